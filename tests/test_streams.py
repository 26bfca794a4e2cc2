"""streams.py: the stream ids and keys are those every earlier run drew with (changing one would
change the draws of every run, and a resumed run would not continue the one it resumes)."""

import numpy as np
import tensorflow as tf

from mmd_keras import streams


def test_stream_ids_keep_their_values():
  ids = {name: getattr(streams, name) for name in (
      "TRAIN_STEP", "PRETRAIN_GRID", "FINETUNE_EXAMPLES", "FINETUNE_GRID", "SAMPLE_X_T",
      "SAMPLE_STEPS", "DATA_ORDER", "DATA_FLIP", "EXPORT_X_T", "EXPORT_STEP_NOISE")}
  assert ids == dict(TRAIN_STEP=0, PRETRAIN_GRID=1, FINETUNE_EXAMPLES=1, FINETUNE_GRID=2,
                     SAMPLE_X_T=2, SAMPLE_STEPS=3, DATA_ORDER=1001, DATA_FLIP=1002, EXPORT_X_T=0,
                     EXPORT_STEP_NOISE=1)


def test_keys_are_the_plain_stateless_keys():
  for dtype in (tf.int32, tf.int64):
    key = streams.key(5, 1001, dtype)
    assert key.dtype == dtype
    np.testing.assert_array_equal(key, [5, 1001])
    np.testing.assert_array_equal(
        streams.fold_in(5, 1001, 7, dtype=dtype),
        tf.random.experimental.stateless_fold_in(tf.constant([5, 1001], dtype),
                                                 tf.constant(7, dtype)))
  # A request's seed is a tensor.
  np.testing.assert_array_equal(streams.key(tf.constant(9, tf.int64), 1, tf.int64), [9, 1])


def test_step_seed_is_the_one_of_earlier_runs():
  np.testing.assert_array_equal(streams.step_seed(3, 7, replica_id=1), [865607465, 1])
  np.testing.assert_array_equal(streams.step_seed(0, 0, replica_id=0), [-1496990542, 0])


def test_step_seed_differs_by_step_and_seed():
  a = streams.step_seed(0, 1).numpy()
  np.testing.assert_array_equal(a, streams.step_seed(0, 1).numpy())
  assert not np.array_equal(a, streams.step_seed(0, 2).numpy())
  assert not np.array_equal(a, streams.step_seed(1, 1).numpy())
  assert a.shape == (2,) and a.dtype == np.int32
