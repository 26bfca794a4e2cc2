"""dpm_solver.py against the Gaussian closed form, an independent NumPy DPM-Solver++(2M), and DDIM.

For data x0 ~ N(m, s²) per pixel the optimal ε-model is affine in x_t, and every step is a linear
combination of x_t and x̂0s, so the sampler is an affine map x_0 = a x_T + b per channel: for
x_T ~ N(0, 1) its output is exactly N(b, a²), measured from x_T = 0 and x_T = 1. The exact
probability-flow ODE keeps (x_t − α_t m) / sqrt(α_t² s² + σ_t²) constant, so from the first
timestep t_K it gives a* = s / sqrt(α_{t_K}² s² + σ_{t_K}²).
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from helpers import FINETUNER_IMAGE_SIZE
from helpers import FINETUNER_SCHEDULE
from helpers import gaussian_eps_model
from helpers import randomize_weights
from helpers import tiny_unet
from mmd_keras import ddim
from mmd_keras import dpm_solver
from mmd_keras import schedule as schedule_lib

SCHEDULE = schedule_lib.NoiseSchedule.linear()
MEANS = np.array([0.3, -0.4])
STDS = np.array([0.5, 0.25])
NUM_SAMPLES = 20_000


def oracle():
  return gaussian_eps_model(MEANS, STDS, SCHEDULE.alphas_cumprod)


def affine_map(sampler, *, timesteps):
  """(a, b) per channel of x_0 = a x_T + b under the Gaussian ε-oracle."""
  x_T = tf.constant(np.stack([np.zeros([1, 1, 2]), np.ones([1, 1, 2])]), tf.float32)
  x_0 = sampler(oracle(), x_T, timesteps=timesteps,
                alphas_cumprod=SCHEDULE.alphas_cumprod).numpy().reshape(2, 2).astype(np.float64)
  return x_0[1] - x_0[0], x_0[0]


def exact_ode_slope(first_timestep):
  """a* = s / sqrt(ᾱ s² + 1 − ᾱ) at ᾱ = ᾱ_{t_K}: the exact ODE map's slope."""
  alpha_bar = SCHEDULE.alphas_cumprod[first_timestep]
  return STDS / np.sqrt(alpha_bar * STDS**2 + 1.0 - alpha_bar)


def reference_dpm_solver_pp(x_T, *, timesteps, alphas_cumprod):
  """Algorithm 2 of Lu et al. (2022) in float64 with the exact data prediction
  x_θ(x, t) = E[x0 | x_t = x] = m + s² α_t (x − α_t m) / (α_t² s² + σ_t²) and a first-order last
  step into σ = 0. Returns the K model inputs x̃_{t_0}, …, x̃_{t_{K−1}} and x_0."""
  alpha = np.sqrt(alphas_cumprod)
  sigma = np.sqrt(1.0 - alphas_cumprod)
  lam = np.log(alpha / sigma)

  def x_theta(x, t):
    return MEANS + STDS**2 * alpha[t] * (x - alpha[t] * MEANS) / (
        alpha[t]**2 * STDS**2 + sigma[t]**2)

  ts = list(timesteps)[::-1]
  x = x_T
  inputs, predictions = [], []
  for i, t in enumerate(ts):
    inputs.append(x)
    predictions.append(x_theta(x, t))
    if i == len(ts) - 1:
      # h = ∞: σ_0 / σ_t = 0 and e^{−h} = 0 with α_0 = 1.
      return inputs, predictions[-1]
    s = ts[i + 1]
    h = lam[s] - lam[t]
    if i == 0:
      d = predictions[-1]
    else:
      r = (lam[t] - lam[ts[i - 1]]) / h
      d = (1 + 1 / (2 * r)) * predictions[-1] - 1 / (2 * r) * predictions[-2]
    x = sigma[s] / sigma[t] * x - alpha[s] * (np.exp(-h) - 1) * d


def relative_error(a, b):
  return np.abs(a - b).max() / np.abs(b).max()


# K = T is the same for every spacing.
@pytest.mark.parametrize("kind, num_steps, rtol", [("uniform", 200, 0.02), ("trailing", 200, 0.02),
                                                   ("uniform", 1000, 0.002)])
