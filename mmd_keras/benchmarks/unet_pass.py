"""Where a finetuning step's time goes: one UNet call, forward and forward + backward.

  python -m mmd_keras.benchmarks unet_pass [--config=fashion] [--batch_size=N] [--repeats=5]

A replayed finetuning step (`replay.py`) runs K − 1 forwards without a tape, then K forward +
backward passes (the last step's under the loss tape, the K − 1 replays): time ≈ (K − 1)·F + K·V,
F one forward and V one forward + backward of the UNet at the batch. Keeping every call's
activations instead (`--norecompute`) would cost K·V, so (K − 1)·F is all that the replay can lose
and any variant of the same float32 kernels can win. This prints, for the config's UNet at its
finetuning batch (configs of `benchmarks/finetune.py`):

- F and V as a plain graph, with XLA (`jit_compile`) and under Keras' mixed_bfloat16 policy
  (bfloat16 convolutions where the CPU has them), each timed as the median of `--repeats` calls
  after two warm-up calls;
- the step-time model above for K = 5 and 20 and its floor K·V;
- the TF profiler's breakdown of V (plain graph) by op type: which kernels the time is spent in.
"""

import collections
import datetime
import glob
import json
import os
import sys
import tempfile
import time

import numpy as np

from absl import flags

from mmd_keras.benchmarks import cli
from mmd_keras.benchmarks import presets

FLAGS = flags.FlagValues()
flags.DEFINE_enum("config", "fashion", list(presets.PRESETS),
                  "UNet preset (benchmarks/presets.py).", flag_values=FLAGS)
flags.DEFINE_integer("batch_size", None,
                     "Images per call (default: the preset's finetuning batch).", lower_bound=1,
                     flag_values=FLAGS)
flags.DEFINE_integer("repeats", 5, "Timed calls per pass (the median is shown).", lower_bound=1,
                     flag_values=FLAGS)


def _median_seconds(fn, repeats):
  fn(), fn()  # Trace, compile, warm up.
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _passes(config, batch_size, policy):
  """(forward, forward + backward) of the config's UNet as `tf.function`s over a fixed batch."""
  import keras
  import tensorflow as tf

  from mmd_keras import unet as unet_lib

  keras.mixed_precision.set_global_policy(policy)
  unet = unet_lib.UNet(**presets.unet_kwargs(config)).build_for_inference()
  keras.mixed_precision.set_global_policy("float32")
  rng = np.random.default_rng(0)
  shape = [batch_size, unet.image_size, unet.image_size, unet.channels]
  x = tf.constant(rng.normal(size=shape), tf.float32)
  t = tf.constant(rng.integers(0, 1000, batch_size), tf.int32)
  weights = unet.trainable_weights

  def forward():
    return tf.cast(unet(x, t), tf.float32)

  def forward_backward():
    with tf.GradientTape() as tape:
      tape.watch(x)
      eps = forward()
    return tape.gradient(eps, [x, *weights], output_gradients=x)
  return forward, forward_backward


def _op_breakdown(fn):
  """{op type: seconds} of one call of `fn`, from the TF profiler's host trace."""
  import tensorflow as tf
  from tensorflow.tsl.profiler.protobuf import xplane_pb2

  with tempfile.TemporaryDirectory() as logdir:
    tf.profiler.experimental.start(logdir)
    fn()
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(glob.glob(os.path.join(logdir, "**", "*.xplane.pb"), recursive=True)[0], "rb") as f:
      space.ParseFromString(f.read())
  seconds = collections.Counter()
  for plane in space.planes:
    for line in plane.lines:
      # Op kernels run on TF's compute threads (inter-op) and Eigen's pool (intra-op).
      if not line.name.startswith(("tf_Compute", "tf_numa")):
        continue
      for event in line.events:
        name = plane.event_metadata[event.metadata_id].name
        op_type = name.rsplit(":", 1)[-1]
        # Kernels are "<node name>:<op type>"; "Process" spans the whole function's run.
        if ":" in name and op_type != "Process":
          seconds[op_type] += event.duration_ps * 1e-12
  return seconds


def main():
  cli.parse(FLAGS, sys.argv[1:])
  config, repeats = FLAGS.config, FLAGS.repeats
  batch_size = FLAGS.batch_size or presets.PRESETS[config].batch_size
  import tensorflow as tf

  command = " ".join(["python -m mmd_keras.benchmarks unet_pass", *sys.argv[1:]])
  header = dict(command=command, date=datetime.datetime.now().isoformat(timespec="seconds"),
                commit=cli.commit(), tensorflow=tf.__version__,
                cpus=os.cpu_count(), config=config, batch_size=batch_size)
  print("# " + " | ".join(f"{k}: {v}" for k, v in header.items()))
  variants = collections.OrderedDict()
  for name, policy, jit in (("float32 graph", "float32", False), ("XLA", "float32", True),
                            ("mixed_bfloat16 graph", "mixed_bfloat16", False)):
    forward, forward_backward = _passes(config, batch_size, policy)
    variants[name] = dict(
        forward_s=_median_seconds(tf.function(forward, jit_compile=jit), repeats),
        forward_backward_s=_median_seconds(tf.function(forward_backward, jit_compile=jit),
                                           repeats))
    print(f"  {name}: F {variants[name]['forward_s']:.3f} s, "
          f"V {variants[name]['forward_backward_s']:.3f} s", file=sys.stderr)
  base = variants["float32 graph"]
  print(f"| {config} UNet, batch {batch_size} | F s | V s | F vs float32 | V vs float32 |")
  print("|---|---|---|---|---|")
  for name, row in variants.items():
    print(f"| {name} | {row['forward_s']:.3f} | {row['forward_backward_s']:.3f} | "
          f"{base['forward_s'] / row['forward_s']:.2f}x | "
          f"{base['forward_backward_s'] / row['forward_backward_s']:.2f}x |")
  model = {}
  for k in (5, 20):
    replayed = (k - 1) * base["forward_s"] + k * base["forward_backward_s"]
    floor = k * base["forward_backward_s"]
    model[k] = dict(replayed_s=replayed, all_activations_kept_s=floor)
    print(f"K={k}: replayed step ≈ (K−1)·F + K·V = {replayed:.2f} s; keeping all K calls' "
          f"activations: K·V = {floor:.2f} s, at most {replayed / floor:.2f}x faster")
  ops = _op_breakdown(tf.function(_passes(config, batch_size, "float32")[1]))
  total = sum(ops.values())
  print(f"op time of one V (float32 graph, summed over threads: {total:.3f} s):")
  for op, seconds in ops.most_common(12):
    print(f"  {op:44s} {seconds:7.3f} s  {100 * seconds / total:5.1f} %")
  print(json.dumps(dict(header, variants=variants, step_model=model,
                        op_seconds=dict(ops.most_common()))))


if __name__ == "__main__":
  main()
