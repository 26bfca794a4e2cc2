"""∂L(x_0)/∂θ through a K-step sampler, replaying one step at a time: memory and graph flat in K.

  forward   x_T ─► step 0 ─► … ─► step K−2        (no tape; only each step's input state is kept)
  last      step K−1 ─► x_0 ─► L                  (one tape: its activations are used at once)
  backward  for i = K−2 … 0: replay step i under a tape, pull the state's gradient back through it
            (a vector-Jacobian product) and add the step's weight gradients.

Both loops are `tf.while_loop`s over the step index, so the graph holds three copies of the step
(forward body, last step, replayed body) whatever K is, and the backward pass holds one step's
activations at a time. The price is one more forward per step but the last, as with
`tf.recompute_grad` around each call, whose Python-unrolled graph grew with K (and with it tracing
time and the process's memory).

A replayed forward does not need the incoming gradient, so TF would start it early and hold several
calls' activations at once: both loops run one iteration at a time (parallel_iterations=1; by
default up to ten replays ran at once: 1.6 GiB of tensors instead of 0.5 at K=20, batch 64), and
each replay waits for its step's incoming gradient (else the first one ran beside the last step's
backward pass: 1.0 GiB).
"""

import tensorflow as tf

_ZERO = tf.UnconnectedGradients.ZERO


def _dense(grads):
  # Loop variables need one type throughout: a gather's IndexedSlices become tensors.
  return [tf.convert_to_tensor(g) for g in grads]


def value_and_gradients(steps, eps_model, x_T, *, loss_fn, weights, gradient_scale=1.0):
  """(L, gradient_scale · ∂L/∂weights) for L = loss_fn(x_0), x_0 = the K steps of `steps` from x_T.

  `steps` is a sampler's `Steps` (see `steps.py`). `eps_model(x, t)` must be a function of its
  inputs alone (dropout masks seeded by t, no stateful draws): step i runs twice and both runs must
  agree. `weights` are variables or tensors; a tensor (e.g. the learned timesteps `steps` was made
  from, which each step reads) is watched by every tape.
  """
  tensors = [w for w in weights if isinstance(w, tf.Tensor)]
  k = steps.num_steps
  state = steps.initial_state(x_T)
  inputs = [tf.TensorArray(s.dtype, size=max(k - 1, 1), element_shape=s.shape) for s in state]

  def forward(i, state, inputs):
    inputs = [ta.write(i, s) for ta, s in zip(inputs, state)]
    return i + 1, steps.step(eps_model, state, i), inputs

  if k > 1:
    _, state, inputs = tf.while_loop(lambda i, *_: i < k - 1, forward,
                                     (tf.constant(0), state, inputs), parallel_iterations=1)
  with tf.GradientTape() as tape:
    tape.watch([*state, *tensors])
    loss = loss_fn(steps.output(steps.step(eps_model, state, k - 1)))
  state_grads, grads = tape.gradient(loss, [list(state), weights],
                                     output_gradients=tf.constant(gradient_scale, loss.dtype),
                                     unconnected_gradients=_ZERO)
  grads = _dense(grads)

  def backward(i, state_grads, grads):
    # The replay waits for the incoming gradient: otherwise it would start as soon as the step's
    # input is readable, e.g. step K−2's beside the last step's backward pass, two calls'
    # activations alive at once.
    with tf.control_dependencies(state_grads):
      state = tuple(ta.read(i) for ta in inputs)
    with tf.GradientTape() as tape:
      tape.watch([*state, *tensors])
      outputs = steps.step(eps_model, state, i)
    input_grads, step_grads = tape.gradient(outputs, [list(state), weights],
                                            output_gradients=list(state_grads),
                                            unconnected_gradients=_ZERO)
    return i - 1, input_grads, [g + s for g, s in zip(grads, _dense(step_grads))]

  if k > 1:
    _, _, grads = tf.while_loop(lambda i, *_: i >= 0, backward,
                                (tf.constant(k - 2), state_grads, grads), parallel_iterations=1)
  return loss, grads
