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


def _log_alphas_cumprod(betas, t):
  """log ᾱ(t) written out: Σ_{s≤⌊t⌋} log(1 − β_s), plus the fraction of the next term."""
  floor = min(int(math.floor(t)), len(betas) - 2)
  fraction = t - floor
  return (sum(math.log1p(-b) for b in betas[:floor + 1])
          + fraction * math.log1p(-betas[floor + 1]))


def test_continuous_alphas_cumprod_interpolate_log_alphas_cumprod():
  sched = schedule_lib.NoiseSchedule.linear(num_timesteps=50, beta_start=1e-3, beta_end=0.2)
  t = [0.0, 0.25, 3.0, 17.6, 48.999, 49.0]
  expected = [_log_alphas_cumprod(sched.betas, v) for v in t]
  got_tf = schedule_lib.log_alphas_cumprod_at(sched.alphas_cumprod, tf.constant(t, tf.float64))
  got_np = schedule_lib.log_alphas_cumprod_at(sched.alphas_cumprod, np.array(t))
  np.testing.assert_allclose(got_tf.numpy(), expected, rtol=1e-12)
  np.testing.assert_allclose(got_np, expected, rtol=1e-12)
  # Exact at the integers: ᾱ_t itself.
  np.testing.assert_allclose(np.exp(got_tf.numpy()[[0, 2, 5]]), sched.alphas_cumprod[[0, 3, 49]],
                             rtol=1e-14)


def test_continuous_alphas_cumprod_slope_is_log_one_minus_beta():
  sched = schedule_lib.NoiseSchedule.linear(num_timesteps=50, beta_start=1e-3, beta_end=0.2)
  t = tf.constant([17.6, 2.2], tf.float32)
  with tf.GradientTape() as tape:
    tape.watch(t)
    log_alpha = schedule_lib.log_alphas_cumprod_at(sched.alphas_cumprod, t)
  np.testing.assert_allclose(tape.jacobian(log_alpha, t).numpy().diagonal(),
                             np.log1p(-sched.betas[[18, 3]]), rtol=1e-6)


@pytest.mark.parametrize("kind", ["uniform", "trailing", "linspace", "quadratic"])
def test_learned_timesteps_start_at_the_spacing(kind):
  # Only the ends of the range move inward, by ENDPOINT_MARGIN: (0, T − 1) is open.
  seq = schedule_lib.timestep_subsequence(num_timesteps=1000, num_steps=10, kind=kind)
  logits = schedule_lib.timestep_logits(seq, num_timesteps=1000)
  assert logits.shape == (11,) and logits.dtype == np.float32
  expected = np.where(seq == 0, 0.5, np.where(seq == 999, 998.5, seq))
  got = schedule_lib.learned_timesteps(logits, num_timesteps=1000).numpy()
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-3)


def test_learned_timesteps_increase_inside_the_range_for_any_logits():
  rng = np.random.default_rng(0)
  for _ in range(20):
    t = schedule_lib.learned_timesteps(rng.normal(0.0, 3.0, 8), num_timesteps=20).numpy()
    assert t.shape == (7,) and t[0] > 0 and t[-1] < 19 and np.all(np.diff(t) > 0), t


def test_learned_timesteps_round_trip_continuous_values():
  t = np.array([0.3, 12.25, 600.5, 998.9])
  logits = schedule_lib.timestep_logits(t, num_timesteps=1000)
  np.testing.assert_allclose(schedule_lib.learned_timesteps(logits, num_timesteps=1000), t,
                             rtol=1e-5)


def test_timesteps_that_cannot_start_inside_the_range_are_refused():
  with pytest.raises(UserError, match=r"^kind=0.0,1.0 cannot start learned timesteps: moved inside "
                                      r"\(0, 1\)"):
    schedule_lib.timestep_logits([0, 1], num_timesteps=2)


def test_float_timesteps_are_continuous_explicit_timesteps():
  seq = schedule_lib.timestep_subsequence(num_timesteps=100, num_steps=3, kind=[0.5, 40.25, 98.5])
  assert seq.dtype == np.float64 and list(seq) == [0.5, 40.25, 98.5]
  with pytest.raises(UserError, match=r"must lie in \[0, 99\]"):
    schedule_lib.timestep_subsequence(num_timesteps=100, num_steps=2, kind=[0.5, 99.5])
