"""Memory and time the unrolled K-step MMD finetuning step costs a user's machine.

  python -m mmd_keras.benchmarks finetune [--configs=fashion,small] [--ks=5,20] [--batch_size=N]
      [--steps=2] [--gradients=replay,tape] [--lora_ranks=0,4,16] [--trees=<name>:<dir>,...]
      [--json_out=<file>]

Each (config, K) variant runs in a fresh Python process, so none inherits another's heap or
graphs. The child builds the config's UNet, `MMDFinetuner` with Adam and a fixed random pixel
projection as feature network (so the unroll, not the features, is measured), runs one step and
then `--steps` timed steps on a fixed real batch, and reports:

- peak RSS: the process's resident-set high-water mark (VmHWM in /proc/self/status), from process
  start to the end of the timed steps: imports, tracing and graph optimisation included. This is
  the memory the machine must hold for the run; nothing is reset (no clear_refs) and glibc is not
  tuned (no MALLOC_* variables), so allocator slack counts as it would for a user.
- RSS after imports: VmRSS once TensorFlow, Keras and the project are imported, before any model;
  the part of the peak that `import tensorflow` alone costs. Then the stages of the peak: VmRSS
  once the UNet and Adam are built, VmHWM once the step is traced (Python builds the graph), and
  once the first step has run (graph optimisation, kernels, the step's tensors).
- first step s: trace, graph optimisation and the first run; step s: the mean of the timed steps.
- TF allocator peak: the peak of TF's CPU allocator over the process, a breakdown of the peak
  RSS, not a substitute: it counts tensor buffers only (and, in TF 2.21, none under ~256 KiB, so
  it is near zero for `tiny`); the rest is the interpreter, libraries, graphs and allocator slack.
  null where TF does not track it.

Configs: `fashion` is configs/fashion_mnist.cfg's UNet at batch 64; `small` the same with one res
block per level and no attention, at batch 32; `tiny` an 8-px UNet at batch 4 (for the tests).
Their dropout is off while finetuning (the finetuner's default). `--batch_size` overrides the
config's batch.

`--gradients` names how the step's gradient is taken, one variant each: `replay` (the default,
`recompute=True`: one UNet call's activations alive at a time) and `tape` (`recompute=False`,
main.py's `--norecompute`: one tape over all K calls).

`--lora_ranks` lists how many weights train, one variant each: 0 (every weight, the default) or
the rank R of low-rank adapters on every layer (main.py's `--lora_rank`); each row also reports
the trained parameters (what Adam keeps two more copies of, and what the run saves: the whole UNet,
or the adapters' file).

`--trees=ref:<dir>` also measures the code of another checkout of this repository: its directory
is first on the child's PYTHONPATH, so `import mmd_keras` loads that code while the child script is
this file (it uses only APIs both trees have); scripts/compare_finetune_step.py makes such a
checkout of any git revision. The variants alternate, the other trees then this one for each config
and K, so machine noise hits them alike (and so do the gradients' variants). The output is a header
line (command, date, commits, TensorFlow, CPUs), a table per config (with more than one variant,
each one's step-time speed-up over the first variant's), the ratios peak RSS at the largest K over
the smallest per config and variant, and a JSON line with all of it; progress goes to stderr.
"""

import datetime
import json
import os
import pathlib
import shlex
import subprocess
import sys

from absl import flags

from mmd_keras.benchmarks import cli
from mmd_keras.benchmarks import presets

REPO = cli.REPO
CHILD = pathlib.Path(__file__).with_name("finetune_child.py")

# --gradients names -> MMDFinetuner's `recompute`.
GRADIENTS = dict(replay=True, tape=False)

FLAGS = flags.FlagValues()
cli.define_names("configs", "fashion,small", tuple(presets.PRESETS),
                 "UNet presets (benchmarks/presets.py) to measure.", noun="config",
                 flag_values=FLAGS)
