"""A K-step sampler as K steps addressed by index, so one step function serves two loops.

A sampler's `Steps` object (`ddim.Steps`, `dpm_solver.Steps`) has `num_steps`,
`initial_state(x_T)` -> a tuple of tensors, `step(eps_model, state, i)` -> the next state (one
ε-model call) and `output(state)` -> x_0. Step i may be a Python int: `run` unrolls the K steps in
Python (sampling, evaluation, export). It may also be an int32 scalar tensor: finetuning's replayed
backward pass (`replay.py`) runs the same steps in a `tf.while_loop`, whose graph does not grow
with K. Per-step constants live in Python lists read by `at_step`.

Timesteps are integers (indices into ᾱ) or continuous: float values, or a float tensor [K] (learned
timesteps, which gradients must reach). Continuous timesteps take ᾱ(t) from
`schedule.log_alphas_cumprod_at` and step by `ContinuousSteps`.
"""

import numpy as np
import tensorflow as tf

from mmd_keras import schedule as schedule_lib

# A continuous step's coefficients (see `continuous_coefficients`).
COEFFICIENTS = ("t", "alpha", "sigma", "c_x", "c_d", "w")


def at_step(values, i):
  """values[i] of a per-step table: a Python value for a Python int i (unrolled graphs keep their
  constants), a gathered tensor for a tensor i."""
  if isinstance(i, int):
    return values[i]
  return tf.gather(tf.constant(values), i)


def run(steps, eps_model, x_T):
  """x_0 from x_T by the K steps of `steps`, unrolled in Python: gradients flow through every step."""
  state = steps.initial_state(x_T)
  for i in range(steps.num_steps):
    state = steps.step(eps_model, state, i)
  return steps.output(state)


def is_continuous(timesteps):
  """Whether `timesteps` are continuous: a tensor (differentiable) or float values (an empty list,
  float for NumPy, is neither)."""
  if tf.is_tensor(timesteps):
    return True
  values = np.asarray(timesteps)
  return values.size > 0 and np.issubdtype(values.dtype, np.floating)


def continuous_coefficients(timesteps, i, *, alphas_cumprod, second_order):
  """{COEFFICIENTS: float32 scalar} of step i over increasing continuous timesteps t_0 < … < t_{K−1}
  (a float tensor [K]), from t = t_{K−1−i} to t_prev, the next smaller one (−1 after t_0: ᾱ = 1):

    α = sqrt(ᾱ(t)), σ = sqrt(1 − ᾱ(t)), x̂0 = (x_t − σ ε̂) / α, D = x̂0 + w (x̂0 − x̂0_last)
    x_{t_prev} = c_x x_t + c_d D,  c_x = σ_prev / σ,  c_d = α_prev − σ_prev α / σ

  which is DDIM (η = 0) for w = 0 and DPM-Solver++(2M) for w = h / (2 h_last) (its 1/(2r), with
  h = λ_prev − λ and h_last = λ − λ_last, λ = log(α/σ)) on every step but the first and the last.
  Computed in float64 from log ᾱ (σ² = −expm1(log ᾱ) keeps its digits near t = 0); i may be a
  tensor. Valid (finite gradients) for t_0 > 0, as learned timesteps are.
  """
  t_all = tf.cast(timesteps, tf.float64)
  k = tf.shape(t_all)[0]
  j = k - 1 - i
  first, last = tf.equal(i, 0), tf.equal(j, 0)
  # The first step has no t_last, the last no t_prev (−1): t itself stands in for them, which
  # keeps every branch finite; tf.where below discards what depends on them.
  t, t_prev, t_last = (tf.gather(t_all, n) for n in (j, tf.maximum(j - 1, 0),
                                                      tf.minimum(j + 1, k - 1)))
  log_a, log_a_prev, log_a_last = tf.unstack(
      schedule_lib.log_alphas_cumprod_at(alphas_cumprod, tf.stack([t, t_prev, t_last])))
  sigma_of = lambda log_alpha: tf.sqrt(-tf.math.expm1(log_alpha))
  alpha, sigma = tf.exp(0.5 * log_a), sigma_of(log_a)
  alpha_prev = tf.where(last, tf.ones_like(alpha), tf.exp(0.5 * log_a_prev))
  sigma_prev = tf.where(last, tf.zeros_like(sigma), sigma_of(log_a_prev))
  w = tf.zeros_like(alpha)
  if second_order:
    log_snr = lambda log_alpha: 0.5 * log_alpha - tf.math.log(sigma_of(log_alpha))
    h = log_snr(log_a_prev) - log_snr(log_a)
    h_last = log_snr(log_a) - log_snr(log_a_last)
    middle = tf.logical_not(tf.logical_or(first, last))
    w = tf.where(middle, 0.5 * h / tf.where(middle, h_last, tf.ones_like(h_last)), w)
  values = dict(t=t, alpha=alpha, sigma=sigma, c_x=sigma_prev / sigma,
                c_d=alpha_prev - sigma_prev * alpha / sigma, w=w)
  return {name: tf.cast(value, tf.float32) for name, value in values.items()}


class Tables:
  """Per-step coefficients given as tables ({name: K values}), read as `ContinuousSteps` gives
  them."""

  def __init__(self, columns):
    self._columns = columns

  def at(self, i):
    """{name: value} of step i."""
    return {name: at_step(values, i) for name, values in self._columns.items()}


class ContinuousSteps:
  """The coefficients of K steps over continuous timesteps (`continuous_coefficients`): from a
  tensor, computed inside each step, so that gradients reach the timesteps (also through a replayed
  step); from float values, computed once (eagerly, also inside a tf.function) into Python float
  tables, so an unrolled graph (an export) holds them as constants, as for integer timesteps."""

  def __init__(self, timesteps, *, alphas_cumprod, second_order):
    self._alphas_cumprod = np.asarray(alphas_cumprod, np.float64)
    self._second_order = second_order
    self._timesteps = timesteps
    self._tables = None
    if tf.is_tensor(timesteps):
      self.num_steps = int(timesteps.shape[0])
      return
    values = np.asarray(timesteps, np.float64)
    if values.ndim != 1 or not len(values) or np.any(np.diff(values) <= 0):
      raise ValueError(f"continuous timesteps must increase strictly, got {values.tolist()}")
    self.num_steps = len(values)
    with tf.init_scope():
      rows = [continuous_coefficients(tf.constant(values), i, alphas_cumprod=self._alphas_cumprod,
                                      second_order=second_order) for i in range(self.num_steps)]
      self._tables = Tables({name: [float(row[name]) for row in rows] for name in COEFFICIENTS})

  def at(self, i):
    """{COEFFICIENTS: value} of step i."""
    if self._tables is None:
      return continuous_coefficients(self._timesteps, i, alphas_cumprod=self._alphas_cumprod,
                                     second_order=self._second_order)
    return self._tables.at(i)


def eps_timesteps(x, t):
  """The ε-model's timesteps [B] for images x: int32 for an integer step, float32 otherwise."""
  dtype = tf.int32 if isinstance(t, (int, np.integer)) or (
      tf.is_tensor(t) and t.dtype.is_integer) else tf.float32
  return tf.fill([tf.shape(x)[0]], tf.cast(t, dtype))
