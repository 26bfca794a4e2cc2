"""provenance.py: the weights fingerprint follows the values (not the build, not the file), an
input file's digest follows its bytes."""

import numpy as np

from conftest import randomize_weights
from conftest import tiny_unet
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
