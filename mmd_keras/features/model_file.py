"""Any image model as a file: `savedmodel:<dir>` or `keras:<file.keras>`. Its `serving_default` (or
only) signature, or its callable, maps float images [N, S, S, C] in [lo, hi] to features [N, D]. S
and [lo, hi] come from `--feature_image_size` / `--feature_image_range`, else from the model's
metadata (`<dir>/assets.extra/feature_net.json`, `<file>.json` beside a .keras file:
{"image_size": S, "image_range": [lo, hi]}); S may also come from the model's fixed input shape.
Images are resized bilinearly to S×S, grayscale is repeated when the model takes 3 channels, and
[-1, 1] is mapped linearly onto [lo, hi]."""

import json
import os

import keras
import tensorflow as tf

from mmd_keras.errors import ParameterError
from mmd_keras.features import network as network_lib
from mmd_keras.features.network import FeatureError

# Prefixes of the feature networks a file names, and what follows each.
KINDS = {"savedmodel": "<dir>", "keras": "<file.keras>"}


def parse_name(name):
  """(kind, path) of a `savedmodel:<dir>` / `keras:<file>` name, else None."""
  kind, sep, path = name.partition(":")
  return (kind, path) if sep and kind in KINDS else None


def parse_image_range(text):
  """(lo, hi) floats of the text "lo,hi" (e.g. "-1,1", "0,1", "0,255"); a ParameterError on
  `feature_image_range` unless lo < hi."""
  items = [v.strip() for v in text.split(",")]
  try:
    low, high = (float(v) for v in items)
  except ValueError:
    low = high = None
  if low is None or not low < high:
    raise ParameterError("feature_image_range", "must be lo,hi with lo < hi, e.g. -1,1 or 0,1 or "
                         "0,255 (the value range the feature model takes)", value=text)
  return low, high


def metadata_path(kind, path):
  """Where a model file's feature_net.json is: in the SavedModel's assets.extra/ (which TF's loader
  leaves alone), or beside the .keras file as <file>.json."""
  if kind == "savedmodel":
    return os.path.join(path, "assets.extra", "feature_net.json")
  return (path[:-len(".keras")] if path.endswith(".keras") else path) + ".json"


def _read_model_metadata(name, kind, path):
  meta_path = metadata_path(kind, path)
  if not os.path.exists(meta_path):
    return {}
  try:
    with open(meta_path) as f:
      meta = json.load(f)
    size, value_range = meta.get("image_size"), meta.get("image_range")
    if size is not None and not (isinstance(size, int) and size > 0):
      raise ValueError(f"image_size {size!r} is not a positive integer")
    if value_range is not None:
      low, high = (float(v) for v in value_range)
      if not low < high:
        raise ValueError(f"image_range {value_range!r} is not [lo, hi] with lo < hi")
      meta["image_range"] = (low, high)
  except (OSError, TypeError, ValueError, AttributeError) as e:
    raise FeatureError("feature_net", f"has unreadable metadata {meta_path} ({network_lib.first_line(e)}); "
                       f"expected {{\"image_size\": S, \"image_range\": [lo, hi]}}",
                       value=name) from None
  return meta


def check(name, *, image_range):
  kind, path = parse_name(name)
  if not os.path.exists(path):
    what = "a SavedModel directory" if kind == "savedmodel" else "a Keras 3 .keras file"
    raise FeatureError("feature_net", f"does not exist; expected {what}", value=name)
  if kind == "savedmodel" and not os.path.isdir(path):
    raise FeatureError("feature_net", "is not a directory; expected a SavedModel directory "
                       "(saved_model.pb and variables/)", value=name)
  if kind == "keras" and not (os.path.isfile(path) and path.endswith(".keras")):
    raise FeatureError("feature_net", "is not a .keras file; expected a Keras 3 model saved with "
                       "model.save('<file>.keras')", value=name)
  meta = _read_model_metadata(name, kind, path)
  if image_range is None and "image_range" not in meta:
    raise FeatureError("feature_net", f"needs the value range its model takes: "
                       f"{{feature_image_range}} (e.g. -1,1 or 0,1 or 0,255) or \"image_range\" in "
                       f"{metadata_path(kind, path)}", value=name, refs=("feature_image_range",))
  return kind, path, meta


