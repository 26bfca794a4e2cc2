"""Feature networks from model files: savedmodel:<dir>, keras:<file.keras> and the frozen FID
Inception GraphDef (inception_fid). The tests write tiny models of each format and check their
features against NumPy (or the original Keras model) on the same preprocessing, the gradient
w.r.t. the images, the path through the flags into the report's spaces, and the one-line errors."""

import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import helpers

from mmd_keras import errors
from mmd_keras import evaluation as evaluate
from mmd_keras import features
from mmd_keras import mmd
from mmd_keras import settings
from mmd_keras.app import inputs
from mmd_keras.errors import ParameterError
from mmd_keras.errors import UserError

DIM = 6  # Features of the tiny SavedModel.
KERNEL = np.random.default_rng(0).normal(size=(3, DIM)).astype(np.float32)
BIAS = np.linspace(-1, 1, DIM).astype(np.float32)


def _images(n=3, size=8, channels=1, seed=0):
  return tf.constant(np.random.default_rng(seed).uniform(-1, 1, (n, size, size, channels)),
                     tf.float32)


def _check_gradient(network, images):
  return helpers.check_feature_gradient(network, images).numpy()


def _np_resize(images, size, *, half_pixel=True):
  """Bilinear resize of [N, H, W, C] to size×size: TF2's (half-pixel centres) or TF1's legacy one
  (the FID graphs')."""
  out = np.asarray(images, np.float64)
  for axis in (1, 2):
    n = out.shape[axis]
    coords = np.arange(size, dtype=np.float64) * (n / size)
    if half_pixel:
      coords += 0.5 * (n / size) - 0.5
    coords = np.clip(coords, 0, n - 1)
    low = np.floor(coords).astype(int)
    high = np.minimum(low + 1, n - 1)
    shape = [1, 1, 1, 1]
    shape[axis] = size
    frac = (coords - low).reshape(shape)
    out = np.take(out, low, axis=axis) * (1 - frac) + np.take(out, high, axis=axis) * frac
  return out


class _TinyFeatures(tf.Module):
  """φ(x) = mean over pixels of tanh(x) @ KERNEL + BIAS for x [N, 16, 16, 3]."""

  def __init__(self):
    super().__init__()
    self.kernel = tf.Variable(KERNEL)
    self.bias = tf.Variable(BIAS)

  @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32)])
  def serve(self, images):
    return dict(features=tf.reduce_mean(tf.tanh(images), axis=[1, 2]) @ self.kernel + self.bias,
                pooled=tf.reduce_mean(images, axis=[1, 2]))


def _tiny_reference(images, *, value_range):
  low, high = value_range
  x = _np_resize(np.repeat(images, 3, axis=-1), 16)
  x = low + (x + 1) * (high - low) / 2
  return np.tanh(x).mean(axis=(1, 2)) @ KERNEL + BIAS


def _save_module(module, path, *, metadata=None, **signatures):
  tf.saved_model.save(module, str(path), signatures=signatures)
  if metadata is not None:
    os.makedirs(os.path.join(path, "assets.extra"), exist_ok=True)
    with open(os.path.join(path, "assets.extra", "feature_net.json"), "w") as f:
      json.dump(metadata, f)
  return f"savedmodel:{path}"


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
  module = _TinyFeatures()
  return _save_module(module, tmp_path_factory.mktemp("features") / "tiny",
                      metadata={"image_range": [0, 1]}, serving_default=module.serve)


def test_saved_model_features_match_numpy(saved_model):
  network = features.make_feature_network(saved_model, image_size=8, channels=1)
  assert network.name == saved_model and network.dim == DIM
  images = _images()
  phi = _check_gradient(network, images)  # Grayscale 8 px -> 3 channels at 16 px, in [0, 1].
  assert phi.shape == (3, DIM)
  np.testing.assert_allclose(phi, _tiny_reference(images.numpy(), value_range=(0, 1)),
                             rtol=1e-4, atol=1e-5)


