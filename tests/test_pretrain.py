"""pretrain.py: the DDPM trainer learns, its EMA follows the formula, checkpoints round-trip, and
one step under MirroredStrategy on 2 logical CPUs is the single-device step.

Logical devices must be configured before TensorFlow initialises its devices, so the mirrored step
runs in a fresh interpreter (`python tests/test_pretrain.py <out.npz>`); pytest compares its output.
"""

import shutil
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from helpers import randomize_weights
from helpers import run_test_file_as_script
from helpers import tiny_unet
from mmd_keras import checkpoints
from mmd_keras import pretrain
from mmd_keras import schedule as schedule_lib

SCHEDULE = schedule_lib.NoiseSchedule.linear(num_timesteps=100)


def _trainer(*, ema_decay, learning_rate=2e-3, seed=0):
  unet = tiny_unet(image_size=8, channels=1)
  trainer = pretrain.DDPMTrainer(unet, schedule=SCHEDULE, ema_decay=ema_decay, grad_clip=1.0,
                                 seed=seed)
  trainer.compile(optimizer=keras.optimizers.Adam(learning_rate=learning_rate))
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
  with pytest.raises(checkpoints.CheckpointError, match="^init_checkpoint="):
    checkpoints.restore_unet(bigger, str(folder), use_ema=True)


def test_resume_check_accepts_the_runs_own_checkpoint(trained, tmp_path):
  folder = trained[1]
  factory = lambda: tiny_unet(image_size=8, channels=1)
  found = checkpoints.check_resume(str(folder / "checkpoints"), unet_factory=factory)
  assert found == str(folder / "checkpoints" / "ckpt-40")
  assert checkpoints.check_resume(str(tmp_path / "none"), unet_factory=factory) is None


def test_resume_check_refuses_another_unet_and_a_truncated_checkpoint(trained, tmp_path):
  folder = trained[1]
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"^cannot resume from .*ckpt-40: it does not hold this UNet's weights "
                           r".*image_size, ch, .*use another workdir"):
    checkpoints.check_resume(str(folder / "checkpoints"),
                             unet_factory=lambda: tiny_unet(image_size=8, channels=3))
  copy = tmp_path / "checkpoints"
  shutil.copytree(folder / "checkpoints", copy)
  [data] = copy.glob("ckpt-40.data-*")
  data.write_bytes(data.read_bytes()[:-4])  # Four bytes short: the last float32.
  with pytest.raises(checkpoints.CheckpointError,
                     match=r"ckpt-40: its tensor .* cannot be read .*complete checkpoint"
                           r".*use another workdir"):
    checkpoints.check_resume(str(copy), unet_factory=lambda: tiny_unet(image_size=8, channels=1))


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
  with pytest.raises(checkpoints.CheckpointError, match="^init_checkpoint="):
    checkpoints.restore_unet(tiny_unet(image_size=8, channels=1), prefix, use_ema=False)


# The mirrored step. SGD keeps the update linear in the clipped gradient (Adam's first step is
# ±lr whatever the scale, which would hide a wrong clip); the clip is far below the gradient norm.
CLIP = 1e-2
LEARNING_RATE = 1.0
EMA_DECAY = 0.5


def _one_step(strategy, init, *, grad_clip, keras_clip=None):
  """Weights, EMA and logs after one fit() step of a DDPMTrainer under `strategy` on the global
  batch `_fixed_batch()`: clipped by the trainer (`grad_clip`) or by Keras (`keras_clip`)."""
  with strategy.scope():
    unet = tiny_unet(image_size=8, channels=1)
    for w, value in zip(unet.weights, init):
      w.assign(value)
    trainer = pretrain.DDPMTrainer(unet, schedule=SCHEDULE, ema_decay=EMA_DECAY,
                                   grad_clip=grad_clip, seed=3)
    trainer.compile(optimizer=keras.optimizers.SGD(learning_rate=LEARNING_RATE,
                                                   global_clipnorm=keras_clip))
  history = trainer.fit(tf.data.Dataset.from_tensors(_fixed_batch()), epochs=1, verbose=0,
                        shuffle=False)
  return dict(weights=[w.numpy() for w in unet.weights], ema=[e.numpy() for e in trainer.ema],
              loss=np.array(history.history["step_loss"][-1]),
              grad_norm=np.array(history.history["step_grad_norm"][-1]))


