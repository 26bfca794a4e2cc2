"""The serving `tf.Module`: a fixed-K sampler of `samplers` behind two signatures.

  serving_default(seed: int64 [], num_images: int32 []) -> images: uint8 [N, H, W, C]
  from_noise(noise: float32 [N, H, W, C]) -> images: uint8, images_float: float32 in [-1, 1]

K is fixed at construction, so the sampler's Python loop unrolls into one K-step graph, traced once.
Randomness is stateless and a function of `seed` alone: x_T ~ stateless_normal(seed=(seed, 0)) and,
for η > 0, step i draws its noise from fold_in((seed, 1), i) (inside `ddim.sample`; the stream ids
are `streams.EXPORT_X_T` and `streams.EXPORT_STEP_NOISE`). One seed thus gives the same images in
every process, on every server. `from_noise` is a function of `noise` alone: for η > 0 its step
noise uses seed 0.

Bad requests fail inside the graph (so also under TF Serving, which does not check shapes against the
signature): `num_images` outside [1, max_images], and noise that is not rank 4 with the exported
H, W, C and 1 ≤ N ≤ max_images. `from_noise` therefore declares an unknown-rank `noise` input.

The metadata records sha256 digests of the UNet weights and of ᾱ: with the settings they say which
model an exported file holds, so a re-export can tell "the same model again" from "new weights".
"""


import numpy as np
import tensorflow as tf

from mmd_keras import ddim
from mmd_keras import provenance
from mmd_keras import samplers
from mmd_keras import steps as steps_lib
from mmd_keras import streams


def seeded_noise(seed, num_images, image_shape):
  """x_T of `serving_default`: [num_images, H, W, C] ~ N(0, I) from the int64 `seed`."""
  return tf.random.stateless_normal(tf.concat([[num_images], image_shape], axis=0),
                                    seed=streams.key(seed, streams.EXPORT_X_T, tf.int64))


def step_noise_seed(seed):
  """The [2] seed DDIM folds the step index into for its η > 0 noise."""
  return streams.key(seed, streams.EXPORT_STEP_NOISE, tf.int64)


def _constant(value, dtype=None):
  # A non-trainable variable: unlike a tf.constant attribute, it is restored on load.
  return tf.Variable(value, dtype=dtype, trainable=False)


# The largest request a served sampler takes unless told otherwise.
MAX_IMAGES = 64


