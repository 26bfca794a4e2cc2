"""Saving and restoring UNet weights.

Three kinds of `--init_checkpoint` are understood:
  * a training directory or checkpoint prefix written by `pretrain`/`finetune` (tf.train.Checkpoint
    with `unet` and, when present, `ema` weights);
  * a `.weights.h5` file of the UNet alone (what the bundled base model is);
  * the DDPM checkpoints released by Ho et al. (see `ddpm_import`).
"""

import os

import tensorflow as tf

from mmd_keras.errors import UserError


class CheckpointError(UserError):
  """A checkpoint that cannot be used; the message names the flag or file."""


class WeightList(tf.Module):
  """A flat list of variables (the UNet's weights or their EMA copies) for tf.train.Checkpoint.

  Keras 3 keeps sublayer lists (the UNet's `down`/`up` levels) in containers tf.train.Checkpoint
  does not follow, so checkpointing the `unet` object alone saves only part of its weights.
  """

  def __init__(self, variables, name):
    super().__init__(name=name)
    self.variables_list = list(variables)


def _list_keys(name, count):
  return [f"{name}/variables_list/{i}/.ATTRIBUTES/VARIABLE_VALUE" for i in range(count)]


def training_checkpoint(*, unet, ema=None, optimizer=None):
  """The tf.train.Checkpoint written by `pretrain` and `finetune`."""
  objects = dict(unet=unet, unet_weights=WeightList(unet.weights, "unet_weights"))
  if ema is not None:
    objects["ema"] = WeightList(ema, "ema")
  if optimizer is not None:
    objects["optimizer"] = optimizer
  return tf.train.Checkpoint(**objects)


def latest(path):
  """The newest checkpoint prefix in a directory, or `path` itself if it is a prefix."""
  if path and os.path.isdir(path):
    found = tf.train.latest_checkpoint(path)
    if found is None:
      found = tf.train.latest_checkpoint(os.path.join(path, "checkpoints"))
    return found
  return path


def _assign_from_reader(unet, prefix, *, use_ema):
  """Loads `unet` from a training checkpoint prefix: its EMA weights if asked and present."""
  reader = tf.train.load_checkpoint(prefix)
  names = reader.get_variable_to_shape_map()
  weights = unet.weights
  ema_keys = _list_keys("ema", len(weights) + 1)
  if ema_keys[-1] in names:
    raise CheckpointError(f"--init_checkpoint={prefix} does not match the UNet flags: it holds "
                          f"more weights than the {len(weights)} of this UNet")
  if not (use_ema and all(k in names for k in ema_keys[:-1])):
    # The raw weights are also reachable through `unet` and the optimizer, so they are stored
    # under whichever path the saver met first: restore them through the object graph.
    status = tf.train.Checkpoint(unet_weights=WeightList(weights, "unet_weights")).restore(prefix)
    try:
      status.expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError) as e:
      raise CheckpointError(f"--init_checkpoint={prefix} does not hold the raw weights of this "
                            f"UNet: {str(e).splitlines()[0]}") from e
    return "raw"
  for weight, key in zip(weights, ema_keys):
    value = reader.get_tensor(key)
    if tuple(value.shape) != tuple(weight.shape):
      raise CheckpointError(
          f"--init_checkpoint={prefix} does not match the UNet flags: {weight.path} has shape "
          f"{tuple(weight.shape)}, the checkpoint has {tuple(value.shape)}")
    weight.assign(value)
  return "ema"


def restore_unet(unet, path, *, use_ema=True):
  """Loads weights into a built `unet` from any supported `--init_checkpoint`; returns a label."""
  if not path:
    raise CheckpointError("--init_checkpoint is empty and the workdir holds no checkpoint")
  if path.endswith(".weights.h5"):
    if not os.path.exists(path):
      raise CheckpointError(f"--init_checkpoint={path} does not exist")
    try:
      unet.load_weights(path)
    except Exception as e:  # h5py/Keras raise many types for a wrong or corrupt file.
      raise CheckpointError(f"--init_checkpoint={path} cannot be loaded into the UNet built from "
                            f"the flags: {type(e).__name__}: {str(e).splitlines()[0]}") from e
    return "weights.h5"
  prefix = latest(path)
  if prefix is None or not tf.io.gfile.exists(prefix + ".index"):
    raise CheckpointError(
        f"--init_checkpoint={path}: no checkpoint found (expected a .weights.h5 file, a checkpoint "
        f"prefix with a .index file, or a directory holding one)")
  try:
    names = tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
  except (tf.errors.OpError, ValueError) as e:
    raise CheckpointError(f"--init_checkpoint={prefix} is unreadable: {str(e).splitlines()[0]}") from e
  if any(k.startswith("model/") for k in names):
    from mmd_keras import ddpm_import  # The released TF1 checkpoints of Ho et al.
    return ddpm_import.restore(unet, prefix, use_ema=use_ema)
  return _assign_from_reader(unet, prefix, use_ema=use_ema)


def save_weights_h5(unet, path, *, overwrite=False):
  """Writes the UNet weights to `path` via a temporary file and a rename (never half-written)."""
  if os.path.exists(path) and not overwrite:
    raise CheckpointError(f"{path} exists; refusing to overwrite it")
  tmp = path[:-len(".weights.h5")] + ".tmp.weights.h5"
  unet.save_weights(tmp)
  os.replace(tmp, path)
