"""DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) as pure functions of an ε-model.

Data prediction, multistep, second order: with α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t),
λ_t = log(α_t / σ_t) and x̂0 = (x_t − σ_t ε̂) / α_t, each step from t to t_prev < t is

  h = λ_{t_prev} − λ_t,  r = h_last / h  (h_last: the step that produced x_t)
  D = (1 + 1/(2r)) x̂0(x_t) − 1/(2r) x̂0(x_{t_last})
  x_{t_prev} = (σ_{t_prev} / σ_t) x_t − α_{t_prev} (e^{−h} − 1) D

The first step, having no x̂0(x_{t_last}), and the last one, to t_prev = −1 (ᾱ = 1, σ = 0,
λ = +∞), are first order (D = x̂0). First order is DDIM with η = 0.

`eps_model(x_t, t) -> ε̂` takes images [B, H, W, C] and int32 timesteps [B], and is called once per
step, so finetuning can wrap each call in `tf.recompute_grad` as it does for `ddim.sample`.
"""

import tensorflow as tf


def _alpha_sigma(alphas_cumprod, t):
  """(α_t, σ_t) in float64, with ᾱ_{−1} = 1: α = 1, σ = 0."""
  if t < 0:
    return tf.constant(1.0, tf.float64), tf.constant(0.0, tf.float64)
  alpha_bar = tf.gather(alphas_cumprod, t)
  return tf.sqrt(alpha_bar), tf.sqrt(1.0 - alpha_bar)


def _log_snr(alphas_cumprod, t):
  """λ_t = log(α_t / σ_t), for t ≥ 0 only (λ_{−1} = +∞)."""
  alpha, sigma = _alpha_sigma(alphas_cumprod, t)
  return tf.math.log(alpha) - tf.math.log(sigma)


def dpm_solver_step(eps_model, x_t, *, t, t_prev, alphas_cumprod, x0_last=None, t_last=None,
                    clip_x0=False):
  """One DPM-Solver++ step x_t -> x_{t_prev}; returns (x_{t_prev}, x̂0(x_t)).

  Second order when x0_last, the x̂0 of the previous step's input x_{t_last}, is given and
  t_prev ≥ 0; first order otherwise. t, t_prev, t_last are Python ints, t_prev = −1 at the end.
  `alphas_cumprod` is cast to float64 for the coefficients: with float64 ᾱ, 1 − ᾱ_t near t = 0
  keeps its digits.
  """
  t, t_prev = int(t), int(t_prev)
  alphas_cumprod = tf.cast(alphas_cumprod, tf.float64)
  alpha, sigma = _alpha_sigma(alphas_cumprod, t)
  alpha_prev, sigma_prev = _alpha_sigma(alphas_cumprod, t_prev)
  dtype = x_t.dtype
  batch = tf.shape(x_t)[0]
  eps = eps_model(x_t, tf.fill([batch], tf.constant(t, tf.int32)))
  x0_pred = (x_t - tf.cast(sigma, dtype) * eps) / tf.cast(alpha, dtype)
  if clip_x0:
    x0_pred = tf.clip_by_value(x0_pred, -1.0, 1.0)
  data = x0_pred
  if x0_last is not None and t_prev >= 0:
    lam = _log_snr(alphas_cumprod, t)
    r = (lam - _log_snr(alphas_cumprod, int(t_last))) / (_log_snr(alphas_cumprod, t_prev) - lam)
    data = x0_pred + tf.cast(0.5 / r, dtype) * (x0_pred - x0_last)
  # −α_prev (e^{−h} − 1) = α_prev − σ_prev α_t / σ_t: no λ_prev, so σ_prev = 0 (λ = +∞) is exact.
  x_prev = (tf.cast(sigma_prev / sigma, dtype) * x_t
            + tf.cast(alpha_prev - sigma_prev * alpha / sigma, dtype) * data)
  return x_prev, x0_pred


def sample(eps_model, x_T, *, timesteps, alphas_cumprod, clip_x0=False):
  """x_T ~ N(0, I) -> x_0 over the increasing timestep subsequence `timesteps` (length K).

  K ε-model calls: the first and the last step are first order, the K − 2 between second order.
  As `ddim.sample`, the loop is unrolled in Python (K fixed per call) and gradients flow through
  every step. `clip_x0` clips each x̂0 to [−1, 1] before it enters D, so x_0 = x̂0 is in range.
  """
  timesteps = [int(t) for t in timesteps]
  if not timesteps:
    raise ValueError("dpm_solver.sample: `timesteps` is empty")
  if any(later <= earlier for earlier, later in zip(timesteps, timesteps[1:])):
    # Equal timesteps would make h = 0 and r infinite.
    raise ValueError(f"dpm_solver.sample: `timesteps` must increase strictly, got {timesteps}")
  alphas_cumprod = tf.cast(alphas_cumprod, tf.float64)
  previous = [-1] + timesteps[:-1]
  x, x0_last, t_last = x_T, None, None
  for t, t_prev in zip(reversed(timesteps), reversed(previous)):
    x, x0_last = dpm_solver_step(eps_model, x, t=t, t_prev=t_prev, alphas_cumprod=alphas_cumprod,
                                 x0_last=x0_last, t_last=t_last, clip_x0=clip_x0)
    t_last = t
  return x
