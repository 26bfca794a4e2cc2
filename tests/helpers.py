"""What several test modules share: tiny models, the Gaussian ε-oracle, the finetuning setup,
main.py as a subprocess, TensorBoard events, and a test file run as a script in its own process.

Test modules import these (`from helpers import ...`); no test module imports another. conftest.py
holds only fixtures and pytest hooks.
"""

import os
import pathlib
import subprocess
import sys

import keras
import numpy as np
import tensorflow as tf

from mmd_keras import checkpoints
from mmd_keras import finetune
from mmd_keras import mmd
from mmd_keras import schedule as schedule_lib
from mmd_keras import unet as unet_lib
from mmd_keras.benchmarks import presets

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent
# configs/fashion_mnist.cfg's UNet, the architecture of the bundled base model, read from it.
FASHION_UNET = presets.unet_kwargs("fashion")

# The flags of a UNet small enough for end-to-end runs of main.py (8 px, T = 20).
TINY_UNET = ["--image_size=8", "--ch=32", "--ch_mult=1,2", "--num_res_blocks=1",
             "--attn_resolutions=", "--dropout=0", "--num_timesteps=20"]

# make_finetuner's setting. T = 100 keeps sqrt(ᾱ_T) ≈ 0.6: x̂0 of an untrained UNet stays O(1)
# without clipping.
FINETUNER_IMAGE_SIZE = 8
FINETUNER_SCHEDULE = schedule_lib.NoiseSchedule.linear(num_timesteps=100)


def tiny_unet(*, image_size=8, channels=1, dropout=0.0, attn_resolutions=()):
  """A UNet small enough for unit tests: ch 32, two levels, one block each."""
  return unet_lib.UNet(image_size=image_size, channels=channels, ch=32, ch_mult=(1, 2),
                       num_res_blocks=1, attn_resolutions=attn_resolutions,
                       dropout=dropout).build_for_inference()


def randomize_weights(model, *, seed=0, scale=0.1):
  """Overwrites every weight with N(0, scale²): zero-initialised output convs would hide bugs."""
  rng = np.random.default_rng(seed)
  for weight in model.weights:
    weight.assign(rng.normal(0.0, scale, weight.shape).astype(np.float32))
  return model


def gaussian_eps_model(means, stds, alphas_cumprod):
  """The optimal ε-model for x0 ~ N(means, stds²), one Gaussian per channel:
  ε*(x_t, t) = E[ε | x_t] = sqrt(1 − ᾱ_t) (x_t − sqrt(ᾱ_t) m) / (ᾱ_t s² + 1 − ᾱ_t)."""
  m = tf.constant(means, tf.float32)
  s2 = tf.constant(np.square(stds), tf.float32)
  alphas_cumprod = tf.constant(alphas_cumprod, tf.float32)

  def eps_model(x_t, t):
    a = tf.gather(alphas_cumprod, t)[:, None, None, None]
    return tf.sqrt(1.0 - a) * (x_t - tf.sqrt(a) * m) / (a * s2 + 1.0 - a)

  return eps_model


class RandomConvFeatures:
  """φ(x) = [mean, std] over pixels of relu(conv3x3(x, W)), W fixed and random: frozen, weightless."""

  def __init__(self, *, channels=1, filters=8, seed=0):
    rng = np.random.default_rng(seed)
    self.kernel = rng.normal(0.0, 1.0 / 3.0, [3, 3, channels, filters]).astype(np.float32)
    self.dim = 2 * filters

  def __call__(self, images):
    h = tf.nn.relu(tf.nn.conv2d(images, self.kernel, strides=1, padding="SAME"))
    mean, variance = tf.nn.moments(h, axes=[1, 2])
    return tf.concat([mean, tf.sqrt(variance + 1e-6)], axis=1)


def make_finetuner(unet, *, num_steps=2, recompute=True, dropout=False, seed=0, lr=1e-3,
                   grad_clip=None, optimizer=None, sampler="ddim", **options):
  """An MMDFinetuner on FINETUNER_SCHEDULE with RandomConvFeatures and the polynomial kernel;
  `options` are MMDFinetuner's others (timestep_kind, learn_timesteps, …)."""
  trainer = finetune.MMDFinetuner(
      unet, feature_net=RandomConvFeatures(), schedule=FINETUNER_SCHEDULE, num_steps=num_steps,
      kernel=mmd.make_kernel("polynomial"), sampler=sampler, recompute=recompute,
      dropout=dropout, seed=seed, grad_clip=grad_clip, **options)
  # As the driver: no XLA, whatever the device.
  trainer.compile(optimizer=optimizer or keras.optimizers.Adam(learning_rate=lr), jit_compile=False)
  return trainer


