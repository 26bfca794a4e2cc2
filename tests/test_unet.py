"""unet.py: the published parameter count, shapes, the timestep embedding (integer and continuous
t), seeded dropout, GroupNorm against NumPy's closed forms, bad shapes."""

import math

import numpy as np
import pytest
import tensorflow as tf

from helpers import FASHION_UNET, REPO_ROOT, randomize_weights, tiny_unet
from mmd_keras import checkpoints
from mmd_keras import unet as unet_lib
from mmd_keras.errors import UserError


def test_cifar10_unet_has_the_published_parameter_count():
  # Ho et al. (2020), CIFAR-10 model: 35.7 M parameters; the original TF code counts 35,746,307.
  model = unet_lib.UNet(image_size=32, channels=3, ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2,
                        attn_resolutions=(16,), dropout=0.1).build_for_inference()
  assert model.count_params() == 35_746_307


def test_output_shape_equals_input_shape():
  model = tiny_unet(image_size=16, channels=3, attn_resolutions=(8,))
  x = tf.random.normal([3, 16, 16, 3])
  out = model(x, tf.constant([0, 10, 999]))
  assert out.shape == (3, 16, 16, 3)


def test_original_variable_scopes():
  names = {w.path for w in tiny_unet(attn_resolutions=(4,)).weights}
  for expected in ("unet/temb/dense0/kernel", "unet/conv_in/kernel",
                   "unet/down_0/block_0/conv1/kernel", "unet/down_0/downsample/conv/kernel",
                   "unet/down_1/attn_0/q/kernel", "unet/mid/attn_1/proj_out/kernel",
                   "unet/up_0/block_1/nin_shortcut/kernel", "unet/up_1/upsample/conv/kernel",
                   "unet/norm_out/gamma", "unet/conv_out/bias"):
    assert expected in names, expected


@pytest.mark.parametrize("dim", [32, 33])
def test_timestep_embedding_matches_numpy(dim):
  t = np.array([0, 1, 17, 999])
  half = dim // 2
  freqs = np.exp(-math.log(10000.0) * np.arange(half) / (half - 1))
  args = t[:, None] * freqs[None, :]
  expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
  if dim % 2:
    expected = np.pad(expected, [(0, 0), (0, 1)])
  got = unet_lib.timestep_embedding(tf.constant(t), dim).numpy()
  assert got.shape == (4, dim)
  np.testing.assert_allclose(got, expected, atol=2e-4)


def test_continuous_timesteps_at_integers_are_the_integer_timesteps():
  t = [0, 1, 17, 999]
  np.testing.assert_array_equal(unet_lib.timestep_embedding(tf.constant(t, tf.float32), 33),
                                unet_lib.timestep_embedding(tf.constant(t, tf.int32), 33))
  model = randomize_weights(tiny_unet(), seed=1, scale=0.05)
  x = tf.random.stateless_normal([4, 8, 8, 1], seed=[1, 2])
  np.testing.assert_array_equal(model(x, tf.constant(t, tf.float32)), model(x, tf.constant(t)))


def test_the_output_is_differentiable_in_a_continuous_timestep():
  model = randomize_weights(tiny_unet(), seed=1, scale=0.05)
  x = tf.random.stateless_normal([2, 8, 8, 1], seed=[1, 2])
  t = tf.constant([10.3, 40.6])
  with tf.GradientTape() as tape:
    tape.watch(t)
    out = tf.reduce_sum(model(x, t) ** 2)
  grad = tape.gradient(out, t).numpy()
  assert np.all(np.isfinite(grad)) and np.all(grad != 0), grad


@pytest.fixture(scope="module")
def dropout_unet():
  # conv_out and conv2 start at zero; random weights make every dropout mask visible in the output.
  return randomize_weights(tiny_unet(dropout=0.5), seed=1)


def test_seeded_dropout_is_a_function_of_the_seed(dropout_unet):
  x = tf.random.stateless_normal([2, 8, 8, 1], seed=[0, 0])
  t = tf.constant([5, 500])

  def run(seed):
    return dropout_unet(x, t, training=True,
                        dropout_seed=tf.constant(seed, tf.int32)).numpy()

  np.testing.assert_array_equal(run([1, 2]), run([1, 2]))
  assert np.abs(run([1, 2]) - run([1, 3])).max() > 1e-3


def test_inference_ignores_dropout(dropout_unet):
  x = tf.random.stateless_normal([2, 8, 8, 1], seed=[0, 1])
  t = tf.constant([5, 500])
  a = dropout_unet(x, t, training=False, dropout_seed=tf.constant([1, 2])).numpy()
  b = dropout_unet(x, t, training=False, dropout_seed=tf.constant([7, 8])).numpy()
  c = dropout_unet(x, t).numpy()
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, c)
  trained = dropout_unet(x, t, training=True, dropout_seed=tf.constant([1, 2])).numpy()
  assert np.abs(trained - a).max() > 1e-3


def test_image_size_not_divisible_names_the_parameter():
  with pytest.raises(UserError, match="^image_size=30 must be divisible by 4"):
    unet_lib.UNet(image_size=30, channels=1, ch=32, ch_mult=(1, 2, 2))


def test_channels_not_divisible_by_groups_names_the_parameter():
  with pytest.raises(UserError, match="^ch=48 times every ch_mult entry"):
    unet_lib.UNet(image_size=32, channels=1, ch=48, ch_mult=(1, 2))


