"""The DDIM sampler (Song et al. 2021) as pure functions of an ε-model.

`eps_model(x_t, t) -> ε̂` takes images [B, H, W, C] and timesteps [B] (int32, or float32 for
continuous timesteps, see `steps.py`). Everything that samples runs the steps of `Steps` below,
unchanged: evaluation and the exported serving graph through `sample`, finetuning through `sample`
or, replaying one step at a time, through `replay.py`.
"""

import tensorflow as tf

from mmd_keras import steps as steps_lib


def _alpha_bar(alphas_cumprod, t):
  """ᾱ_t, with ᾱ_{−1} = 1 (the clean image at the end of the chain)."""
  t = tf.convert_to_tensor(t, tf.int32)
  return tf.where(t >= 0, tf.gather(alphas_cumprod, tf.maximum(t, 0)), 1.0)


def predict_x0(x_t, eps, alpha_bar):
  """x̂0 = (x_t − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t)."""
  return (x_t - tf.sqrt(1.0 - alpha_bar) * eps) / tf.sqrt(alpha_bar)


def ddim_step(eps_model, x_t, *, t, t_prev, alphas_cumprod, eta=0.0, clip_x0=False, noise=None):
  """One step of p(x_{t_prev} | x_t) in DDIM's generalized form; returns (x_{t_prev}, x̂0).

  σ = η · sqrt((1 − ᾱ_prev) / (1 − ᾱ_t)) · sqrt(1 − ᾱ_t / ᾱ_prev)
  x_prev = sqrt(ᾱ_prev) x̂0 + sqrt(1 − ᾱ_prev − σ²) ε̂ + σ z
  t_prev = −1 is the last step (ᾱ_prev = 1, so x_prev = x̂0). `noise` (z) is needed when η > 0.
  """
  batch = tf.shape(x_t)[0]
  eps = eps_model(x_t, tf.fill([batch], tf.cast(t, tf.int32)))
  alpha_bar = _alpha_bar(alphas_cumprod, t)
  alpha_bar_prev = _alpha_bar(alphas_cumprod, t_prev)
  x0_pred = predict_x0(x_t, eps, alpha_bar)
  if clip_x0:
    x0_pred = tf.clip_by_value(x0_pred, -1.0, 1.0)
    # Keep ε̂ consistent with the clipped x̂0 so the step stays on the DDIM trajectory.
    eps = (x_t - tf.sqrt(alpha_bar) * x0_pred) / tf.sqrt(1.0 - alpha_bar)
  sigma = eta * tf.sqrt((1.0 - alpha_bar_prev) / (1.0 - alpha_bar)) * tf.sqrt(
      1.0 - alpha_bar / alpha_bar_prev)
  direction = tf.sqrt(tf.maximum(1.0 - alpha_bar_prev - sigma**2, 0.0)) * eps
  x_prev = tf.sqrt(alpha_bar_prev) * x0_pred + direction
  if eta:
    if noise is None:
      raise ValueError("ddim_step: eta > 0 needs `noise`")
    x_prev += sigma * noise
  return x_prev, x0_pred


class Steps:
  """DDIM's K steps by index i = 0 … K−1 (step i goes from the (K−i)-th largest timestep down):
  `step` takes i as a Python int (an unrolled loop) or an int32 scalar tensor (a `tf.while_loop`,
  as finetuning's replayed backward pass runs it). The state is (x_t,).

  η > 0 needs `seed` ([2] int): step i draws its noise from stateless_normal(fold_in(seed, i)), so a
  seed fixes the whole trajectory.

  Continuous timesteps (float values or a float tensor [K], `steps.is_continuous`) step by
  `steps.ContinuousSteps` (η = 0 only): x_prev = sqrt(ᾱ_prev) x̂0 + sqrt(1 − ᾱ_prev) ε̂ written as
  c_x x_t + c_d x̂0.
  """

  def __init__(self, timesteps, *, alphas_cumprod, eta=0.0, clip_x0=False, seed=None):
    if eta and seed is None:
      raise ValueError("ddim.sample: eta > 0 needs a `seed` ([2] int) for its stateless noise")
    self._clip_x0 = clip_x0
    self._continuous = None
    if steps_lib.is_continuous(timesteps):
      if eta:
        raise ValueError("ddim.sample: continuous timesteps need eta = 0")
      self._continuous = steps_lib.ContinuousSteps(timesteps, alphas_cumprod=alphas_cumprod,
                                                   second_order=False)
      self.num_steps = self._continuous.num_steps
      return
    timesteps = [int(t) for t in timesteps]
    if not timesteps:
      raise ValueError("ddim.sample: `timesteps` is empty")
    self.num_steps = len(timesteps)
    self._t = timesteps[::-1]
    self._t_prev = ([-1] + timesteps[:-1])[::-1]
    self._alphas_cumprod = tf.convert_to_tensor(alphas_cumprod, tf.float32)
    self._eta = eta
    self._seed = seed

  def initial_state(self, x_T):
    return (x_T,)

  def step(self, eps_model, state, i):
    (x,) = state
    if self._continuous is not None:
      c = self._continuous.at(i)
      x0_pred = (x - c["sigma"] * eps_model(x, steps_lib.eps_timesteps(x, c["t"]))) / c["alpha"]
      if self._clip_x0:
        x0_pred = tf.clip_by_value(x0_pred, -1.0, 1.0)
      return (c["c_x"] * x + c["c_d"] * x0_pred,)
    noise = None
    if self._eta:
      noise = tf.random.stateless_normal(
          tf.shape(x), seed=tf.random.experimental.stateless_fold_in(self._seed, i),
          dtype=x.dtype)
    x, _ = ddim_step(eps_model, x, t=steps_lib.at_step(self._t, i),
                     t_prev=steps_lib.at_step(self._t_prev, i),
                     alphas_cumprod=self._alphas_cumprod, eta=self._eta, clip_x0=self._clip_x0,
                     noise=noise)
    return (x,)

  def output(self, state):
    return state[0]


def sample(eps_model, x_T, *, timesteps, alphas_cumprod, eta=0.0, clip_x0=False, seed=None):
  """x_T ~ N(0, I) -> x_0 over the increasing timestep subsequence `timesteps` (length K).

  The loop is unrolled in Python: K is fixed per call, gradients flow through every step, and a
  `tf.function` around this traces the K-step graph once. η > 0 needs `seed` (see `Steps`).
  """
  steps = Steps(timesteps, alphas_cumprod=alphas_cumprod, eta=eta, clip_x0=clip_x0, seed=seed)
  return steps_lib.run(steps, eps_model, x_T)


def to_uint8(images):
  """[-1, 1] float -> [0, 255] uint8, rounding to nearest."""
  return tf.cast(tf.round(tf.clip_by_value((images + 1.0) * 127.5, 0.0, 255.0)), tf.uint8)
