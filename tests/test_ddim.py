"""ddim.py against the Gaussian closed form and hand-computed DDIM steps.

For data x0 ~ N(m, s²) per pixel, x_t = sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε is Gaussian too, and the optimal
ε-model is E[ε | x_t] = sqrt(1 − ᾱ_t) (x_t − sqrt(ᾱ_t) m) / (ᾱ_t s² + 1 − ᾱ_t). With it, DDIM must turn
N(0, I) into N(m, s²) up to its discretisation error, which for this linear model is known exactly:
every step is an affine map of x plus σ z, so mean and variance follow a scalar recursion (below).
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from helpers import gaussian_eps_model
from mmd_keras import ddim
from mmd_keras import schedule as schedule_lib

SCHEDULE = schedule_lib.NoiseSchedule.linear()
MEANS = np.array([0.3, -0.4])
STDS = np.array([0.5, 0.25])
NUM_SAMPLES = 20_000


def exact_ddim_moments(m, s, *, timesteps, alphas_cumprod, eta):
  """Mean and std of DDIM's output for x_T ~ N(0, 1) and the Gaussian ε-model, in float64."""
  mean, var = 0.0, 1.0
  previous = [-1] + list(timesteps[:-1])
  for t, t_prev in zip(reversed(timesteps), reversed(previous)):
    a = alphas_cumprod[t]
    a_prev = 1.0 if t_prev < 0 else alphas_cumprod[t_prev]
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)

    def step(x):
      eps = math.sqrt(1 - a) * (x - math.sqrt(a) * m) / (a * s * s + 1 - a)
      x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
      return math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - sigma**2, 0.0)) * eps

    offset = step(0.0)
    slope = step(1.0) - offset
    mean, var = slope * mean + offset, slope**2 * var + sigma**2
  return mean, math.sqrt(var)


@pytest.mark.parametrize("num_steps, eta, rtol", [(100, 0.0, 0.08), (1000, 0.0, 0.03),
                                                  (1000, 1.0, 0.03)])
def test_ddim_turns_noise_into_the_gaussian_data(num_steps, eta, rtol):
  timesteps = SCHEDULE.timesteps(num_steps)
  x_T = tf.random.stateless_normal([NUM_SAMPLES, 1, 1, 2], seed=[0, num_steps])
  samples = ddim.sample(gaussian_eps_model(MEANS, STDS, SCHEDULE.alphas_cumprod), x_T,
                        timesteps=timesteps, alphas_cumprod=SCHEDULE.alphas_cumprod, eta=eta,
                        seed=tf.constant([3, 4]))
  samples = samples.numpy().reshape(-1, 2).astype(np.float64)
  mean, std = samples.mean(axis=0), samples.std(axis=0)
  # Sampling error (4.5 standard errors) of mean and std.
  mean_tol = 4.5 * STDS / math.sqrt(NUM_SAMPLES)
  std_tol = 4.5 * STDS / math.sqrt(2 * NUM_SAMPLES)
  for c in range(2):
    exact_mean, exact_std = exact_ddim_moments(
        MEANS[c], STDS[c], timesteps=timesteps, alphas_cumprod=SCHEDULE.alphas_cumprod, eta=eta)
    # The implementation follows the discretised DDIM chain exactly ...
    assert abs(mean[c] - exact_mean) < mean_tol[c] + 1e-3
    assert abs(std[c] - exact_std) < std_tol[c] + 1e-3
    # ... and that chain solves the problem: N(0, 1) -> N(m, s²) up to discretisation.
    assert abs(mean[c] - MEANS[c]) < mean_tol[c] + 0.01
    assert abs(std[c] - STDS[c]) < rtol * STDS[c]


def test_eta_zero_is_deterministic():
  eps_model = gaussian_eps_model(MEANS, STDS, SCHEDULE.alphas_cumprod)
  x_T = tf.random.stateless_normal([16, 2, 2, 2], seed=[1, 1])
  kwargs = dict(timesteps=SCHEDULE.timesteps(10), alphas_cumprod=SCHEDULE.alphas_cumprod)
  np.testing.assert_array_equal(ddim.sample(eps_model, x_T, **kwargs).numpy(),
                                ddim.sample(eps_model, x_T, **kwargs).numpy())