def _load_keras_model(name, path):
  try:
    model = keras.saving.load_model(path, compile=False)
  except Exception as e:  # Keras raises many types for a corrupt or foreign file.
    raise FeatureError("feature_net", f"cannot be loaded as a Keras model ({network_lib.first_line(e)})",
                       value=name) from None
  if len(model.inputs or ()) != 1:
    raise FeatureError("feature_net", f"is a Keras model of {len(model.inputs or ())} inputs; "
                       f"expected one, images [N, H, W, C]", value=name)
  model, call = network_lib.frozen(model)
  return model, call, tf.TensorShape(model.inputs[0].shape)


def _model_size(name, *, kind, path, meta, image_size, input_shape):
  """The side S images are resized to: declared (flag, else metadata), and equal to the model's
  fixed input size if it has one."""
  fixed = input_shape[1:3] if input_shape.rank == 4 else tf.TensorShape(None)
  fixed = tuple(fixed) if fixed.is_fully_defined() else None
  size = image_size or meta.get("image_size")
  if size is None:
    if fixed is None or fixed[0] != fixed[1]:
      raise FeatureError("feature_net", f"takes images of no fixed square size; declare it with "
                         f"{{feature_image_size}} or \"image_size\" in {metadata_path(kind, path)}",
                         value=name, refs=("feature_image_size",))
    return fixed[0]
  if fixed is not None and fixed != (size, size):
    if image_size:
      raise FeatureError("feature_image_size", f"does not fit {name}, which takes "
                         f"{fixed[0]}x{fixed[1]} images", value=image_size)
    raise FeatureError("feature_net", f"takes {fixed[0]}x{fixed[1]} images, but "
                       f"{metadata_path(kind, path)} declares image_size {size}", value=name)
  return size


def _model_preprocess(*, size, value_range, channels):
  low, high = value_range

  def preprocess(images):
    if images.shape[-1] == 1 and channels == 3:
      images = tf.repeat(images, 3, axis=-1)
    images = tf.image.resize(images, [size, size], method="bilinear")
    return low + (images + 1.0) * ((high - low) / 2.0)  # [-1, 1] -> [lo, hi].
  return preprocess


def build(name, *, image_size, channels, feature_image_size, feature_image_range):
  kind, path, meta = check(name, image_range=feature_image_range)
  if kind == "savedmodel":
    model, call, input_shape = network_lib.load_saved_model(path, flag="feature_net", value=name)
  else:
    model, call, input_shape = _load_keras_model(name, path)
  size = _model_size(name, kind=kind, path=path, meta=meta, image_size=feature_image_size,
                     input_shape=input_shape)
  wanted = input_shape[-1] if input_shape.rank == 4 and input_shape[-1] is not None else 3
  if wanted not in (1, 3) or (wanted == 1 and channels != 1):
    raise FeatureError("feature_net", f"takes {wanted}-channel images; expected 3 channels, or 1 "
                       f"for grayscale data (the data has {channels})", value=name)
  preprocess = _model_preprocess(size=size, value_range=feature_image_range or meta["image_range"],
                                 channels=wanted)
  features = lambda x: network_lib.one_output(call(x), names=("features",), flag="feature_net", value=name,
                                   what="the features [N, D]")
  probe = network_lib.probe(
      features, preprocess(tf.zeros([2, image_size, image_size, channels])), flag="feature_net",
      value=name, images_text=f"{size}x{size}x{wanted} images")
  if probe.shape.rank != 2 or probe.shape[-1] is None:
    raise FeatureError("feature_net", f"returns features of shape {probe.shape} for 2 images; "
                       f"expected [N, D] (rank 2)", value=name)
  return network_lib.FeatureNetwork(name=name, dim=int(probe.shape[-1]), model=model,
                                    call=features, preprocess=preprocess, channels=channels)
