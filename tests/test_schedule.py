"""schedule.py against closed forms written out independently."""

import math

import numpy as np
import pytest
import tensorflow as tf

from mmd_keras import schedule as schedule_lib
from mmd_keras.errors import UserError


def test_linear_betas_match_the_closed_form():
  betas = schedule_lib.linear_betas(num_timesteps=1000, beta_start=1e-4, beta_end=0.02)
  expected = [1e-4 + (0.02 - 1e-4) * t / 999 for t in range(1000)]
  np.testing.assert_allclose(betas, expected, rtol=1e-12)
  assert betas.shape == (1000,) and betas.dtype == np.float64


def test_alphas_cumprod_is_the_running_product():
  sched = schedule_lib.NoiseSchedule.linear(num_timesteps=50, beta_start=1e-3, beta_end=0.2)
  betas = [1e-3 + (0.2 - 1e-3) * t / 49 for t in range(50)]
  expected = [math.prod(1.0 - b for b in betas[:t + 1]) for t in range(50)]
  np.testing.assert_allclose(sched.alphas_cumprod, expected, rtol=1e-12)
  np.testing.assert_allclose(sched.alphas_cumprod_tf().numpy(), expected, rtol=1e-6)
  assert sched.num_timesteps == 50


def test_default_schedule_endpoints():
  # ᾱ_{T-1} of the DDPM schedule: exp(Σ log(1 − β_t)) summed in float64.
  sched = schedule_lib.NoiseSchedule.linear()
  log_sum = sum(math.log1p(-(1e-4 + (0.02 - 1e-4) * t / 999)) for t in range(1000))
  np.testing.assert_allclose(sched.alphas_cumprod[-1], math.exp(log_sum), rtol=1e-9)
  np.testing.assert_allclose(sched.alphas_cumprod[0], 1 - 1e-4, rtol=1e-12)