def test_stochastic_sampling_is_fixed_by_its_seed():
  eps_model = gaussian_eps_model(MEANS, STDS, SCHEDULE.alphas_cumprod)
  x_T = tf.random.stateless_normal([16, 2, 2, 2], seed=[1, 1])
  kwargs = dict(timesteps=SCHEDULE.timesteps(10), alphas_cumprod=SCHEDULE.alphas_cumprod,
                eta=0.5)
  a = ddim.sample(eps_model, x_T, seed=tf.constant([5, 6]), **kwargs).numpy()
  b = ddim.sample(eps_model, x_T, seed=tf.constant([5, 6]), **kwargs).numpy()
  c = ddim.sample(eps_model, x_T, seed=tf.constant([5, 7]), **kwargs).numpy()
  np.testing.assert_array_equal(a, b)
  assert np.abs(a - c).max() > 1e-2
  with pytest.raises(ValueError, match="seed"):
    ddim.sample(eps_model, x_T, **kwargs)


def _toy_eps_model(x_t, t):
  """A non-trivial, t-dependent ε-model with an easy NumPy twin."""
  return tf.tanh(x_t) * 0.8 + tf.cast(t, tf.float32)[:, None, None, None] / 1000.0


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_the_formula(eta):
  rng = np.random.default_rng(0)
  x_t = rng.normal(size=[4, 3, 3, 2]).astype(np.float32)
  z = rng.normal(size=x_t.shape).astype(np.float32)
  t, t_prev = 600, 400
  a, a_prev = SCHEDULE.alphas_cumprod[t], SCHEDULE.alphas_cumprod[t_prev]
  x_prev, x0_pred = ddim.ddim_step(
      _toy_eps_model, tf.constant(x_t), t=t, t_prev=t_prev,
      alphas_cumprod=tf.constant(SCHEDULE.alphas_cumprod, tf.float32), eta=eta,
      noise=tf.constant(z))
  eps = np.tanh(x_t.astype(np.float64)) * 0.8 + t / 1000.0
  x0 = (x_t - np.sqrt(1 - a) * eps) / np.sqrt(a)
  # DDIM eq. (12) with σ from eq. (16).
  sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
  expected = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev - sigma**2) * eps + sigma * z
  np.testing.assert_allclose(x0_pred.numpy(), x0, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(x_prev.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_last_step_returns_the_x0_prediction():
  x_t = tf.random.stateless_normal([4, 3, 3, 1], seed=[2, 2])
  x_prev, x0_pred = ddim.ddim_step(
      _toy_eps_model, x_t, t=20, t_prev=-1,
      alphas_cumprod=tf.constant(SCHEDULE.alphas_cumprod, tf.float32))
  a = SCHEDULE.alphas_cumprod[20]
  eps = np.tanh(x_t.numpy()) * 0.8 + 0.02
  np.testing.assert_allclose(x0_pred.numpy(), (x_t.numpy() - np.sqrt(1 - a) * eps) / np.sqrt(a),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(x_prev.numpy(), x0_pred.numpy(), rtol=1e-6, atol=1e-6)


def test_clip_x0_keeps_the_prediction_in_range():
  # At t near T, x̂0 divides by sqrt(ᾱ_t) ≈ 0.006: unclipped it leaves [-1, 1] by far.
  x_t = 3.0 * tf.random.stateless_normal([8, 4, 4, 1], seed=[3, 3])
  alphas_cumprod = tf.constant(SCHEDULE.alphas_cumprod, tf.float32)
  _, unclipped = ddim.ddim_step(_toy_eps_model, x_t, t=999, t_prev=899,
                                alphas_cumprod=alphas_cumprod)
  _, clipped = ddim.ddim_step(_toy_eps_model, x_t, t=999, t_prev=899,
                              alphas_cumprod=alphas_cumprod, clip_x0=True)
  assert np.abs(unclipped.numpy()).max() > 1.0
  assert np.abs(clipped.numpy()).max() <= 1.0
  samples = ddim.sample(_toy_eps_model, x_t, timesteps=SCHEDULE.timesteps(5),
                        alphas_cumprod=SCHEDULE.alphas_cumprod, clip_x0=True)
  assert np.abs(samples.numpy()).max() <= 1.0


def test_to_uint8_rounds_to_nearest():
  values = np.array([-1.5, -1.0, -0.5, 0.0, 0.3, 1.0, 2.0], np.float32)
  expected = np.clip(np.round((np.clip(values, -1, 1) + 1) * 127.5), 0, 255).astype(np.uint8)
  got = ddim.to_uint8(tf.constant(values)).numpy()
  assert got.dtype == np.uint8
  np.testing.assert_array_equal(got, expected)
  assert got[1] == 0 and got[5] == 255
