"""Parity of the exported K-step sampler on the bundled, trained Fashion-MNIST model.

tests/test_export.py checks the contract on a tiny random UNet with x̂0 clipping; only a trained
model shows that the SavedModel and TFLite files reproduce the real sampler (no clipping, ε̂ that
cancels x_T to within float error at t ≈ T, where x̂0 divides by sqrt(ᾱ_T) ≈ 0.006).
"""

import numpy as np
import pytest
import tensorflow as tf
from ai_edge_litert.interpreter import Interpreter

from helpers import FASHION_UNET, REPO_ROOT
from mmd_keras import checkpoints
from mmd_keras import ddim
from mmd_keras import schedule as schedule_lib
from mmd_keras import unet as unet_lib
from mmd_keras.export import sampler_module, writers

NUM_STEPS = 5
SCHEDULE = schedule_lib.NoiseSchedule.linear()
BUNDLED = REPO_ROOT / "pretrained" / "fashion_mnist" / "unet_ema.weights.h5"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def unet():
  model = unet_lib.UNet(**FASHION_UNET).build_for_inference()
  checkpoints.restore_unet(model, str(BUNDLED))
  return model


@pytest.fixture(scope="module")
def exported(unet, tmp_path_factory):
  root = str(tmp_path_factory.mktemp("exports"))
  sampler = sampler_module.Sampler.from_schedule(unet, schedule=SCHEDULE, num_steps=NUM_STEPS,
                                                 max_images=16)
  saved = writers.write_saved_model(sampler, export_dir=root, model_name="fmnist", version=1)
  tflite = writers.write_tflite(sampler, writers.tflite_path(
      export_dir=root, model_name="fmnist", num_steps=NUM_STEPS, float16=False), float16=False)
  return dict(saved=saved, tflite=tflite)


@pytest.fixture(scope="module")
def noise():
  return np.random.default_rng(7).standard_normal((8, 28, 28, 1)).astype(np.float32)


@pytest.fixture(scope="module")
def reference(unet, noise):
  x_0 = ddim.sample(lambda x, t: unet(x, t), tf.constant(noise),
                    timesteps=SCHEDULE.timesteps(NUM_STEPS), alphas_cumprod=SCHEDULE.alphas_cumprod)
  return ddim.to_uint8(x_0).numpy()


def _diff(a, b):
  return np.abs(a.astype(np.int32) - b.astype(np.int32))


def test_reference_images_are_not_degenerate(reference):
  # Garments on a dark background: neither constant nor saturated, so parity below means something.
  assert reference.std() > 40
  assert 0.05 < (reference == 0).mean() < 0.9


def test_saved_model_matches_the_in_process_sampler(exported, noise, reference):
  images = tf.saved_model.load(exported["saved"]).signatures["from_noise"](
      noise=tf.constant(noise))["images"].numpy()
  diff = _diff(images, reference)
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_tflite_matches_the_in_process_sampler(exported, noise, reference):
  interpreter = Interpreter(model_path=exported["tflite"], num_threads=1)
  index = interpreter.get_input_details()[0]["index"]
  interpreter.resize_tensor_input(index, noise.shape)
  interpreter.allocate_tensors()
  interpreter.set_tensor(index, noise)
  interpreter.invoke()
  images = interpreter.get_tensor(interpreter.get_output_details()[0]["index"])
  diff = _diff(images, reference)
  assert diff.max() <= 1 and (diff > 0).mean() < 0.01
