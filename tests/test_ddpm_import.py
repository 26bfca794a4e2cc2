"""Released DDPM checkpoints (Ho et al., TF1) into the Keras UNet.

The reference for names, shapes and layer conventions is the original `diffusion_tf` code
(`models/unet.py`, `nn.py`, tf.contrib group_norm), re-written here independently of `unet.py`:
`original_variables` lists what its `model(name='model')` creates, `write_original_checkpoint` saves
them the way its TPU training graph does (TF1 Saver with EMA shadows, Adam slots, global_step),
and the `np_*` functions re-implement its layers in NumPy.
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from mmd_keras import checkpoints
from mmd_keras import ddpm_import
from mmd_keras.unet import UNet
from mmd_keras.unet import timestep_embedding

TINY = dict(image_size=16, channels=3, ch=32, ch_mult=(1, 2), num_res_blocks=1,
            attn_resolutions=(8,))
CIFAR10 = dict(image_size=32, channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
               attn_resolutions=(16,))
EMA = "/ExponentialMovingAverage"


def original_variables(*, image_size, channels, ch, ch_mult, num_res_blocks, attn_resolutions):
  """{name: shape} of the variables `diffusion_tf/models/unet.py::model(name='model')` creates."""
  shapes = {}

  def conv(scope, c_in, c_out):
    shapes[f"{scope}/W"], shapes[f"{scope}/b"] = (3, 3, c_in, c_out), (c_out,)

  def dense(scope, c_in, c_out):  # nn.dense and nn.nin
    shapes[f"{scope}/W"], shapes[f"{scope}/b"] = (c_in, c_out), (c_out,)

  def norm(scope, c):
    shapes[f"{scope}/gamma"], shapes[f"{scope}/beta"] = (c,), (c,)

  def resnet_block(scope, c_in, c_out):
    norm(f"{scope}/norm1", c_in)
    conv(f"{scope}/conv1", c_in, c_out)
    dense(f"{scope}/temb_proj", 4 * ch, c_out)
    norm(f"{scope}/norm2", c_out)
    conv(f"{scope}/conv2", c_out, c_out)
    if c_in != c_out:
      dense(f"{scope}/nin_shortcut", c_in, c_out)
    return c_out

  def attn_block(scope, c):
    norm(f"{scope}/norm", c)
    for part in ("q", "k", "v", "proj_out"):
      dense(f"{scope}/{part}", c, c)

  dense("model/temb/dense0", ch, 4 * ch)
  dense("model/temb/dense1", 4 * ch, 4 * ch)
  conv("model/conv_in", channels, ch)
  hs, resolution = [ch], image_size
  for i, mult in enumerate(ch_mult):
    for j in range(num_res_blocks):
      hs.append(resnet_block(f"model/down_{i}/block_{j}", hs[-1], ch * mult))
      if resolution in attn_resolutions:
        attn_block(f"model/down_{i}/attn_{j}", hs[-1])
    if i != len(ch_mult) - 1:
      conv(f"model/down_{i}/downsample/conv", hs[-1], hs[-1])
      hs.append(hs[-1])
      resolution //= 2
  c = resnet_block("model/mid/block_1", hs[-1], hs[-1])
  attn_block("model/mid/attn_1", c)
  resnet_block("model/mid/block_2", c, c)
  for i in reversed(range(len(ch_mult))):
    for j in range(num_res_blocks + 1):
      c = resnet_block(f"model/up_{i}/block_{j}", c + hs.pop(), ch * ch_mult[i])
      if resolution in attn_resolutions:
        attn_block(f"model/up_{i}/attn_{j}", c)
    if i != 0:
      conv(f"model/up_{i}/upsample/conv", c, c)
      resolution *= 2
  norm("model/norm_out", c)
  conv("model/conv_out", c, channels)
  assert not hs
  return shapes


def write_original_checkpoint(prefix, shapes, *, seed, with_ema=True):
  """Random weights saved as the original training graph does; returns {variable name: value}."""
  rng = np.random.default_rng(seed)
  graph = tf.Graph()
  with graph.as_default():
    weights = [tf.compat.v1.get_variable(
        name, initializer=tf.constant(0.1 * rng.standard_normal(shape).astype(np.float32)))
        for name, shape in shapes.items()]
    global_step = tf.compat.v1.train.get_or_create_global_step()
    # Only to create the Adam slots and beta powers the released checkpoints carry; never run.
    tf.compat.v1.train.AdamOptimizer(2e-4).apply_gradients(
        [(tf.ones_like(w), w) for w in weights], global_step=global_step)
    ema_randomize = []
    if with_ema:
      ema = tf.compat.v1.train.ExponentialMovingAverage(decay=0.9999)
      ema.apply(weights)
      ema_randomize = [ema.average(w).assign(
          0.1 * rng.standard_normal(w.shape).astype(np.float32)) for w in weights]
    saver = tf.compat.v1.train.Saver()
    everything = tf.compat.v1.global_variables()
    with tf.compat.v1.Session(graph=graph) as sess:
      sess.run(tf.compat.v1.global_variables_initializer())
      sess.run(ema_randomize)
      saver.save(sess, prefix, write_meta_graph=False)
      return {v.op.name: value for v, value in zip(everything, sess.run(everything))}


def write_tensors(prefix, values):
  names = sorted(values)
  tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                    tensors=[tf.constant(values[n]) for n in names])
  return prefix


def tiny_unet(**overrides):
  return UNet(**{**TINY, "dropout": 0.0, **overrides}).build_for_inference()


@pytest.fixture(scope="module")
def released(tmp_path_factory):
  """(prefix, values) of a tiny-architecture checkpoint in the released format."""
  prefix = str(tmp_path_factory.mktemp("ddpm") / "model.ckpt-790000")
  return prefix, write_original_checkpoint(prefix, original_variables(**TINY), seed=0)


def keras_values(unet):
  return {name: w.numpy() for name, w in ddpm_import.variable_mapping(unet).items()}


# ---- names and shapes ----

@pytest.mark.parametrize("arch", [TINY, CIFAR10], ids=["tiny", "cifar10"])
def test_mapping_is_the_original_variable_list(arch):
  unet = UNet(**arch, dropout=0.1).build_for_inference()
  mapping = ddpm_import.variable_mapping(unet)
  assert {n: tuple(w.shape) for n, w in mapping.items()} == original_variables(**arch)
  assert len({id(w) for w in mapping.values()}) == len(unet.weights) == len(mapping)
  if arch is CIFAR10:  # The original's run_cifar.py: "unet2d16b2  # 35.7M".
    assert round(unet.count_params() / 1e5) == 357


def test_released_format_has_ema_copies_and_optimizer_state(released):
  prefix, values = released
  names = set(tf.train.load_checkpoint(prefix).get_variable_to_shape_map())
  raw = set(original_variables(**TINY))
  assert {n + EMA for n in raw} <= names
  assert {n + "/Adam" for n in raw} | {n + "/Adam_1" for n in raw} <= names
  assert {"global_step", "beta1_power", "beta2_power"} <= names
  assert set(values) == names


# ---- loading ----

@pytest.mark.parametrize("use_ema,suffix,label", [(True, EMA, "ddpm-ema"), (False, "", "ddpm-raw")])
def test_restore_copies_every_weight_from_its_source(released, use_ema, suffix, label):
  prefix, values = released
  unet = tiny_unet()
  assert checkpoints.restore_unet(unet, prefix, use_ema=use_ema) == label
  loaded = keras_values(unet)
  assert set(loaded) == set(original_variables(**TINY))
  for name, value in loaded.items():
    np.testing.assert_array_equal(value, values[name + suffix], err_msg=name)
    assert not np.array_equal(value, values[name + (EMA if not suffix else "")]), name


def test_restore_takes_raw_weights_when_the_checkpoint_has_no_ema(tmp_path):
  prefix = str(tmp_path / "model.ckpt-1")
  values = write_original_checkpoint(prefix, original_variables(**TINY), seed=1, with_ema=False)
  unet = tiny_unet()
  assert checkpoints.restore_unet(unet, prefix, use_ema=True) == "ddpm-raw"
  for name, value in keras_values(unet).items():
    np.testing.assert_array_equal(value, values[name], err_msg=name)


def test_round_trip_through_the_original_format(released, tmp_path):
  prefix, values = released
  unet = tiny_unet()
  checkpoints.restore_unet(unet, prefix)
  written = str(tmp_path / "roundtrip")
  ddpm_import.save(unet, written)
  reader = tf.train.load_checkpoint(written)
  assert set(reader.get_variable_to_shape_map()) == set(original_variables(**TINY))
  for name in original_variables(**TINY):
    np.testing.assert_array_equal(reader.get_tensor(name), values[name + EMA], err_msg=name)
  again = tiny_unet()
  assert checkpoints.restore_unet(again, written) == "ddpm-raw"
  x = tf.random.stateless_normal([2, 16, 16, 3], seed=[1, 2])
  t = tf.constant([0, 999])
  np.testing.assert_array_equal(again(x, t).numpy(), unet(x, t).numpy())


def _model_weights(values, suffix=EMA):
  return {n: v for n, v in values.items() if n.startswith("model/") and n.endswith(suffix)}


@pytest.mark.parametrize("edit,expected", [
    ("missing", "lacks model/down_1/attn_0/k/W" + EMA),
    ("shape", "model/conv_in/W" + EMA + " is (3, 3, 3, 16)"),
    ("extra", "no weight for model/down_0/block_0/conv_shortcut/W" + EMA),
])
def test_mismatch_names_the_first_offending_variables(released, tmp_path, edit, expected):
  prefix, values = released
  values = _model_weights(values)
  if edit == "missing":
    del values["model/down_1/attn_0/k/W" + EMA]
  elif edit == "shape":
    values["model/conv_in/W" + EMA] = np.zeros([3, 3, 3, 16], np.float32)
  else:
    values["model/down_0/block_0/conv_shortcut/W" + EMA] = np.zeros([3, 3, 32, 32], np.float32)
  unet = tiny_unet()
  before = [w.numpy() for w in unet.weights]
  with pytest.raises(checkpoints.CheckpointError) as error:
    checkpoints.restore_unet(unet, write_tensors(str(tmp_path / "bad"), values))
  message = str(error.value)
  assert "\n" not in message and message.startswith("init_checkpoint=")
  assert expected in message
  for old, w in zip(before, unet.weights):  # Nothing is assigned from a bad checkpoint.
    np.testing.assert_array_equal(old, w.numpy())


def test_checkpoint_of_another_architecture_is_refused(released):
  prefix, _ = released
  with pytest.raises(checkpoints.CheckpointError, match="^init_checkpoint=.* ch_mult"):
    checkpoints.restore_unet(tiny_unet(ch=64), prefix)


# ---- conventions against a NumPy re-implementation of diffusion_tf ----

def np_swish(x):
  return x / (1.0 + np.exp(-x))


def np_timestep_embedding(t, dim):
  half = dim // 2
  freqs = np.exp(-math.log(10000) / (half - 1) * np.arange(half))
  args = np.asarray(t, np.float64)[:, None] * freqs[None]
  return np.concatenate([np.sin(args), np.cos(args)], axis=1)


def np_group_norm(x, gamma, beta, groups=32, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * gamma + beta


def np_conv(x, kernel, bias, stride=1):
  """tf.nn.conv2d padding='SAME': pad_total = max((out−1)·s + k − in, 0), the extra at bottom/right."""
  k, size = kernel.shape[0], x.shape[1]
  out = -(-size // stride)
  total = max((out - 1) * stride + k - size, 0)
  x = np.pad(x, [(0, 0), (total // 2, total - total // 2), (total // 2, total - total // 2), (0, 0)])
  y = sum(x[:, a:a + stride * out:stride, b:b + stride * out:stride] @ kernel[a, b]
          for a in range(k) for b in range(k))
  return y + bias


class Ref:
  """The original's layers in NumPy, reading weights by their original names from `values`."""

  def __init__(self, values, suffix=EMA):
    self.values, self.suffix = values, suffix

  def __getitem__(self, name):
    return self.values[f"model/{name}{self.suffix}"].astype(np.float64)

  def dense(self, scope, x):
    return x @ self[f"{scope}/W"] + self[f"{scope}/b"]

  def conv(self, scope, x, stride=1):
    return np_conv(x, self[f"{scope}/W"], self[f"{scope}/b"], stride)

  def norm(self, scope, x):
    return np_group_norm(x, self[f"{scope}/gamma"], self[f"{scope}/beta"])

  def temb(self, t, ch):
    h = self.dense("temb/dense0", np_timestep_embedding(t, ch))
    return self.dense("temb/dense1", np_swish(h))

  def resnet_block(self, scope, x, temb):
    h = self.conv(f"{scope}/conv1", np_swish(self.norm(f"{scope}/norm1", x)))
    h = h + self.dense(f"{scope}/temb_proj", np_swish(temb))[:, None, None, :]
    h = self.conv(f"{scope}/conv2", np_swish(self.norm(f"{scope}/norm2", h)))
    if f"model/{scope}/nin_shortcut/W{self.suffix}" in self.values:
      x = self.dense(f"{scope}/nin_shortcut", x)
    return x + h

  def attn_block(self, scope, x):
    b, height, width, c = x.shape
    h = self.norm(f"{scope}/norm", x)
    q, k, v = (self.dense(f"{scope}/{p}", h).reshape(b, -1, c) for p in "qkv")
    logits = np.einsum("bic,bjc->bij", q, k) * c ** -0.5
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    h = np.einsum("bij,bjc->bic", w, v).reshape(x.shape)
    return x + self.dense(f"{scope}/proj_out", h)

  def upsample(self, scope, x):
    return self.conv(f"{scope}/conv", x.repeat(2, axis=1).repeat(2, axis=2))

  def model(self, x, t, *, ch, ch_mult, num_res_blocks, attn_resolutions):
    temb = self.temb(t, ch)
    hs = [self.conv("conv_in", x)]
    for i in range(len(ch_mult)):
      for j in range(num_res_blocks):
        h = self.resnet_block(f"down_{i}/block_{j}", hs[-1], temb)
        if h.shape[1] in attn_resolutions:
          h = self.attn_block(f"down_{i}/attn_{j}", h)
        hs.append(h)
      if i != len(ch_mult) - 1:
        hs.append(self.conv(f"down_{i}/downsample/conv", hs[-1], stride=2))
    h = self.resnet_block("mid/block_1", hs[-1], temb)
    h = self.attn_block("mid/attn_1", h)
    h = self.resnet_block("mid/block_2", h, temb)
    for i in reversed(range(len(ch_mult))):
      for j in range(num_res_blocks + 1):
        h = self.resnet_block(f"up_{i}/block_{j}", np.concatenate([h, hs.pop()], -1), temb)
        if h.shape[1] in attn_resolutions:
          h = self.attn_block(f"up_{i}/attn_{j}", h)
      if i != 0:
        h = self.upsample(f"up_{i}/upsample", h)
    return self.conv("conv_out", np_swish(self.norm("norm_out", h)))


