"""Saving and restoring UNet weights.

Three kinds of `--init_checkpoint` are understood:
  * a training directory or checkpoint prefix written by `pretrain`/`finetune` (tf.train.Checkpoint
    with `unet` and, when present, `ema` weights);
  * a `.weights.h5` file of the UNet alone (what the bundled base model is);
  * the DDPM checkpoints released by Ho et al. (see `ddpm_import`, when available).
"""

import os

import tensorflow as tf

from mmd_keras.errors import UserError


class CheckpointError(UserError):
  """A checkpoint that cannot be used; the message names the flag or file."""


class EmaWeights(tf.Module):
  """Holds the EMA copies of a model's weights so tf.train.Checkpoint can track them."""

  def __init__(self, variables):
    super().__init__(name="ema")
    self.variables_list = list(variables)


def training_checkpoint(*, unet, ema=None, optimizer=None):
  """The tf.train.Checkpoint written by `pretrain` and `finetune`."""
  objects = dict(unet=unet)
  if ema is not None:
    objects["ema"] = EmaWeights(ema)
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
  ema_keys = [f"ema/variables_list/{i}/.ATTRIBUTES/VARIABLE_VALUE" for i in range(len(weights))]
  if f"ema/variables_list/{len(weights)}/.ATTRIBUTES/VARIABLE_VALUE" in names:
    raise CheckpointError(f"--init_checkpoint={prefix} does not match the UNet flags: it holds "
                          f"more weights than the {len(weights)} of this UNet")
  if not (use_ema and all(k in names for k in ema_keys)):
    status = tf.train.Checkpoint(unet=unet).restore(prefix)
    try:
      status.assert_existing_objects_matched()
    except AssertionError as e:
      raise CheckpointError(f"--init_checkpoint={prefix} does not match the UNet flags: "
                            f"{str(e).splitlines()[0]}") from e
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
