"""MMDFinetuner: the unroll is real (every weight gets a gradient), recompute changes nothing but
memory (also with dropout), both for DDIM and DPM-Solver++, finetuning lowers a held-out MMD², the
driver checkpoints and resumes, an EMA of the weights is what it saves. Learned timesteps:
test_learned_timesteps.py; micro-batches: test_micro_batches.py."""

import os

import keras
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
from mmd_keras import distribute
from mmd_keras import dpm_solver
from mmd_keras import finetune
from mmd_keras import mmd
from mmd_keras import streams
from mmd_keras.errors import UserError


def relative_error(a, b):
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver_pp"])
def test_every_trainable_weight_gets_a_gradient_through_the_unroll(sampler):
  # Attention at 4x4 too, so the down/up-level attention blocks are in the unroll.
  unet = randomize_weights(tiny_unet(image_size=IMAGE_SIZE, attn_resolutions=(4,)), seed=1,
                           scale=0.05)
  loss, grads = finetuner_gradients(make_finetuner(unet, num_steps=3, sampler=sampler),
                          real_images(6, seed=0))
  assert np.isfinite(loss)
  assert len(grads) == len(unet.trainable_weights) > 20
  silent = [w.path for w, g in zip(unet.trainable_weights, grads) if not np.any(g)]
  assert not silent, f"no gradient reaches {silent}"


def test_gradient_matches_finite_differences_of_the_whole_unroll():
  # An independent check that nothing truncates the chain (e.g. a stop_gradient between steps):
  # the directional derivative along g = ∇L must be ‖g‖², measured by central differences.
  unet = randomize_weights(tiny_unet(image_size=IMAGE_SIZE), seed=1, scale=0.05)
  trainer = make_finetuner(unet, num_steps=3)
  x_real = real_images(6, seed=0)
  _, grads = finetuner_gradients(trainer, x_real)
  loss_fn = tf.function(lambda: trainer.compute_gradients(tf.constant(x_real))[0])
  norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads))
  h = 1e-2 / norm
  values = {}
  for sign in (1, -1):
    for w, g in zip(unet.trainable_weights, grads):
      w.assign_add(sign * h * g)
    values[sign] = float(loss_fn())
    for w, g in zip(unet.trainable_weights, grads):
      w.assign_sub(sign * h * g)
  np.testing.assert_allclose((values[1] - values[-1]) / (2 * h), norm ** 2, rtol=2e-2)


@pytest.mark.parametrize("sampler", ["ddim", "dpm_solver_pp"])
@pytest.mark.parametrize("dropout", [False, True])
def test_recompute_gives_the_same_gradients(dropout, sampler):
  unet = randomize_weights(tiny_unet(image_size=IMAGE_SIZE, dropout=0.3, attn_resolutions=(4,)),
                           seed=2, scale=0.05)
  x_real = real_images(6, seed=0)
  loss_plain, plain = finetuner_gradients(make_finetuner(unet, num_steps=3, recompute=False,
                                               dropout=dropout, sampler=sampler), x_real)
  loss_recomputed, recomputed = finetuner_gradients(make_finetuner(unet, num_steps=3, recompute=True,
                                                         dropout=dropout, sampler=sampler),
                                          x_real)
  # Float32 rounding only: the replayed loop runs the same steps in another graph (constants
  # gathered, not folded).
  np.testing.assert_allclose(loss_recomputed, loss_plain, rtol=1e-5)
  # Some gradients are 0 in exact arithmetic (a conv bias right before a GroupNorm with one channel
  # per group, attention's key bias under the softmax): there both sides are rounding noise
  # (~1e-9), so the floor is relative to the whole gradient.
  total = np.sqrt(sum(np.sum(b.astype(np.float64) ** 2) for b in plain))
  for weight, a, b in zip(unet.trainable_weights, recomputed, plain):
    assert np.linalg.norm(a - b) <= max(1e-5 * np.linalg.norm(b), 1e-6 * total), weight.path


def test_dropout_flag_changes_the_gradients():
  # Guards test_recompute_gives_the_same_gradients: with dropout on, the masks must actually be
  # applied.
  unet = randomize_weights(tiny_unet(image_size=IMAGE_SIZE, dropout=0.3), seed=2, scale=0.05)
  x_real = real_images(6, seed=0)
  _, off = finetuner_gradients(make_finetuner(unet, num_steps=2, dropout=False), x_real)
  _, on = finetuner_gradients(make_finetuner(unet, num_steps=2, dropout=True), x_real)
  assert relative_error(on[0], off[0]) > 1e-3


