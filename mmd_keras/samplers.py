"""The K-step samplers by name: the one place a `--sampler` value becomes a function.

  ddim           `ddim.sample` (Song et al. 2021): η = 0 deterministic, η > 0 stochastic.
  dpm_solver_pp  `dpm_solver.sample`, DPM-Solver++(2M) (Lu et al. 2022): deterministic, so η = 0.

Both call `eps_model` once per step and come as `Steps` (see `steps.py`), so finetuning's replayed
backward pass (`replay.py`) runs either.
"""

from mmd_keras import ddim
from mmd_keras import dpm_solver
from mmd_keras import steps as steps_lib
from mmd_keras.errors import ParameterError

SAMPLERS = ("ddim", "dpm_solver_pp")
# How reports name the base model sampled by each.
LABELS = {"ddim": "DDIM", "dpm_solver_pp": "DPM-Solver++"}


def check(name, *, eta=0.0):
  """A ParameterError for an unknown sampler, or for η > 0 with one that draws no noise."""
  if name not in SAMPLERS:
    raise ParameterError("sampler", f"must be one of {'|'.join(SAMPLERS)}", value=name)
  if eta and name != "ddim":
    raise ParameterError("eta", f"must be 0 with {{sampler}}={name}: it is deterministic",
                         value=eta, refs=("sampler",))


def steps(name, *, timesteps, alphas_cumprod, eta=0.0, clip_x0=False, seed=None):
  """The K steps of the sampler `name` (see `steps.py`); `seed` ([2] int) for DDIM's η > 0 noise."""
  check(name, eta=eta)
  if name == "ddim":
    return ddim.Steps(timesteps, alphas_cumprod=alphas_cumprod, eta=eta, clip_x0=clip_x0,
                      seed=seed)
  return dpm_solver.Steps(timesteps, alphas_cumprod=alphas_cumprod, clip_x0=clip_x0)


def sample(name, eps_model, x_T, *, timesteps, alphas_cumprod, eta=0.0, clip_x0=False,
           seed=None):
  """x_T -> x_0 by the sampler `name` over `timesteps`; `seed` ([2] int) for DDIM's η > 0 noise."""
  return steps_lib.run(steps(name, timesteps=timesteps, alphas_cumprod=alphas_cumprod, eta=eta,
                             clip_x0=clip_x0, seed=seed), eps_model, x_T)
