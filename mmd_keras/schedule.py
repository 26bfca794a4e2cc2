"""The DDPM noise schedule: β_t, ᾱ_t (and ᾱ(t) of continuous t), the K-step DDIM timestep
subsequence, and the parametrisation of learned (continuous, increasing) timesteps.

Schedules are computed in float64 NumPy (closed forms are exact there) and cast to float32 only
at the TF border, as the original DDPM code does.
"""

import dataclasses

import numpy as np
import tensorflow as tf

from mmd_keras.errors import ParameterError

TIMESTEP_KINDS = ("uniform", "trailing", "linspace", "quadratic")


# Ho et al. 2020's schedule, the default of every base model.
DDPM_NUM_TIMESTEPS, DDPM_BETA_START, DDPM_BETA_END = 1000, 1e-4, 0.02


def linear_betas(*, num_timesteps=DDPM_NUM_TIMESTEPS, beta_start=DDPM_BETA_START,
                 beta_end=DDPM_BETA_END):
  """β_t linearly spaced from beta_start to beta_end, t = 0 … T−1 (Ho et al. 2020)."""
  if num_timesteps < 1:
    raise ParameterError("num_timesteps", "must be >= 1", value=num_timesteps)
  if not 0.0 < beta_start <= beta_end < 1.0:
    raise ParameterError("beta_start", f"and {{beta_end}}={beta_end} must satisfy "
                         f"0 < beta_start <= beta_end < 1", value=beta_start, refs=("beta_end",))
  return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def timestep_subsequence(*, num_timesteps, num_steps, kind="uniform"):
  """The K timesteps a K-step sampler visits, in increasing order.

  uniform:   i · ⌊T/K⌋ for i = 0 … K−1                 ("leading"; the official MMD-DDM code)
  trailing:  round(T − i·T/K) − 1 for i = 0 … K−1       (starts at T−1, where x_T ~ N(0, I) belongs)
  linspace:  round(i · (T−1)/(K−1)) for i = 0 … K−1     (both ends, 0 and T−1)
  quadratic: ⌊(i · sqrt(0.8·T) / (K−1))²⌋ for i = 0 … K−1  (the DDIM paper, CIFAR-10)
  `kind` may also be the K timesteps themselves (a sequence of increasing ints in [0, T−1], or
  of floats: continuous timesteps, e.g. learned ones, returned as float64).
  """
  if not isinstance(kind, str):
    return _explicit_timesteps(kind, num_timesteps=num_timesteps, num_steps=num_steps)
  if kind not in TIMESTEP_KINDS:
    raise ParameterError("kind", f"must be one of {'|'.join(TIMESTEP_KINDS)} or a comma-separated "
                         f"list of K increasing timesteps", value=kind)
  if not 1 <= num_steps <= num_timesteps:
    raise ParameterError("num_steps", f"(K) must be in [1, {num_timesteps}] (the number of "
                         f"diffusion timesteps T, {{num_timesteps}})", value=num_steps,
                         refs=("num_timesteps",))
  i = np.arange(num_steps)
  if kind == "uniform":
    seq = i * (num_timesteps // num_steps)
  elif kind == "trailing":
    seq = (np.round(num_timesteps - i * num_timesteps / num_steps) - 1)[::-1]
  elif kind == "linspace":
    seq = np.round(np.linspace(0, num_timesteps - 1, num_steps))
  else:
    seq = np.floor(np.linspace(0, np.sqrt(num_timesteps * 0.8), num_steps) ** 2)
    if len(np.unique(seq)) != num_steps:
      raise ParameterError("num_steps", f"repeats timesteps with {{kind}}=quadratic and "
                           f"T={num_timesteps}; use {{kind}}=uniform", value=num_steps,
                           refs=("kind",))
  return seq.astype(np.int64)


def _explicit_timesteps(timesteps, *, num_timesteps, num_steps):
  seq = np.asarray(timesteps)
  continuous = np.issubdtype(seq.dtype, np.floating)
  if seq.ndim != 1 or not (continuous or np.issubdtype(seq.dtype, np.integer)):
    raise ParameterError("kind", "must be a comma-separated list of integer timesteps",
                         value=list(timesteps))
  if len(seq) != num_steps:
    raise ParameterError("kind", f"lists {len(seq)} timesteps; expected K={num_steps} "
                         f"({{num_steps}})", value=seq.tolist(), refs=("num_steps",))
  if seq.min() < 0 or seq.max() > num_timesteps - 1:
    raise ParameterError("kind", f"must lie in [0, {num_timesteps - 1}] (T={num_timesteps})",
                         value=seq.tolist())
  if np.any(np.diff(seq) <= 0):
    raise ParameterError("kind", "must be strictly increasing", value=seq.tolist())
  return seq.astype(np.float64 if continuous else np.int64)


def log_alphas_cumprod_at(alphas_cumprod, t):
  """log ᾱ(t) for real t ∈ [0, T−1]: log ᾱ linearly interpolated between ⌊t⌋ and ⌊t⌋ + 1.

  log ᾱ_t = Σ_{s≤t} log(1 − β_s) is a running sum, so this holds β constant between integers:
  exact at integer t, continuous, and differentiable in t between integers (slope
  log(1 − β_{⌊t⌋+1})). `t` is a tensor (a float64 tensor of its shape is returned; it extrapolates
  linearly outside [0, T−1]) or NumPy values (a float64 array, clamped to the ends).
  """
  log_table = np.log(np.asarray(alphas_cumprod, np.float64))
  if not tf.is_tensor(t):
    return np.interp(t, np.arange(len(log_table)), log_table)
  t = tf.cast(t, tf.float64)
  lower = tf.clip_by_value(tf.floor(t), 0.0, float(max(len(log_table) - 2, 0)))
  index = tf.cast(lower, tf.int32)
  upper = tf.minimum(index + 1, len(log_table) - 1)
  fraction = t - lower  # floor has no gradient: ∂/∂t is the slope of the segment.
  return (1.0 - fraction) * tf.gather(log_table, index) + fraction * tf.gather(log_table, upper)


def format_timesteps(timesteps):
  """Continuous timesteps as messages, logs and reports show them: "0.50,200.12,…"."""
  return ",".join(f"{t:.2f}" for t in timesteps)


# How far learned timesteps start inside (0, T − 1) when the spacing puts one at 0 or T − 1.
ENDPOINT_MARGIN = 0.5


def learned_timesteps(logits, *, num_timesteps):
  """t_i = (T − 1) Σ_{j≤i} softmax(θ)_j, i = 0 … K − 1, of K + 1 logits θ: K timesteps strictly
  increasing in the open interval (0, T − 1) whatever θ (softmax(θ)_K is the gap above t_{K−1}),
  float32 [K] (DDSS, Watson et al. 2022, learn timesteps through such a parametrisation)."""
  gaps = tf.nn.softmax(tf.convert_to_tensor(logits, tf.float32))
  return float(num_timesteps - 1) * tf.cumsum(gaps[:-1])


def timestep_logits(timesteps, *, num_timesteps):
  """θ [K + 1] (float32) with learned_timesteps(θ) = `timesteps` (K increasing values in
  [0, T − 1]) up to float32 rounding, except at the ends of the range, which the open interval
  leaves out: 0 starts at ENDPOINT_MARGIN and T − 1 at T − 1 − ENDPOINT_MARGIN. θ_j = log of the
  j-th gap of 0 < t_0 < … < t_{K−1} < T − 1 over T − 1.

  (Any margin > 0 would do; the gradient of a timestep through the softmax scales with its gap, so
  a tiny first gap would keep t_0 where it starts.)
  """
  last = float(num_timesteps - 1)
  t = np.asarray(timesteps, np.float64)
  inside = np.where(t <= 0.0, ENDPOINT_MARGIN, np.where(t >= last, last - ENDPOINT_MARGIN, t))
  gaps = np.diff(np.concatenate([[0.0], inside, [last]]))
  if not np.all(gaps > 0):
    raise ParameterError("kind", f"cannot start learned timesteps: moved inside (0, {last:g}) "
                         f"(T={num_timesteps}) they would not increase strictly",
                         value=t.tolist())
  return np.log(gaps / last).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
  """β_t and ᾱ_t = Π_{s≤t} (1 − β_s) for t = 0 … T−1."""

  betas: np.ndarray

  @classmethod
  def linear(cls, **schedule):
    """The schedule of `linear_betas(**schedule)`."""
    return cls(linear_betas(**schedule))

  @property
  def num_timesteps(self):
    return int(self.betas.shape[0])

  @property
  def alphas_cumprod(self):
    return np.cumprod(1.0 - self.betas)

  def alphas_cumprod_tf(self):
    return tf.constant(self.alphas_cumprod, dtype=tf.float32)

  def timesteps(self, num_steps, kind="uniform"):
    return timestep_subsequence(num_timesteps=self.num_timesteps, num_steps=num_steps, kind=kind)


def q_sample(x0, t, noise, *, alphas_cumprod):
  """x_t ~ q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 − ᾱ_t) I), given the noise ε."""
  a = tf.gather(alphas_cumprod, t)[:, None, None, None]
  return tf.sqrt(a) * x0 + tf.sqrt(1.0 - a) * noise
