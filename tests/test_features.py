"""Feature networks: loading paths, errors, frozenness, gradients w.r.t. the images."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import helpers

from mmd_keras import classifier as classifier_lib
from mmd_keras import features
from mmd_keras.errors import UserError

RESOLUTION = 75  # Keras InceptionV3's smallest input keeps these tests fast.


def _images(n=2, size=12, channels=1, seed=0):
  return tf.constant(np.random.default_rng(seed).uniform(-1, 1, (n, size, size, channels)),
                     tf.float32)


_check_gradient = helpers.check_feature_gradient


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
  keras.utils.set_random_seed(0)
  model = keras.applications.InceptionV3(include_top=False, weights=None, pooling="avg",
                                         input_shape=(RESOLUTION, RESOLUTION, 3))
  path = str(tmp_path_factory.mktemp("inception") / "inception.weights.h5")
  model.save_weights(path)
  images = _images(3, 20, 3, seed=1)
  resized = tf.image.resize(images, [RESOLUTION, RESOLUTION], method="bilinear")
  return path, images, model(resized, training=False).numpy()


def test_inception_from_keras_weights_matches_the_saved_model(inception_weights):
  path, images, expected = inception_weights
  network = features.make_feature_network("inception_v3", image_size=20, channels=3,
                                          inception_weights=path, inception_resolution=RESOLUTION)
  assert network.dim == 2048 and network.name == "inception_v3"
  assert network.model.weights and not network.model.trainable_weights
  phi = _check_gradient(network, images)
  assert phi.dtype == tf.float32 and phi.shape == (3, 2048)
  np.testing.assert_allclose(phi.numpy(), expected, rtol=1e-4, atol=1e-5)


def test_inception_from_a_legacy_h5_model_with_top(tmp_path):
  keras.utils.set_random_seed(1)
  full = keras.applications.InceptionV3(include_top=True, weights=None,
                                        input_shape=(RESOLUTION, RESOLUTION, 3))
  path = str(tmp_path / "inception_v3_with_top.h5")
  full.save(path)  # The legacy HDF5 format of the keras-applications release files.
  network = features.make_feature_network("inception_v3", image_size=RESOLUTION, channels=3,
                                          inception_weights=path, inception_resolution=RESOLUTION)
  images = _images(2, RESOLUTION, 3, seed=7)
  pool3 = keras.Model(full.input, full.get_layer("avg_pool").output)(images, training=False)
  np.testing.assert_allclose(network(images).numpy(), pool3.numpy(), rtol=1e-4, atol=1e-5)


def test_inception_repeats_grayscale_to_three_channels(inception_weights):
  path, _, _ = inception_weights
  gray = features.make_feature_network("inception_v3", image_size=20, channels=1,
                                       inception_weights=path, inception_resolution=RESOLUTION)
  color = features.make_feature_network("inception_v3", image_size=20, channels=3,
                                        inception_weights=path, inception_resolution=RESOLUTION)
  images = _images(2, 20, 1, seed=2)
  np.testing.assert_allclose(gray(images).numpy(), color(tf.repeat(images, 3, axis=-1)).numpy(),
                             rtol=1e-5, atol=1e-6)


class _FakeInception(tf.Module):
  """Stands in for TF-GAN's FID Inception: [N, R, R, 3] in [-1, 1] -> pool_3 [N, 1, 1, 2048]."""

  def __init__(self, as_dict):
    super().__init__()
    self.kernel = tf.Variable(np.random.default_rng(3).normal(size=(3, 2048)), dtype=tf.float32)
    self.as_dict = as_dict

  @tf.function(input_signature=[tf.TensorSpec([None, RESOLUTION, RESOLUTION, 3], tf.float32)])
  def serve(self, images):
    pooled = tf.reduce_mean(tf.tanh(images), axis=[1, 2])
    pool_3 = tf.reshape(pooled @ self.kernel, [-1, 1, 1, 2048])
    if self.as_dict:
      return dict(pool_3=pool_3, logits=pooled)
    return pool_3


