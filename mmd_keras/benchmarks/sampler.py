"""Images/s of the K-step sampler variants beside the bound "K × one UNet forward".

  nice -n 19 python -m mmd_keras.benchmarks sampler --num_steps=5,10 --batch_sizes=1,64

Variants: the eager Python loop of `ddim.sample`, tf.function (traced for the batch's static shape
and, like the exported graphs, for a dynamic batch), tf.function(jit_compile=True), the loaded
SavedModel (`from_noise`) and TFLite float32/float16 (LiteRT, --tflite_threads threads). The bound
is a tf.function'd single UNet forward, timed in the same run, times K. The output starts with a
header line: the command, the TensorFlow version, the weights and the thread counts.
"""

import json
import os
import shlex
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf
from absl import app
from absl import flags

from mmd_keras import checkpoints
from mmd_keras import ddim
from mmd_keras import schedule as schedule_lib
from mmd_keras import unet as unet_lib
from mmd_keras.benchmarks import presets
from mmd_keras.export import sampler_module
from mmd_keras.export import writers

flags.DEFINE_list("num_steps", ["5", "10"], "Step budgets K.")
flags.DEFINE_list("batch_sizes", ["1", "64"], "Batch sizes.")
flags.DEFINE_enum("unet", "fashion", list(presets.PRESETS),
                  "The UNet preset (benchmarks/presets.py): configs/fashion_mnist.cfg's, smaller "
                  "ones, or a tiny 8x8 one (smoke tests).")
flags.DEFINE_string("weights", None, "A .weights.h5 of that UNet (default: random weights).")
flags.DEFINE_integer("tflite_threads", 1, "LiteRT interpreter threads (TF uses its default).",
                     lower_bound=1)
flags.DEFINE_float("min_seconds", 2.0, "Time each variant for at least this long (after a warm-up).")
flags.DEFINE_string("json_out", None, "Also write the results here.")
FLAGS = flags.FLAGS


def _unet():
  unet = unet_lib.UNet(**presets.unet_kwargs(FLAGS.unet)).build_for_inference()
  if FLAGS.weights:
    checkpoints.restore_unet(unet, FLAGS.weights)
  else:  # Zero-initialised output convs would make some kernels trivially cheap.
    rng = np.random.default_rng(0)
    for weight in unet.weights:
      weight.assign(rng.normal(0.0, 0.05, weight.shape).astype(np.float32))
  return unet


def _seconds_per_call(fn):
  """Median seconds of fn() over repeats filling FLAGS.min_seconds, after one warm-up call."""
  fn()
  times = []
  while sum(times) < FLAGS.min_seconds or len(times) < 3:
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def _tflite_runner(path, noise):
  from ai_edge_litert.interpreter import Interpreter  # pylint: disable=g-import-not-at-top
  interpreter = Interpreter(model_path=path, num_threads=FLAGS.tflite_threads)
  index = interpreter.get_input_details()[0]["index"]
  interpreter.resize_tensor_input(index, noise.shape)
  interpreter.allocate_tensors()
  interpreter.set_tensor(index, noise)
  output = interpreter.get_output_details()[0]["index"]
  return lambda: (interpreter.invoke(), interpreter.get_tensor(output))


def _variants(unet, schedule, num_steps, workdir):
  image_shape = [unet.image_size, unet.image_size, unet.channels]
  timesteps = schedule.timesteps(num_steps)
  run = lambda x: ddim.to_uint8(ddim.sample(lambda y, t: unet(y, t), x, timesteps=timesteps,
                                             alphas_cumprod=schedule.alphas_cumprod))
  sampler = sampler_module.Sampler.from_schedule(unet, schedule=schedule, num_steps=num_steps,
                                                 max_images=max(map(int, FLAGS.batch_sizes)))
  saved = writers.write_saved_model(sampler, export_dir=workdir, model_name="bench",
                                    version=num_steps)
  from_noise = tf.saved_model.load(saved).signatures["from_noise"]
  tflite = {fp16: writers.write_tflite(sampler, writers.tflite_path(
      export_dir=workdir, model_name="bench", num_steps=num_steps, float16=fp16), float16=fp16)
            for fp16 in (False, True)}
  return {
      "eager python loop": lambda: run,
      "tf.function": lambda: tf.function(run),
      # The exported graphs take any batch: this isolates what a dynamic batch dimension costs.
      "tf.function dynamic batch": lambda: tf.function(
          run, input_signature=[tf.TensorSpec([None, *image_shape], tf.float32)]),
      "tf.function(jit_compile)": lambda: tf.function(run, jit_compile=True),
      "SavedModel from_noise": lambda: lambda x: from_noise(noise=x)["images"],
      "TFLite float32": lambda: tflite[False],
      "TFLite float16": lambda: tflite[True],
  }


def _measure(name, make, noise):
  try:
    made = make()
    if name.startswith("TFLite"):
      call = _tflite_runner(made, noise.numpy())
    else:
      call = lambda: made(noise).numpy()
    return len(noise) / _seconds_per_call(call)
  except Exception as e:  # XLA on CPU may lack a kernel: report it in the table.
    return f"failed: {type(e).__name__}: {str(e).splitlines()[0][:80]}"


def main():
  app.run(_main)


def _header():
  """What the numbers depend on: the command, TF's version, the weights, the thread counts."""
  command = shlex.join(["python", "-m", "mmd_keras.benchmarks", "sampler", *sys.argv[1:]])
  threads = tf.config.threading.get_intra_op_parallelism_threads() or "default"
  return dict(command=command, tensorflow=tf.__version__, unet=FLAGS.unet,
              weights=FLAGS.weights or "random N(0, 0.05^2)", tf_intra_op_threads=threads,
              cpu_count=os.cpu_count(), tflite_threads=FLAGS.tflite_threads)


def _main(argv):
  del argv
  header = _header()
  print("# " + " | ".join(f"{key}: {value}" for key, value in header.items()), flush=True)
  unet = _unet()
  schedule = schedule_lib.NoiseSchedule.linear()
  forward = tf.function(lambda x: unet(x, tf.fill([tf.shape(x)[0]], 500)))
  results = []
  with tempfile.TemporaryDirectory() as workdir:
    for num_steps in map(int, FLAGS.num_steps):
      variants = _variants(unet, schedule, num_steps, workdir)
      for batch in map(int, FLAGS.batch_sizes):
        noise = tf.random.stateless_normal([batch, unet.image_size, unet.image_size, unet.channels],
                                           seed=[0, batch])
        bound = batch / (num_steps * _seconds_per_call(lambda: forward(noise).numpy()))
        row = dict(num_steps=num_steps, batch=batch, bound=bound)
        for name, make in variants.items():
          row[name] = _measure(name, make, noise)
        results.append(row)
        print(json.dumps(row), flush=True)
  names = ["bound"] + list(variants)
  print("\nimages/s (ratio to the bound K × one UNet forward)")
  print("| K | batch | " + " | ".join(names) + " |")
  print("|---|---|" + "---|" * len(names))
  for row in results:
    cells = [f"{row['bound']:.1f}"] + [
        f"{row[n]:.1f} ({row[n] / row['bound']:.2f})" if isinstance(row[n], float) else row[n]
        for n in names[1:]]
    print(f"| {row['num_steps']} | {row['batch']} | " + " | ".join(cells) + " |")
  print(json.dumps(results))
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(dict(header, results=results), f, indent=2)
