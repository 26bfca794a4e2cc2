"""The tf.distribute strategy chosen by `--strategy`, and what multi-worker training needs.

Under `multi_worker` every worker runs the same program on the same flags. Saving takes all workers
(the standard MultiWorkerMirroredStrategy pattern), but only the chief writes into the real run
directory: the others write into a throwaway temporary directory (`write_dir`).
"""

import atexit
import json
import os
import shutil
import tempfile

import tensorflow as tf
from absl import logging

from mmd_keras import console
from mmd_keras.errors import ParameterError
from mmd_keras.errors import UserError

STRATEGIES = ("default", "mirrored", "multi_worker", "tpu")
TF_CONFIG_EXAMPLE = ('{"cluster": {"worker": ["host1:12345", "host2:12345"]}, '
                     '"task": {"type": "worker", "index": 0}}')
# Task types MultiWorkerMirroredStrategy trains on (an "evaluator" task would not train).
TRAINING_TASKS = ("chief", "worker")


def check_tf_config(value):
  """Parses TF_CONFIG; raises a UserError saying what is wrong and what is expected.

  Returns (task type, task index, number of training tasks).
  """
  expected = (f"expected JSON like {TF_CONFIG_EXAMPLE} (the same cluster on every worker, its "
              f"own task index on each)")
  if not value:
    raise ParameterError("name", f"needs the TF_CONFIG environment variable; {expected}; on one "
                         f"machine use {{name}}=mirrored", value="multi_worker", refs=("name",))
  try:
    config = json.loads(value)
  except json.JSONDecodeError as e:
    raise UserError(f"TF_CONFIG is not valid JSON ({e.msg} at character {e.pos}); {expected}") \
        from None
  cluster = config.get("cluster") if isinstance(config, dict) else None
  if not isinstance(cluster, dict) or not cluster:
    raise UserError(f"TF_CONFIG has no \"cluster\" object; {expected}")
  for job, addresses in cluster.items():
    if job not in TRAINING_TASKS:
      raise UserError(f"TF_CONFIG cluster job {job!r} is not supported (only "
                      f"{' and '.join(TRAINING_TASKS)}); {expected}")
    if (not isinstance(addresses, list) or not addresses
        or not all(isinstance(a, str) and a.rpartition(":")[2].isdigit() for a in addresses)):
      raise UserError(f"TF_CONFIG cluster.{job} must be a non-empty list of \"host:port\" strings, "
                      f"got {addresses!r}; {expected}")
  task = config.get("task")
  if not isinstance(task, dict) or "type" not in task or "index" not in task:
    raise UserError(f"TF_CONFIG has no \"task\" with \"type\" and \"index\"; {expected}")
  task_type, index = task["type"], task["index"]
  if task_type not in cluster:
    raise UserError(f"TF_CONFIG task type {task_type!r} is not a job of its cluster "
                    f"({', '.join(cluster)}); {expected}")
  size = len(cluster[task_type])
  if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < size:
    raise UserError(f"TF_CONFIG task index {index!r} is not in [0, {size}) for "
                    f"cluster.{task_type}; {expected}")
  return task_type, index, sum(len(addresses) for addresses in cluster.values())


def split_cpu(num_devices):
  """Splits the CPU into `num_devices` logical devices (before TF initialises its devices), so
  `--strategy=mirrored` can be tried on a machine without GPUs."""
  if num_devices < 1:
    raise ParameterError("num_devices", "must be >= 1", value=num_devices)
  cpus = tf.config.list_physical_devices("CPU")
  tf.config.set_logical_device_configuration(
      cpus[0], [tf.config.LogicalDeviceConfiguration()] * num_devices)


