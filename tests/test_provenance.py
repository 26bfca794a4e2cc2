"""provenance.py: the weights fingerprint follows the values (not the build, not the file), an
input file's digest follows its bytes, and every setting that decides a sampler's images counts."""

import json

import numpy as np
import pytest

from helpers import randomize_weights
from helpers import tiny_unet
from mmd_keras import provenance


def test_weights_sha256_follows_the_values_not_the_build():
  first, second = tiny_unet(dropout=0.1), tiny_unet(dropout=0.1)  # Own seed-generator states.
  randomize_weights(first, seed=3)
  randomize_weights(second, seed=3)
  digest = provenance.weights_sha256(first.weights)
  assert digest == provenance.weights_sha256(second.weights)
  assert len(digest) == 64 and int(digest, 16) >= 0
  kernel = second.weights[0]
  kernel.assign(kernel.numpy() + np.float32(1e-3) * np.eye(*kernel.shape[-2:], dtype=np.float32))
  assert provenance.weights_sha256(second.weights) != digest


def test_weights_sha256_sees_dtypes_and_shapes():
  values = np.arange(6, dtype=np.float32)
  digest = provenance.weights_sha256([values])
  assert provenance.weights_sha256([values.reshape(2, 3)]) != digest
  assert provenance.weights_sha256([values.view(np.int32)]) != digest


def test_files_sha256_of_prefixes_and_directories(tmp_path):
  for folder in ("a", "b"):
    (tmp_path / folder).mkdir()
    (tmp_path / folder / "ckpt-1.index").write_bytes(b"index")
    (tmp_path / folder / "ckpt-1.data-00000-of-00001").write_bytes(b"data")
  prefix = lambda folder: str(tmp_path / folder / "ckpt-1")
  assert provenance.files_sha256(prefix("a")) == provenance.files_sha256(prefix("b"))
  assert provenance.files_sha256(str(tmp_path / "a")) == provenance.files_sha256(
      str(tmp_path / "b"))
  (tmp_path / "b" / "ckpt-1.data-00000-of-00001").write_bytes(b"other")
  assert provenance.files_sha256(prefix("a")) != provenance.files_sha256(prefix("b"))
  assert provenance.files_sha256(str(tmp_path / "a")) != provenance.files_sha256(
      str(tmp_path / "b"))
  assert provenance.files_sha256(str(tmp_path / "nothing")) is None


def _settings(**change):
  kwargs = dict(sampler="ddim", weights_sha256="ab" * 32,
                alphas_cumprod=np.linspace(0.99, 0.01, 10), timesteps=(9, 4), eta=0.0, clip_x0=False, image_shape=(8, 8, 1))
  return provenance.sampler_settings(**dict(kwargs, **change))


def test_sampler_settings_are_plain_json_of_every_sampler_key():
  settings = _settings()
  assert tuple(settings) == provenance.SAMPLER_KEYS
  assert json.loads(json.dumps(settings)) == settings
  assert settings["num_steps"] == 2 and settings["num_timesteps"] == 10
  samples = provenance.samples_settings(settings, seed=3, batch_size=8, num_images=16)
  assert tuple(samples) == provenance.SAMPLES_KEYS


@pytest.mark.parametrize("change", [
    dict(sampler="dpm_solver_pp"), dict(weights_sha256="cd" * 32),
    dict(alphas_cumprod=np.linspace(0.98, 0.01, 10)), dict(timesteps=(9, 5)), dict(eta=0.5), dict(clip_x0=True), dict(image_shape=(8, 8, 3))])
def test_same_sampler_compares_every_sampler_key(change):
  record = json.loads(json.dumps(dict(_settings(), max_images=4)))  # As read from sampler.json.
  assert provenance.same_sampler(record, _settings())
  assert not provenance.same_sampler(record, _settings(**change))
  assert not provenance.same_sampler(None, _settings())


def test_a_record_from_before_the_sampler_choice_is_ddim():
  older = {key: value for key, value in json.loads(json.dumps(_settings())).items()
           if key != "sampler"}
  assert provenance.sampler_record(older) == json.loads(json.dumps(_settings()))
  assert provenance.same_sampler(older, _settings())
  assert not provenance.same_sampler(older, _settings(sampler="dpm_solver_pp"))
  assert provenance.sampler_record(None) is None
