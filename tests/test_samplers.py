"""samplers.py: each name dispatches to its module's `sample`, unchanged; bad names and η are
refused naming the parameter. Both samplers over continuous timesteps (`steps.ContinuousSteps`):
at integer values they are the integer samplers, a tensor gives the values' samples, and the
gradient with respect to the tensor is the finite-difference one."""

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


CONTINUOUS = [10.3, 40.6, 70.4]  # Off the integers by > 0.25: no kink of ᾱ(t) within ±h below.


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
@pytest.mark.parametrize("clip_x0", [False, True])
def test_continuous_timesteps_at_integers_are_the_integer_sampler(setup, sampler, clip_x0):
  eps_model, x_T = setup
  kwargs = dict(alphas_cumprod=SCHEDULE.alphas_cumprod, clip_x0=clip_x0)
  expected = samplers.sample(sampler, eps_model, x_T, timesteps=TIMESTEPS, **kwargs)
  for timesteps in (TIMESTEPS.astype(np.float64), tf.constant(TIMESTEPS, tf.float32)):
    got = samplers.sample(sampler, eps_model, x_T, timesteps=timesteps, **kwargs)
    # Float32 rounding: the coefficients come from exp(log ᾱ) in another order of operations.
    np.testing.assert_allclose(got, expected, atol=2e-6)


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_a_timestep_tensor_samples_as_its_values(setup, sampler):
  eps_model, x_T = setup
  kwargs = dict(alphas_cumprod=SCHEDULE.alphas_cumprod)
  expected = samplers.sample(sampler, eps_model, x_T, timesteps=np.array(CONTINUOUS), **kwargs)
  got = samplers.sample(sampler, eps_model, x_T, timesteps=tf.constant(CONTINUOUS), **kwargs)
  np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_timestep_gradient_is_the_finite_difference_one(setup, sampler):
  eps_model, x_T = setup
  loss_of = lambda t: tf.reduce_mean(samplers.sample(
      sampler, eps_model, x_T, timesteps=t, alphas_cumprod=SCHEDULE.alphas_cumprod) ** 2)
  t = tf.constant(CONTINUOUS)
  with tf.GradientTape() as tape:
    tape.watch(t)
    loss = loss_of(t)
  grad = tf.convert_to_tensor(tape.gradient(loss, t)).numpy()
  h = 0.05
  expected = [(float(loss_of(t + h * e)) - float(loss_of(t - h * e))) / (2 * h)
              for e in np.eye(3, dtype=np.float32)]
  assert np.all(grad != 0), grad
  np.testing.assert_allclose(grad, expected, rtol=2e-2, atol=1e-5)


def test_continuous_timesteps_with_eta_are_refused():
  with pytest.raises(ValueError, match="continuous timesteps need eta = 0"):
    ddim.Steps(CONTINUOUS, alphas_cumprod=SCHEDULE.alphas_cumprod, eta=0.5, seed=[1, 2])