def _compute_mirrored_step(out_path):
  cpus = tf.config.list_physical_devices("CPU")
  tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)
  init = [w.numpy() for w in randomize_weights(tiny_unet(image_size=8), seed=4, scale=0.05).weights]
  one = tf.distribute.OneDeviceStrategy("/cpu:0")
  mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  assert mirrored.num_replicas_in_sync == 2
  runs = dict(single=_one_step(one, init, grad_clip=CLIP),
              single_keras=_one_step(one, init, grad_clip=None, keras_clip=CLIP),
              mirrored=_one_step(mirrored, init, grad_clip=CLIP),
              mirrored_keras=_one_step(mirrored, init, grad_clip=None, keras_clip=CLIP))
  arrays = {f"init_{i}": w for i, w in enumerate(init)}
  for name, run in runs.items():
    arrays[f"{name}_loss"], arrays[f"{name}_grad_norm"] = run["loss"], run["grad_norm"]
    for i, (w, e) in enumerate(zip(run["weights"], run["ema"])):
      arrays[f"{name}_weight_{i}"], arrays[f"{name}_ema_{i}"] = w, e
  np.savez(out_path, num_weights=np.array(len(init)), **arrays)


@pytest.fixture(scope="module")
def mirrored_step(tmp_path_factory):
  results = run_test_file_as_script(__file__, tmp_path_factory.mktemp("mirrored") / "step.npz")
  count = int(results["num_weights"])
  init = [results[f"init_{i}"].astype(np.float64) for i in range(count)]
  updates = {name: [results[f"{name}_weight_{i}"] - init[i] for i in range(count)]
             for name in ("single", "single_keras", "mirrored", "mirrored_keras")}
  emas = {name: [results[f"{name}_ema_{i}"] for i in range(count)]
          for name in ("single", "mirrored")}
  return results, updates, emas


def _norm(update):
  return np.sqrt(sum(np.sum(u ** 2) for u in update))


@pytest.mark.slow
def test_one_device_clip_is_keras_global_clipnorm(mirrored_step):
  # On one device Keras' global_clipnorm is the textbook clip: an independent reference for ours.
  results, updates, _ = mirrored_step
  assert results["single_grad_norm"] > 10 * CLIP
  np.testing.assert_allclose(_norm(updates["single"]), LEARNING_RATE * CLIP, rtol=1e-4)
  for ours, reference in zip(updates["single"], updates["single_keras"]):
    np.testing.assert_allclose(ours, reference, rtol=0, atol=1e-5 * LEARNING_RATE * CLIP)


@pytest.mark.slow
def test_mirrored_step_is_the_single_device_step(mirrored_step):
  results, updates, emas = mirrored_step
  np.testing.assert_allclose(results["mirrored_loss"], results["single_loss"], rtol=1e-5)
  np.testing.assert_allclose(results["mirrored_grad_norm"], results["single_grad_norm"],
                             rtol=1e-5)
  for mirrored, single in zip(updates["mirrored"], updates["single"]):
    np.testing.assert_allclose(mirrored, single, rtol=0, atol=1e-5 * LEARNING_RATE * CLIP)
  # ema = d·w0 + (1 − d)·w1, and the EMA of the first replica is the one kept.
  for mirrored, single in zip(emas["mirrored"], emas["single"]):
    np.testing.assert_allclose(mirrored, single, rtol=0, atol=1e-5 * LEARNING_RATE * CLIP)


@pytest.mark.slow
def test_per_replica_clipping_would_differ(mirrored_step):
  # Keras' global_clipnorm clips each replica's half of the gradient before the sum: the update
  # is neither lr·clip long nor along the global gradient.
  _, updates, _ = mirrored_step
  difference = _norm([k - s for k, s in zip(updates["mirrored_keras"], updates["single"])])
  assert difference > 0.1 * LEARNING_RATE * CLIP


if __name__ == "__main__":
  _compute_mirrored_step(sys.argv[1])
