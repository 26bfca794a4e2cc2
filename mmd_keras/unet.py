"""The DDPM UNet of Ho et al. (2020) as a Keras 3 model: ε_θ(x_t, t).

Layer names follow the scopes of the original TF code (`temb/dense0`, `down_{i}/block_{j}/conv1`,
`mid/attn_1`, `up_{i}/upsample/conv`, `norm_out`, `conv_out`, …) so that the released checkpoints map
onto this model one variable at a time (see `checkpoints.py`). Conventions that matter for that
mapping are kept: GroupNorm(32, ε=1e-6), attention logits scaled by C^-1/2, TF 'SAME' padding for the
stride-2 conv (extra pad at bottom/right), sin-then-cos timestep embedding.

Dropout can be made a pure function of an explicit seed (`dropout_seed`), which a replayed forward
pass needs (`replay.py`, `tf.recompute_grad`): a stateful generator would draw another mask.
"""

import math

import keras
import tensorflow as tf

from mmd_keras.errors import ParameterError


def timestep_embedding(t, dim):
  """Sinusoidal embedding of t: [sin(t·ω_i), cos(t·ω_i)], ω_i = 10000^(−i/(dim/2 − 1))."""
  half_dim = dim // 2
  freqs = tf.exp(tf.range(half_dim, dtype=tf.float32) * -(math.log(10000.0) / (half_dim - 1)))
  args = tf.cast(t, tf.float32)[:, None] * freqs[None, :]
  emb = tf.concat([tf.sin(args), tf.cos(args)], axis=1)
  if dim % 2 == 1:
    emb = tf.pad(emb, [[0, 0], [0, 1]])
  return emb


def _init(scale=1.0):
  # The original `default_init`: variance scaling, fan_avg, uniform; scale 0 means zeros.
  if scale == 0.0:
    return "zeros"
  return keras.initializers.VarianceScaling(scale=scale, mode="fan_avg", distribution="uniform")


def _conv(units, name, *, kernel_size=3, strides=1, init_scale=1.0):
  return keras.layers.Conv2D(units, kernel_size, strides=strides, padding="same", name=name,
                             kernel_initializer=_init(init_scale))


def _dense(units, name, *, init_scale=1.0):
  return keras.layers.Dense(units, name=name, kernel_initializer=_init(init_scale))


class GroupNormalization(keras.layers.GroupNormalization):
  """GroupNormalization over the last axis of NHWC images with its gradient in closed form.

  Keras' own class name: `.weights.h5` files key a model's direct layers by it (`norm_out`).

  Keras normalises a [B, H, W, G, C/G] view, reducing over three non-adjacent axes, and its
  automatic gradient keeps every intermediate. Here the statistics sum over H, W first (a [B, C]
  result), then over each group's channels, and the backward pass is GroupNorm's closed form,
  keeping only the input and the per-group mean and σ⁻¹. The same function and weights (`gamma`,
  `beta`), two-pass variance.
  """

  def call(self, inputs):
    if self.axis not in (-1, len(inputs.shape) - 1) or len(inputs.shape) != 4:
      return super().call(inputs)
    channels = inputs.shape[-1]
    groups, per_group, epsilon = self.groups, channels // self.groups, self.epsilon
    # Statistics in float32 under a bfloat16/float16 policy, as Keras' layer does.
    x = tf.cast(inputs, tf.float32)
    shape = tf.shape(x)
    count = tf.cast(shape[1] * shape[2] * per_group, tf.float32)

    def group_mean(v):  # [B, C] sums over H, W -> [B, G, 1] means over each group's pixels
      return tf.reduce_sum(tf.reshape(v, [-1, groups, per_group]), -1, keepdims=True) / count

    def per_channel(v):  # [B, G, 1] -> [B, 1, 1, C]
      return tf.reshape(tf.broadcast_to(v, [shape[0], groups, per_group]), [-1, 1, 1, channels])

    def pixel_sum(v):  # [B, H, W, C] -> [B, C]
      return tf.reduce_sum(v, axis=[1, 2])

    @tf.custom_gradient
    def normalize(x, gamma, beta):
      mean = per_channel(group_mean(pixel_sum(x)))
      inv = per_channel(tf.math.rsqrt(group_mean(pixel_sum(tf.square(x - mean))) + epsilon))
      scale = inv * gamma

      def gradient(dy):
        # dx = σ⁻¹(g − mean(g) − x̂·mean(g·x̂)), g = γ·dy, x̂ = (x − μ)σ⁻¹, written as
        # dy·p + x·q + r with per-channel p, q, r: the only image-sized tensors are x, which stays
        # alive anyway, dy and three temporaries (a literal x̂ and g: +12 % of a UNet backward's
        # tensor peak).
        inv_c, mean_c = tf.reshape(inv, [-1, channels]), tf.reshape(mean, [-1, channels])
        dy_sum = pixel_sum(dy)
        dy_x_hat_sum = inv_c * (pixel_sum(dy * x) - mean_c * dy_sum)  # Σ dy·x̂ over H, W
        mean_g = per_channel(group_mean(gamma * dy_sum))
        mean_g_x_hat = per_channel(group_mean(gamma * dy_x_hat_sum))
        q = -inv * inv * mean_g_x_hat
        r = -inv * mean_g - mean * q
        dx = dy * scale + x * q + r
        return dx, tf.reduce_sum(dy_x_hat_sum, axis=0), tf.reduce_sum(dy_sum, axis=0)
      return x * scale + (beta - mean * scale), gradient

    gamma = tf.cast(self.gamma, tf.float32) if self.scale else tf.ones([channels])
    beta = tf.cast(self.beta, tf.float32) if self.center else tf.zeros([channels])
    return tf.cast(normalize(x, gamma, beta), self.compute_dtype)


