"""pretrain.py: the DDPM trainer learns, its EMA follows the formula, checkpoints round-trip."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import tiny_unet
from mmd_keras import checkpoints
from mmd_keras import pretrain
from mmd_keras import schedule as schedule_lib

SCHEDULE = schedule_lib.NoiseSchedule.linear(num_timesteps=100)


def _trainer(*, ema_decay, learning_rate=2e-3, seed=0):
  unet = tiny_unet(image_size=8, channels=1)
  trainer = pretrain.DDPMTrainer(unet, schedule=SCHEDULE, ema_decay=ema_decay, seed=seed)
  trainer.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate,
                                                  global_clipnorm=1.0))
  return trainer


def _fixed_batch():
  # Two smooth patterns: a learnable data set for a tiny model.
  ramp = np.linspace(-1.0, 1.0, 8, dtype=np.float32)
  return np.stack([np.broadcast_to(ramp[None, :], (8, 8)),
                   np.broadcast_to(ramp[:, None], (8, 8))] * 4)[..., None]


def _denoising_loss(unet, x0):
  """‖ε − ε_θ(x_t, t)‖² at fixed t and ε, written out with NumPy's ᾱ."""
  t = np.array([5, 20, 40, 60, 80, 95, 10, 50])
  noise = np.random.default_rng(0).normal(size=x0.shape).astype(np.float32)
  a = SCHEDULE.alphas_cumprod[t][:, None, None, None].astype(np.float32)
  x_t = np.sqrt(a) * x0 + np.sqrt(1.0 - a) * noise
  eps = unet(tf.constant(x_t), tf.constant(t)).numpy()
  return float(np.mean((noise - eps) ** 2))


def test_step_seed_differs_by_step_and_seed():
  a = pretrain.step_seed(0, 1).numpy()
  np.testing.assert_array_equal(a, pretrain.step_seed(0, 1).numpy())
  assert not np.array_equal(a, pretrain.step_seed(0, 2).numpy())
  assert not np.array_equal(a, pretrain.step_seed(1, 1).numpy())
  assert a.shape == (2,) and a.dtype == np.int32


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """40 steps on a fixed batch with a fast EMA, saved as `pretrain` saves them.

  Returns (trainer, checkpoint dir, saved raw weights, saved EMA weights, loss before, loss after).
  One trainer for the module: each one costs a trace of the UNet's forward and backward pass.
  """
  trainer = _trainer(ema_decay=0.5)
  x0 = _fixed_batch()
  before = _denoising_loss(trainer.unet, x0)
  for _ in range(40):
    logs = trainer.train_on_batch(x0, return_dict=True)
  assert np.isfinite(logs["loss"])
  after = _denoising_loss(trainer.unet, x0)
  folder = tmp_path_factory.mktemp("ckpt")
  ckpt = checkpoints.training_checkpoint(unet=trainer.unet, ema=trainer.ema,
                                         optimizer=trainer.optimizer)
  tf.train.CheckpointManager(ckpt, str(folder / "checkpoints"), max_to_keep=1).save(
      checkpoint_number=40)
  raw = [w.numpy() for w in trainer.unet.weights]
  ema = [e.numpy() for e in trainer.ema]
  return trainer, folder, raw, ema, before, after


def test_training_reduces_the_denoising_loss(trained):
  trainer, _, _, _, before, after = trained
  assert int(trainer.optimizer.iterations.numpy()) >= 40
  assert after < 0.7 * before


def test_ema_update_is_decay_times_ema_plus_rest_times_weights(trained):
  trainer = trained[0]
  ema_before = [e.numpy() for e in trainer.ema]
  trainer.train_on_batch(_fixed_batch())
  moved = 0
  for e_before, w, e_after in zip(ema_before, trainer.unet.weights, trainer.ema):
    w = w.numpy()
    np.testing.assert_allclose(e_after.numpy(), 0.5 * e_before + 0.5 * w, rtol=1e-5, atol=1e-7)
    moved += int(not np.allclose(e_before, w))
  assert moved > 0


@pytest.mark.parametrize("use_ema", [True, False])
def test_checkpoint_restores_ema_and_raw_weights(trained, use_ema):
  _, folder, raw, ema, _, _ = trained
  source, other = (ema, raw) if use_ema else (raw, ema)
  restored = tiny_unet(image_size=8, channels=1)
  label = checkpoints.restore_unet(restored, str(folder), use_ema=use_ema)
  assert label == ("ema" if use_ema else "raw")
  differs = False
  for got, want, alternative in zip(restored.weights, source, other):
    np.testing.assert_array_equal(got.numpy(), want)
    differs |= not np.allclose(want, alternative)
  assert differs  # EMA and raw weights really are different sets here.


def test_checkpoint_for_another_architecture_is_refused(trained):
  folder = trained[1]
  bigger = tiny_unet(image_size=8, channels=3)
  with pytest.raises(checkpoints.CheckpointError, match="--init_checkpoint"):
    checkpoints.restore_unet(bigger, str(folder), use_ema=True)


def test_weights_h5_round_trip(trained, tmp_path):
  trainer = trained[0]
  path = str(tmp_path / "base.weights.h5")
  checkpoints.save_weights_h5(trainer.unet, path)
  restored = tiny_unet(image_size=8, channels=1)
  assert checkpoints.restore_unet(restored, path) == "weights.h5"
  for got, want in zip(restored.weights, trainer.unet.weights):
    np.testing.assert_array_equal(got.numpy(), want.numpy())
  with pytest.raises(checkpoints.CheckpointError, match="exists"):
    checkpoints.save_weights_h5(trainer.unet, path)


def test_checkpoint_without_the_weight_list_is_refused(tmp_path):
  # The `unet` object alone misses the weights Keras 3 keeps in sublayer lists.
  prefix = tf.train.Checkpoint(unet=tiny_unet(image_size=8, channels=1)).save(
      str(tmp_path / "partial"))
  with pytest.raises(checkpoints.CheckpointError, match="--init_checkpoint"):
    checkpoints.restore_unet(tiny_unet(image_size=8, channels=1), prefix, use_ema=False)