@pytest.mark.parametrize("num_steps", [1, 5, 10, 100, 1000, 7, 333])
def test_uniform_subsequence_is_every_T_over_K(num_steps):
  seq = schedule_lib.timestep_subsequence(num_timesteps=1000, num_steps=num_steps, kind="uniform")
  assert list(seq) == [i * (1000 // num_steps) for i in range(num_steps)]


@pytest.mark.parametrize("num_steps, expected", [
    # round(T − i·T/K) − 1, i = 0 … K−1, in increasing order (diffusers' "trailing").
    (5, [199, 399, 599, 799, 999]),
    (3, [332, 666, 999]),  # 1000 − 333.3·i = 1000, 666.7, 333.3.
    (1, [999]),
])
def test_trailing_subsequence_starts_at_T_minus_1(num_steps, expected):
  seq = schedule_lib.timestep_subsequence(num_timesteps=1000, num_steps=num_steps, kind="trailing")
  assert list(seq) == expected


@pytest.mark.parametrize("num_steps, expected", [
    (5, [0, 250, 500, 749, 999]),  # 999·i/4 = 0, 249.75, 499.5 (to even: 500), 749.25, 999.
    (2, [0, 999]),
])
def test_linspace_subsequence_spans_0_to_T_minus_1(num_steps, expected):
  seq = schedule_lib.timestep_subsequence(num_timesteps=1000, num_steps=num_steps, kind="linspace")
  assert list(seq) == expected


@pytest.mark.parametrize("kind", ["uniform", "trailing", "linspace"])
@pytest.mark.parametrize("num_steps", [1, 7, 64, 999, 1000])
def test_every_spacing_is_k_distinct_increasing_timesteps(kind, num_steps):
  seq = schedule_lib.timestep_subsequence(num_timesteps=1000, num_steps=num_steps, kind=kind)
  assert len(seq) == num_steps and seq[0] >= 0 and seq[-1] <= 999
  assert np.all(np.diff(seq) > 0)


def test_explicit_timesteps_are_taken_as_given():
  seq = schedule_lib.timestep_subsequence(num_timesteps=1000, num_steps=3, kind=(0, 500, 999))
  assert list(seq) == [0, 500, 999] and seq.dtype == np.int64


@pytest.mark.parametrize("timesteps, message", [
    ((0, 500), "^kind=0,500 lists 2 timesteps; expected K=3 .num_steps."),
    ((0, 500, 1000), r"^kind=0,500,1000 must lie in \[0, 999\]"),
    ((-1, 500, 999), r"^kind=-1,500,999 must lie in \[0, 999\]"),
    ((0, 600, 500), "^kind=0,600,500 must be strictly increasing"),
    ((0, 500, 500), "^kind=0,500,500 must be strictly increasing"),
])
def test_bad_explicit_timesteps(timesteps, message):
  with pytest.raises(UserError, match=message):
    schedule_lib.timestep_subsequence(num_timesteps=1000, num_steps=3, kind=timesteps)


@pytest.mark.parametrize("num_steps", [2, 5, 10, 20])
def test_quadratic_subsequence_is_the_ddim_formula(num_steps):
  # DDIM's CIFAR-10 choice: τ_i = floor((i · sqrt(0.8 T) / (K − 1))²).
  T = 1000
  expected = [int(math.floor((i * math.sqrt(0.8 * T) / (num_steps - 1)) ** 2))
              for i in range(num_steps)]
  seq = schedule_lib.timestep_subsequence(num_timesteps=T, num_steps=num_steps, kind="quadratic")
  assert list(seq) == expected
  assert all(b > a for a, b in zip(expected, expected[1:]))


def test_quadratic_with_repeated_timesteps_is_refused():
  # For K = 50 and T = 1000 the first two DDIM timesteps both floor to 0.
  assert int((math.sqrt(800) / 49) ** 2) == 0
  with pytest.raises(UserError, match="^num_steps=50 repeats timesteps with kind=quadratic"):
    schedule_lib.timestep_subsequence(num_timesteps=1000, num_steps=50, kind="quadratic")


def test_schedule_timesteps_method_agrees():
  sched = schedule_lib.NoiseSchedule.linear(num_timesteps=100)
  assert list(sched.timesteps(4)) == [0, 25, 50, 75]


@pytest.mark.parametrize("num_steps", [0, -3, 1001])
def test_num_steps_out_of_range_names_the_parameter(num_steps):
  with pytest.raises(UserError, match=rf"^num_steps={num_steps} \(K\) must be in \[1, 1000\]"):
    schedule_lib.timestep_subsequence(num_timesteps=1000, num_steps=num_steps)


def test_unknown_kind_names_the_parameter():
  with pytest.raises(UserError, match="^kind=cosine must be one of uniform"):
    schedule_lib.timestep_subsequence(num_timesteps=1000, num_steps=10, kind="cosine")


def test_bad_schedule_parameters():
  with pytest.raises(UserError, match="^num_timesteps=0 must be >= 1$"):
    schedule_lib.linear_betas(num_timesteps=0)
  with pytest.raises(UserError, match="^beta_start=0.1 and beta_end=0.01 must satisfy"):
    schedule_lib.linear_betas(beta_start=0.1, beta_end=0.01)


def test_q_sample_is_the_forward_marginal():
  alphas_cumprod = tf.constant([0.9, 0.5, 0.1], tf.float32)
  x0 = tf.constant(np.full([3, 2, 2, 1], 0.7, np.float32))
  noise = tf.constant(np.full([3, 2, 2, 1], -1.3, np.float32))
  x_t = schedule_lib.q_sample(x0, tf.constant([0, 1, 2]), noise, alphas_cumprod=alphas_cumprod)
  expected = [math.sqrt(a) * 0.7 + math.sqrt(1 - a) * -1.3 for a in (0.9, 0.5, 0.1)]
  np.testing.assert_allclose(x_t.numpy()[:, 0, 0, 0], expected, rtol=1e-6)