def test_empty_ch_mult_names_the_parameter():
  with pytest.raises(UserError, match="^ch_mult= must list positive"):
    unet_lib.check_architecture(image_size=32, ch=32, ch_mult=())


def test_upsample_is_nearest_neighbour_resize_and_compiles_with_its_gradient():
  x = tf.random.stateless_normal([2, 3, 5, 4], seed=[1, 2])
  expected = tf.image.resize(x, [6, 10], method="nearest")
  np.testing.assert_array_equal(unet_lib.upsample_nearest_2x(x), expected)
  # Each output pixel copies one input pixel: the gradient sums the 2x2 block, under XLA too.
  weights = tf.random.stateless_normal([2, 6, 10, 4], seed=[3, 4])

  @tf.function(jit_compile=True)
  def gradient(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = tf.reduce_sum(unet_lib.upsample_nearest_2x(x) * weights)
    return tape.gradient(y, x)

  blocks = np.reshape(weights.numpy().astype(np.float64), [2, 3, 2, 5, 2, 4])
  block_sums = blocks.sum(axis=(2, 4))
  # A float32 sum of four terms in any order (XLA's, oneDNN's) is within 3 roundings of the exact
  # sum, each at most eps/2 of the running |sum| <= sum of |terms|.
  bound = 3 * np.finfo(np.float32).eps / 2 * np.abs(blocks).sum(axis=(2, 4)) + 1e-30
  assert np.all(np.abs(gradient(x).numpy() - block_sums) <= bound)


def _np_group_norm(x, gamma, beta, groups, eps):
  """(y, the function that maps dy to (dx, dγ, dβ)): GroupNorm's closed forms in float64."""
  b, h, w, c = x.shape
  xg = x.reshape(b, h, w, groups, c // groups)
  mean = xg.mean(axis=(1, 2, 4), keepdims=True)
  inv = 1.0 / np.sqrt(xg.var(axis=(1, 2, 4), keepdims=True) + eps)
  x_hat = (xg - mean) * inv
  y = x_hat.reshape(x.shape) * gamma + beta

  def backward(dy):
    g = (dy * gamma).reshape(xg.shape)
    dx = inv * (g - g.mean(axis=(1, 2, 4), keepdims=True)
                - x_hat * (g * x_hat).mean(axis=(1, 2, 4), keepdims=True))
    return (dx.reshape(x.shape), (dy * x_hat.reshape(x.shape)).sum(axis=(0, 1, 2)),
            dy.sum(axis=(0, 1, 2)))
  return y, backward


@pytest.mark.parametrize("groups,channels,offset", [(4, 8, 0.0), (2, 2, 0.0), (4, 8, 30.0)])
def test_group_norm_and_its_gradient_match_the_closed_forms(groups, channels, offset):
  rng = np.random.default_rng(groups + channels)
  # An offset far above the spread: the two-pass variance must not cancel it away.
  x = rng.normal(size=(3, 5, 6, channels)) * 2.0 + offset
  gamma, beta = rng.normal(size=channels) + 1.0, rng.normal(size=channels)
  dy = rng.normal(size=x.shape)
  layer = unet_lib.GroupNormalization(groups=groups, epsilon=1e-6)
  layer.build(x.shape)
  layer.gamma.assign(gamma.astype(np.float32))
  layer.beta.assign(beta.astype(np.float32))
  x_tf = tf.constant(x, tf.float32)
  with tf.GradientTape() as tape:
    tape.watch(x_tf)
    y = layer(x_tf)
    loss = tf.reduce_sum(y * tf.constant(dy, tf.float32))
  grads = tape.gradient(loss, [x_tf, layer.gamma, layer.beta])
  y_ref, backward = _np_group_norm(x, gamma, beta, groups, 1e-6)
  np.testing.assert_allclose(y, y_ref, atol=2e-5)
  for got, want in zip(grads, backward(dy)):
    np.testing.assert_allclose(got, want, atol=2e-4 * np.abs(want).max())


def test_group_norm_keeps_the_compute_dtype_and_an_unknown_batch():
  layer = unet_lib.GroupNormalization(groups=2, epsilon=1e-6, dtype="mixed_bfloat16")
  layer.build((None, 4, 4, 4))
  fn = tf.function(layer).get_concrete_function(tf.TensorSpec([None, 4, 4, 4], tf.bfloat16))
  assert fn.structured_outputs.dtype == tf.bfloat16
  x = tf.random.stateless_normal([3, 4, 4, 4], seed=[5, 6])
  y = tf.cast(fn(tf.cast(x, tf.bfloat16)), tf.float32)
  # Each group of the output has mean 0 and variance 1 (γ = 1, β = 0), to bfloat16's precision.
  groups = tf.reshape(y, [3, 16, 2, 2])
  np.testing.assert_allclose(tf.reduce_mean(groups, axis=[1, 3]), 0.0, atol=0.03)
  np.testing.assert_allclose(tf.math.reduce_variance(groups, axis=[1, 3]), 1.0, atol=0.05)


def test_the_bundled_weights_load_into_the_flagfile_unet():
  # .weights.h5 files key a model's direct layers by their class name (norm_out: a
  # GroupNormalization), so the bundled file of Keras' own layer must still load.
  unet = unet_lib.UNet(**FASHION_UNET).build_for_inference()
  checkpoints.restore_unet(unet, str(REPO_ROOT / "pretrained" / "fashion_mnist" /
                                     "unet_ema.weights.h5"))
  assert np.abs(unet.norm_out.gamma.numpy() - 1.0).max() > 1e-3  # Trained, not the initial ones.