cli.define_positive_ints("ks", "5,20", "Step budgets K.", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", None, "Images per step (default: the preset's).", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("steps", 2, "Timed steps after the first.", lower_bound=1, flag_values=FLAGS)
cli.define_names("gradients", "replay", tuple(GRADIENTS),
                 "How the gradient is taken (replay: --recompute, tape: --norecompute).",
                 noun="gradient", flag_values=FLAGS)
flags.DEFINE_string("lora_ranks", "0", "Adapter ranks to measure (0: every weight trains).",
                    flag_values=FLAGS)
flags.register_validator("lora_ranks", lambda text: cli.ints_at_least(text, 0) is not None,
                         message="expected comma-separated integers >= 0", flag_values=FLAGS)
flags.DEFINE_string("trees", "", "Other checkouts of this repository to measure too, as "
                    "<name>:<dir> (e.g. from scripts/compare_finetune_step.py).", flag_values=FLAGS)
flags.DEFINE_string("json_out", None, "Also write the report here.", flag_values=FLAGS)
flags.register_validator(
    "json_out", lambda path: path is None or os.path.isdir(os.path.dirname(os.path.abspath(path))),
    message="expected a file in an existing directory", flag_values=FLAGS)


def _trees(text):
  """{name: Path} of --trees, then "current": this repository; exits on a bad entry."""
  trees = {}
  for entry in filter(None, text.split(",")):
    name, colon, path = entry.partition(":")
    checkout = os.path.isdir(os.path.join(path, "mmd_keras"))
    if not (colon and name and name != "current" and checkout):
      sys.exit(f"error: flag --trees={text}: expected <name>:<dir> entries, each dir a checkout "
               f"of this repository (with mmd_keras/) and no name 'current'; got {entry!r}")
    trees[name] = pathlib.Path(path)
  return {**trees, "current": REPO}


# (row key, column title, format) of the tables.
COLUMNS = (("step_s", "step s", ".2f"), ("peak_rss_mib", "peak RSS MiB", ".0f"),
           ("trained_params", "trained parameters", "d"),
           ("first_step_s", "first step s", ".1f"),
           ("rss_after_imports_mib", "RSS after imports MiB", ".0f"),
           ("rss_after_model_mib", "RSS after model MiB", ".0f"),
           ("rss_after_trace_mib", "peak RSS after tracing MiB", ".0f"),
           ("rss_after_first_step_mib", "peak RSS after first step MiB", ".0f"),
           ("tf_allocator_peak_mib", "TF allocator peak MiB", ".0f"))


def _run_child(*, tree, config, k, batch_size, steps, recompute, lora_rank=0):
  """One variant's figures, measured in a fresh process that imports mmd_keras from `tree`."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
  # The architecture is resolved here, by this tree: an older tree's child builds the same UNet.
  spec = json.dumps(dict(config=config, unet=presets.unet_kwargs(config), k=k,
                         batch_size=batch_size, steps=steps, tree=str(tree), recompute=recompute,
                         **({"lora_rank": lora_rank} if lora_rank else {})))
  # -P keeps this file's directory off sys.path: PYTHONPATH alone decides which mmd_keras loads.
  result = subprocess.run([sys.executable, "-P", str(CHILD), spec],
                          cwd=tree, env=env, capture_output=True, text=True)
  if result.returncode != 0:
    sys.exit(f"error: the {config} K={k} child on {tree} failed with exit code "
             f"{result.returncode}:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.splitlines()[-1])


def variant_names(trees, gradients, lora_ranks=(0,)):
  """{variant name: (tree name, gradient, adapter rank)}: the tree's name, then the gradient where
  more than one is measured, then "full" or "lora<R>" where more than one rank is (so a run of two
  trees keeps their names, e.g. "ref" and "current")."""
  names = {}
  for tree in trees:
    for gradient in gradients:
      for rank in lora_ranks:
        parts = [tree, *([gradient] if len(gradients) > 1 else []),
                 *([f"lora{rank}" if rank else "full"] if len(lora_ranks) > 1 else [])]
        names[" ".join(parts)] = (tree, gradient, rank)
  return names


def _measure(*, configs, ks, gradients, lora_ranks, trees, commits):
  """Every variant's row, the variants alternating for each config and K."""
  variants = variant_names(trees, gradients, lora_ranks)
  runs = [(config, k, name) for config in configs for k in ks for name in variants]
  rows = []
  for index, (config, k, name) in enumerate(runs, 1):
    tree, gradient, rank = variants[name]
    batch_size = FLAGS.batch_size or presets.PRESETS[config].batch_size
    print(f"[{index}/{len(runs)}] {config} K={k} batch {batch_size} {name} "
          f"({commits[tree]}) ...", end="", file=sys.stderr, flush=True)
    figures = _run_child(tree=trees[tree], config=config, k=k, batch_size=batch_size,
                         steps=FLAGS.steps, recompute=GRADIENTS[gradient], lora_rank=rank)
    print(f" {figures['step_s']:.2f} s/step, peak RSS {figures['peak_rss_mib']:.0f} MiB, "
          f"first step {figures['first_step_s']:.1f} s", file=sys.stderr, flush=True)
    rows.append(dict(config=config, k=k, batch_size=batch_size, steps=FLAGS.steps, tree=tree,
                     gradient=gradient, lora_rank=rank, variant=name, commit=commits[tree],
                     **figures))
  return rows


def _cell(value, spec):
  return "null" if value is None else format(value, spec)


def _print_tables(rows, *, configs, ks, variants):
  """One table per config, a column per name of `variants`, the first the speed-ups' baseline."""
  by = {(row["config"], row["k"], row["variant"]): row for row in rows}
  compare = len(variants) > 1
  for config in configs:
    first = by[(config, ks[0], variants[-1])]
    print(f"\n{config}: batch {first['batch_size']}; step s: the mean of the {first['steps']} "
          f"timed step(s) after the first")
    titles = ["K"]
    for key, title, _ in COLUMNS:
      titles += [f"{title} {name}" for name in variants] if compare else [title]
      if key == "step_s" and compare:
        titles += [f"speed-up {variants[0]}/{name}" for name in variants[1:]]
    print("| " + " | ".join(titles) + " |")
    print("|" + "---|" * len(titles))
    for k in ks:
      cells = [str(k)]
      for key, _, spec in COLUMNS:
        cells += [_cell(by[(config, k, name)].get(key), spec) for name in variants]
        if key == "step_s" and compare:
          base = by[(config, k, variants[0])]["step_s"]
          cells += [f"{base / by[(config, k, name)]['step_s']:.2f}" for name in variants[1:]]
      print("| " + " | ".join(cells) + " |")


def _ratios(rows, *, configs, ks, variants):
  """peak RSS(K = max) / peak RSS(K = min) per config and variant: how the unroll's memory grows."""
  if len(ks) < 2:
    return []
  by = {(row["config"], row["k"], row["variant"]): row["peak_rss_mib"] for row in rows}
  return [dict(config=config, variant=name, k_min=min(ks), k_max=max(ks),
               peak_rss_ratio=by[(config, max(ks), name)] / by[(config, min(ks), name)])
          for config in configs for name in variants]


def main():
  argv = sys.argv[1:]
  cli.parse(FLAGS, argv)
  configs, ks = cli.names(FLAGS.configs), list(dict.fromkeys(cli.positive_ints(FLAGS.ks)))
  gradients = cli.names(FLAGS.gradients)
  lora_ranks = list(dict.fromkeys(cli.ints_at_least(FLAGS.lora_ranks, 0)))
  trees = _trees(FLAGS.trees)
  commits = {name: cli.commit(tree) for name, tree in trees.items()}
  header = dict(command=shlex.join(["python", "-m", "mmd_keras.benchmarks", "finetune", *argv]),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                commit=commits["current"], tensorflow=cli.tensorflow_version(), cpus=os.cpu_count(),
                **{f"tree {name}": f"{trees[name]} ({commits[name]})" for name in trees
                   if name != "current"})
  print("# " + " | ".join(f"{key}: {value}" for key, value in header.items()), flush=True)
  rows = _measure(configs=configs, ks=ks, gradients=gradients, lora_ranks=lora_ranks, trees=trees,
                  commits=commits)
  names = list(variant_names(trees, gradients, lora_ranks))
  _print_tables(rows, configs=configs, ks=ks, variants=names)
  ratios = _ratios(rows, configs=configs, ks=ks, variants=names)
  if ratios:
    print(f"\npeak RSS(K={max(ks)}) / peak RSS(K={min(ks)}): " + ", ".join(
        f"{r['config']} {r['variant']} {r['peak_rss_ratio']:.2f}" for r in ratios))
  report = dict(header, rows=rows, ratios=ratios)
  print(json.dumps(report))
  if FLAGS.json_out is not None:
    with open(FLAGS.json_out, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  main()
