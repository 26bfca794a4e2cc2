"""Micro-batches (mmd_keras/micro_batches.py) in MMDFinetuner: two micro-batches give the loss and
gradient of one batch of twice the size, against a larger real batch; the generated batch has its
own size."""

import numpy as np
import pytest
import tensorflow as tf

from helpers import FINETUNER_IMAGE_SIZE as IMAGE_SIZE
from helpers import finetuner_gradients
from helpers import make_finetuner
from helpers import randomize_weights
from helpers import real_images
from helpers import tiny_unet
from mmd_keras import mmd
from mmd_keras.errors import UserError


@pytest.mark.slow
@pytest.mark.parametrize("recompute", [True, False])
def test_micro_batches_give_the_gradient_of_the_whole_batch_against_a_larger_real_one(recompute):
  """Two micro-batches of 3 generated images against 8 real ones: the loss and gradient of one
  batch of 6 (to float tolerance), and the loss MMD²_u of φ(S_K(z)) and φ(x_real) itself."""
  unet = randomize_weights(tiny_unet(image_size=IMAGE_SIZE), seed=4, scale=0.05)
  x_real = tf.constant(real_images(8, seed=0))
  z = tf.random.stateless_normal([6, IMAGE_SIZE, IMAGE_SIZE, 1], seed=[5, 6])
  whole = make_finetuner(unet, recompute=recompute, generated_batch_size=6)
  split = make_finetuner(unet, recompute=recompute, generated_batch_size=6, micro_batches=2)
  loss, grads = tf.function(whole.compute_gradients)(x_real, z)
  split_loss, split_grads = tf.function(split.compute_gradients)(x_real, z)
  expected = mmd.mmd2_unbiased(whole.feature_net(whole.sample(z, seed=tf.constant([0, 0]))),
                               whole.feature_net(x_real), kernel=whole.kernel)
  np.testing.assert_allclose(float(loss), float(expected), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(split_loss), float(loss), rtol=1e-5, atol=1e-7)
  total = np.sqrt(sum(np.sum(np.square(g.numpy().astype(np.float64))) for g in grads))
  assert total > 0
  for weight, a, b in zip(unet.trainable_weights, split_grads, grads):
    assert np.linalg.norm(a.numpy() - b.numpy()) <= max(1e-4 * np.linalg.norm(b.numpy()),
                                                        1e-6 * total), weight.path


def test_the_generated_batch_is_its_own_size():
  unet = randomize_weights(tiny_unet(image_size=IMAGE_SIZE), seed=4, scale=0.05)
  trainer = make_finetuner(unet, generated_batch_size=2)
  loss, _ = finetuner_gradients(trainer, real_images(6, seed=0))
  assert np.isfinite(loss)
  with pytest.raises(UserError, match="^generated_batch_size=1 must be >= 2"):
    make_finetuner(unet, generated_batch_size=1)
  with pytest.raises(UserError, match="^micro_batches=4 must be >= 1 and divide the generated"):
    make_finetuner(unet, generated_batch_size=6, micro_batches=4)
