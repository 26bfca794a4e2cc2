"""Frozen feature networks φ: images [N, H, W, C] in [-1, 1] -> features [N, D] float32.

Every network here is differentiable with respect to its input images (MMD finetuning backpropagates
through φ into the sampler) and has no trainable weights: BatchNorm runs in inference mode.

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
"""

import os

import keras
import tensorflow as tf

from mmd_keras import classifier as classifier_lib
from mmd_keras.errors import ParameterError
from mmd_keras.errors import UserError

FEATURE_NETS = ("inception_v3", "classifier", "classifier_heldout")
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
  checkpoint) its weights. `model` is the underlying Keras model (trainable=False) or loaded SavedModel.
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


def _pick_pool3(outputs, path):
  if isinstance(outputs, dict):
    for key in ("pool_3", "pool3", "pool"):
      if key in outputs:
        return outputs[key]
    if len(outputs) == 1:
      return next(iter(outputs.values()))
    raise FeatureError("inception_weights", f"the SavedModel returns {sorted(outputs)}; "
                       f"expected a single output or one named 'pool_3'", value=path)
  if isinstance(outputs, (list, tuple)):
    if len(outputs) != 1:
      raise FeatureError("inception_weights", f"the SavedModel returns {len(outputs)} "
                         f"outputs; expected the pool3 activations only", value=path)
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
  return loaded, lambda x: _pick_pool3(call(x), path)


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
  try:
    probe = call(preprocess(tf.zeros([1, resolution, resolution, channels])))
  except UserError:
    raise
  except (TypeError, ValueError, tf.errors.OpError) as e:  # E.g. a callable traced for one size.
    raise FeatureError("inception_weights", f"cannot embed {resolution}x{resolution}x3 "
                       f"images ({{inception_resolution}}): {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}", value=weights,
                       refs=("inception_resolution",)) from e
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


def check_feature_network(name, *, image_size, channels, inception_weights=None,
                          inception_resolution=299, classifier_path=None):
  """Raises FeatureError for a feature network `make_feature_network` cannot build because a flag or
  file is missing; cheap (nothing is loaded), so runs call it before their data."""
  if name not in FEATURE_NETS:
    raise FeatureError("feature_net", f"must be one of {', '.join(FEATURE_NETS)}", value=name)
  if name == "inception_v3":
    _check_inception(channels=channels, weights=inception_weights, resolution=inception_resolution)
  else:
    _check_classifier(name, image_size=image_size, channels=channels, path=classifier_path)


def make_feature_network(name, *, image_size, channels, inception_weights=None,
                         inception_resolution=299, classifier_path=None):
  """The frozen φ named by `--feature_net` for images [N, image_size, image_size, channels]."""
  if name not in FEATURE_NETS:
    raise FeatureError("feature_net", f"must be one of {', '.join(FEATURE_NETS)}", value=name)
  if name == "inception_v3":
    return _inception(channels=channels, weights=inception_weights, resolution=inception_resolution)
  return _classifier(name, image_size=image_size, channels=channels, path=classifier_path)
