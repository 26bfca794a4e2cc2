"""Learned timesteps (mmd_keras/learned_timesteps.py) in MMDFinetuner: they get the
finite-difference gradient, the replayed gradient equals the taped one, fit moves them and keeps
them increasing, and the driver saves and resumes them."""

import os

import numpy as np
import pytest
import tensorflow as tf

from helpers import FINETUNER_IMAGE_SIZE as IMAGE_SIZE
from helpers import FINETUNER_SCHEDULE as SCHEDULE
from helpers import finetune_base_and_real
from helpers import finetune_driver
from helpers import finetuner_gradients
from helpers import make_finetuner
from helpers import randomize_weights
from helpers import real_images
from helpers import tensorboard_summaries
from helpers import tiny_unet
from mmd_keras import checkpoints
from mmd_keras.errors import UserError


# The learned timesteps start here (T = 100): off the integers, so the finite differences below cross no
# kink of ᾱ(t).
CONTINUOUS = [10.3, 40.6, 70.4]


def learned_finetuner(unet, **options):
  options.setdefault("timesteps_lr", 1e-2)
  return make_finetuner(unet, num_steps=3, timestep_kind=CONTINUOUS, learn_timesteps=True,
                        **options)


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver_pp"])
def test_learned_timesteps_get_the_finite_difference_gradient(sampler):
  # Along g = ∇_ψ L of the logits ψ alone, the directional derivative must be ‖g‖².
  unet = randomize_weights(tiny_unet(image_size=IMAGE_SIZE), seed=1, scale=0.05)
  trainer = learned_finetuner(unet, sampler=sampler)
  np.testing.assert_allclose(trainer.current_timesteps(), CONTINUOUS, rtol=1e-5)
  x_real = real_images(6, seed=0)
  _, grads = finetuner_gradients(trainer, x_real)
  assert len(grads) == len(unet.trainable_weights) + 1
  g = grads[-1].astype(np.float64)
  assert g.shape == (4,) and np.all(g != 0), g
  logits = trainer.learned_timesteps.logits
  start = logits.numpy()
  loss_fn = tf.function(lambda: trainer.compute_gradients(tf.constant(x_real))[0])
  h = 2e-3 / np.linalg.norm(g)  # Moves each timestep by < 0.2: no integer crossed.
  values = {}
  for sign in (1, -1):
    logits.assign(start + sign * h * g)
    values[sign] = float(loss_fn())
  logits.assign(start)
  np.testing.assert_allclose((values[1] - values[-1]) / (2 * h), np.sum(g ** 2), rtol=3e-2)


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver_pp"])
def test_learned_timesteps_recompute_gives_the_same_gradients(sampler):
  unet = randomize_weights(tiny_unet(image_size=IMAGE_SIZE), seed=2, scale=0.05)
  x_real = real_images(6, seed=0)
  _, plain = finetuner_gradients(learned_finetuner(unet, sampler=sampler, recompute=False), x_real)
  _, recomputed = finetuner_gradients(learned_finetuner(unet, sampler=sampler, recompute=True), x_real)
  np.testing.assert_allclose(recomputed[-1], plain[-1], rtol=1e-4)
  total = np.sqrt(sum(np.sum(b.astype(np.float64) ** 2) for b in plain[:-1]))
  for weight, a, b in zip(unet.trainable_weights, recomputed, plain):
    assert np.linalg.norm(a - b) <= max(1e-5 * np.linalg.norm(b), 1e-6 * total), weight.path


def test_fit_moves_the_learned_timesteps_and_keeps_them_increasing():
  unet = randomize_weights(tiny_unet(image_size=IMAGE_SIZE), seed=3, scale=0.05)
  trainer = learned_finetuner(unet, lr=1e-3, timesteps_lr=0.1)
  before = trainer.current_timesteps()
  dataset = tf.data.Dataset.from_tensor_slices(real_images(8 * 3, seed=0)).batch(8)
  history = trainer.fit(dataset, epochs=1, verbose=0, shuffle=False)
  after = trainer.current_timesteps()
  assert np.abs(after - before).max() > 0.5, (before, after)
  assert 0 < after[0] and np.all(np.diff(after) > 0) and after[-1] < 99, after
  assert history.history["timesteps_grad_norm"][-1] > 0


def test_learned_timesteps_with_eta_or_a_bad_learning_rate_are_refused():
  unet = tiny_unet(image_size=IMAGE_SIZE)
  with pytest.raises(UserError, match="^learn_timesteps=True needs eta=0"):
    make_finetuner(unet, learn_timesteps=True, eta=0.5)
  with pytest.raises(UserError, match="^timesteps_lr=0 must be > 0$"):
    make_finetuner(unet, learn_timesteps=True, timesteps_lr=0)


@pytest.mark.slow
def test_driver_saves_and_resumes_the_learned_timesteps(tmp_path):
  init, real = finetune_base_and_real(tmp_path)
  options = dict(learn_timesteps=True, timesteps_lr=0.1, timestep_kind=CONTINUOUS[:2])
  run = tmp_path / "run"
  finetune_driver(run, init, steps=1, real=real, **options)
  os.remove(run / "unet.weights.h5")
  first = checkpoints.learned_timesteps(str(run / "checkpoints"),
                                        num_timesteps=SCHEDULE.num_timesteps)
  # The rerun resumes the logits (and their Adam) from the checkpoint of step 1.
  trainer = finetune_driver(run, init, steps=2, real=real, **options)
  saved = checkpoints.learned_timesteps(str(run / "unet.weights.h5"),
                                        num_timesteps=SCHEDULE.num_timesteps)
  np.testing.assert_array_equal(saved, trainer.current_timesteps())
  np.testing.assert_array_equal(
      checkpoints.learned_timesteps(str(run / "checkpoints"), num_timesteps=SCHEDULE.num_timesteps),
      saved)
  assert not np.allclose(first, CONTINUOUS[:2]) and not np.allclose(saved, first)
  assert set(tensorboard_summaries(run / "tensorboard")) >= {"timestep_0", "timestep_1",
                                                             "timesteps_grad_norm"}
  assert checkpoints.learned_timesteps(str(init), num_timesteps=SCHEDULE.num_timesteps) is None
