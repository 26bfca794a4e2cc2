"""The process-wide setup a run needs before TensorFlow builds anything: devices, determinism,
and the strategy its training modes run under."""

import keras
import tensorflow as tf

from mmd_keras import distribute
from mmd_keras import errors
from mmd_keras.errors import ParameterError

# Modes that train under a strategy; the others run on one device, and every worker of a cluster
# would run them whole and race on the same files.
DISTRIBUTED_MODES = ("pretrain", "finetune")


def prepare(cfg):
  """Checks the mode fits the strategy, splits the CPU into logical devices when asked (before
  anything initialises TF's devices) and turns on determinism."""
  strategy = cfg.distribution.strategy
  if strategy in ("multi_worker", "tpu") and cfg.run.mode not in DISTRIBUTED_MODES:
    hint = (f"; for the quickstart run {{run.mode}}=finetune {{distribution.strategy}}={strategy}, "
            f"then {{run.mode}}=evaluate and {{run.mode}}=export on one machine"
            if cfg.run.mode == "quickstart" else "")
    raise ParameterError(
        "distribution.strategy", f"is only for {{run.mode}}="
        f"{' and {run.mode}='.join(DISTRIBUTED_MODES)}; {{run.mode}}={cfg.run.mode} runs on one "
        f"device (use {{distribution.strategy}}=default){hint}", value=strategy,
        refs=("run.mode", "distribution.strategy"))
  if cfg.distribution.num_cpu_devices is not None:
    distribute.split_cpu(cfg.distribution.num_cpu_devices)
  if cfg.run.deterministic:
    keras.utils.set_random_seed(cfg.run.seed)
    tf.config.experimental.enable_op_determinism()


def strategy_for(cfg, *, batch_size, batch_field):
  """The configured tf.distribute strategy, checked to split `batch_size` evenly."""
  with errors.renamed(name="distribution.strategy", tpu="distribution.tpu"):
    strategy = distribute.make_strategy(cfg.distribution.strategy, tpu=cfg.distribution.tpu)
  with errors.renamed(global_batch=batch_field):
    distribute.check_global_batch(batch_size, strategy)
  return strategy
