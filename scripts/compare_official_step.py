"""One MMD finetuning step of the paper's PyTorch code beside ours, on the same work and host.

  python scripts/compare_official_step.py GIT_DIR TORCH_PYTHON [--ks=5,20] [--steps=3]

GIT_DIR is a git directory of diegovalsesia/MMD-DDM (a clone or mirror), TORCH_PYTHON a Python with
torch (a side virtual environment: torch is never in requirements.txt). The timing scripts are
../shared/bench/{official_step,project_step}.py (see its README): the fashion UNet (ch 32, ch_mult
1,2,2, two res blocks, attention at 7 px), batch 64, a fixed random pixel projection as the
features, polynomial MMD², Adam + clip 0.5. Each variant runs in its own process, alternating
sides, so machine noise hits both alike. Variants: the gradient recomputed per step (PyTorch's
checkpoint, our replay) at every K, one tape over all K calls at the smallest K. Prints a table of
seconds per step (median), process peak RSS and the ratios, then a JSON line.
"""

import argparse
import json
import os
import pathlib
import re
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parent.parent
BENCH = REPO.parent / "shared" / "bench"
UNET = ["--ch", "32", "--ch_mult", "1,2,2", "--res_blocks", "2", "--attn", "7", "--batch", "64"]
LINE = re.compile(r"step_s median ([0-9.]+) .* maxrss_MB ([0-9]+)")


def _run(command, *, cwd):
  print("+ " + " ".join(command), file=sys.stderr, flush=True)
  result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
  found = LINE.search(result.stdout)
  if result.returncode or not found:
    sys.exit(f"error: {' '.join(command)} failed (exit {result.returncode}): "
             f"{(result.stderr or result.stdout).strip().splitlines()[-1:]}")
  return dict(step_s=float(found.group(1)), peak_rss_mb=int(found.group(2)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("git_dir")
  parser.add_argument("torch_python")
  parser.add_argument("--ks", default="5,20")
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  if not os.path.isdir(args.git_dir):
    sys.exit(f"error: GIT_DIR {args.git_dir} is not a directory (expected a git directory of "
             f"diegovalsesia/MMD-DDM)")
  ks = [int(k) for k in args.ks.split(",")]
  steps = ["--steps", str(args.steps)]
  rows = []
  for k in ks:
    gradients = ["recomputed", "one tape"] if k == min(ks) else ["recomputed"]
    for gradient in gradients:
      tape = gradient == "one tape"
      theirs = _run([args.torch_python, str(BENCH / "official_step.py"), args.git_dir, *UNET,
                     "--K", str(k), *steps, *(["--no_checkpoint"] if tape else [])], cwd=REPO)
      ours = _run([sys.executable, str(BENCH / "project_step.py"), *UNET, "--K", str(k), *steps,
                   *(["--no_recompute"] if tape else [])], cwd=REPO)
      rows.append(dict(k=k, gradient=gradient, official=theirs, ours=ours,
                       speed_ours_over_official=theirs["step_s"] / ours["step_s"],
                       rss_ours_over_official=ours["peak_rss_mb"] / theirs["peak_rss_mb"]))
  print("| K, gradient | official PyTorch: step s, peak RSS MB | ours | speed ours/theirs "
        "| RSS ours/theirs |")
  print("|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['k']}, {r['gradient']} | {r['official']['step_s']:.2f}, "
          f"{r['official']['peak_rss_mb']} | {r['ours']['step_s']:.2f}, {r['ours']['peak_rss_mb']} "
          f"| {r['speed_ours_over_official']:.2f}x | {r['rss_ours_over_official']:.2f}x |")
  print(json.dumps(dict(rows=rows)))


if __name__ == "__main__":
  main()
