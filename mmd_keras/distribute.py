"""The tf.distribute strategy chosen by `--strategy`."""

import tensorflow as tf

from mmd_keras.errors import UserError

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")


def make_strategy(name, *, tpu=None):
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    return tf.distribute.MirroredStrategy()
  if name == "multi_worker":
    # Reads the cluster from the TF_CONFIG environment variable.
    return tf.distribute.MultiWorkerMirroredStrategy()
  if name == "tpu":
    resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
    tf.config.experimental_connect_to_cluster(resolver)
    tf.tpu.experimental.initialize_tpu_system(resolver)
    return tf.distribute.TPUStrategy(resolver)
  raise UserError(f"--strategy must be one of {'|'.join(STRATEGIES)}, got {name!r}")


def check_global_batch(global_batch, strategy):
  replicas = strategy.num_replicas_in_sync
  if global_batch % replicas:
    raise UserError(f"--batch_size={global_batch} must be divisible by the number of replicas "
                     f"({replicas})")
  return global_batch // replicas