def test_flags_override_the_metadata(saved_model):
  network = features.make_feature_network(saved_model, image_size=8, channels=1,
                                          feature_image_size=16, feature_image_range=(0, 255))
  images = _images(seed=1)
  np.testing.assert_allclose(network(images).numpy(),
                             _tiny_reference(images.numpy(), value_range=(0, 255)),
                             rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def keras_model(tmp_path_factory):
  keras.utils.set_random_seed(3)
  model = keras.Sequential([keras.Input((12, 12, 3)), keras.layers.Conv2D(4, 3),
                            keras.layers.BatchNormalization(), keras.layers.ReLU(),
                            keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(5)])
  batch_norm = model.layers[1]
  batch_norm.moving_mean.assign(np.full([4], 0.2, np.float32))  # Inference mode differs.
  batch_norm.moving_variance.assign(np.full([4], 0.5, np.float32))
  path = tmp_path_factory.mktemp("features") / "tiny.keras"
  model.save(str(path))
  with open(features.metadata_path("keras", str(path)), "w") as f:
    json.dump({"image_range": [-1, 1]}, f)
  return f"keras:{path}", model


def test_keras_model_matches_the_original_model(keras_model):
  name, model = keras_model
  network = features.make_feature_network(name, image_size=8, channels=1)
  assert network.dim == 5 and not network.model.trainable_weights
  images = _images(seed=2)
  phi = _check_gradient(network, images)
  preprocessed = _np_resize(np.repeat(images.numpy(), 3, axis=-1), 12).astype(np.float32)
  np.testing.assert_allclose(phi, model(preprocessed, training=False).numpy(), rtol=1e-4,
                             atol=1e-5)


# A frozen FID Inception graph of the TTUR layout: [1, H, W, 3] in [0, 255] at ExpandDims:0, the
# graph's own legacy resize to 299, (x - 128) / 128 at Mul:0, a 2015 batch norm, pool_3 of 2048.
FID_KERNEL = np.random.default_rng(4).normal(size=(3, 2048)).astype(np.float32)
BN = dict(mean=[0.1, -0.2, 0.0], variance=[0.5, 2.0, 1.0], beta=[0.0, 0.1, -0.1],
          gamma=[1.5, 0.5, 1.0], epsilon=1e-3)


def _fid_graph_def(input_name):
  graph = tf.Graph()
  with graph.as_default():
    if input_name == "ExpandDims":
      decoded = tf.compat.v1.placeholder(tf.float32, [None, None, 3], name="Cast")
      batch = tf.expand_dims(decoded, 0, name="ExpandDims")
      resized = tf.raw_ops.ResizeBilinear(images=batch, size=[299, 299], name="ResizeBilinear")
      scaled = tf.multiply(tf.subtract(resized, 128.0, name="Sub"), 1 / 128, name="Mul")
    else:  # TF-GAN's input: already resized and scaled.
      scaled = tf.compat.v1.placeholder(tf.float32, [None, 299, 299, 3], name="Mul")
    stats = [tf.constant(np.float32(BN[k]), name=k) for k in ("mean", "variance", "beta", "gamma")]
    normalized = tf.identity(scaled, name="batchnorm")  # Becomes the 2015 op below.
    pooled = tf.reduce_mean(tf.tanh(normalized), axis=[1, 2]) @ FID_KERNEL
    tf.reshape(pooled, [-1, 1, 1, 2048], name="pool_3")
  graph_def = graph.as_graph_def()
  graph_def.versions.producer = 8  # Before TF refused BatchNormWithGlobalNormalization.
  node = next(n for n in graph_def.node if n.name == "batchnorm")
  node.op = "BatchNormWithGlobalNormalization"
  node.input[:] = [node.input[0]] + [t.op.name for t in stats]
  node.attr["variance_epsilon"].f = BN["epsilon"]
  node.attr["scale_after_normalization"].b = True
  return graph_def


def _fid_reference(images):
  x = _np_resize((np.repeat(images, 3, axis=-1) + 1) * 127.5, 299, half_pixel=False)
  x = (x - 128) / 128
  x = (x - BN["mean"]) / np.sqrt(np.add(BN["variance"], BN["epsilon"])) * BN["gamma"] + BN["beta"]
  return np.tanh(x).mean(axis=(1, 2)) @ FID_KERNEL


def _write_graph(folder, input_name, graph_def=None):
  path = os.path.join(folder, f"fid_{input_name}.pb")
  with open(path, "wb") as f:
    f.write((graph_def or _fid_graph_def(input_name)).SerializeToString())
  return path


@pytest.fixture(scope="module")
def fid_graph(tmp_path_factory):
  return _write_graph(str(tmp_path_factory.mktemp("fid")), "ExpandDims")


def test_inception_fid_matches_numpy_for_both_graph_inputs(fid_graph, tmp_path):
  network = features.make_feature_network("inception_fid", image_size=8, channels=1,
                                          inception_graph=fid_graph)
  assert network.dim == 2048 and network.name == "inception_fid"
  images = _images(seed=5)
  phi = _check_gradient(network, images)
  assert phi.shape == (3, 2048)
  np.testing.assert_allclose(phi, _fid_reference(images.numpy()), rtol=1e-3, atol=1e-4)
  # TF-GAN's graph takes Mul:0: the same features, resized by us as TF-GAN does.
  tf_gan = features.make_feature_network("inception_fid", image_size=8, channels=1,
                                         inception_graph=_write_graph(str(tmp_path), "Mul"))
  np.testing.assert_allclose(tf_gan(images).numpy(), phi, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", ["savedmodel", "keras", "inception_fid"])
def test_mmd_gradient_flows_through_each_kind_in_a_traced_step(kind, saved_model, keras_model,
                                                               fid_graph):
  # As MMDFinetuner.compute_gradients uses φ: inside a tf.function, real features held fixed.
  name = dict(savedmodel=saved_model, keras=keras_model[0], inception_fid="inception_fid")[kind]
  network = features.make_feature_network(name, image_size=8, channels=1,
                                          inception_graph=fid_graph)
  kernel = mmd.make_kernel("polynomial")

  @tf.function
  def mmd2_and_gradient(fake, real):
    real_features = tf.stop_gradient(network(real))
    with tf.GradientTape() as tape:
      tape.watch(fake)
      loss = mmd.mmd2_unbiased(network(fake), real_features, kernel=kernel)
    return loss, tape.gradient(loss, fake)

  loss, grad = mmd2_and_gradient(_images(4, seed=7), _images(4, seed=8))
  assert np.isfinite(float(loss)) and np.abs(grad.numpy()).max() > 0


def _message(main_module, cfg, name):
  """The one line main.py prints for the error of loading feature network `name` of `cfg`."""
  with pytest.raises(ParameterError) as caught:
    with errors.renamed(**settings.LIBRARY_NAMES):  # As main.main does.
      inputs.feature_network(cfg, name)
  message = caught.value.message(main_module.flag_of)
  assert "\n" not in message
  return message


def _configure(main_module, repo_root, monkeypatch, *args):
  monkeypatch.chdir(repo_root)
  main_module._parse_flags(["main.py", "--flagfile=configs/fashion_mnist.cfg", *args])
  return main_module.configuration()


def test_every_kind_through_the_flags_into_the_report_spaces(main_module, repo_root, monkeypatch,
                                                             saved_model, keras_model, fid_graph,
                                                             tmp_path):
  keras_name, _ = keras_model
  cfg = _configure(main_module, repo_root, monkeypatch, f"--feature_net={saved_model}",
                   f"--eval_feature_nets={keras_name},inception_fid",
                   f"--inception_graph={fid_graph}")
  spaces = inputs.feature_spaces(cfg, num_images=3000, images_field="eval.num_images")
  assert [(s.name, s.trained, s.network.dim) for s in spaces] == [
      (saved_model, True, DIM), (keras_name, False, 5), ("inception_fid", False, 2048)]
  assert all("files_sha256" in s.settings for s in spaces)
  digests = {s.name: evaluate.feature_cache_key(s) for s in spaces}
  real = np.random.default_rng(6).uniform(-1, 1, (4, 28, 28, 1)).astype(np.float32)
  cached = evaluate.reference_features(spaces, real, num_images=4, batch_size=4, digests=digests,
                                       cache_dir=str(tmp_path), real_set="real")
  assert {k: v.shape for k, v in cached.items()} == {
      saved_model: (4, DIM), keras_name: (4, 5), "inception_fid": (4, 2048)}
  assert len(os.listdir(tmp_path)) == 3  # One cache file per space, whatever its name holds.


class _Rank4(tf.Module):
  @tf.function(input_signature=[tf.TensorSpec([None, 16, 16, 3], tf.float32)])
  def serve(self, images):
    return images[:, :2, :2]


def test_model_file_mistakes_are_one_line_naming_the_flag(main_module, repo_root, monkeypatch,
                                                          saved_model, tmp_path):
  rank4 = _Rank4()
  two = _TinyFeatures()
  cases = [
      # (feature_net, extra flags, expected start of the message, expected text)
      (f"savedmodel:{tmp_path / 'nope'}", [], "--feature_net=savedmodel:", "does not exist"),
      (f"keras:{tmp_path / 'nope.keras'}", [], "--feature_net=keras:", "does not exist"),
      (saved_model, ["--feature_image_size=20"], "--feature_image_size=20 ",
       "which takes 16x16 images"),
      (_save_module(rank4, tmp_path / "rank4", serving_default=rank4.serve),
       ["--feature_image_range=-1,1"], "--feature_net=savedmodel:", "expected [N, D] (rank 2)"),
      (_save_module(two, tmp_path / "two", a=two.serve, b=two.serve),
       ["--feature_image_range=0,1"], "--feature_net=savedmodel:", "expected one, or one named "
       "serving_default"),
      (_save_module(tf.Module(), tmp_path / "empty"), ["--feature_image_range=0,1"],
       "--feature_net=savedmodel:", "has no signature and is not callable"),
      (_save_module(rank4, tmp_path / "no_range", serving_default=rank4.serve), [],
       "--feature_net=savedmodel:", "--feature_image_range (e.g. -1,1"),
      (_save_module(two, tmp_path / "declares_20", serving_default=two.serve,
                    metadata={"image_size": 20, "image_range": [0, 1]}),
       [], "--feature_net=savedmodel:", "takes 16x16 images, but"),
  ]
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
  cases.append((f"savedmodel:{broken}", ["--feature_image_range=0,1"],
                "--feature_net=savedmodel:", "is not a loadable SavedModel"))
  garbage = tmp_path / "garbage.keras"
  garbage.write_bytes(b"not a zip")
  cases.append((f"keras:{garbage}", ["--feature_image_range=0,1"], "--feature_net=keras:",
                "cannot be loaded as a Keras model"))
  for name, extra, start, text in cases:
    cfg = _configure(main_module, repo_root, monkeypatch, f"--feature_net={name}", *extra)
    message = _message(main_module, cfg, name)
    assert message.startswith(start) and text in message, message
    main_module.FLAGS.unparse_flags()


def test_fid_graph_mistakes_are_one_line_naming_the_flag(main_module, repo_root, monkeypatch,
                                                         tmp_path):
  graph = tf.Graph()
  with graph.as_default():
    tf.identity(tf.compat.v1.placeholder(tf.float32, [None, None, None, 3], name="ExpandDims"),
                name="logits")
  no_pool = _write_graph(str(tmp_path), "no_pool_3", graph.as_graph_def())
  cases = [
      ([], "--eval_feature_nets=inception_fid needs --inception_graph",
       "classify_image_graph_def.pb"),
      ([f"--inception_graph={tmp_path / 'nope.pb'}"], "--inception_graph=", "does not exist"),
      ([f"--inception_graph={no_pool}"], "--inception_graph=", "has no tensor pool_3:0"),
  ]
  for extra, start, text in cases:
    cfg = _configure(main_module, repo_root, monkeypatch, "--feature_net=classifier",
                     "--eval_feature_nets=inception_fid", *extra)
    message = _message(main_module, cfg, "inception_fid")
    assert message.startswith(start) and text in message, message
    main_module.FLAGS.unparse_flags()


@pytest.mark.parametrize("args, message", [
    (["--feature_net=savedmodel:"], "--feature_net=savedmodel: must be one of inception_v3|"),
    (["--eval_feature_nets=classifier,onnx:/m.onnx"], "--eval_feature_nets must name "),
    (["--feature_image_range=1,0"], "--feature_image_range=1,0 must be lo,hi with lo < hi"),
    (["--feature_image_range=0-1"], "--feature_image_range=0-1 must be lo,hi"),
    (["--feature_image_size=0"], "--feature_image_size=0 must be > 0"),
])
def test_configuration_refuses_malformed_feature_flags(main_module, repo_root, monkeypatch, args,
                                                       message):
  monkeypatch.chdir(repo_root)
  main_module._parse_flags(["main.py", "--flagfile=configs/fashion_mnist.cfg", *args])
  with pytest.raises(UserError) as caught:
    main_module.configuration()
  assert caught.value.message(main_module.flag_of).startswith(message)
