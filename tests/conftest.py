"""Shared test setup: quiet TF, a tiny UNet factory, the repository root and main.py for CLI
tests."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib

import numpy as np
import pytest

from mmd_keras import unet as unet_lib

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent


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


@pytest.fixture
def repo_root():
  return REPO_ROOT


def tensorboard_summaries(logdir):
  """{tag: {step: value}} of the TensorBoard events in `logdir`: a float for a scalar, the decoded
  image's shape for an image summary."""
  import tensorflow as tf
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


@pytest.fixture
def main_module():
  """main.py imported in this process (its flags defined), the flags reset afterwards."""
  import main
  yield main
  main.FLAGS.unparse_flags()


def run_test_file_as_script(test_file, out_path, *, timeout=600):
  """Runs `test_file`'s `__main__` (a computation that needs its own process, e.g. logical CPU
  devices) with `out_path` as its argument; returns the .npz it writes there as a dict."""
  import subprocess
  import sys
  tests_dir = os.path.dirname(os.path.abspath(test_file))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(tests_dir), tests_dir, os.environ.get("PYTHONPATH", "")]))
  proc = subprocess.run([sys.executable, os.path.abspath(test_file), str(out_path)], env=env,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return dict(np.load(out_path))
