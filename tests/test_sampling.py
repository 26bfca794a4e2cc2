"""sampling.py: noise fixed per batch index by the seed, whatever the number of images; the
configured sampler draws the images."""

import numpy as np
import pytest

from helpers import randomize_weights, tiny_unet
from mmd_keras import ddim
from mmd_keras import dpm_solver
from mmd_keras import sampling
from mmd_keras import schedule as schedule_lib
from mmd_keras import streams

SCHEDULE = schedule_lib.NoiseSchedule.linear(num_timesteps=100)


@pytest.fixture(scope="module")
def unet():
  return randomize_weights(tiny_unet(image_size=8, channels=1), seed=2, scale=0.05)


def test_initial_noise_depends_on_seed_and_batch_index_only():
  kwargs = dict(batch_size=4, image_shape=(8, 8, 1))
  a = sampling.initial_noise(seed=1, batch_index=0, **kwargs).numpy()
  assert a.shape == (4, 8, 8, 1)
  np.testing.assert_array_equal(a, sampling.initial_noise(seed=1, batch_index=0, **kwargs))
  assert not np.allclose(a, sampling.initial_noise(seed=1, batch_index=1, **kwargs))
  assert not np.allclose(a, sampling.initial_noise(seed=2, batch_index=0, **kwargs))


def test_fewer_images_are_a_prefix_of_more(unet):
  # η = 1: both x_T and the per-step noise must be fixed by (seed, batch index) alone.
  kwargs = dict(num_steps=3, schedule=SCHEDULE, eta=1.0, clip_x0=True, seed=7, batch_size=4)
  many = sampling.generate(unet, num_images=10, **kwargs)
  few = sampling.generate(unet, num_images=6, **kwargs)
  assert many.shape == (10, 8, 8, 1) and few.shape == (6, 8, 8, 1)
  assert many.dtype == np.float32
  assert np.abs(many).max() <= 1.0
  np.testing.assert_allclose(few, many[:6], atol=1e-5)
  other_seed = sampling.generate(unet, num_images=6, **dict(kwargs, seed=8))
  assert np.abs(other_seed - few).max() > 1e-3


def test_a_short_last_batch_draws_what_a_batch_of_its_size_draws(unet):
  # The last batch runs at the full batch size (one XLA shape); its extra images must not change
  # the kept ones, η-noise included.
  kwargs = dict(num_steps=3, schedule=SCHEDULE, eta=1.0, clip_x0=True, seed=7, batch_size=4)
  images = sampling.generate(unet, num_images=6, **kwargs)
  timesteps = SCHEDULE.timesteps(3, "uniform")
  last = ddim.sample(lambda x, t: unet(x, t),
                     sampling.initial_noise(seed=7, batch_index=1, batch_size=4,
                                            image_shape=(8, 8, 1))[:2],
                     timesteps=timesteps, alphas_cumprod=SCHEDULE.alphas_cumprod, eta=1.0,
                     clip_x0=True, seed=streams.key(7, streams.SAMPLE_STEPS + 1))
  np.testing.assert_allclose(images[4:], np.clip(last.numpy(), -1.0, 1.0), atol=1e-5)


def test_progress_bar_counts_every_image(unet, capsys):
  sampling.generate(unet, num_images=6, num_steps=1, schedule=SCHEDULE, batch_size=4)
  assert "sampling K=1: 6/6 images (100%)" in capsys.readouterr().err


def test_dpm_solver_pp_draws_dpm_solver_sample_from_the_same_noise(unet):
  kwargs = dict(num_images=6, num_steps=3, schedule=SCHEDULE, timestep_kind="trailing",
                clip_x0=True, seed=7, batch_size=4)
  images = sampling.generate(unet, sampler="dpm_solver_pp", **kwargs)
  timesteps = SCHEDULE.timesteps(3, "trailing")
  expected = np.concatenate([
      dpm_solver.sample(lambda x, t: unet(x, t),
                        sampling.initial_noise(seed=7, batch_index=i, batch_size=4,
                                               image_shape=(8, 8, 1))[:count],
                        timesteps=timesteps, alphas_cumprod=SCHEDULE.alphas_cumprod,
                        clip_x0=True).numpy()
      for i, count in enumerate((4, 2))])
  np.testing.assert_allclose(images, np.clip(expected, -1.0, 1.0), atol=1e-5)
  ddim_images = sampling.generate(unet, **kwargs)
  assert np.abs(images - ddim_images).max() > 1e-3
