"""One variant of `benchmarks/finetune.py`, measured in a fresh process: run by path with the tree
to measure first on PYTHONPATH, so it imports nothing of this tree but what that tree has
(`python -P finetune_child.py '<JSON spec>'`); prints its figures as one JSON line."""

import json
import pathlib
import sys
import time

FEATURE_DIM = 256


def _status_mib(field):
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024  # The kernel reports kB.
  raise KeyError(field)


def _child(*, config, unet, k, batch_size, steps, tree, recompute, lora_rank=0):
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
  if lora_rank:
    from mmd_keras import adapters  # Only trees that have adapters are asked for them.
    adapters.enable(unet, lora_rank)
  trained_params = int(sum(np.prod(w.shape) for w in unet.trainable_weights))
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
                        trained_params=trained_params,
                        first_step_s=first_step_s, step_s=step_s,
                        tf_allocator_peak_mib=allocator_peak,
                        rss_after_model_mib=rss_after_model, rss_after_trace_mib=rss_after_trace,
                        rss_after_first_step_mib=rss_after_first_step)))


if __name__ == "__main__":
  _child(**json.loads(sys.argv[1]))
