"""Writing a `Sampler`: a SavedModel in TF Serving's versioned layout and TFLite flatbuffers.

  <export_dir>/<model_name>/<version>/           saved_model.pb, variables/, assets/sampler.json
  <export_dir>/<model_name>_k<K>.tflite          noise -> images, float32 weights
  <export_dir>/<model_name>_k<K>_fp16.tflite     the same with float16 weights
  <export_dir>/<model_name>_k<K>_v<version>.tflite   the same, named after its version (the
                                                     quickstart's next-free-version exports)

Every .tflite has a record `<file>.json`: the sampler's metadata (weights sha256, settings) and the
SavedModel version it was exported with. Every file appears whole or not at all: it is written
beside its target under a hidden name (TF Serving only loads numeric version directories) and
renamed into place.
"""

import json
import os
import re
import tempfile

import tensorflow as tf

from mmd_keras import atomic
from mmd_keras import console
from mmd_keras import errors
from mmd_keras import provenance
from mmd_keras.errors import ParameterError


# A name TF Serving can key a model by, in a directory name and in its REST URL
# (/v1/models/<name>): no path separators, and no leading dot ("." and ".." leave the export dir,
# hidden names look like our staging files).
MODEL_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


# No gradients are served: skip tracing the gradient of every op with a custom gradient.
_SAVE_OPTIONS = tf.saved_model.SaveOptions(experimental_custom_gradients=False)


def check_model_name(name):
  """Raises a ParameterError unless `name` is a plain model name (see MODEL_NAME_PATTERN)."""
  if not MODEL_NAME_PATTERN.fullmatch(name or ""):
    raise ParameterError("model_name", "must be letters, digits, '_', '-' and '.', starting with "
                         "a letter or digit (a directory under the export directory)", value=name)


def version_dir(*, export_dir, model_name, version):
  return os.path.join(export_dir, model_name, str(version))


def tflite_path(*, export_dir, model_name, num_steps, float16=False, version=None):
  version_part = "" if version is None else f"_v{version}"
  return os.path.join(export_dir,
                      f"{model_name}_k{num_steps}{version_part}{'_fp16' if float16 else ''}.tflite")


def tflite_record_path(path):
  return path + ".json"


def _read_json(path):
  """The JSON object in `path`, or None if it is missing or not JSON (a record we cannot trust)."""
  try:
    with open(path) as f:
      value = json.load(f)
  except (OSError, ValueError):
    return None
  return value if isinstance(value, dict) else None


def read_saved_metadata(path):
  """assets/sampler.json of the SavedModel version `path`, or None."""
  return _read_json(os.path.join(path, "assets", "sampler.json"))


def read_tflite_record(path):
  """The record of the TFLite file `path`, or None (no record: an unknown model)."""
  return _read_json(tflite_record_path(path))


def same_model(record, metadata):
  """Whether `record` (a sampler.json or TFLite record) describes the sampler of `metadata`."""
  return provenance.same_sampler(record, metadata)


def versions(*, export_dir, model_name):
  """The numeric version directories under <export_dir>/<model_name>, ascending."""
  try:
    names = os.listdir(os.path.join(export_dir, model_name))
  except FileNotFoundError:
    return []
  return sorted(int(name) for name in names
                if name.isdigit() and os.path.isdir(os.path.join(export_dir, model_name, name)))


def next_free_version(metadata, *, export_dir, model_name, first_version, num_steps,
                      tflite_variants):
  """(version, reused) for an export of the sampler with `metadata` that never replaces a file.

  Reuses the latest version (if >= `first_version`) when it holds the same metadata (weights and
  settings) and each of its TFLite files of `tflite_variants` (float16 flags) is missing or the same
  model. Otherwise the first version from `first_version` on above every existing one (TF Serving
  serves the highest) whose directory and TFLite names are all free.
  """
  metadata = json.loads(json.dumps(metadata))  # Tuples as lists, as read back from the file.
  existing = versions(export_dir=export_dir, model_name=model_name)
  tflite = lambda version, float16: tflite_path(export_dir=export_dir, model_name=model_name,
                                                num_steps=num_steps, float16=float16,
                                                version=version)
  same_tflite = lambda path: not os.path.exists(path) or same_model(read_tflite_record(path),
                                                                    metadata)
  if existing and existing[-1] >= first_version:
    latest = existing[-1]
    saved = read_saved_metadata(version_dir(export_dir=export_dir, model_name=model_name,
                                            version=latest))
    if provenance.sampler_record(saved) == metadata and all(
        same_tflite(tflite(latest, f16)) for f16 in tflite_variants):
      return latest, True
  version = max([first_version] + [v + 1 for v in existing])
  while any(os.path.exists(p) for p in (
      version_dir(export_dir=export_dir, model_name=model_name, version=version),
      tflite(version, False), tflite(version, True))):
    version += 1
  return version, False