def test_dpm_solver_pp_unroll_is_dpm_solver_sample():
  unet = randomize_weights(tiny_unet(image_size=IMAGE_SIZE), seed=1, scale=0.05)
  trainer = make_finetuner(unet, num_steps=3, sampler="dpm_solver_pp", recompute=False)
  z = tf.random.stateless_normal([2, IMAGE_SIZE, IMAGE_SIZE, 1], [3, 4])
  expected = dpm_solver.sample(lambda x, t: unet(x, t), z, timesteps=trainer.timesteps,
                               alphas_cumprod=trainer.alphas_cumprod)
  np.testing.assert_allclose(trainer.sample(z, seed=tf.constant([0, 0])), expected, atol=1e-5)


def test_dpm_solver_pp_gradient_reaches_each_of_the_k_calls():
  # A per-step offset on ε̂: the loss depends on each, so no step may be cut off the chain.
  unet = randomize_weights(tiny_unet(image_size=IMAGE_SIZE), seed=1, scale=0.05)
  trainer = make_finetuner(unet, num_steps=3, sampler="dpm_solver_pp", recompute=True)
  offsets = {t: tf.Variable(0.0) for t in trainer.timesteps}
  calls = []
  eps_fn = trainer._eps_fn

  def eps_fn_with_offsets(dropout_seed):
    eps = eps_fn(dropout_seed)

    def call(x, t):
      calls.append(int(t[0]))
      return eps(x, t) + offsets[int(t[0])]
    return call

  trainer._eps_fn = eps_fn_with_offsets
  z = tf.random.stateless_normal([2, IMAGE_SIZE, IMAGE_SIZE, 1], [3, 4])
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(trainer.sample(z, seed=tf.constant([0, 0])) ** 2)
  grads = tape.gradient(loss, list(offsets.values()))
  assert calls == sorted(trainer.timesteps, reverse=True)
  assert all(g is not None and abs(float(g)) > 0 for g in grads), grads


def test_noise_is_a_function_of_seed_step_and_example():
  z = streams.example_noise(tf.constant([4, 3, 3, 1]), seed=5, step=7)
  again = streams.example_noise(tf.constant([4, 3, 3, 1]), seed=5, step=7)
  next_step = streams.example_noise(tf.constant([4, 3, 3, 1]), seed=5, step=8)
  np.testing.assert_array_equal(z, again)
  assert not np.allclose(z, next_step)
  assert abs(float(tf.reduce_mean(z))) < 1.0 and z.shape == (4, 3, 3, 1)


def heldout_mmd2(trainer, *, num_batches=4, batch=16):
  """MMD² between fresh K-step samples and held-out real images (seeds unused in training)."""
  fake = [trainer.sample(tf.random.stateless_normal([batch, IMAGE_SIZE, IMAGE_SIZE, 1], [99, i]),
                         seed=tf.constant([99, i])) for i in range(num_batches)]
  features = trainer.feature_net
  fake = features(tf.concat(fake, axis=0))
  real = features(tf.constant(real_images(num_batches * batch, seed=1234)))
  return float(mmd.mmd2_unbiased(fake, real, kernel=trainer.kernel))


def test_a_few_steps_lower_the_heldout_mmd2():
  keras.utils.set_random_seed(0)
  unet = randomize_weights(tiny_unet(image_size=IMAGE_SIZE), seed=3, scale=0.05)
  trainer = make_finetuner(unet, num_steps=2, lr=2e-3, grad_clip=1.0)
  before = heldout_mmd2(trainer)
  dataset = tf.data.Dataset.from_tensor_slices(real_images(8 * 30, seed=0)).batch(8)
  trainer.fit(dataset, epochs=1, verbose=0, shuffle=False)
  after = heldout_mmd2(trainer)
  assert after < 0.5 * before, (before, after)


def test_bad_input_is_a_user_error():
  unet = tiny_unet(image_size=IMAGE_SIZE)
  for num_steps in (0, SCHEDULE.num_timesteps + 1):
    with pytest.raises(UserError, match=f"^num_steps={num_steps} "):
      make_finetuner(unet, num_steps=num_steps)
  with pytest.raises(UserError, match="^kernel=laplace "):
    mmd.make_kernel("laplace")