def test_turns_noise_into_the_gaussian_data(kind, num_steps, rtol):
  timesteps = SCHEDULE.timesteps(num_steps, kind)
  slope, offset = affine_map(dpm_solver.sample, timesteps=timesteps)
  # ᾱ_{t_K} ≈ 4e-5 ≠ 0: x_T ~ N(0, 1) is slightly off the marginal, the mean by ~1e-3.
  np.testing.assert_allclose(offset, MEANS, atol=2e-3)
  np.testing.assert_allclose(slope, STDS, rtol=rtol)
  # The same on samples, through a batch.
  x_T = tf.random.stateless_normal([NUM_SAMPLES, 1, 1, 2], seed=[0, num_steps])
  samples = dpm_solver.sample(oracle(), x_T, timesteps=timesteps,
                              alphas_cumprod=SCHEDULE.alphas_cumprod)
  samples = samples.numpy().reshape(-1, 2).astype(np.float64)
  # Sampling error: 4.5 standard errors of mean and std.
  np.testing.assert_allclose(samples.mean(axis=0), MEANS,
                             atol=4.5 * STDS.max() / math.sqrt(NUM_SAMPLES) + 2e-3)
  np.testing.assert_allclose(samples.std(axis=0), STDS,
                             rtol=4.5 / math.sqrt(2 * NUM_SAMPLES) + rtol)


def test_is_second_order_where_ddim_is_first():
  # Uniform spacing keeps the first-order last step (from t = 0) negligible.
  errors = {}
  for name, sampler in [("ddim", ddim.sample), ("dpm", dpm_solver.sample)]:
    for num_steps in (100, 200):
      timesteps = SCHEDULE.timesteps(num_steps)
      slope, _ = affine_map(sampler, timesteps=timesteps)
      errors[name, num_steps] = np.abs(slope / exact_ode_slope(timesteps[-1]) - 1).max()
  # Halving the step divides the error by 2^order.
  assert 1.7 < errors["ddim", 100] / errors["ddim", 200] < 2.3
  assert errors["dpm", 100] / errors["dpm", 200] > 3.5
  assert errors["dpm", 200] < 0.5 * errors["ddim", 200]


@pytest.mark.parametrize("kind", ["uniform", "trailing"])
@pytest.mark.parametrize("num_steps", [5, 10])
def test_trajectory_matches_the_published_update(kind, num_steps):
  timesteps = SCHEDULE.timesteps(num_steps, kind)
  x_T = tf.random.stateless_normal([16, 2, 2, 2], seed=[1, num_steps])
  eps_model = oracle()
  inputs = []

  def recording_eps_model(x_t, t):
    inputs.append(x_t.numpy())
    return eps_model(x_t, t)

  x_0 = dpm_solver.sample(recording_eps_model, x_T, timesteps=timesteps,
                          alphas_cumprod=SCHEDULE.alphas_cumprod).numpy()
  expected_inputs, expected_x_0 = reference_dpm_solver_pp(
      x_T.numpy().astype(np.float64), timesteps=timesteps, alphas_cumprod=SCHEDULE.alphas_cumprod)
  assert len(inputs) == num_steps
  for got, expected in zip(inputs, expected_inputs):
    assert relative_error(got, expected) < 1e-5
  assert relative_error(x_0, expected_x_0) < 1e-5


def test_one_step_is_the_x0_prediction():
  x_T = tf.random.stateless_normal([4, 2, 2, 2], seed=[2, 2])
  t = 700
  x_0 = dpm_solver.sample(oracle(), x_T, timesteps=[t], alphas_cumprod=SCHEDULE.alphas_cumprod)
  a = SCHEDULE.alphas_cumprod[t]
  eps = oracle()(x_T, tf.fill([4], t)).numpy().astype(np.float64)
  expected = (x_T.numpy() - np.sqrt(1 - a) * eps) / np.sqrt(a)
  assert relative_error(x_0.numpy(), expected) < 1e-5


@pytest.fixture(scope="module")
def unet():
  return randomize_weights(tiny_unet(image_size=FINETUNER_IMAGE_SIZE), seed=1, scale=0.05)


@pytest.mark.parametrize("model, clip_x0", [("oracle", False), ("unet", False), ("unet", True)])
def test_two_steps_are_ddim(model, clip_x0, unet):
  # First-order DPM-Solver++ is DDIM (η = 0); with K = 2 both steps are first order.
  if model == "oracle":
    eps_model, schedule, shape = oracle(), SCHEDULE, [16, 2, 2, 2]
  else:
    eps_model = lambda x, t: unet(x, t, training=False)
    schedule, shape = FINETUNER_SCHEDULE, [4, FINETUNER_IMAGE_SIZE, FINETUNER_IMAGE_SIZE, 1]
  # × 3 so that the UNet's first x̂0 leaves [−1, 1] (by up to 15) and clipping acts.
  x_T = 3.0 * tf.random.stateless_normal(shape, seed=[3, 3])
  kwargs = dict(timesteps=schedule.timesteps(2, "trailing"), alphas_cumprod=schedule.alphas_cumprod)
  got = dpm_solver.sample(eps_model, x_T, clip_x0=clip_x0, **kwargs).numpy()
  expected = ddim.sample(eps_model, x_T, clip_x0=clip_x0, **kwargs).numpy()
  assert relative_error(got, expected) < 1e-5
  if clip_x0:
    assert np.abs(got - dpm_solver.sample(eps_model, x_T, **kwargs).numpy()).max() > 1.0


