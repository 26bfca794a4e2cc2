"""pool_3 (D = 2048) of the frozen FID Inception GraphDef behind published FIDs (`--inception_graph`):
TTUR's `classify_image_graph_def.pb` (input `ExpandDims:0`, float images [N, H, W, 3] in [0, 255],
which the graph resizes bilinearly to 299×299 itself) or TF-GAN's
`inceptionv1_for_inception_score.pb` (input `Mul:0`, [N, 299, 299, 3] in [-1, 1], resized here as
TF-GAN's `preprocess_image` does); output `pool_3:0` [N, 1, 1, 2048]. Imported once into a wrapped
function."""

import os

import tensorflow as tf

from mmd_keras.features import network as network_lib
from mmd_keras.features.network import FeatureError

DIM = 2048
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


def check(*, channels, graph):
  if not graph:
    raise FeatureError("feature_net", f"needs {{inception_graph}}; {FID_HELP}",
                       value="inception_fid", refs=("inception_graph",))
  if not os.path.isfile(graph):
    raise FeatureError("inception_graph", f"does not exist or is not a file; {FID_HELP}",
                       value=graph)
  if channels not in (1, 3):
    raise FeatureError("feature_net", f"needs 1 or 3 image channels, got {channels}",
                       value="inception_fid")


def build(*, channels, graph):
  check(channels=channels, graph=graph)
  graph_def = tf.compat.v1.GraphDef()
  try:
    with open(graph, "rb") as f:
      graph_def.ParseFromString(f.read())
  except Exception as e:  # protobuf's DecodeError, or OSError.
    raise FeatureError("inception_graph", f"is not a GraphDef ({network_lib.first_line(e)}); {FID_HELP}",
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
                       f"({network_lib.first_line(e)}); {FID_HELP}", value=graph) from None
  if probe.shape.num_elements() != 2 * DIM:
    raise FeatureError("inception_graph", f"gives {FID_OUTPUT} of shape {probe.shape} for 2 "
                       f"images; expected {DIM} values per image", value=graph)
  return network_lib.FeatureNetwork(name="inception_fid", dim=DIM, model=model, call=model,
                                    preprocess=preprocess, channels=channels)
