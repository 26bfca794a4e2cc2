"""Saving and restoring UNet weights.

Three kinds of checkpoint (e.g. a run's `init_checkpoint`) are understood:
  * a training directory or checkpoint prefix written by `pretrain`/`finetune` (tf.train.Checkpoint
    with `unet` and, when present, `ema` weights and learned timesteps' logits);
  * a `.weights.h5` file of the UNet alone (what the bundled base model is), with, for weights
    finetuned with learned timesteps, those timesteps in `<name>.timesteps.json` beside it;
  * the DDPM checkpoints released by Ho et al. (see `ddpm_import`).
"""

import collections
import json
import os

import h5py
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import trackable_object_graph_pb2

from mmd_keras import atomic
from mmd_keras import ddpm_import
from mmd_keras import schedule as schedule_lib
from mmd_keras.errors import ParameterError


# The UNet parameters that decide its weight shapes, as `ParameterError` refs.
UNET_PARAMETERS = ("image_size", "ch", "ch_mult", "num_res_blocks", "attn_resolutions")
_UNET = ", ".join("{" + name + "}" for name in UNET_PARAMETERS)


class CheckpointError(ParameterError):
  """A checkpoint that cannot be used, named by the parameter that gave it (None: no parameter,
  e.g. the checkpoint a rerun resumes from)."""

  def __init__(self, parameter, detail, *, value=ParameterError._UNSET, refs=UNET_PARAMETERS):
    super().__init__(parameter, detail, value=value, refs=refs)


class WeightList(tf.Module):
  """A flat list of variables (the UNet's weights or their EMA copies) for tf.train.Checkpoint.

  Keras 3 keeps sublayer lists (the UNet's `down`/`up` levels) in containers tf.train.Checkpoint
  does not follow, so checkpointing the `unet` object alone saves only part of its weights.
  """

  def __init__(self, variables, name):
    super().__init__(name=name)
    self.variables_list = list(variables)


# The training checkpoint's object holding the learned timesteps' logits.
LEARNED_TIMESTEPS = "timestep_logits"


def _list_keys(name, count):
  return [f"{name}/variables_list/{i}/.ATTRIBUTES/VARIABLE_VALUE" for i in range(count)]


def training_checkpoint(*, unet, ema=None, optimizer=None, learned_timesteps=None):
  """The tf.train.Checkpoint written by `pretrain` and `finetune` (with `learned_timesteps`, a
  `learned_timesteps.LearnedTimesteps`: its logits and optimizer)."""
  objects = dict(unet=unet, unet_weights=WeightList(unet.weights, "unet_weights"))
  if ema is not None:
    objects["ema"] = WeightList(ema, "ema")
  if optimizer is not None:
    objects["optimizer"] = optimizer
  if learned_timesteps is not None:
    objects[LEARNED_TIMESTEPS] = WeightList([learned_timesteps.logits], LEARNED_TIMESTEPS)
    objects["timesteps_optimizer"] = learned_timesteps.optimizer
  return tf.train.Checkpoint(**objects)


def has_ema(prefix):
  """Whether the training checkpoint `prefix` holds EMA weights."""
  return _list_keys("ema", 1)[0] in {name for name, _ in tf.train.list_variables(prefix)}


def latest(path):
  """The newest checkpoint prefix in a directory, or `path` itself if it is a prefix."""
  if path and os.path.isdir(path):
    found = tf.train.latest_checkpoint(path)
    if found is None:
      found = tf.train.latest_checkpoint(os.path.join(path, "checkpoints"))
    return found
  return path


def _assign_from_reader(unet, prefix, *, use_ema, parameter):
  """Loads `unet` from a training checkpoint prefix: its EMA weights if asked and present."""
  reader = tf.train.load_checkpoint(prefix)
  names = reader.get_variable_to_shape_map()
  weights = unet.weights
  ema_keys = _list_keys("ema", len(weights) + 1)
  if ema_keys[-1] in names:
    raise CheckpointError(parameter, f"does not match the UNet ({_UNET}): it holds more weights "
                          f"than the {len(weights)} of this UNet", value=prefix)
  if not (use_ema and all(k in names for k in ema_keys[:-1])):
    # The raw weights are also reachable through `unet` and the optimizer, so they are stored
    # under whichever path the saver met first: restore them through the object graph.
    status = tf.train.Checkpoint(unet_weights=WeightList(weights, "unet_weights")).restore(prefix)
    try:
      status.expect_partial().assert_existing_objects_matched()
    except (AssertionError, ValueError) as e:
      raise CheckpointError(parameter, f"does not hold the raw weights of this UNet: "
                            f"{str(e).splitlines()[0]}", value=prefix) from e
    return "raw"
  for weight, key in zip(weights, ema_keys):
    value = reader.get_tensor(key)
    if tuple(value.shape) != tuple(weight.shape):
      raise CheckpointError(
          parameter, f"does not match the UNet ({_UNET}): {weight.path} has shape "
          f"{tuple(weight.shape)}, the checkpoint has {tuple(value.shape)}", value=prefix)
    weight.assign(value)
  return "ema"


