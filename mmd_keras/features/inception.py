"""Inception-V3 pool3 (D = 2048) from a local file or directory (`--inception_weights`): Keras
InceptionV3 weights (.h5 / .weights.h5 / .keras, with or without the top), or a SavedModel such as
TF-GAN's FID Inception whose signature or callable maps [N, R, R, 3] in [-1, 1] to pool3. Images are
resized bilinearly to R×R (`--inception_resolution`) and grayscale is repeated to 3 channels."""

import os

import keras
import tensorflow as tf

from mmd_keras.features import network as network_lib
from mmd_keras.features.network import FeatureError

DIM = 2048
RESOLUTION = 299  # Inception-V3's own input size.
MIN_RESOLUTION = 75  # Keras InceptionV3's smallest input.
INCEPTION_HELP = (
    "{inception_weights} must point to a local copy of the Keras InceptionV3 ImageNet weights "
    "'inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5' (keras-applications release: "
    "https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/) or to a TF-GAN FID "
    "Inception SavedModel directory, downloaded beforehand: nothing is downloaded at run time")


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
      errors.append(network_lib.first_line(e))
      continue
    if include_top:
      model = keras.Model(model.input, model.get_layer("avg_pool").output)
    return network_lib.frozen(model)
  raise FeatureError("inception_weights", f"cannot be loaded into Keras InceptionV3 "
                     f"({errors[0]}); {INCEPTION_HELP}", value=path,
                     refs=("inception_weights",))


def _saved_model_inception(path, resolution):
  """(loaded, call) of a SavedModel directory mapping [N, R, R, 3] in [-1, 1] to pool3."""
  loaded, call, shape = network_lib.load_saved_model(
      path, flag="inception_weights", value=path, help_text=INCEPTION_HELP,
      refs=("inception_weights",))
  size = shape[1:3] if shape.rank == 4 else None
  if size is not None and size.is_fully_defined() and tuple(size) != (resolution, resolution):
    # TF-GAN's FID Inception takes 299x299 only.
    raise FeatureError("inception_weights", f"takes {size[0]}x{size[1]} images; set "
                       f"{{inception_resolution}}={size[0]} (got {resolution})", value=path,
                       refs=("inception_resolution",))
  return loaded, lambda x: network_lib.one_output(call(x), names=("pool_3", "pool3", "pool"),
                                                  flag="inception_weights", value=path,
                                                  what="the pool3 activations")


def check(*, channels, weights, resolution):
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
  if resolution < MIN_RESOLUTION:
    raise FeatureError("inception_resolution", f"must be >= {MIN_RESOLUTION}",
                       value=resolution)
  if channels not in (1, 3):
    raise FeatureError("feature_net", f"needs 1 or 3 image channels, got {channels}",
                       value="inception_v3")


def build(*, channels, weights, resolution):
  check(channels=channels, weights=weights, resolution=resolution)
  if os.path.isdir(weights):
    model, call = _saved_model_inception(weights, resolution)
  else:
    model, call = _keras_inception(weights, resolution)
  preprocess = _inception_preprocess(resolution)
  probe = network_lib.probe(
      call, preprocess(tf.zeros([1, resolution, resolution, channels])), flag="inception_weights",
      value=weights, refs=("inception_resolution",),
      images_text=f"{resolution}x{resolution}x3 images ({{inception_resolution}})")
  if probe.shape.num_elements() != DIM:
    raise FeatureError("inception_weights", f"gives {probe.shape} activations per image; "
                       f"expected pool3 with {DIM} values", value=weights)
  return network_lib.FeatureNetwork(name="inception_v3", dim=DIM, model=model, call=call,
                                    preprocess=preprocess, channels=channels)
