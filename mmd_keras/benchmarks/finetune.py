"""Memory and time the unrolled K-step MMD finetuning step costs a user's machine.

  python -m mmd_keras.benchmarks finetune [--configs=fashion,small] [--ks=5,20] [--batch_size=N]
      [--steps=2] [--gradients=replay,tape] [--compare_ref=<git rev>] [--json_out=<file>]

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

`--compare_ref=<rev>` also measures another git revision of the code: a temporary detached
worktree of <rev> is first on the child's PYTHONPATH, so `import mmd_keras` loads the old code
while the child script is this file (it uses only APIs both trees have). The variants alternate,
ref then current for each config and K, so machine noise hits both alike (and so do the
gradients' variants). The output is a header line (command, date, commit, TensorFlow, CPUs), a
table per config (with more than one variant, each one's step-time speed-up over the first
variant's), the ratios peak RSS at the largest K over the smallest per config and variant, and a
JSON line with all of it; progress goes to stderr.
"""

import collections
import contextlib
import datetime
import importlib.metadata
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]
FEATURE_DIM = 256



def _presets():
  """benchmarks.presets, imported by the parent only: a child of an older tree has none."""
  from mmd_keras.benchmarks import presets  # pylint: disable=import-outside-toplevel
  return presets


Options = collections.namedtuple("Options",
                                 "configs ks batch_size steps gradients compare_ref json_out")
DEFAULTS = dict(configs="fashion,small", ks="5,20", batch_size=None, steps="2", gradients="replay",
                compare_ref=None, json_out=None)
# --gradients names -> MMDFinetuner's `recompute`.
GRADIENTS = dict(replay=True, tape=False)

# (row key, column title, format) of the tables.
COLUMNS = (("step_s", "step s", ".2f"), ("peak_rss_mib", "peak RSS MiB", ".0f"),
           ("first_step_s", "first step s", ".1f"),
           ("rss_after_imports_mib", "RSS after imports MiB", ".0f"),
           ("rss_after_model_mib", "RSS after model MiB", ".0f"),
           ("rss_after_trace_mib", "peak RSS after tracing MiB", ".0f"),
           ("rss_after_first_step_mib", "peak RSS after first step MiB", ".0f"),
           ("tf_allocator_peak_mib", "TF allocator peak MiB", ".0f"))


def _status_mib(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024  # The kernel reports kB.
  raise KeyError(field)


def _child(*, config, unet, k, batch_size, steps, tree, recompute):
  """Measures one variant in this fresh process; prints its figures as one JSON line."""
  import mmd_keras
  if pathlib.Path(mmd_keras.__file__).resolve().parents[1] != pathlib.Path(tree).resolve():
    sys.exit(f"error: mmd_keras was imported from {mmd_keras.__file__}, not from {tree}")
  import keras
  import numpy as np
  import tensorflow as tf

  from mmd_keras import finetune
  from mmd_keras import mmd
  from mmd_keras import schedule as schedule_lib
  from mmd_keras import unet as unet_lib

  rss_after_imports = _status_mib("VmRSS")
  del config  # Named in the spec for error messages; `unet` holds its architecture.
  unet = unet_lib.UNet(**unet).build_for_inference()
  image_shape = [unet.image_size, unet.image_size, unet.channels]
  dim = int(np.prod(image_shape))
  projection = tf.constant(
      np.random.default_rng(0).normal(size=[dim, FEATURE_DIM]) / np.sqrt(dim), tf.float32)
  trainer = finetune.MMDFinetuner(
      unet, feature_net=lambda images: tf.reshape(images, [-1, dim]) @ projection,
      schedule=schedule_lib.NoiseSchedule.linear(), num_steps=k,
      kernel=mmd.make_kernel("polynomial"), grad_clip=0.5, recompute=recompute)
  trainer.compile(optimizer=keras.optimizers.Adam(5e-6))
  trainer.optimizer.build(unet.trainable_weights)
  step = tf.function(trainer.train_step)
  x_real = tf.constant(np.random.default_rng(1).uniform(-1.0, 1.0, [batch_size, *image_shape]),
                       tf.float32)
  rss_after_model = _status_mib("VmRSS")
  start = time.perf_counter()
  # Tracing alone first (Python builds the graph), so the peak can be split into its stages.
  step.get_concrete_function(x_real)
  rss_after_trace = _status_mib("VmHWM")
  float(step(x_real)["mmd2"])  # Reading the result waits for the step to finish.
  first_step_s = time.perf_counter() - start
  rss_after_first_step = _status_mib("VmHWM")
  start = time.perf_counter()
  for _ in range(steps):
    float(step(x_real)["mmd2"])
  step_s = (time.perf_counter() - start) / steps
  peak_rss = _status_mib("VmHWM")
  try:
    allocator_peak = tf.config.experimental.get_memory_info("CPU:0")["peak"] / 2**20
  except ValueError:  # This build's CPU allocator does not track its peak.
    allocator_peak = None
  print(json.dumps(dict(rss_after_imports_mib=rss_after_imports, peak_rss_mib=peak_rss,
                        first_step_s=first_step_s, step_s=step_s,
                        tf_allocator_peak_mib=allocator_peak,
                        rss_after_model_mib=rss_after_model, rss_after_trace_mib=rss_after_trace,
                        rss_after_first_step_mib=rss_after_first_step)))


def _git(*args):
  return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True)