def check_version_free(path, *, overwrite):
  """Raises a ParameterError if the export version `path` exists and `overwrite` is off."""
  if os.path.exists(path) and not overwrite:
    raise ParameterError("overwrite", f"is off and export version {path} already exists "
                         f"({{export_dir}}/<{{model_name}}>/<{{model_version}}>); choose another "
                         f"{{model_version}} or pass {{overwrite}}",
                         refs=("export_dir", "model_name", "model_version", "overwrite"))


def make_model_dir(*, export_dir, model_name):
  """Creates <export_dir>/<model_name>, the parent of the versions; UserError if that fails."""
  return errors.writable_dir(os.path.join(export_dir, model_name), parameter="export_dir",
                             value=export_dir)


def write_saved_model(sampler, *, export_dir, model_name, version, overwrite=False):
  """Saves `sampler` with its two signatures to <export_dir>/<model_name>/<version>; returns it."""
  check_model_name(model_name)
  target = version_dir(export_dir=export_dir, model_name=model_name, version=version)
  check_version_free(target, overwrite=overwrite)
  make_model_dir(export_dir=export_dir, model_name=model_name)
  with atomic.staged_dir(target) as staging, tempfile.TemporaryDirectory() as scratch:
    metadata_path = os.path.join(scratch, "sampler.json")
    with open(metadata_path, "w") as f:
      json.dump(sampler.metadata(), f, indent=2)
    sampler.metadata_file = tf.saved_model.Asset(metadata_path)
    # tf.functions, not concrete functions: save traces under its own context anyway, so one
    # trace per signature instead of two.
    signatures = dict(serving_default=sampler.serving_default, from_noise=sampler.from_noise)
    with console.timed("writing the SavedModel"):
      tf.saved_model.save(sampler, staging, signatures=signatures, options=_SAVE_OPTIONS)
  return target


def tflite_bytes(sampler, *, float16=False):
  """The TFLite flatbuffer of `sampler.tflite_function()`, builtin ops only (no Flex delegate)."""
  # Converted from a SavedModel of that one function and the weights, written here: given the
  # function itself, the converter writes such a SavedModel on its own, with debug info and the
  # gradient of every op with a custom gradient (the UNet's GroupNorm) traced, 1.8x the time.
  weights = tf.Module()
  weights.unet_variables = sampler.unet_variables
  with tempfile.TemporaryDirectory() as scratch:
    tf.saved_model.save(weights, scratch, signatures=sampler.tflite_function(),
                        options=_SAVE_OPTIONS)
    converter = tf.lite.TFLiteConverter.from_saved_model(scratch)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    if float16:
      converter.optimizations = [tf.lite.Optimize.DEFAULT]
      converter.target_spec.supported_types = [tf.float16]
    return converter.convert()


def write_tflite(sampler, path, *, float16=False, version=None):
  """Writes the TFLite sampler to `path` (replacing an older file of that name) and its record
  `<path>.json` (metadata, float16, the SavedModel `version` it goes with); returns `path`."""
  with console.timed("converting the sampler to TFLite"):
    data = tflite_bytes(sampler, float16=float16)
  record = dict(sampler.metadata(), float16=bool(float16), saved_model_version=version)
  for key in ("signatures", "max_images", "seed_streams"):  # The SavedModel's, not the TFLite's.
    del record[key]
  # The old record goes first: a crash in between leaves a file without a record (an unknown model),
  # never a new file with the old model's record or the reverse.
  if os.path.exists(tflite_record_path(path)):
    os.remove(tflite_record_path(path))
  # Unique staging names: two exports into one directory never share (or delete) a staging file.
  atomic.write_bytes(path, data, unique=True)
  atomic.write_json(tflite_record_path(path), record, unique=True)
  return path