def _group_norm(name):
  return GroupNormalization(groups=32, epsilon=1e-6, name=name)


def _dropout(h, *, rate, seed, seed_generator):
  """Dropout that is deterministic given `seed` (shape [2] int32); stateful if `seed` is None."""
  if seed is None:
    return keras.random.dropout(h, rate, seed=seed_generator)
  return tf.nn.experimental.stateless_dropout(h, rate=rate, seed=seed)


def _fold_seed(seed, index):
  return None if seed is None else tf.random.experimental.stateless_fold_in(seed, index)


class ResnetBlock(keras.layers.Layer):
  """h = conv2(drop(σ(norm2(conv1(σ(norm1(x))) + W·σ(temb))))); return shortcut(x) + h."""

  def __init__(self, out_ch, *, dropout, name=None):
    super().__init__(name=name)
    self.out_ch = out_ch
    self.dropout = dropout
    self.norm1 = _group_norm("norm1")
    self.conv1 = _conv(out_ch, "conv1")
    self.temb_proj = _dense(out_ch, "temb_proj")
    self.norm2 = _group_norm("norm2")
    self.conv2 = _conv(out_ch, "conv2", init_scale=0.0)
    self.nin_shortcut = None
    self.seed_generator = keras.random.SeedGenerator(0) if dropout > 0 else None

  def build(self, input_shape):
    if input_shape[-1] != self.out_ch:
      self.nin_shortcut = _dense(self.out_ch, "nin_shortcut")

  def call(self, x, temb, *, training=False, dropout_seed=None):
    h = tf.nn.silu(self.norm1(x))
    h = self.conv1(h)
    h += self.temb_proj(tf.nn.silu(temb))[:, None, None, :]
    h = tf.nn.silu(self.norm2(h))
    if training and self.dropout > 0:
      h = _dropout(h, rate=self.dropout, seed=dropout_seed, seed_generator=self.seed_generator)
    h = self.conv2(h)
    if self.nin_shortcut is not None:
      x = self.nin_shortcut(x)
    return x + h


class AttnBlock(keras.layers.Layer):
  """Single-head self-attention over all H·W positions, residual."""

  def __init__(self, name=None):
    super().__init__(name=name)
    self.norm = _group_norm("norm")

  def build(self, input_shape):
    channels = input_shape[-1]
    self.q = _dense(channels, "q")
    self.k = _dense(channels, "k")
    self.v = _dense(channels, "v")
    self.proj_out = _dense(channels, "proj_out", init_scale=0.0)

  def call(self, x):
    shape = tf.shape(x)
    batch, height, width = shape[0], shape[1], shape[2]
    channels = x.shape[-1]
    h = self.norm(x)
    q = tf.reshape(self.q(h), [batch, -1, channels])
    k = tf.reshape(self.k(h), [batch, -1, channels])
    v = tf.reshape(self.v(h), [batch, -1, channels])
    w = tf.nn.softmax(tf.matmul(q, k, transpose_b=True) * (channels ** -0.5), axis=-1)
    h = tf.reshape(tf.matmul(w, v), [batch, height, width, channels])
    return x + self.proj_out(h)