def _ints(option, text, *, single):
  try:
    values = [int(value) for value in text.split(",")]
  except ValueError:
    values = []
  if not values or min(values) < 1 or (single and len(values) > 1):
    expected = "an integer >= 1" if single else "comma-separated integers >= 1"
    sys.exit(f"error: --{option}={text}: expected {expected}")
  return values


def _names(option, text, known, *, noun):
  """The distinct comma-separated names of `text`, in order; exits with a one-line error naming the
  first one not in `known`."""
  names = list(dict.fromkeys(text.split(",")))
  unknown = [name for name in names if name not in known]
  if unknown:
    sys.exit(f"error: --{option}={text}: unknown {noun} {unknown[0]!r}; expected names from "
             f"{', '.join(known)}")
  return names


def _parse(argv):
  """Options from `--name=value` arguments; exits with a one-line error on bad input."""
  options = dict(DEFAULTS)
  for arg in argv:
    name, equals, value = arg.partition("=")
    if name.startswith("--") and name[2:] in options and not equals:
      sys.exit(f"error: {name}: expected {name}=<value>")
    if not (name.startswith("--") and name[2:] in options):
      sys.exit(f"error: unknown option {arg!r}; expected --name=value, name one of "
               f"{', '.join(options)}")
    options[name[2:]] = value
  configs = _names("configs", options["configs"], _presets().PRESETS, noun="config")
  gradients = _names("gradients", options["gradients"], GRADIENTS, noun="gradient")
  batch_size = options["batch_size"]
  if batch_size is not None:
    [batch_size] = _ints("batch_size", batch_size, single=True)
  json_out = options["json_out"]
  if json_out is not None and not os.path.isdir(os.path.dirname(os.path.abspath(json_out))):
    sys.exit(f"error: --json_out={json_out}: expected a file in an existing directory")
  return Options(configs=configs, ks=list(dict.fromkeys(_ints("ks", options["ks"], single=False))),
                 batch_size=batch_size, steps=_ints("steps", options["steps"], single=True)[0],
                 gradients=gradients,
                 compare_ref=options["compare_ref"], json_out=json_out)


def _resolve(rev):
  """The full commit hash of `rev`; exits with a one-line error if git cannot resolve it."""
  result = _git("rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}")
  if result.returncode != 0:
    sys.exit(f"error: --compare_ref={rev}: expected a git revision of {REPO}; git cannot "
             "resolve it")
  return result.stdout.strip()


def current_commit():
  head = _git("rev-parse", "--short", "HEAD").stdout.strip() or "unknown"
  # Uncommitted changes to tracked files are measured too: say so.
  return head + ("-dirty" if _git("status", "--porcelain", "--untracked-files=no").stdout else "")


def _tensorflow_version():
  """The installed TensorFlow's version, read without importing it (the parent stays small)."""
  distributions = importlib.metadata.packages_distributions().get("tensorflow")
  return importlib.metadata.version(distributions[0]) if distributions else "not installed"


@contextlib.contextmanager
def _worktree(commit):
  """A temporary detached git worktree of `commit`, removed on exit, also on error."""
  parent = tempfile.mkdtemp(prefix="mmd_keras_bench_")
  path = os.path.join(parent, commit[:12])
  try:
    result = _git("worktree", "add", "--detach", path, commit)
    if result.returncode != 0:
      sys.exit(f"error: git worktree add {commit} failed: {result.stderr.strip()}")
    yield pathlib.Path(path)
  finally:
    _git("worktree", "remove", "--force", path)
    shutil.rmtree(parent, ignore_errors=True)


