#!/usr/bin/env python3
"""The finetuning step of another git revision beside this checkout's, in one benchmark run:

  python scripts/compare_finetune_step.py REV [benchmark flags, e.g. --configs=fashion --ks=5]

makes a temporary detached worktree of REV, runs `python -m mmd_keras.benchmarks finetune
--trees=ref:<worktree> ...` (the variants alternate, ref then current, for each config and K) and
removes the worktree afterwards, also on error.
"""

import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args):
  return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)


def main():
  if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
    sys.exit("usage: python scripts/compare_finetune_step.py REV [benchmark flags]")
  rev, flags = sys.argv[1], sys.argv[2:]
  resolved = _git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
  if resolved.returncode != 0:
    sys.exit(f"error: {rev}: expected a git revision of {REPO}; git cannot resolve it")
  commit = resolved.stdout.strip()
  parent = tempfile.mkdtemp(prefix="mmd_keras_bench_")
  tree = os.path.join(parent, commit[:12])
  try:
    added = _git("worktree", "add", "--detach", tree, commit)
    if added.returncode != 0:
      sys.exit(f"error: git worktree add {commit} failed: {added.stderr.strip()}")
    sys.exit(subprocess.call([sys.executable, "-m", "mmd_keras.benchmarks", "finetune",
                              f"--trees=ref:{tree}", *flags], cwd=REPO))
  finally:
    _git("worktree", "remove", "--force", tree)
    shutil.rmtree(parent, ignore_errors=True)


if __name__ == "__main__":
  main()