class Downsample(keras.layers.Layer):

  def __init__(self, name=None):
    super().__init__(name=name)

  def build(self, input_shape):
    self.conv = _conv(input_shape[-1], "conv", strides=2)

  def call(self, x):
    return self.conv(x)


def upsample_nearest_2x(x):
  """Nearest-neighbour 2x upsampling, NHWC: each pixel becomes a 2x2 block. The same values as
  tf.image.resize(method="nearest"), but its gradient (a sum over the blocks) compiles with XLA,
  which has no kernel for ResizeNearestNeighborGrad."""
  shape = tf.shape(x)
  blocks = tf.broadcast_to(x[:, :, None, :, None, :],
                           [shape[0], shape[1], 2, shape[2], 2, shape[3]])
  return tf.reshape(blocks, [shape[0], 2 * shape[1], 2 * shape[2], shape[3]])


class Upsample(keras.layers.Layer):

  def __init__(self, name=None):
    super().__init__(name=name)

  def build(self, input_shape):
    self.conv = _conv(input_shape[-1], "conv")

  def call(self, x):
    return self.conv(upsample_nearest_2x(x))


class TimestepEmbed(keras.layers.Layer):
  """temb = dense1(σ(dense0(sinusoidal(t))))."""

  def __init__(self, ch, name="temb"):
    super().__init__(name=name)
    self.ch = ch
    self.dense0 = _dense(ch * 4, "dense0")
    self.dense1 = _dense(ch * 4, "dense1")

  def build(self, *shapes):
    # Sublayers build on the first call. Keras' default build would first trace `call`
    # symbolically, once per nesting level: most of the time of building a small UNet.
    del shapes

  def call(self, t):
    return self.dense1(tf.nn.silu(self.dense0(timestep_embedding(t, self.ch))))


class Level(keras.layers.Layer):
  """One resolution of the encoder (`down_i`) or decoder (`up_i`): res blocks, attention, resampling."""

  def __init__(self, *, out_ch, num_blocks, attention, dropout, resample, name):
    super().__init__(name=name)
    self.blocks = [ResnetBlock(out_ch, dropout=dropout, name=f"block_{i}")
                   for i in range(num_blocks)]
    self.attns = [AttnBlock(name=f"attn_{i}") for i in range(num_blocks)] if attention else []
    self.resample = None
    if resample == "down":
      self.resample = Downsample(name="downsample")
    elif resample == "up":
      self.resample = Upsample(name="upsample")

  def build(self, *shapes):
    # Sublayers build on the first call. Keras' default build would first trace `call`
    # symbolically, once per nesting level: most of the time of building a small UNet.
    del shapes

  def call(self, h, temb, skips=None, training=False, dropout_seed=None):
    """Encoder: returns every block output (the skips). Decoder: consumes `skips`, returns h."""
    outputs = []
    for i, block in enumerate(self.blocks):
      if skips is not None:
        h = tf.concat([h, skips[i]], axis=-1)
      h = block(h, temb, training=training, dropout_seed=_fold_seed(dropout_seed, i))
      if self.attns:
        h = self.attns[i](h)
      outputs.append(h)
    if self.resample is not None:
      h = self.resample(h)
      outputs.append(h)
    return h if skips is not None else outputs


class Middle(keras.layers.Layer):

  def __init__(self, *, out_ch, dropout, name="mid"):
    super().__init__(name=name)
    self.block_1 = ResnetBlock(out_ch, dropout=dropout, name="block_1")
    self.attn_1 = AttnBlock(name="attn_1")
    self.block_2 = ResnetBlock(out_ch, dropout=dropout, name="block_2")

  def build(self, *shapes):
    # Sublayers build on the first call. Keras' default build would first trace `call`
    # symbolically, once per nesting level: most of the time of building a small UNet.
    del shapes

  def call(self, h, temb, training=False, dropout_seed=None):
    h = self.block_1(h, temb, training=training, dropout_seed=_fold_seed(dropout_seed, 1))
    h = self.attn_1(h)
    return self.block_2(h, temb, training=training, dropout_seed=_fold_seed(dropout_seed, 2))


# The DDPM CIFAR-10 UNet (Ho et al. 2020): the architecture a UNet has unless told otherwise.
DDPM_CIFAR10 = dict(ch=128, ch_mult=(1, 2, 2, 2), num_res_blocks=2, attn_resolutions=(16,),
                    dropout=0.1)


