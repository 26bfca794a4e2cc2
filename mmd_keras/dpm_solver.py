"""DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) as pure functions of an ε-model.

Data prediction, multistep, second order: with α_t = sqrt(ᾱ_t), σ_t = sqrt(1 − ᾱ_t),
λ_t = log(α_t / σ_t) and x̂0 = (x_t − σ_t ε̂) / α_t, each step from t to t_prev < t is

  h = λ_{t_prev} − λ_t,  r = h_last / h  (h_last: the step that produced x_t)
  D = (1 + 1/(2r)) x̂0(x_t) − 1/(2r) x̂0(x_{t_last})
  x_{t_prev} = (σ_{t_prev} / σ_t) x_t − α_{t_prev} (e^{−h} − 1) D

The first step, having no x̂0(x_{t_last}), and the last one, to t_prev = −1 (ᾱ = 1, σ = 0,
λ = +∞), are first order (D = x̂0). First order is DDIM with η = 0.

`eps_model(x_t, t) -> ε̂` takes images [B, H, W, C] and int32 timesteps [B] (float32 for continuous
timesteps, whose coefficients come from `steps.ContinuousSteps`), and is called once per step, so
finetuning replays one step at a time as it does for DDIM (`replay.py`).
"""

import numpy as np
import tensorflow as tf

from mmd_keras import steps as steps_lib


def _alpha_sigma(alphas_cumprod, t):
  """(α_t, σ_t) in float64, with ᾱ_{−1} = 1: α = 1, σ = 0."""
  if t < 0:
    return 1.0, 0.0
  return np.sqrt(alphas_cumprod[t]), np.sqrt(1.0 - alphas_cumprod[t])


def _log_snr(alphas_cumprod, t):
  """λ_t = log(α_t / σ_t), for t ≥ 0 only (λ_{−1} = +∞)."""
  alpha, sigma = _alpha_sigma(alphas_cumprod, t)
  return np.log(alpha) - np.log(sigma)


class Steps:
  """DPM-Solver++(2M)'s K steps by index i = 0 … K−1 (see `steps.py`); the state is
  (x_t, x̂0 of the previous step's input), the latter zeros before the first step.

  Every coefficient is computed once, in float64 NumPy: with float64 ᾱ, 1 − ᾱ_t near t = 0 keeps
  its digits. Step i is x_{t_prev} = c_x x_t + c_D D with D = x̂0 + w (x̂0 − x̂0_last), w = 1/(2r)
  on second-order steps and 0 on the first and the last (first-order) ones.
  """

  def __init__(self, timesteps, *, alphas_cumprod, clip_x0=False):
    self._clip_x0 = clip_x0
    if steps_lib.is_continuous(timesteps):
      self._coefficients = steps_lib.ContinuousSteps(timesteps, alphas_cumprod=alphas_cumprod,
                                                     second_order=True)
      self.num_steps = self._coefficients.num_steps
      return
    timesteps = [int(t) for t in timesteps]
    if not timesteps:
      raise ValueError("dpm_solver.sample: `timesteps` is empty")
    if any(later <= earlier for earlier, later in zip(timesteps, timesteps[1:])):
      # Equal timesteps would make h = 0 and r infinite.
      raise ValueError(f"dpm_solver.sample: `timesteps` must increase strictly, got {timesteps}")
    alphas_cumprod = np.asarray(alphas_cumprod).astype(np.float64)
    self.num_steps = len(timesteps)
    columns = {name: [] for name in ("t", "alpha", "sigma", "c_x", "c_d", "w")}
    t_last = None
    for t, t_prev in zip(timesteps[::-1], ([-1] + timesteps[:-1])[::-1]):
      alpha, sigma = _alpha_sigma(alphas_cumprod, t)
      alpha_prev, sigma_prev = _alpha_sigma(alphas_cumprod, t_prev)
      w = 0.0
      if t_last is not None and t_prev >= 0:
        lam = _log_snr(alphas_cumprod, t)
        r = (lam - _log_snr(alphas_cumprod, t_last)) / (_log_snr(alphas_cumprod, t_prev) - lam)
        w = 0.5 / r
      # −α_prev (e^{−h} − 1) = α_prev − σ_prev α_t / σ_t: no λ_prev, so σ_prev = 0 (λ = +∞) is
      # exact.
      c_d = alpha_prev - sigma_prev * alpha / sigma
      for name, value in (("alpha", alpha), ("sigma", sigma), ("c_x", sigma_prev / sigma),
                          ("c_d", c_d), ("w", w)):
        columns[name].append(float(np.float32(value)))  # As the float32 images will see them.
      columns["t"].append(t)
      t_last = t
    self._coefficients = steps_lib.Tables(columns)

  def initial_state(self, x_T):
    return (x_T, tf.zeros_like(x_T))

  def step(self, eps_model, state, i):
    x, x0_last = state
    c = self._coefficients.at(i)
    eps = eps_model(x, steps_lib.eps_timesteps(x, c["t"]))
    x0_pred = (x - c["sigma"] * eps) / c["alpha"]
    if self._clip_x0:
      x0_pred = tf.clip_by_value(x0_pred, -1.0, 1.0)
    data = x0_pred + c["w"] * (x0_pred - x0_last)
    return (c["c_x"] * x + c["c_d"] * data, x0_pred)

  def output(self, state):
    return state[0]


def sample(eps_model, x_T, *, timesteps, alphas_cumprod, clip_x0=False):
  """x_T ~ N(0, I) -> x_0 over the increasing timestep subsequence `timesteps` (length K).

  K ε-model calls: the first and the last step are first order, the K − 2 between second order.
  As `ddim.sample`, the loop is unrolled in Python (K fixed per call) and gradients flow through
  every step. `clip_x0` clips each x̂0 to [−1, 1] before it enters D, so x_0 = x̂0 is in range.
  """
  return steps_lib.run(Steps(timesteps, alphas_cumprod=alphas_cumprod, clip_x0=clip_x0),
                       eps_model, x_T)
