"""distribute: TF_CONFIG is checked before TensorFlow sees it; one process is the chief of itself.

The multi-worker behaviour (two real worker processes) is tested in test_multi_worker.py.
"""

import json

import numpy as np
import pytest
import tensorflow as tf

from mmd_keras import distribute
from mmd_keras.errors import UserError


def config(cluster, task):
  return json.dumps({"cluster": cluster, "task": task})


@pytest.mark.parametrize("value, expected", [
    (config({"worker": ["a:1", "b:2"]}, {"type": "worker", "index": 1}), ("worker", 1, 2)),
    (config({"chief": ["a:1"], "worker": ["b:2", "c:3"]}, {"type": "chief", "index": 0}),
     ("chief", 0, 3)),
    (config({"worker": ["10.0.0.1:2222"]}, {"type": "worker", "index": 0}), ("worker", 0, 1)),
])
def test_valid_tf_config(value, expected):
  assert distribute.check_tf_config(value) == expected


@pytest.mark.parametrize("value, detail", [
    (None, "needs the TF_CONFIG environment variable"),
    ("", "needs the TF_CONFIG environment variable"),
    ("{'cluster': {}}", "TF_CONFIG is not valid JSON"),
    ("[1, 2]", "TF_CONFIG has no \"cluster\" object"),
    (json.dumps({"task": {"type": "worker", "index": 0}}), "TF_CONFIG has no \"cluster\" object"),
    (config({"ps": ["a:1"]}, {"type": "ps", "index": 0}), "TF_CONFIG cluster job 'ps'"),
    (config({"worker": "a:1,b:2"}, {"type": "worker", "index": 0}), "TF_CONFIG cluster.worker"),
    (config({"worker": ["a"]}, {"type": "worker", "index": 0}), "TF_CONFIG cluster.worker"),
    (json.dumps({"cluster": {"worker": ["a:1"]}}), "TF_CONFIG has no \"task\""),
    (config({"worker": ["a:1"]}, {"type": "chief", "index": 0}), "TF_CONFIG task type 'chief'"),
    (config({"worker": ["a:1", "b:2"]}, {"type": "worker", "index": 2}), "TF_CONFIG task index 2"),
    (config({"worker": ["a:1", "b:2"]}, {"type": "worker", "index": "0"}),
     "TF_CONFIG task index '0'"),
    (config({"worker": ["a:1", "b:2"]}, {"type": "worker", "index": True}),
     "TF_CONFIG task index True"),
])
def test_bad_tf_config_says_what_is_expected(value, detail):
  with pytest.raises(UserError) as error:
    distribute.check_tf_config(value)
  message = str(error.value)
  assert detail in message
  assert "\n" not in message
  assert distribute.TF_CONFIG_EXAMPLE in message


def test_unknown_strategy_and_unreachable_tpu_are_user_errors():
  with pytest.raises(UserError, match="^name=parameter_server must be one of"):
    distribute.make_strategy("parameter_server")
  # Off a TPU VM an empty TPU address names no TPU: TF's ValueError becomes a one-line UserError.
  with pytest.raises(UserError, match="^tpu= cannot be reached") as error:
    distribute.make_strategy("tpu", tpu="")
  assert "\n" not in str(error.value)


def test_a_single_process_writes_into_the_real_directory(tmp_path):
  strategy = distribute.make_strategy("default")
  assert distribute.is_chief(strategy)
  assert not distribute.is_multi_worker(strategy)
  assert distribute.write_dir(str(tmp_path), strategy) == str(tmp_path)
  assert distribute.check_global_batch(6, strategy) == 6
  logs = {"loss": tf.constant(1.5)}
  assert distribute.fit_logs(logs) is logs


def test_global_batches_are_sharded_by_data_and_left_unchanged():
  dataset = tf.data.Dataset.range(12).batch(4)
  sharded = distribute.shard_global_batches(dataset)
  assert (sharded.options().experimental_distribute.auto_shard_policy
          == tf.data.experimental.AutoShardPolicy.DATA)
  np.testing.assert_array_equal(np.stack(list(sharded.as_numpy_iterator())),
                                np.arange(12).reshape(3, 4))