def unet_gradients(unet, *, recompute, timesteps):
  """(∂L/∂θ, ∂L/∂c) for L = mean((x_0 − 0.5)²), ε = c_t · ε_θ(x_t, t) with c = 1 per timestep."""
  def call(x, t):
    return unet(x, t, training=False)

  if recompute:
    call = tf.recompute_grad(call)
  scales = tf.Variable(tf.ones([FINETUNER_SCHEDULE.num_timesteps]))

  def eps_model(x, t):
    return call(x, t) * tf.gather(scales, t)[:, None, None, None]

  x_T = tf.random.stateless_normal([4, FINETUNER_IMAGE_SIZE, FINETUNER_IMAGE_SIZE, 1], seed=[4, 4])

  @tf.function
  def gradients():
    with tf.GradientTape() as tape:
      x_0 = dpm_solver.sample(eps_model, x_T, timesteps=timesteps,
                              alphas_cumprod=FINETUNER_SCHEDULE.alphas_cumprod)
      loss = tf.reduce_mean(tf.square(x_0 - 0.5))
    return tape.gradient(loss, [*unet.trainable_weights, scales])

  # The scales' gradient comes as IndexedSlices (from the gather).
  grads = [tf.convert_to_tensor(g).numpy() for g in gradients()]
  return grads[:-1], grads[-1]


def test_gradients_flow_through_every_call_and_recompute_changes_nothing(unet):
  # K = 4: first-order, two second-order and the first-order last step.
  timesteps = FINETUNER_SCHEDULE.timesteps(4)
  plain, plain_scales = unet_gradients(unet, recompute=False, timesteps=timesteps)
  recomputed, recomputed_scales = unet_gradients(unet, recompute=True, timesteps=timesteps)
  assert all(np.all(np.isfinite(g)) for g in plain + [plain_scales])
  # Every call's output reaches the loss, and only the K calls exist.
  np.testing.assert_array_equal(np.flatnonzero(plain_scales), timesteps)
  silent = [w.path for w, g in zip(unet.trainable_weights, plain) if not np.any(g)]
  assert not silent, f"no gradient reaches {silent}"
  for weight, a, b in zip(unet.trainable_weights, recomputed, plain):
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5, weight.path
  np.testing.assert_allclose(recomputed_scales, plain_scales, rtol=1e-5, atol=1e-9)


def _toy_eps_model(x_t, t):
  """A t-dependent ε-model whose x̂0 at t near T is far outside [−1, 1]."""
  return tf.tanh(x_t) * 0.8 + tf.cast(t, tf.float32)[:, None, None, None] / 1000.0


def test_clip_x0_keeps_the_prediction_in_range():
  x_t = 3.0 * tf.random.stateless_normal([8, 4, 4, 1], seed=[3, 3])
  kwargs = dict(timesteps=[899, 999], alphas_cumprod=SCHEDULE.alphas_cumprod)
  # The state after the first step (999 -> 899) holds that step's x̂0.
  _, unclipped = dpm_solver.Steps(**kwargs).step(_toy_eps_model, (x_t, tf.zeros_like(x_t)), 0)
  _, clipped = dpm_solver.Steps(clip_x0=True, **kwargs).step(_toy_eps_model,
                                                             (x_t, tf.zeros_like(x_t)), 0)
  assert np.abs(unclipped.numpy()).max() > 1.0
  assert np.abs(clipped.numpy()).max() <= 1.0
  samples = dpm_solver.sample(_toy_eps_model, x_t, timesteps=SCHEDULE.timesteps(5),
                              alphas_cumprod=SCHEDULE.alphas_cumprod, clip_x0=True)
  assert np.abs(samples.numpy()).max() <= 1.0


def test_timesteps_must_increase():
  kwargs = dict(alphas_cumprod=SCHEDULE.alphas_cumprod)
  x_T = tf.zeros([1, 1, 1, 2])
  with pytest.raises(ValueError, match="empty"):
    dpm_solver.sample(oracle(), x_T, timesteps=[], **kwargs)
  with pytest.raises(ValueError, match="increase"):
    dpm_solver.sample(oracle(), x_T, timesteps=[0, 400, 400], **kwargs)