@pytest.mark.slow
def test_the_ema_of_the_finetuned_weights_is_what_the_run_saves_and_resumes(tmp_path):
  init, real = finetune_base_and_real(tmp_path)
  start = [w.numpy() for w in _unet_weights(init)]
  one = [w.numpy() for w in finetune_driver(tmp_path / "raw", init, steps=1, real=real).unet.weights]
  decay = 0.5
  # The EMA does not change training (the same raw weights), and w̄1 = d·w0 + (1 − d)·w1 is saved.
  run = tmp_path / "ema"
  trainer = finetune_driver(run, init, steps=1, real=real, ema_decay=decay)
  for w, r in zip(trainer.unet.weights, one):
    np.testing.assert_allclose(w.numpy(), r, rtol=1e-5, atol=1e-7)
  ema_one = [decay * w0 + (1 - decay) * w1 for w0, w1 in zip(start, one)]
  for saved, e in zip(_unet_weights(run / "unet.weights.h5"), ema_one):
    np.testing.assert_allclose(saved.numpy(), e, rtol=1e-5, atol=1e-7)
  # Resumed from its checkpoint at step 1 (the EMA in it): w̄2 = d·w̄1 + (1 − d)·w2.
  os.remove(run / "unet.weights.h5")
  trainer = finetune_driver(run, init, steps=2, real=real, ema_decay=decay)
  two = [w.numpy() for w in trainer.unet.weights]
  for saved, e1, w2 in zip(_unet_weights(run / "unet.weights.h5"), ema_one, two):
    np.testing.assert_allclose(saved.numpy(), decay * e1 + (1 - decay) * w2, rtol=1e-5, atol=1e-7)


def _unet_weights(path):
  unet = tiny_unet(image_size=IMAGE_SIZE).build_for_inference()
  checkpoints.restore_unet(unet, str(path), use_ema=False)
  return unet.weights


@pytest.mark.slow
def test_driver_checkpoints_resumes_and_never_overwrites(tmp_path):
  init, real = finetune_base_and_real(tmp_path)
  straight = finetune_driver(tmp_path / "straight", init, steps=3, real=real)
  assert int(straight.optimizer.iterations.numpy()) == 3
  run = tmp_path / "straight"
  assert os.path.exists(run / "unet.weights.h5")
  assert sorted(os.listdir(run / "samples")) == ["step_0000002.png", "step_0000003.png"]
  summaries = tensorboard_summaries(run / "tensorboard")
  assert set(summaries["mmd2"]) == set(summaries["grad_norm"]) == {1, 2, 3}
  assert all(np.isfinite(v) and v > 0 for v in summaries["grad_norm"].values())
  # The K-step sample grid of 4 images of 8x8, at every checkpoint.
  assert set(summaries["samples"]) == {2, 3}
  assert all(shape[0] >= 16 and shape[1] >= 16 for shape in summaries["samples"].values())

  # Stopping at step 2 and resuming to 3 (a fixed real batch) reproduces the straight run.
  finetune_driver(tmp_path / "resumed", init, steps=2, real=real)
  os.remove(tmp_path / "resumed" / "unet.weights.h5")
  resumed = finetune_driver(tmp_path / "resumed", init, steps=3, real=real)
  for a, b in zip(resumed.unet.weights, straight.unet.weights):
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-7)

  base = randomize_weights(tiny_unet(image_size=IMAGE_SIZE), scale=0.05)
  assert any(not np.allclose(a.numpy(), b.numpy()) for a, b in
             zip(straight.unet.weights, base.weights))
  with pytest.raises(UserError, match="exists"):
    finetune_driver(tmp_path / "straight", init, steps=5, real=real)


def test_bad_driver_input_is_a_user_error(tmp_path):
  real = real_images(4, seed=0)
  with pytest.raises(UserError, match="^learning_rate=0.0 must be > 0$"):
    finetune.finetune(
        unet_factory=None, feature_net_factory=None, kernel=None, dataset_fn=None, schedule=SCHEDULE,
        workdir=str(tmp_path), num_steps=2, finetune_steps=3, learning_rate=0.0, grad_clip=0.5,
        global_batch_size=real.shape[0], checkpoint_every=2, log_every=1, seed=0,
        strategy=tf.distribute.get_strategy(), init_checkpoint=None)
  assert distribute.check_global_batch(4, tf.distribute.get_strategy()) == 4


def test_driver_names_its_batch_parameter(tmp_path):
  # The command line says which flag set it (test_config).
  with pytest.raises(UserError, match="^global_batch_size=0 must be > 0$"):
    finetune.finetune(
        unet_factory=None, feature_net_factory=None, kernel=None, dataset_fn=None, schedule=SCHEDULE,
        workdir=str(tmp_path), num_steps=2, finetune_steps=3, learning_rate=1e-3, grad_clip=0.5,
        global_batch_size=0, checkpoint_every=2, log_every=1, seed=0,
        strategy=tf.distribute.get_strategy(), init_checkpoint=None)