def finetuner_gradients(trainer, x_real):
  """(MMD², [gradient arrays]) of one `compute_gradients` of `trainer` on `x_real`."""
  loss, grads = tf.function(trainer.compute_gradients)(tf.constant(x_real))
  return float(loss), [g.numpy() for g in grads]


def finetune_driver(workdir, init, *, steps, real, **options):
  """`finetune.finetune` of the tiny UNet (FINETUNER_IMAGE_SIZE, K = 2) from the weights file
  `init` in `workdir`, `real` as every real batch; `options` override the settings below or add
  others (validation, lora_rank, …)."""
  settings = {**dict(learning_rate=1e-3, grad_clip=0.5, checkpoint_every=2, log_every=1, seed=0,
                     num_sample_images=4), **options}
  return finetune.finetune(
      unet_factory=lambda: tiny_unet(image_size=FINETUNER_IMAGE_SIZE),
      feature_net_factory=RandomConvFeatures, kernel=mmd.make_kernel("polynomial"),
      dataset_fn=lambda start_batch: tf.data.Dataset.from_tensors(real).repeat(),
      schedule=FINETUNER_SCHEDULE, workdir=str(workdir), num_steps=2, finetune_steps=steps,
      global_batch_size=real.shape[0], strategy=tf.distribute.get_strategy(),
      init_checkpoint=str(init), **settings)


def finetune_base_and_real(tmp_path):
  """A small random base model's weights file and 4 real images for `finetune_driver`."""
  init = tmp_path / "base.weights.h5"
  checkpoints.save_weights_h5(
      randomize_weights(tiny_unet(image_size=FINETUNER_IMAGE_SIZE), scale=0.05), str(init))
  return init, real_images(4, seed=0)


def real_images(count, *, seed):
  """A simple target distribution: a bright centre square on a dark background, plus noise."""
  rng = np.random.default_rng(seed)
  size = FINETUNER_IMAGE_SIZE
  images = np.full([count, size, size, 1], -0.8, np.float32)
  images[:, 2:6, 2:6] = 0.6
  return np.clip(images + rng.normal(0.0, 0.1, images.shape), -1, 1).astype(np.float32)


def tensorboard_summaries(logdir):
  """{tag: {step: value}} of the TensorBoard events in `logdir`: a float for a scalar, the decoded
  image's shape for an image summary."""
  summaries = {}
  for path in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
    for record in tf.data.TFRecordDataset(str(path)):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        tensor = tf.make_ndarray(value.tensor)
        if value.metadata.plugin_data.plugin_name == "images":
          # [width, height, png, ...]: decode the first image.
          entry = tuple(tf.io.decode_png(tensor[2]).shape)
        else:
          entry = float(tensor)
        summaries.setdefault(value.tag, {})[event.step] = entry
  return summaries


def run_main(*args, timeout=600):
  """`python main.py *args` in the repository, one thread, TF's C++ logs quiet."""
  env = dict(os.environ, TF_NUM_INTRAOP_THREADS="1", TF_NUM_INTEROP_THREADS="1",
             TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.run([sys.executable, "main.py", *args], cwd=REPO_ROOT, env=env,
                        stdin=subprocess.DEVNULL, capture_output=True, text=True,
                        timeout=timeout)


def assert_user_error(result, flag):
  """Exit code != 0 and exactly one stderr line `error: ...` naming `flag`, no traceback."""
  assert result.returncode != 0
  lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert len(lines) == 1, result.stderr
  assert flag in lines[0]
  assert "Traceback" not in result.stderr


def run_test_file_as_script(test_file, out_path, *, timeout=600):
  """Runs `test_file`'s `__main__` (a computation that needs its own process, e.g. logical CPU
  devices) with `out_path` as its argument; returns the .npz it writes there as a dict."""
  tests_dir = os.path.dirname(os.path.abspath(test_file))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(tests_dir), tests_dir, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, os.path.abspath(test_file), str(out_path)], env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(np.load(out_path))


def check_feature_gradient(network, images):
  """φ(images) of a feature network, after checking ∂Σφ²/∂images is finite and not all zero (MMD
  finetuning backpropagates through φ)."""
  with tf.GradientTape() as tape:
    tape.watch(images)
    phi = network(images)
    loss = tf.reduce_sum(tf.square(phi))
  grad = tape.gradient(loss, images).numpy()
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
  return phi