def _resolve(path, *, parameter):
  """("h5", the file) or ("checkpoint", the prefix) of an existing checkpoint; `parameter` names
  it in errors."""
  if not path:
    raise CheckpointError(parameter, "is empty and the workdir holds no checkpoint")
  if path.endswith(".weights.h5"):
    if not os.path.exists(path):
      raise CheckpointError(parameter, "does not exist (expected an existing .weights.h5 file)",
                            value=path)
    try:
      # Opening checks the HDF5 signature and the stored end of file: garbage and truncated
      # files fail here, before any model is built.
      with h5py.File(path, "r"):
        pass
    except OSError as e:
      raise CheckpointError(parameter, f"is not a readable .weights.h5 (HDF5) file: "
                            f"{str(e).splitlines()[0]}", value=path) from e
    return "h5", path
  prefix = latest(path)
  if prefix is None or not tf.io.gfile.exists(prefix + ".index"):
    raise CheckpointError(
        parameter, "names no checkpoint (expected a .weights.h5 file, a checkpoint prefix with a "
        ".index file, or a directory holding one)", value=path)
  return "checkpoint", prefix


def _variable_shapes(prefix, *, parameter):
  try:
    return tf.train.load_checkpoint(prefix).get_variable_to_shape_map()
  except (tf.errors.OpError, ValueError) as e:
    raise CheckpointError(parameter, f"is unreadable (expected a TF checkpoint): "
                          f"{str(e).splitlines()[0]}", value=prefix) from e


def _shape_difference(path, unet):
  """How the weight shapes of a .weights.h5 file and of `unet` differ, or None if they do not."""
  in_file = collections.Counter()
  with h5py.File(path, "r") as f:
    f.visititems(lambda _, obj: in_file.update([tuple(obj.shape)])
                 if isinstance(obj, h5py.Dataset) else None)
  in_unet = collections.Counter(tuple(w.shape) for w in unet.weights)
  if in_file == in_unet:
    return None
  only_file = sorted((in_file - in_unet).elements())
  only_unet = sorted((in_unet - in_file).elements())
  return (f"the file holds {in_file.total()} weights, the UNet {in_unet.total()}; shape "
          f"{only_file[0] if only_file else 'none'} in the file, "
          f"{only_unet[0] if only_unet else 'none'} in the UNet")


def check_readable(path, *, parameter="init_checkpoint"):
  """Raises CheckpointError unless `path` names a checkpoint whose file (or index) can be read.

  Cheap (no model is built), so a run can refuse a missing or corrupt file before loading data;
  whether the weights fit the UNet is only known when they are restored.
  """
  kind, resolved = _resolve(path, parameter=parameter)
  if kind == "checkpoint":
    _variable_shapes(resolved, parameter=parameter)


def restore_unet(unet, path, *, use_ema=True, parameter="init_checkpoint"):
  """Loads weights into a built `unet` from any supported checkpoint; returns a label.

  `parameter` names `path` in the error messages.
  """
  kind, resolved = _resolve(path, parameter=parameter)
  if kind == "h5":
    try:
      unet.load_weights(resolved)
    except Exception as e:  # h5py/Keras raise many types for a wrong or corrupt file.
      # Keras' own message names no shape; the shapes say which parameter differs.
      detail = _shape_difference(resolved, unet) or f"{type(e).__name__}: {str(e).splitlines()[0]}"
      raise CheckpointError(parameter, f"cannot be loaded into the UNet of {_UNET}: {detail}",
                            value=path) from e
    return "weights.h5"
  names = _variable_shapes(resolved, parameter=parameter)
  if ddpm_import.is_released(names):  # The TF1 checkpoints of Ho et al.
    try:
      return ddpm_import.restore(unet, resolved, use_ema=use_ema)
    except ddpm_import.MismatchError as e:
      raise CheckpointError(parameter, f"({e.label} weights) does not match the UNet ({_UNET}): "
                            f"{e}", value=resolved) from e
  return _assign_from_reader(unet, resolved, use_ema=use_ema, parameter=parameter)


# What restoring a corrupt or foreign training checkpoint raises (a short data file: IndexError).
RESTORE_ERRORS = (AssertionError, ValueError, LookupError, tf.errors.OpError)


def first_line(error):
  """The first line of an exception's message (its type name if it has none)."""
  text = str(error).strip()
  return text.splitlines()[0] if text else type(error).__name__


def resume_error(prefix, detail, *, corrupt=False):
  """The error for a resume checkpoint (the one a rerun continues from) that cannot be used:
  `corrupt` if its files are damaged, else it may be another run's."""
  folder = os.path.dirname(prefix)
  if corrupt:
    expected = "expected a complete checkpoint:"
  else:
    expected = (f"expected a checkpoint written by this command (the same {_UNET}): rerun with "
                f"the flags of the run that wrote it (its flags.cfg),")
  return CheckpointError(None, f"cannot resume from {prefix}: {detail}; {expected} use another "
                         f"{{workdir}}, or move {folder} away to start over",
                         refs=UNET_PARAMETERS + ("workdir",))


