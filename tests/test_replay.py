"""replay.py: the replayed gradient equals the gradient of the unrolled sampler (every sampler,
K = 1 … 4, with clipping and η-noise; also with respect to a tensor of continuous timesteps),
reaches each of the K steps, and its graph does not grow with K."""

import numpy as np
import pytest
import tensorflow as tf

from helpers import FINETUNER_SCHEDULE as SCHEDULE
from mmd_keras import replay
from mmd_keras import samplers
from mmd_keras import schedule
from mmd_keras import steps as steps_lib

SHAPE = [3, 4, 4, 2]


class ToyEpsModel:
  """ε̂ = tanh(s_t · x W + b): nonlinear, with a trainable scale per timestep, so the gradient of
  s says which steps the loss reached."""

  def __init__(self):
    rng = np.random.default_rng(0)
    self.scales = tf.Variable(tf.ones([SCHEDULE.num_timesteps]))
    self.kernel = tf.Variable(rng.normal(0.0, 0.7, [SHAPE[-1], SHAPE[-1]]).astype(np.float32))
    self.bias = tf.Variable(rng.normal(0.0, 0.1, [SHAPE[-1]]).astype(np.float32))
    self.calls = 0

  @property
  def weights(self):
    return [self.scales, self.kernel, self.bias]

  def __call__(self, x, t):
    self.calls += 1  # Counts traced calls inside tf.function.
    scaled = x * tf.gather(self.scales, t)[:, None, None, None]
    return tf.tanh(tf.einsum("bhwc,cd->bhwd", scaled, self.kernel) + self.bias)


class ContinuousToyEpsModel(ToyEpsModel):
  """ε̂ = tanh((1 + t/50) · x W + b): the toy model of a continuous timestep."""

  def __call__(self, x, t):
    self.calls += 1
    scaled = x * (1.0 + tf.cast(t, tf.float32) / 50.0)[:, None, None, None]
    return tf.tanh(tf.einsum("bhwc,cd->bhwd", scaled, self.kernel) + self.bias)


def loss_fn(x_0):
  return tf.reduce_mean(tf.square(x_0 - 0.3)) + tf.reduce_mean(x_0[..., 0] * x_0[..., 1])


def make_steps(sampler, k, *, timesteps=None, **kwargs):
  if timesteps is None:
    timesteps = SCHEDULE.timesteps(k)
  return samplers.steps(sampler, timesteps=timesteps, alphas_cumprod=SCHEDULE.alphas_cumprod,
                        **kwargs)


def dense(grads):
  return [tf.convert_to_tensor(g).numpy() for g in grads]


@pytest.mark.parametrize("sampler,options", [
    ("ddim", {}), ("ddim", {"clip_x0": True}), ("ddim", {"eta": 0.7, "seed": [5, 6]}),
    ("dpm_solver_pp", {}), ("dpm_solver_pp", {"clip_x0": True})])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_replayed_gradient_is_the_unrolled_gradient(sampler, options, k):
  model = ToyEpsModel()
  x_T = tf.random.stateless_normal(SHAPE, seed=[1, 2]) * 3.0  # Large: clipping takes effect.
  steps = make_steps(sampler, k, **options)

  @tf.function
  def unrolled():
    with tf.GradientTape() as tape:
      loss = loss_fn(steps_lib.run(steps, model, x_T))
    return loss, tape.gradient(loss, model.weights)

  @tf.function
  def replayed():
    return replay.value_and_gradients(steps, model, x_T, loss_fn=loss_fn, weights=model.weights,
                                      gradient_scale=0.5)

  loss, expected = unrolled()
  replayed_loss, got = replayed()
  np.testing.assert_allclose(replayed_loss, loss, rtol=1e-6)
  for name, a, b in zip(["scales", "kernel", "bias"], dense(got), dense(expected)):
    np.testing.assert_allclose(a, 0.5 * b, rtol=1e-5, atol=1e-7, err_msg=name)
  # Each of the K steps' timestep gets a gradient, and no other.
  np.testing.assert_array_equal(np.flatnonzero(dense(got)[0]), SCHEDULE.timesteps(k))


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
@pytest.mark.parametrize("k", [1, 2, 4])
def test_replayed_gradient_reaches_each_learned_timestep(sampler, k):
  model = ContinuousToyEpsModel()
  x_T = tf.random.stateless_normal(SHAPE, seed=[1, 2])
  logits = tf.Variable(schedule.timestep_logits(SCHEDULE.timesteps(k, "linspace"),
                                                num_timesteps=SCHEDULE.num_timesteps))
  weights = [model.kernel, model.bias]

  @tf.function
  def unrolled():
    with tf.GradientTape() as tape:
      loss = loss_fn(steps_lib.run(make_steps(sampler, k, timesteps=schedule.learned_timesteps(
          logits, num_timesteps=SCHEDULE.num_timesteps)), model, x_T))
    return tape.gradient(loss, weights + [logits])

  @tf.function
  def replayed():
    with tf.GradientTape() as tape:
      timesteps = schedule.learned_timesteps(logits, num_timesteps=SCHEDULE.num_timesteps)
    _, grads = replay.value_and_gradients(make_steps(sampler, k, timesteps=timesteps), model, x_T,
                                          loss_fn=loss_fn, weights=weights + [timesteps])
    timestep_grad = grads[-1]
    logits_grad = tape.gradient(timesteps, logits, output_gradients=timestep_grad)
    return grads[:-1] + [logits_grad], timestep_grad

  expected = dense(unrolled())
  got, timestep_grad = replayed()
  for name, a, b in zip(["kernel", "bias", "logits"], dense(got), expected):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7, err_msg=name)
  # Each of the K timesteps gets a gradient.
  assert np.all(timestep_grad.numpy() != 0), timestep_grad


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
def test_the_graph_does_not_grow_with_k(sampler):
  # One traced ε call each for the forward loop body, the last step and the replayed body.
  x_T = tf.random.stateless_normal(SHAPE, seed=[1, 2])
  traced = {}
  for k in (3, 9):
    model = ToyEpsModel()
    steps = make_steps(sampler, k)
    tf.function(lambda: replay.value_and_gradients(
        steps, model, x_T, loss_fn=loss_fn, weights=model.weights)).get_concrete_function()
    traced[k] = model.calls
  assert traced == {3: 3, 9: 3}