def make_strategy(name, *, tpu=None):
  """The strategy of `--strategy`; `multi_worker` must be created before any other TF op runs."""
  if name == "default":
    return tf.distribute.get_strategy()
  if name == "mirrored":
    # MirroredStrategy() takes every GPU, or CPU:0 alone without GPUs: name the logical CPUs of
    # `split_cpu` explicitly.
    cpus = tf.config.list_logical_devices("CPU")
    if not tf.config.list_logical_devices("GPU") and len(cpus) > 1:
      return tf.distribute.MirroredStrategy([d.name for d in cpus])
    return tf.distribute.MirroredStrategy()
  if name == "multi_worker":
    check_tf_config(os.environ.get("TF_CONFIG"))
    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # Reads the cluster from TF_CONFIG.
    if not is_chief(strategy):
      # One progress log and bar per cluster: the chief's.
      logging.set_verbosity(logging.WARNING)
      console.show_progress(False)
    return strategy
  if name == "tpu":
    try:
      resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
      tf.config.experimental_connect_to_cluster(resolver)
      tf.tpu.experimental.initialize_tpu_system(resolver)
    except (ValueError, RuntimeError, tf.errors.OpError) as e:
      raise ParameterError("tpu", f"cannot be reached (expected a TPU name, grpc://host:port, or "
                           f"empty for the local TPU of a TPU VM): {type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}", value=tpu) from e
    return tf.distribute.TPUStrategy(resolver)
  raise ParameterError("name", f"must be one of {'|'.join(STRATEGIES)}", value=name)


def check_global_batch(global_batch, strategy):
  """The per-replica batch of a global batch; it must split evenly."""
  replicas = strategy.num_replicas_in_sync
  if global_batch % replicas:
    raise ParameterError("global_batch", f"must be divisible by the number of replicas "
                         f"({replicas})", value=global_batch)
  return global_batch // replicas


def is_multi_worker(strategy):
  """Whether `strategy` trains on more than one worker process."""
  return (isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
          and strategy.num_replicas_in_sync > len(strategy.extended.worker_devices))


def is_chief(strategy):
  """Whether this process writes the run's files (always, except on non-chief workers)."""
  return strategy.extended.should_checkpoint


def write_dir(path, strategy):
  """`path` on the chief; elsewhere a fresh temporary directory, removed when the process ends.

  Non-chief workers still run every save (all workers must take part), into a directory that
  nobody reads, so a shared `--workdir` gets one copy of each file.
  """
  if is_chief(strategy):
    return path
  temp = tempfile.mkdtemp(prefix=f"mmd_keras_worker{strategy.cluster_resolver.task_id}_")
  atexit.register(shutil.rmtree, temp, ignore_errors=True)
  return temp


def check_same_start(step, strategy, *, workdir):
  """Raises unless every worker starts at the same step, i.e. all of them resumed the chief's
  checkpoint (a worker that cannot see it would start over and the cluster would deadlock)."""
  if not is_multi_worker(strategy):
    return
  steps = strategy.gather(strategy.run(lambda: tf.constant([step], tf.int64)), axis=0).numpy()
  if len(set(steps.tolist())) > 1:
    raise ParameterError(None, f"the workers start at different steps "
                         f"{sorted(set(steps.tolist()))}: every worker must read the chief's "
                         f"checkpoints, so put {{workdir}}={workdir} on a filesystem all workers "
                         f"share", refs=("workdir",))


def shard_global_batches(dataset):
  """`dataset` of global batches, set up so that each worker takes its slice of every batch.

  TF's default (AUTO) would shard a file-based dataset by files, so workers would draw different
  global batches than one process would; DATA makes every worker read the same batches and keep
  its replicas' part, so any number of workers trains on the batches of a single process (tested
  by test_multi_worker). Which replica gets which part does not matter to the MMD² of the batch.
  """
  options = tf.data.Options()
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
  return dataset.with_options(options)


def fit_logs(logs):
  """`train_step`'s scalar logs, as [1] tensors when training on several workers.

  There Keras 3 `fit` reduces the logs with `strategy.reduce(MEAN, value, axis=0)`, which fails on
  scalars (tensorflow/tensorflow#72388); [1] tensors reduce to the scalar mean over replicas.
  """
  if not is_multi_worker(tf.distribute.get_strategy()):
    return logs
  return {name: tf.reshape(value, [1]) for name, value in logs.items()}
