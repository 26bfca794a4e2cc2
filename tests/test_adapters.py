"""Low-rank adapters on the UNet (mmd_keras/adapters.py): they start as the identity, only they
train, merging them into the kernels gives the same model, and a file of them loads only onto the
base weights and architecture it was trained on."""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

from helpers import FINETUNER_IMAGE_SIZE
from helpers import finetune_base_and_real
from helpers import finetune_driver
from helpers import randomize_weights
from helpers import real_images
from helpers import run_main
from helpers import tiny_unet
from mmd_keras import adapters
from mmd_keras import checkpoints
from mmd_keras import finetune
from mmd_keras import provenance
from mmd_keras import validation
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


def _lora_finetune(workdir, init, *, steps, learning_rate=1e-2, validation=None, rank=2,
                   checkpoint_every=100):
  return finetune_driver(workdir, init, steps=steps, real=real_images(4, seed=0),
                         learning_rate=learning_rate, validation=validation, lora_rank=rank,
                         checkpoint_every=checkpoint_every)


@pytest.fixture
def base_file(tmp_path):
  return finetune_base_and_real(tmp_path)[0]


def _plain(path):
  unet = tiny_unet(image_size=FINETUNER_IMAGE_SIZE).build_for_inference()
  checkpoints.restore_unet(unet, str(path), use_ema=False)
  return unet


@pytest.mark.slow
def test_a_finetune_with_adapters_trains_them_alone_saves_them_alone_and_resumes(tmp_path,
                                                                                 base_file):
  trainer = _lora_finetune(tmp_path / "straight", base_file, steps=3)
  assert sorted(p.name for p in (tmp_path / "straight").glob("unet*")) == ["unet.adapters.npz"]
  base = _plain(base_file)
  plain = [w for w in trainer.unet.weights if not w.path.endswith(("lora_kernel_a",
                                                                    "lora_kernel_b"))]
  for frozen, start in zip(plain, base.weights, strict=True):  # The base weights did not move.
    np.testing.assert_array_equal(frozen.numpy(), start.numpy())
  assert any(np.any(w.numpy()) for name, w in adapters.adapter_weights(trainer.unet).items()
             if name.endswith("lora_kernel_b"))
  # The file, loaded onto the base weights and merged, is the trained model.
  adapted = _plain(base_file)
  meta = adapters.load(adapted, str(tmp_path / "straight" / "unet.adapters.npz"))
  assert meta["rank"] == 2 and meta["base_sha256"] == provenance.weights_sha256(base.weights)
  for a, b in zip(adapters.merged_weights(adapted), adapters.merged_weights(trainer.unet)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Killed after step 2's checkpoint, resumed: the same adapters as the straight run.
  _lora_finetune(tmp_path / "resumed", base_file, steps=2, checkpoint_every=1)
  os.remove(tmp_path / "resumed" / "unet.adapters.npz")  # As if killed before the end.
  _lora_finetune(tmp_path / "resumed", base_file, steps=3, checkpoint_every=1)
  _, straight = adapters.read(str(tmp_path / "straight" / "unet.adapters.npz"))
  _, resumed = adapters.read(str(tmp_path / "resumed" / "unet.adapters.npz"))
  for name, value in straight.items():
    np.testing.assert_allclose(resumed[name], value, rtol=1e-4, atol=1e-6)


class _BlindFeatures:
  """Features that do not depend on the images: every validation scores the same, so none is
  better than the start (a tie is no improvement) and each one rewinds."""

  def __init__(self, seed):
    self.seed = seed

  def __call__(self, images):
    return tf.random.stateless_normal([tf.shape(images)[0], 16], seed=[4, self.seed])


@pytest.mark.slow
def test_a_guarded_finetune_with_adapters_rewinds_them_and_ships_the_best(tmp_path, base_file,
                                                                          monkeypatch):
  rewound = []
  rewind = finetune._rewind

  def watched(trainer, path, **kwargs):
    rewind(trainer, path, **kwargs)
    rewound.append({n: w.numpy() for n, w in adapters.adapter_weights(trainer.unet).items()})

  monkeypatch.setattr(finetune, "_rewind", watched)
  spaces = {"val": _BlindFeatures(seed=2)}
  settings = validation.Settings(
      every=2, patience=2, num_images=24, batch_size=24, spaces=spaces,
      real_features={"val": np.asarray(_BlindFeatures(seed=3)(real_images(24, seed=5)),
                                       np.float64)},
      select=("val",), lr_backoff=0.5)
  trainer = _lora_finetune(tmp_path, base_file, steps=8, learning_rate=1e-2, validation=settings)
  with open(tmp_path / validation.RECORD) as f:
    record = json.load(f)
  assert record["best_step"] == 0 and [r["step"] for r in record["validations"]] == [0, 2, 4]
  # One rewind, then stopped.
  assert float(trainer.optimizer.learning_rate.numpy()) == pytest.approx(0.5e-2)
  _, best = adapters.read(str(tmp_path / "unet.adapters.npz"))
  # The start's adapters, which the rewind went back to: every B zero (the base model).
  assert all(not np.any(v) for name, v in best.items() if name.endswith("lora_kernel_b"))
  assert len(rewound) == 1
  for name, value in best.items():
    np.testing.assert_array_equal(rewound[0][name], value)
  _, last = adapters.read(str(tmp_path / "unet_last.adapters.npz"))
  assert any(np.any(v) for name, v in last.items() if name.endswith("lora_kernel_b"))


@pytest.mark.slow
def test_adapters_under_a_mirrored_strategy_are_those_of_one_device(tmp_path):
  """Two logical CPUs mirrored (`python main.py --strategy=mirrored`, its own process) train the
  adapters a single device does: the MMD² of the global batch, the base weights frozen on both."""
  base = tmp_path / "base.weights.h5"
  checkpoints.save_weights_h5(randomize_weights(tiny_unet(image_size=28), scale=0.05), str(base))
  common = [f"--init_checkpoint={base}", "--image_size=28", "--ch=32", "--ch_mult=1,2",
            "--num_res_blocks=1", "--attn_resolutions=", "--dropout=0", "--num_timesteps=20",
            "--mode=finetune", "--num_steps=2", "--finetune_steps=2", "--batch_size=4",
            "--learning_rate=1e-3", "--checkpoint_every=2", "--log_every=1",
            "--feature_net=classifier", "--lora_rank=2", "--novalidate"]
  found = {}
  for name, flags in (("default", []), ("mirrored", ["--strategy=mirrored", "--num_cpu_devices=2"])):
    result = run_main(f"--workdir={tmp_path / name}", *common, *flags)
    assert result.returncode == 0, result.stderr[-3000:]
    found[name] = adapters.read(str(tmp_path / name / "finetune_k2_lora2" / "unet.adapters.npz"))
  (meta, one), (mirrored_meta, two) = found["default"], found["mirrored"]
  assert meta == mirrored_meta
  assert any(np.abs(v).max() > 1e-4 for k, v in one.items() if k.endswith("lora_kernel_b"))
  # Adam moves a weight by about lr·m/√v: where the gradient is ~0 its sign (and the move, up to
  # a few thousandths of lr here) follows float rounding, which the replicas' sum orders differently.
  for name, value in one.items():
    np.testing.assert_allclose(two[name], value, rtol=1e-3, atol=1e-5, err_msg=name)
