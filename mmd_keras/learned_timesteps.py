"""Learned timesteps (DDSS, Watson et al. 2022): `finetune` trains the K timesteps of the sampler
under the same MMD² as the weights. They are continuous, t = schedule.learned_timesteps(ψ) of K + 1
logits ψ, ψ ← Adam(∇_ψ L) with its own learning rate and no clip (Adam moves each logit by about
its learning rate per step whatever the gradient's scale; a non-finite gradient stops the run as
one of θ does). The sampler steps from the tensor t, so ∂L/∂t comes out of the same backward pass
as ∇_θ L, and ∇_ψ L = (∂t/∂ψ)ᵀ ∂L/∂t."""

import keras
import tensorflow as tf

from mmd_keras import schedule as schedule_lib


class LearnedTimesteps(tf.Module):
  """K trainable timesteps t = schedule.learned_timesteps(ψ) (increasing in (0, T − 1)) of K + 1
  logits ψ, starting at `initial` (see `schedule.timestep_logits`), with their own Adam."""

  def __init__(self, initial, *, num_timesteps, learning_rate):
    super().__init__(name="learned_timesteps")
    self.num_timesteps = num_timesteps
    self.logits = keras.Variable(
        schedule_lib.timestep_logits(initial, num_timesteps=num_timesteps), name="timestep_logits")
    self.optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    self.optimizer.build([self.logits])

  def __call__(self):
    """t [K] float32, differentiable in ψ."""
    return schedule_lib.learned_timesteps(self.logits, num_timesteps=self.num_timesteps)

  def values(self):
    """t as a NumPy float32 array."""
    return self().numpy()


def describe(timesteps):
  """(a progress-line text, TensorBoard scalars) of the learned timesteps."""
  return (f"timesteps {schedule_lib.format_timesteps(timesteps)}",
          {f"timestep_{i}": float(t) for i, t in enumerate(timesteps)})