class UNet(keras.Model):
  """ε_θ(x_t, t) for images NHWC in [-1, 1] and integer timesteps t of shape [B]."""

  def __init__(self, *, image_size, channels, ch=DDPM_CIFAR10["ch"],
               ch_mult=DDPM_CIFAR10["ch_mult"], num_res_blocks=DDPM_CIFAR10["num_res_blocks"],
               attn_resolutions=DDPM_CIFAR10["attn_resolutions"],
               dropout=DDPM_CIFAR10["dropout"], name="unet", **kwargs):
    super().__init__(name=name, **kwargs)
    check_architecture(image_size=image_size, ch=ch, ch_mult=ch_mult)
    self.image_size = image_size
    self.channels = channels
    self.ch = ch
    self.ch_mult = tuple(ch_mult)
    self.num_res_blocks = num_res_blocks
    self.attn_resolutions = tuple(attn_resolutions)
    self.dropout = dropout
    num_levels = len(self.ch_mult)
    resolutions = [image_size // 2 ** level for level in range(num_levels)]
    self.temb = TimestepEmbed(ch)
    self.conv_in = _conv(ch, "conv_in")
    self.down = [
        Level(out_ch=ch * mult, num_blocks=num_res_blocks, dropout=dropout,
              attention=resolutions[level] in self.attn_resolutions,
              resample="down" if level != num_levels - 1 else None, name=f"down_{level}")
        for level, mult in enumerate(self.ch_mult)]
    self.mid = Middle(out_ch=ch * self.ch_mult[-1], dropout=dropout)
    self.up = [
        Level(out_ch=ch * self.ch_mult[level], num_blocks=num_res_blocks + 1, dropout=dropout,
              attention=resolutions[level] in self.attn_resolutions,
              resample="up" if level != 0 else None, name=f"up_{level}")
        for level in reversed(range(num_levels))]
    self.norm_out = _group_norm("norm_out")
    self.conv_out = _conv(channels, "conv_out", init_scale=0.0)

  def build(self, x_shape, t_shape=None):
    # Sublayers create their weights on the first call; see `build_for_inference`.
    del x_shape, t_shape

  def call(self, x, t, training=False, dropout_seed=None):
    """ε̂ = ε_θ(x, t). With `dropout_seed` ([2] int), dropout masks are a function of it alone."""
    temb = self.temb(t)
    hs = [self.conv_in(x)]
    # Levels are numbered in call order (down, mid, up) to give each its own dropout seed.
    for index, level in enumerate(self.down):
      hs += level(hs[-1], temb, training=training,
                  dropout_seed=_fold_seed(dropout_seed, index))
    h = self.mid(hs[-1], temb, training=training,
                 dropout_seed=_fold_seed(dropout_seed, len(self.down)))
    for index, level in enumerate(self.up, start=len(self.down) + 1):
      num_skips = len(level.blocks)
      skips = hs[-num_skips:][::-1]
      del hs[-num_skips:]
      h = level(h, temb, skips=skips, training=training,
                dropout_seed=_fold_seed(dropout_seed, index))
    h = tf.nn.silu(self.norm_out(h))
    return self.conv_out(h)

  def build_for_inference(self):
    """Creates all weights by one call on a dummy batch; returns self."""
    x = tf.zeros([1, self.image_size, self.image_size, self.channels])
    self(x, tf.zeros([1], tf.int32))
    return self

  def get_config(self):
    return dict(image_size=self.image_size, channels=self.channels, ch=self.ch,
                ch_mult=self.ch_mult, num_res_blocks=self.num_res_blocks,
                attn_resolutions=self.attn_resolutions, dropout=self.dropout, name=self.name)


def check_architecture(*, image_size, ch, ch_mult):
  """Raises a ParameterError for shapes the UNet cannot take."""
  if not ch_mult or min(ch_mult) < 1:
    raise ParameterError("ch_mult", "must list positive multipliers, e.g. 1,2,2", value=ch_mult)
  if ch < 1:
    raise ParameterError("ch", "must be a positive multiple of 32 (GroupNorm uses 32 groups)",
                         value=ch)
  factor = 2 ** (len(ch_mult) - 1)
  if image_size < 1 or image_size % factor:
    raise ParameterError(
        "image_size", f"must be divisible by {factor} (the UNet halves it {len(ch_mult) - 1} "
        f"times for {{ch_mult}}={','.join(map(str, ch_mult))})", value=image_size,
        refs=("ch_mult",))
  for mult in ch_mult:
    if (ch * mult) % 32:
      raise ParameterError(
          "ch", f"times every {{ch_mult}} entry must be divisible by 32 (GroupNorm uses 32 "
          f"groups), got {ch}*{mult}", value=ch, refs=("ch_mult",))