def _fake_reference(module, images):
  resized = tf.image.resize(tf.repeat(images, 3, axis=-1), [RESOLUTION, RESOLUTION])
  return np.tanh(resized.numpy()).mean(axis=(1, 2)) @ module.kernel.numpy()


@pytest.mark.parametrize("as_dict", [True, False])
def test_inception_from_saved_model(tmp_path, as_dict):
  module = _FakeInception(as_dict)
  path = str(tmp_path / "fid_inception")
  tf.saved_model.save(module, path, signatures=dict(serving_default=module.serve))
  network = features.make_feature_network("inception_v3", image_size=16, channels=1,
                                          inception_weights=path, inception_resolution=RESOLUTION)
  images = _images(2, 16, 1, seed=4)
  phi = _check_gradient(network, images)
  assert phi.shape == (2, 2048)
  np.testing.assert_allclose(phi.numpy(), _fake_reference(module, images), rtol=1e-4, atol=1e-5)


def test_saved_model_with_a_wrong_output_size_is_refused(tmp_path):
  module = tf.Module()
  module.serve = tf.function(lambda x: tf.reduce_mean(x, axis=[1, 2]),
                             input_signature=[tf.TensorSpec([None, RESOLUTION, RESOLUTION, 3])])
  path = str(tmp_path / "wrong")
  tf.saved_model.save(module, path, signatures=dict(serving_default=module.serve))
  with pytest.raises(UserError, match="^inception_weights=.*2048"):
    features.make_feature_network("inception_v3", image_size=16, channels=1,
                                  inception_weights=path, inception_resolution=RESOLUTION)


def test_inception_errors_name_the_parameter_and_the_file(tmp_path):
  with pytest.raises(UserError, match="^feature_net=inception_v3 needs inception_weights.*notop.h5"):
    features.make_feature_network("inception_v3", image_size=28, channels=1)
  with pytest.raises(UserError, match="does not exist.*notop.h5"):
    features.make_feature_network("inception_v3", image_size=28, channels=1,
                                  inception_weights=str(tmp_path / "missing.h5"))
  corrupt = tmp_path / "corrupt.weights.h5"
  corrupt.write_bytes(b"not an h5 file")
  with pytest.raises(UserError, match="^inception_weights=.*cannot be loaded"):
    features.make_feature_network("inception_v3", image_size=28, channels=1,
                                  inception_weights=str(corrupt), inception_resolution=RESOLUTION)


def test_unknown_feature_net_names_the_parameter_and_the_choices():
  with pytest.raises(UserError, match="^feature_net=vgg .*inception_v3.classifier."
                                     "classifier_heldout.classifier_val.inception_fid."
                                     "efficientnet_lite0, or "
                                     "savedmodel:<dir> or "
                                     "keras:<file.keras>"):
    features.make_feature_network("vgg", image_size=28, channels=1)


@pytest.fixture(scope="module")
def classifier_weights(tmp_path_factory):
  keras.utils.set_random_seed(5)
  model = classifier_lib.build_classifier("classifier", image_size=12, channels=1)
  # Non-trivial BatchNorm statistics, so inference mode differs from training mode.
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      layer.moving_mean.assign(np.full(layer.moving_mean.shape, -0.1, np.float32))
      layer.moving_variance.assign(np.full(layer.moving_variance.shape, 0.5, np.float32))
  path = str(tmp_path_factory.mktemp("classifier") / "classifier.weights.h5")
  model.save_weights(path)
  return path, model


