"""Low-rank adapters on the UNet (mmd_keras/adapters.py): they start as the identity, only they
train, merging them into the kernels gives the same model, and a file of them loads only onto the
base weights and architecture it was trained on."""

import numpy as np
import pytest
import tensorflow as tf

from helpers import randomize_weights
from helpers import tiny_unet
from mmd_keras import adapters
from mmd_keras import provenance
from mmd_keras import unet as unet_lib
from mmd_keras.errors import ParameterError

IMAGE_SIZE = 8


def _base(seed=0):
  """A tiny UNet with attention at 4 px, random base weights."""
  return randomize_weights(tiny_unet(image_size=IMAGE_SIZE, attn_resolutions=(4,)), scale=0.05,
                           seed=seed)


def _inputs():
  x = tf.random.stateless_normal([2, IMAGE_SIZE, IMAGE_SIZE, 1], seed=[1, 2])
  return x, tf.constant([10, 700])


def _randomize_adapters(unet, seed=3):
  rng = np.random.default_rng(seed)
  for weight in adapters.adapter_weights(unet).values():
    weight.assign(rng.normal(0.0, 0.1, weight.shape).astype(np.float32))


def test_adapters_start_as_the_base_model_and_only_they_train():
  base = _base()
  x, t = _inputs()
  want = base(x, t).numpy()
  adapters.enable(base, rank=2)
  np.testing.assert_array_equal(base(x, t).numpy(), want)  # B starts at zero.
  assert base.trainable_weights
  assert all(w.path.endswith(("lora_kernel_a", "lora_kernel_b")) for w in base.trainable_weights)
  assert len(base.trainable_weights) == 2 * len(adapters.target_layers(base))
  with tf.GradientTape() as tape:
    loss = tf.reduce_sum(base(x, t) ** 2)
  grads = tape.gradient(loss, base.trainable_weights)
  # At the start dL/dA = dL/dW·Bᵀ = 0; dL/dB = Aᵀ·dL/dW is not.
  assert any(float(tf.reduce_max(tf.abs(g))) > 0 for w, g in zip(base.trainable_weights, grads)
             if w.path.endswith("lora_kernel_b"))


@pytest.mark.parametrize("targets", ["attention", "up"])
def test_targets_narrow_the_adapted_layers(targets):
  unet = _base()
  every, some = adapters.target_layers(unet), adapters.target_layers(unet, targets)
  assert 0 < len(some) < len(every) and set(some) <= set(every)


def test_merged_kernels_give_the_adapted_model_and_a_file_round_trips(tmp_path):
  adapted = _base()
  base_sha256 = adapters.enable(adapted, rank=2)
  _randomize_adapters(adapted)
  x, t = _inputs()
  want = adapted(x, t).numpy()
  assert not np.allclose(want, _base()(x, t).numpy())  # The adapters change the model.
  merged = adapters.merged_into(adapted, _base(seed=5))
  np.testing.assert_allclose(merged(x, t).numpy(), want, rtol=1e-4, atol=1e-5)
  assert not any(w.path.endswith(("lora_kernel_a", "lora_kernel_b")) for w in merged.weights)

  path = str(tmp_path / "k5.adapters.npz")
  adapters.save(adapted, path, base_sha256=base_sha256, rank=2, targets="all")
  loaded = _base()
  meta = adapters.load(loaded, path)
  assert meta == dict(base_sha256=base_sha256, rank=2, targets="all")
  np.testing.assert_array_equal(loaded(x, t).numpy(), want)


def test_bad_adapters_and_ranks_are_one_line_errors(tmp_path):
  adapted = _base()
  base_sha256 = adapters.enable(adapted, rank=2)
  path = str(tmp_path / "a.adapters.npz")
  adapters.save(adapted, path, base_sha256=base_sha256, rank=2, targets="all")
  with pytest.raises(ParameterError, match="other base weights"):
    adapters.load(_base(seed=1), path)
  meta, arrays = adapters.read(path)
  assert meta["rank"] == 2 and len(arrays) == len(adapters.adapter_weights(adapted))
  other = randomize_weights(unet_lib.UNet(
      image_size=IMAGE_SIZE, channels=1, ch=32, ch_mult=(1, 1), num_res_blocks=1,
      attn_resolutions=(4,), dropout=0.0).build_for_inference(), scale=0.05)
  adapters.save(adapted, path, base_sha256=provenance.weights_sha256(other.weights), rank=2,
                targets="all")
  with pytest.raises(ParameterError, match="another UNet architecture"):
    adapters.load(other, path)
  (tmp_path / "junk.npz").write_bytes(b"not an npz")
  with pytest.raises(ParameterError, match="not an adapters file"):
    adapters.read(str(tmp_path / "junk.npz"))
  for rank in (0, 10_000):
    with pytest.raises(ParameterError, match="must be between 1 and"):
      adapters.enable(_base(), rank=rank)
  with pytest.raises(ParameterError, match="must be one of all, attention, up"):
    adapters.enable(_base(), rank=2, targets="down")
