"""samplers.py: each name dispatches to its module's `sample`, unchanged; bad names and η are
refused naming the parameter."""

import numpy as np
import pytest
import tensorflow as tf

from helpers import randomize_weights, tiny_unet
from mmd_keras import ddim
from mmd_keras import dpm_solver
from mmd_keras import samplers
from mmd_keras import schedule as schedule_lib
from mmd_keras.errors import ParameterError

SCHEDULE = schedule_lib.NoiseSchedule.linear(num_timesteps=100)
TIMESTEPS = SCHEDULE.timesteps(4, "trailing")


@pytest.fixture(scope="module")
def setup():
  unet = randomize_weights(tiny_unet(image_size=8, channels=1), seed=2, scale=0.05)
  x_T = tf.random.stateless_normal([3, 8, 8, 1], seed=[1, 2])
  return (lambda x, t: unet(x, t)), x_T


@pytest.mark.parametrize("eta, clip_x0", [(0.0, False), (0.0, True), (0.7, True)])
def test_ddim_is_ddim_sample(setup, eta, clip_x0):
  eps_model, x_T = setup
  kwargs = dict(timesteps=TIMESTEPS, alphas_cumprod=SCHEDULE.alphas_cumprod, eta=eta,
                clip_x0=clip_x0, seed=tf.constant([5, 6]))
  np.testing.assert_array_equal(samplers.sample("ddim", eps_model, x_T, **kwargs),
                                ddim.sample(eps_model, x_T, **kwargs))


@pytest.mark.parametrize("clip_x0", [False, True])
def test_dpm_solver_pp_is_dpm_solver_sample(setup, clip_x0):
  eps_model, x_T = setup
  kwargs = dict(timesteps=TIMESTEPS, alphas_cumprod=SCHEDULE.alphas_cumprod, clip_x0=clip_x0)
  got = samplers.sample("dpm_solver_pp", eps_model, x_T, seed=tf.constant([5, 6]), **kwargs)
  np.testing.assert_array_equal(got, dpm_solver.sample(eps_model, x_T, **kwargs))
  # Not DDIM under another name: the second-order steps differ.
  assert np.abs(got - ddim.sample(eps_model, x_T, **kwargs)).max() > 1e-4


def test_unknown_sampler_is_refused():
  with pytest.raises(ParameterError) as caught:
    samplers.check("plms")
  assert caught.value.parameter == "sampler"
  assert str(caught.value) == "sampler=plms must be one of ddim|dpm_solver_pp"


def test_eta_with_a_deterministic_sampler_is_refused(setup):
  eps_model, x_T = setup
  with pytest.raises(ParameterError) as caught:
    samplers.sample("dpm_solver_pp", eps_model, x_T, timesteps=TIMESTEPS,
                    alphas_cumprod=SCHEDULE.alphas_cumprod, eta=0.5)
  assert caught.value.parameter == "eta" and "sampler" in caught.value.refs
  assert str(caught.value) == "eta=0.5 must be 0 with sampler=dpm_solver_pp: it is deterministic"
  samplers.check("ddim", eta=0.5)
