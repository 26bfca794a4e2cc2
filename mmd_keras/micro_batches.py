"""Gradient accumulation over generated micro-batches with the gradient of the whole batch.

The unbiased MMD² is not a mean over examples, so the parts' own losses would not add up to the
batch's. Instead: every part is sampled once without a tape and embedded, L (of all the features,
of every replica) is differentiated with respect to each generated feature, and then each part is
sampled again with its gradient through φ and the sampler of the linear surrogate Σ φ(x̂)·∂L/∂φ,
by replay or one tape. The sum over the parts is ∂L/∂θ exactly, in the activation memory of one
part, for one more sampler pass per part.
"""

import tensorflow as tf

from mmd_keras import replay
from mmd_keras import steps as steps_lib


def value_and_gradients(steps, eps, z, *, parts, feature_net, loss_fn, weights, recompute):
  """(L, this replica's share of ∂L/∂weights), L = loss_fn(the features of every replica's
  samples, gathered), the samples those of `steps` and `eps` from this replica's noise `z`, drawn
  in `parts` micro-batches."""
  replica = tf.distribute.get_replica_context()
  pieces = tf.split(z, parts, axis=0)
  features = tf.concat([tf.stop_gradient(feature_net(steps_lib.run(steps, eps, piece)))
                        for piece in pieces], axis=0)
  everyone = replica.all_gather(features, axis=0)
  with tf.GradientTape() as tape:
    tape.watch(everyone)
    loss = loss_fn(everyone)
  feature_grads = tape.gradient(loss, everyone)
  # This replica's rows of the gathered batch (all_gather orders replicas by id).
  mine = tf.shape(features)[0]
  feature_grads = feature_grads[replica.replica_id_in_sync_group * mine:][:mine]
  grads = [tf.zeros_like(w) for w in weights]
  for piece, piece_grads in zip(pieces, tf.split(feature_grads, parts, axis=0)):
    surrogate = lambda x, g=piece_grads: tf.reduce_sum(feature_net(x) * g)
    if recompute:
      _, more = replay.value_and_gradients(steps, eps, piece, loss_fn=surrogate, weights=weights)
    else:
      with tf.GradientTape() as piece_tape:
        piece_tape.watch([w for w in weights if isinstance(w, tf.Tensor)])
        value = surrogate(steps_lib.run(steps, eps, piece))
      more = piece_tape.gradient(value, weights,
                                 unconnected_gradients=tf.UnconnectedGradients.ZERO)
    grads = [g + tf.convert_to_tensor(m) for g, m in zip(grads, more)]
  return loss, grads