def check_resume(checkpoint_dir, *, unet_factory):
  """The checkpoint a rerun would resume from in `checkpoint_dir` (None if there is none), checked
  before any data is read: every tensor readable, and the weights those of the UNet `unet_factory`
  builds (built here once, outside any strategy). Raises `resume_error`s.
  """
  prefix = tf.train.latest_checkpoint(checkpoint_dir)
  if prefix is None:
    return None
  try:
    reader = tf.train.load_checkpoint(prefix)
    names = sorted(reader.get_variable_to_shape_map())
  except (tf.errors.OpError, ValueError) as e:
    raise resume_error(prefix, f"its index is unreadable ({first_line(e)})",
                       corrupt=True) from e
  # Every tensor read once (the reader checks sizes and checksums): a data file cut short or
  # damaged fails here rather than minutes later. One tensor at a time; the resume reads them again.
  for name in names:
    try:
      reader.get_tensor(name)
    except RESTORE_ERRORS as e:
      raise resume_error(prefix, f"its tensor {name} cannot be read ({first_line(e)})",
                         corrupt=True) from e
  unet = unet_factory().build_for_inference()
  try:
    tf.train.Checkpoint(unet_weights=WeightList(unet.weights, "unet_weights")).restore(
        prefix).expect_partial().assert_existing_objects_matched()
  except RESTORE_ERRORS as e:
    raise resume_error(prefix, f"it does not hold this UNet's weights ({first_line(e)})") from e
  return prefix


def save_weights_h5(unet, path, *, overwrite=False):
  """Writes the UNet weights to `path` via a staging file and a rename (never half-written)."""
  if os.path.exists(path) and not overwrite:
    raise CheckpointError(None, f"{path} exists; refusing to overwrite it", refs=())
  with atomic.staged(path) as staging:
    unet.save_weights(staging)


def timesteps_path(weights_path):
  """<name>.timesteps.json beside <name>.weights.h5: the timesteps finetuned with those weights."""
  return weights_path[:-len(".weights.h5")] + ".timesteps.json"


def save_timesteps(weights_path, timesteps, *, num_timesteps, sampler):
  """Writes the learned `timesteps` of the weights `weights_path` beside it (`timesteps_path`)."""
  atomic.write_json(timesteps_path(weights_path), dict(
      timesteps=[float(t) for t in timesteps], num_timesteps=int(num_timesteps), sampler=sampler))


_OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"


def _variable_key(reader, path):
  """The checkpoint key of the variable at object path `path` (names from the root), or None.

  Found through the object graph: a variable reachable by several paths (the optimizer tracks what
  it updates) is stored under whichever the saver met first.
  """
  if not reader.has_tensor(_OBJECT_GRAPH):  # A TF1 checkpoint (the released DDPM ones).
    return None
  graph = trackable_object_graph_pb2.TrackableObjectGraph()
  graph.ParseFromString(reader.get_tensor(_OBJECT_GRAPH))
  node = graph.nodes[0]
  for name in path:
    child = next((c for c in node.children if c.local_name == name), None)
    if child is None:
      return None
    node = graph.nodes[child.node_id]
  return next((a.checkpoint_key for a in node.attributes if a.name == "VARIABLE_VALUE"), None)


def learned_timesteps(path, *, num_timesteps, parameter="init_checkpoint"):
  """The timesteps finetuned with the weights of `path` (float64 [K]), None if they were not
  learned: read from `timesteps_path` beside a .weights.h5 file, or from a training checkpoint's
  logits. Values that are not K increasing timesteps in [0, T − 1] are a CheckpointError."""
  kind, resolved = _resolve(path, parameter=parameter)
  if kind == "h5":
    record_path = timesteps_path(resolved)
    if not os.path.exists(record_path):
      return None
    try:
      with open(record_path) as f:
        record = json.load(f)
      values = np.asarray(record["timesteps"], np.float64)
      saved_num_timesteps = int(record["num_timesteps"])
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise CheckpointError(parameter, f"has an unreadable {record_path} ({first_line(e)}): "
                            f"expected the JSON of its learned timesteps", value=path,
                            refs=()) from e
    if saved_num_timesteps != num_timesteps:
      raise CheckpointError(parameter, f"was finetuned with T={saved_num_timesteps} timesteps "
                            f"({record_path}); this run has T={num_timesteps} "
                            f"({{num_timesteps}})", value=path, refs=("num_timesteps",))
  else:
    _variable_shapes(resolved, parameter=parameter)
    reader = tf.train.load_checkpoint(resolved)
    key = _variable_key(reader, [LEARNED_TIMESTEPS, "variables_list", "0"])
    if key is None:
      return None
    record_path = resolved
    values = schedule_lib.learned_timesteps(
        reader.get_tensor(key), num_timesteps=num_timesteps).numpy().astype(np.float64)
  if (values.ndim != 1 or not len(values) or np.any(np.diff(values) <= 0) or values[0] < 0
      or values[-1] > num_timesteps - 1):
    raise CheckpointError(parameter, f"has learned timesteps ({record_path}) that are not "
                          f"increasing values in [0, {num_timesteps - 1}]", value=path, refs=())
  return values
