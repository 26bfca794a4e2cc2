"""A K-step sampler as K steps addressed by index, so one step function serves two loops.

A sampler's `Steps` object (`ddim.Steps`, `dpm_solver.Steps`) has `num_steps`,
`initial_state(x_T)` -> a tuple of tensors, `step(eps_model, state, i)` -> the next state (one
ε-model call) and `output(state)` -> x_0. Step i may be a Python int: `run` unrolls the K steps in
Python (sampling, evaluation, export). It may also be an int32 scalar tensor: finetuning's replayed
backward pass (`replay.py`) runs the same steps in a `tf.while_loop`, whose graph does not grow
with K. Per-step constants live in Python lists read by `at_step`.
"""

import tensorflow as tf


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
