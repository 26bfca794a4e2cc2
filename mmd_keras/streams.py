"""Every random stream of the project in one table: the second word of its stateless seeds.

All randomness is stateless: a draw is keyed by [seed, stream], with a step, batch, example or
position folded in, so it is a function of the run's seed and of where it happens (a resumed run
and an exported model draw exactly what they drew before). The values are fixed: changing one
changes the draws of every run. A value may serve two uses that never meet (pretraining's grid and
finetuning's examples are different runs; finetuning's grid is drawn directly from its key, the
sampler's x_T only through a fold-in).
"""

import tensorflow as tf

# Training (int32 keys): t, ε and dropout of pretraining, dropout and η-noise of finetuning, keyed
# by (step, replica) through `step_seed`.
TRAIN_STEP = 0
PRETRAIN_GRID = 1  # x_T of pretraining's progress grid.
FINETUNE_EXAMPLES = 1  # x_T of finetuning's examples, keyed by (step, global example index).
FINETUNE_GRID = 2  # x_T of finetuning's progress grid.
FINETUNE_VALIDATION = 2001  # x_T of finetuning's validation batch, drawn directly from its key.

# Sampling (`sampling.batches`, int32 keys): x_T of batch i is keyed by i; its η-noise has a stream
# of its own, SAMPLE_STEPS + i.
SAMPLE_X_T = 2
SAMPLE_STEPS = 3

# Data (int64 keys): the epoch's image order, keyed by epoch; random flips, keyed by position.
DATA_ORDER = 1001
DATA_FLIP = 1002

# The exported sampler (int64 keys of the request's seed): x_T, and the η-noise of its steps.
EXPORT_X_T = 0
EXPORT_STEP_NOISE = 1


def key(seed, stream, dtype=tf.int32):
  """The [2] stateless seed [seed, stream]; `seed` may be a tensor (a request's)."""
  return tf.stack([tf.cast(seed, dtype), tf.constant(stream, dtype)])


def fold_in(seed, stream, index, *, dtype=tf.int32):
  """The [2] seed of element `index` (a step, batch, epoch, position) of a stream."""
  return tf.random.experimental.stateless_fold_in(key(seed, stream, dtype), tf.cast(index, dtype))


def step_seed(seed, step, *, replica_id=None):
  """[2] int32 seed of a training step on this replica (or on replica `replica_id`)."""
  if replica_id is None:
    replica = tf.distribute.get_replica_context()
    replica_id = replica.replica_id_in_sync_group if replica is not None else 0
  return tf.random.experimental.stateless_fold_in(fold_in(seed, TRAIN_STEP, step),
                                                  tf.cast(replica_id, tf.int32))


def example_noise(shape, *, seed, step):
  """x_T of this replica's examples: z_g ~ N(0, I) seeded by (seed, step, g), g the global index.

  Replica r holds global examples r·b … r·b + b − 1 (how `experimental_distribute_dataset` splits a
  batch), so the global batch's noise is the same however many replicas share it.
  """
  replica = tf.distribute.get_replica_context()
  replica_id = replica.replica_id_in_sync_group if replica is not None else 0
  batch = shape[0]
  first = tf.cast(replica_id, tf.int32) * batch
  base = fold_in(seed, FINETUNE_EXAMPLES, step)
  # The stateless random ops have no vectorised form; pfor's while_loop fallback is what we want,
  # without its warning at every trace.
  seeds = tf.vectorized_map(lambda g: tf.random.experimental.stateless_fold_in(base, g),
                            first + tf.range(batch), warn=False)
  return tf.vectorized_map(lambda s: tf.random.stateless_normal(shape[1:], s), seeds, warn=False)