def test_classifier_features_are_the_frozen_penultimate_layer(classifier_weights):
  path, model = classifier_weights
  network = features.make_feature_network("classifier", image_size=12, channels=1,
                                          classifier_path=path)
  assert network.name == "classifier" and network.dim == 128
  images = _images(4, 12, 1, seed=6)
  phi = _check_gradient(network, images)
  # Reference: the same layers applied by hand in inference mode.
  h = images
  for layer in model.layers[1:]:
    if layer.name == classifier_lib.FEATURE_LAYER:
      h = layer(h)
      break
    h = layer(h, training=False) if isinstance(
        layer, (keras.layers.BatchNormalization, keras.layers.Dropout)) else layer(h)
  np.testing.assert_allclose(phi.numpy(), h.numpy(), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(network(images).numpy(), phi.numpy())  # Deterministic: no dropout.
  assert network.model.weights and not network.model.trainable_weights


def test_classifier_errors_name_the_parameter(tmp_path, classifier_weights):
  with pytest.raises(UserError, match="^feature_net=classifier needs classifier_path"):
    features.make_feature_network("classifier", image_size=12, channels=1)
  with pytest.raises(UserError, match="^classifier_path=.*does not exist"):
    features.make_feature_network("classifier", image_size=12, channels=1,
                                  classifier_path=str(tmp_path / "missing.weights.h5"))
  path, _ = classifier_weights
  with pytest.raises(UserError, match="^classifier_path=.*cannot be loaded.*classifier_heldout"):
    features.make_feature_network("classifier_heldout", image_size=12, channels=1,
                                  classifier_path=path)


def test_metadata_mismatch_is_refused(tmp_path, classifier_weights):
  path, model = classifier_weights
  copy = str(tmp_path / "classifier.weights.h5")
  model.save_weights(copy)
  with open(classifier_lib.metadata_path(copy), "w") as f:
    f.write('{"arch": "classifier", "image_size": 28, "channels": 1}')
  with pytest.raises(UserError, match="^classifier_path=.*image_size=28"):
    features.make_feature_network("classifier", image_size=12, channels=1, classifier_path=copy)


def test_default_classifier_path_is_in_the_project():
  path = features.default_classifier_path("tfds:lsun/church_outdoor", "classifier_heldout")
  assert path.endswith(os.path.join("pretrained", "lsun_church_outdoor",
                                    "classifier_heldout.weights.h5"))
  project = os.path.dirname(os.path.dirname(os.path.dirname(path)))
  assert os.path.isfile(os.path.join(project, "mmd_keras", "features", "__init__.py"))


def test_inception_from_legacy_weights_only_notop_h5(tmp_path):
  # The keras-applications release file README points to was written by Keras 2's save_weights:
  # a weights-only HDF5 file of the model without top, matched to our model layer by layer.
  import h5py
  from keras.src.legacy.saving import legacy_h5_format
  keras.utils.set_random_seed(2)
  notop = keras.applications.InceptionV3(include_top=False, weights=None,
                                         input_shape=(RESOLUTION, RESOLUTION, 3))
  path = str(tmp_path / "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5")
  with h5py.File(path, "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, notop)
  network = features.make_feature_network("inception_v3", image_size=RESOLUTION, channels=3,
                                          inception_weights=path, inception_resolution=RESOLUTION)
  images = _images(2, RESOLUTION, 3, seed=8)
  pool3 = tf.reduce_mean(notop(images, training=False), axis=[1, 2])
  np.testing.assert_allclose(network(images).numpy(), pool3.numpy(), rtol=1e-4, atol=1e-5)


def test_saved_model_of_another_resolution_names_the_parameter(tmp_path):
  module = _FakeInception(as_dict=True)
  path = str(tmp_path / "fid_inception")
  tf.saved_model.save(module, path, signatures=dict(serving_default=module.serve))
  with pytest.raises(UserError, match=f"inception_resolution={RESOLUTION} .got 80"):
    features.make_feature_network("inception_v3", image_size=16, channels=1,
                                  inception_weights=path, inception_resolution=80)
  # Only its traced function, no signature: the probe's failure is a one-line error too.
  callable_only = str(tmp_path / "callable_only")
  module.__call__ = module.serve
  tf.saved_model.save(module, callable_only, signatures={})
  with pytest.raises(UserError, match="cannot embed 80x80x3 images .inception_resolution"):
    features.make_feature_network("inception_v3", image_size=16, channels=1,
                                  inception_weights=callable_only, inception_resolution=80)


def test_keras_weights_of_another_network_are_refused(classifier_weights):
  path, _ = classifier_weights  # A valid .weights.h5, of the classifier's layers and shapes.
  with pytest.raises(UserError, match="^inception_weights=.*cannot be loaded into Keras InceptionV3"):
    features.make_feature_network("inception_v3", image_size=12, channels=1,
                                  inception_weights=path, inception_resolution=RESOLUTION)