@pytest.fixture(scope="module")
def loaded(released):
  """(Keras UNet with the EMA weights, NumPy reference on the same checkpoint values)."""
  prefix, values = released
  unet = tiny_unet()
  checkpoints.restore_unet(unet, prefix)
  return unet, Ref(values)


def _normal(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_timestep_embedding_is_sin_then_cos():
  t = np.array([0, 1, 17, 500, 999])
  for dim in (32, 128):
    # Both the original and ours form t·ω in float32: at t ≈ 1000 its ulp is 6e-5.
    np.testing.assert_allclose(timestep_embedding(tf.constant(t), dim).numpy(),
                               np_timestep_embedding(t, dim), atol=2e-4)
    np.testing.assert_allclose(timestep_embedding(tf.constant(t[:3]), dim).numpy(),
                               np_timestep_embedding(t[:3], dim), atol=1e-5)


def test_temb_layers(loaded):
  unet, ref = loaded
  t = np.array([0, 5, 999])
  np.testing.assert_allclose(unet.temb(tf.constant(t)).numpy(), ref.temb(t, TINY["ch"]),
                             rtol=1e-5, atol=1e-5)


def test_resnet_block_with_nin_shortcut(loaded):
  unet, ref = loaded
  x, temb = _normal([2, 8, 8, 32], 1), _normal([2, 128], 2)
  block = unet.down[1].blocks[0]  # 32 -> 64 channels
  np.testing.assert_allclose(block(tf.constant(x), tf.constant(temb)).numpy(),
                             ref.resnet_block("down_1/block_0", x, temb), rtol=1e-5, atol=1e-5)


def test_attention_block(loaded):
  unet, ref = loaded
  x = _normal([2, 8, 8, 64], 3)
  np.testing.assert_allclose(unet.down[1].attns[0](tf.constant(x)).numpy(),
                             ref.attn_block("down_1/attn_0", x), rtol=1e-5, atol=1e-5)


def test_downsample_is_stride_2_conv_with_tf_same_padding(loaded):
  unet, ref = loaded
  x = _normal([2, 16, 16, 32], 4)
  np.testing.assert_allclose(unet.down[0].resample(tf.constant(x)).numpy(),
                             ref.conv("down_0/downsample/conv", x, stride=2), rtol=1e-5, atol=1e-5)


def test_upsample_is_the_originals_nearest_neighbour(loaded):
  unet, ref = loaded
  x = _normal([2, 8, 8, 64], 5)
  # The original resizes with align_corners=True; for an exact ×2 that is pixel repetition.
  np.testing.assert_array_equal(
      tf.compat.v1.image.resize_nearest_neighbor(x, [16, 16], align_corners=True).numpy(),
      x.repeat(2, axis=1).repeat(2, axis=2))
  np.testing.assert_allclose(unet.up[0].resample(tf.constant(x)).numpy(),
                             ref.upsample("up_1/upsample", x), rtol=1e-5, atol=1e-5)


def test_whole_model_matches_the_reference(loaded):
  unet, ref = loaded
  x, t = _normal([2, 16, 16, 3], 6), np.array([3, 998])
  arch = {k: TINY[k] for k in ("ch", "ch_mult", "num_res_blocks", "attn_resolutions")}
  expected = ref.model(x.astype(np.float64), t, **arch)
  np.testing.assert_allclose(unet(tf.constant(x), tf.constant(t)).numpy(), expected,
                             rtol=1e-5, atol=1e-5)
