"""MMDFinetuner under MirroredStrategy on 2 logical CPUs equals one device on the same global batch.

Logical devices must be configured before TensorFlow initialises its devices, so the computation runs
in a fresh interpreter (`python tests/test_finetune_distributed.py <out.npz>`) that writes the
single-device and mirrored losses, gradients and updated weights; pytest compares them.
"""

import sys

import numpy as np
import pytest

pytestmark = pytest.mark.slow  # Every test reads the results of a separate process.

GLOBAL_BATCH = 8
CLIP = 1e-3
LEARNING_RATE = 10.0


def _compute(out_path):
  import keras
  import tensorflow as tf

  cpus = tf.config.list_physical_devices("CPU")
  tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * 2)

  from helpers import make_finetuner
  from helpers import randomize_weights
  from helpers import real_images
  from helpers import tiny_unet
  from mmd_keras import distribute

  x_real = real_images(GLOBAL_BATCH, seed=0)
  init = [w.numpy() for w in randomize_weights(tiny_unet(image_size=8), seed=4, scale=0.05).weights]

  def run(strategy):
    with strategy.scope():
      unet = tiny_unet(image_size=8)
      for w, value in zip(unet.weights, init):
        w.assign(value)
      # SGD keeps the update linear in the gradient; the clip is below the gradient norm, so the
      # clipped update is what gets compared.
      trainer = make_finetuner(unet, num_steps=2, grad_clip=CLIP,
                               optimizer=keras.optimizers.SGD(learning_rate=LEARNING_RATE))
    dataset = strategy.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors(x_real))
    batch = next(iter(dataset))

    @tf.function
    def gradients(x):
      loss, grads = strategy.run(trainer.compute_gradients, args=(x,))
      return strategy.experimental_local_results(loss), [
          strategy.experimental_local_results(g) for g in grads]

    losses, grads = gradients(batch)
    trainer.fit(tf.data.Dataset.from_tensors(x_real), epochs=1, verbose=0, shuffle=False)
    return dict(losses=np.array([l.numpy() for l in losses]),
                grads=[np.stack([g.numpy() for g in per_replica]) for per_replica in grads],
                weights=[w.numpy() for w in trainer.unet.weights],
                grad_norm=float(trainer.grad_norm_tracker.result()))

  single = run(tf.distribute.OneDeviceStrategy("/cpu:0"))
  mirrored_strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
  assert mirrored_strategy.num_replicas_in_sync == 2
  mirrored = run(mirrored_strategy)
  try:
    distribute.check_global_batch(GLOBAL_BATCH + 1, mirrored_strategy)
    divisible_error = ""
  except ValueError as e:
    divisible_error = str(e)
  arrays = dict(divisible_error=np.array(divisible_error))
  for name, result in (("single", single), ("mirrored", mirrored)):
    arrays[f"{name}_losses"] = result["losses"]
    arrays[f"{name}_grad_norm"] = np.array(result["grad_norm"])
    for i, g in enumerate(result["grads"]):
      arrays[f"{name}_grad_{i}"] = g
    for i, w in enumerate(result["weights"]):
      arrays[f"{name}_weight_{i}"] = w
  arrays["num_weights"] = np.array(len(single["weights"]))
  arrays["num_grads"] = np.array(len(single["grads"]))
  arrays["init_weights"] = np.array(len(init))
  for i, w in enumerate(init):
    arrays[f"init_{i}"] = w
  np.savez(out_path, **arrays)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
  from helpers import run_test_file_as_script  # Here: the script mode configures TF first.
  return run_test_file_as_script(__file__, tmp_path_factory.mktemp("mirrored") / "results.npz")


def test_every_replica_computes_the_global_loss(results):
  single, mirrored = results["single_losses"], results["mirrored_losses"]
  assert single.shape == (1,) and mirrored.shape == (2,)
  np.testing.assert_allclose(mirrored, np.repeat(single, 2), rtol=1e-5)


def test_gradients_equal_the_single_device_ones(results):
  names = [f"grad_{i}" for i in range(int(results["num_grads"]))]
  # One absolute scale for all: biases feeding a GroupNorm have an exactly-zero gradient, which
  # float32 reports as ±1e-11 noise that differs between any two summation orders.
  scale = max(np.abs(results[f"single_{name}"]).max() for name in names)
  for name in names:
    single, mirrored = results[f"single_{name}"], results[f"mirrored_{name}"]
    assert mirrored.shape[0] == 2
    for replica in range(2):
      np.testing.assert_allclose(mirrored[replica], single[0], rtol=1e-5, atol=1e-6 * scale)


def test_one_clipped_update_equals_the_single_device_one(results):
  np.testing.assert_allclose(results["mirrored_grad_norm"], results["single_grad_norm"], rtol=1e-5)
  assert results["single_grad_norm"] > 10 * CLIP
  deltas = {name: [results[f"{name}_weight_{i}"].astype(np.float64) - results[f"init_{i}"]
                   for i in range(int(results["num_weights"]))] for name in ("single", "mirrored")}
  # SGD on the clipped gradient: the update's global norm is lr·clip.
  norm = np.sqrt(sum(np.sum(d ** 2) for d in deltas["single"]))
  np.testing.assert_allclose(norm, LEARNING_RATE * CLIP, rtol=1e-3)
  for single, mirrored in zip(deltas["single"], deltas["mirrored"]):
    # Float32 weights of O(0.05) round their O(1e-4) updates to ~1e-4 relative.
    np.testing.assert_allclose(mirrored, single, atol=1e-3 * LEARNING_RATE * CLIP)


def test_batch_not_divisible_by_replicas_is_a_user_error(results):
  message = str(results["divisible_error"])
  assert message == "global_batch=9 must be divisible by the number of replicas (2)"


if __name__ == "__main__":
  _compute(sys.argv[1])