class Sampler(tf.Module):
  """x_T -> x_0 in K steps of the sampler `sampler` (DDIM by default) of a UNet, with the
  sampler's settings saved beside the weights.

  Saved attributes (read them from `tf.saved_model.load(path)`): `sampler` (its name), `num_steps`
  K, `timesteps` [K] (int32, or float32 for continuous, e.g. learned, timesteps), `eta`,
  `clip_x0`, `image_shape` [H, W, C], `max_images`, `num_timesteps` T.
  """

  def __init__(self, unet, *, alphas_cumprod, timesteps, sampler="ddim", eta=0.0, clip_x0=False,
               max_images=MAX_IMAGES):
    super().__init__(name="sampler")
    if max_images < 1:
      raise ValueError(f"max_images must be >= 1, got {max_images}")
    samplers.check(sampler, eta=eta)
    self._sampler = sampler
    # The UNet's variables are saved, not the Keras model itself: saving a Keras model object would
    # trace every layer's call for the SavedModel, which is slow and not needed for serving.
    self._eps_model = lambda x, t: unet(x, t)
    self.unet_variables = [v.value for v in unet.variables]  # The tf.Variables under Keras's.
    self._timesteps = provenance.json_timesteps(timesteps)  # Floats for learned timesteps.
    self._eta = float(eta)
    self._clip_x0 = bool(clip_x0)
    self._max_images = int(max_images)
    self._image_shape = (unet.image_size, unet.image_size, unet.channels)
    self._alphas_cumprod = np.asarray(alphas_cumprod, np.float32)
    # unet.weights, not unet.variables: the dropout layers' seed-generator states differ per build.
    # Read when the metadata is written, so it describes the values that are saved.
    self._unet_weights = lambda: unet.weights
    self.sampler = _constant(sampler, tf.string)
    self.num_steps = _constant(len(self._timesteps), tf.int32)
    self.timesteps = _constant(self._timesteps, tf.float32 if steps_lib.is_continuous(
        self._timesteps) else tf.int32)
    self.eta = _constant(self._eta, tf.float32)
    self.clip_x0 = _constant(self._clip_x0)
    self.image_shape = _constant(self._image_shape, tf.int32)
    self.max_images = _constant(self._max_images, tf.int32)
    self.num_timesteps = _constant(len(self._alphas_cumprod), tf.int32)
    self.serving_default = tf.function(
        self._serving_default,
        input_signature=[tf.TensorSpec([], tf.int64, name="seed"),
                         tf.TensorSpec([], tf.int32, name="num_images")])
    self.from_noise = tf.function(
        self._from_noise, input_signature=[tf.TensorSpec(None, tf.float32, name="noise")])
    # The K UNet calls, traced once and called by both signatures and the TFLite function: each
    # trace of them takes seconds (most of writing the SavedModel), and the graphs are the same.
    self._sample_traced = tf.function(
        self._sample_noise,
        input_signature=[tf.TensorSpec([None, *self._image_shape], tf.float32, name="noise"),
                         tf.TensorSpec([], tf.int64, name="seed")])

  @classmethod
  def from_schedule(cls, unet, *, schedule, num_steps, timestep_kind="uniform", **kwargs):
    return cls(unet, alphas_cumprod=schedule.alphas_cumprod,
               timesteps=schedule.timesteps(num_steps, timestep_kind), **kwargs)

  def metadata(self):
    """The settings as plain JSON values (what `assets/sampler.json` holds): the sampler's
    `provenance.sampler_settings` and how it is served."""
    settings = provenance.sampler_settings(
        sampler=self._sampler, weights_sha256=provenance.weights_sha256(self._unet_weights()),
        alphas_cumprod=self._alphas_cumprod, timesteps=self._timesteps, eta=self._eta,
        clip_x0=self._clip_x0, image_shape=self._image_shape)
    return dict(settings, max_images=self._max_images,
                seed_streams=dict(x_T=streams.EXPORT_X_T, step_noise=streams.EXPORT_STEP_NOISE),
                signatures=dict(serving_default=dict(inputs=["seed", "num_images"],
                                                     outputs=["images"]),
                                from_noise=dict(inputs=["noise"],
                                                outputs=["images", "images_float"])))

  def sample(self, x_T, seed=None):
    """x_0 in [-1, 1] (clipped) from x_T [N, H, W, C] by the sampler; `seed` for η > 0."""
    x_0 = samplers.sample(self._sampler, self._eps_model, x_T, timesteps=self._timesteps,
                          alphas_cumprod=self._alphas_cumprod, eta=self._eta,
                          clip_x0=self._clip_x0,
                          seed=None if seed is None else step_noise_seed(seed))
    return tf.clip_by_value(x_0, -1.0, 1.0)

  def _sample_noise(self, noise, seed):
    # The seed only matters for η > 0 (see `sample`).
    return self.sample(noise, seed=seed if self._eta else None)

  def _sample_seed0(self, noise):
    return self._sample_traced(noise, tf.constant(0, tf.int64))

  def tflite_function(self):
    """noise [None, H, W, C] -> images uint8: the concrete function the TFLite file is made from.

    η > 0 would need random ops TFLite lacks, so that case is refused here.
    """
    if self._eta:
      raise ValueError("the TFLite sampler is deterministic (noise -> images); eta must be 0")
    spec = tf.TensorSpec([None, *self._image_shape], tf.float32, name="noise")
    return tf.function(lambda noise: {"images": ddim.to_uint8(self._sample_seed0(noise))},
                       input_signature=[spec]).get_concrete_function()

  def _serving_default(self, seed, num_images):
    message = (f"num_images must be in [1, {self._max_images}] (the export's max_images), "
               f"got a value outside it")
    checks = [tf.debugging.assert_greater_equal(num_images, 1, message=message),
              tf.debugging.assert_less_equal(num_images, self._max_images, message=message)]
    with tf.control_dependencies(checks):
      x_T = seeded_noise(seed, num_images, self._image_shape)
    return {"images": ddim.to_uint8(self._sample_traced(x_T, seed))}

  def _from_noise(self, noise):
    height, width, channels = self._image_shape
    message = (f"noise must be float32 [N, {height}, {width}, {channels}] with "
               f"1 <= N <= {self._max_images}")
    shape = tf.shape(noise)
    # One condition over a zero-padded shape: total for every rank, so no check can fail on
    # another's behalf (shapes of different lengths would not even compare).
    padded = tf.concat([shape, tf.zeros([4], tf.int32)], axis=0)
    valid = tf.reduce_all([tf.size(shape) == 4, padded[0] >= 1, padded[0] <= self._max_images,
                           tf.reduce_all(padded[1:4] == [height, width, channels])])
    checks = [tf.debugging.Assert(valid, [message + "; got shape", shape])]
    with tf.control_dependencies(checks):
      noise = tf.ensure_shape(noise, [None, height, width, channels])
    x_0 = self._sample_seed0(noise)
    return {"images": ddim.to_uint8(x_0), "images_float": x_0}