def _run_child(*, tree, config, k, batch_size, steps, recompute):
  """One variant's figures, measured in a fresh process that imports mmd_keras from `tree`."""
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      filter(None, [str(tree), os.environ.get("PYTHONPATH")])))
  # The architecture is resolved here, by this tree: an older tree's child builds the same UNet.
  spec = json.dumps(dict(config=config, unet=_presets().unet_kwargs(config), k=k,
                         batch_size=batch_size, steps=steps, tree=str(tree), recompute=recompute))
  # -P keeps this file's directory off sys.path: PYTHONPATH alone decides which mmd_keras loads.
  result = subprocess.run([sys.executable, "-P", os.path.abspath(__file__), "--child", spec],
                          cwd=tree, env=env, capture_output=True, text=True)
  if result.returncode != 0:
    sys.exit(f"error: the {config} K={k} child on {tree} failed with exit code "
             f"{result.returncode}:\n{result.stderr[-3000:]}")
  return json.loads(result.stdout.splitlines()[-1])


def variant_names(trees, gradients):
  """{variant name: (tree name, gradient)}: the tree's name alone while one gradient is measured
  (so a --compare_ref run keeps its "ref" and "current"), else "<tree> <gradient>"."""
  return {(tree if len(gradients) == 1 else f"{tree} {gradient}"): (tree, gradient)
          for tree in trees for gradient in gradients}


def _measure(options, *, trees, commits):
  """Every variant's row, the variants alternating for each config and K."""
  variants = variant_names(trees, options.gradients)
  runs = [(config, k, name) for config in options.configs for k in options.ks
          for name in variants]
  rows = []
  for index, (config, k, name) in enumerate(runs, 1):
    tree, gradient = variants[name]
    batch_size = options.batch_size or _presets().PRESETS[config].batch_size
    print(f"[{index}/{len(runs)}] {config} K={k} batch {batch_size} {name} "
          f"({commits[tree]}) ...", end="", file=sys.stderr, flush=True)
    figures = _run_child(tree=trees[tree], config=config, k=k, batch_size=batch_size,
                         steps=options.steps, recompute=GRADIENTS[gradient])
    print(f" {figures['step_s']:.2f} s/step, peak RSS {figures['peak_rss_mib']:.0f} MiB, "
          f"first step {figures['first_step_s']:.1f} s", file=sys.stderr, flush=True)
    rows.append(dict(config=config, k=k, batch_size=batch_size, steps=options.steps, tree=tree,
                     gradient=gradient, variant=name, commit=commits[tree], **figures))
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
        cells += [_cell(by[(config, k, name)][key], spec) for name in variants]
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
  options = _parse(argv)
  commits = {"current": current_commit()}
  if options.compare_ref is not None:
    ref_commit = _resolve(options.compare_ref)
    commits = {"ref": _git("rev-parse", "--short", ref_commit).stdout.strip(), **commits}
  header = dict(command=shlex.join(["python", "-m", "mmd_keras.benchmarks", "finetune", *argv]),
                date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                commit=commits["current"], tensorflow=_tensorflow_version(), cpus=os.cpu_count())
  if options.compare_ref is not None:
    header["compare_ref"] = f"{options.compare_ref} ({commits['ref']})"
  print("# " + " | ".join(f"{key}: {value}" for key, value in header.items()), flush=True)
  with contextlib.ExitStack() as stack:
    trees = {"current": REPO}
    if options.compare_ref is not None:
      trees = {"ref": stack.enter_context(_worktree(ref_commit)), **trees}
    rows = _measure(options, trees=trees, commits=commits)
  names = list(variant_names(trees, options.gradients))
  _print_tables(rows, configs=options.configs, ks=options.ks, variants=names)
  ratios = _ratios(rows, configs=options.configs, ks=options.ks, variants=names)
  if ratios:
    print(f"\npeak RSS(K={max(options.ks)}) / peak RSS(K={min(options.ks)}): " + ", ".join(
        f"{r['config']} {r['variant']} {r['peak_rss_ratio']:.2f}" for r in ratios))
  report = dict(header, rows=rows, ratios=ratios)
  print(json.dumps(report))
  if options.json_out is not None:
    with open(options.json_out, "w") as f:
      json.dump(report, f, indent=2)


if __name__ == "__main__":
  # Children run this file by path (see _run_child), against the tree PYTHONPATH names.
  if sys.argv[1:2] == ["--child"]:
    _child(**json.loads(sys.argv[2]))
  else:
    main()
