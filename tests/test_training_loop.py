"""training_loop.py: the NaN guard raises before anything is saved, progress and checkpoints are
written on their steps, a resume restores the step and takes the learning rate from the flag."""

import io
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from mmd_keras import checkpoints
from mmd_keras import console
from mmd_keras import training_loop


class _Trainer(keras.Model):
  """What the callback and the restore touch: an optimizer, metrics; no network needed."""

  def __init__(self, size=2):
    super().__init__()
    self.weight = keras.Variable(np.ones([size], np.float32), name="weight")
    self.ema = keras.Variable(np.ones([size], np.float32), trainable=False, name="weight_ema")
    self.loss_tracker = keras.metrics.Mean(name="loss")

  @property
  def metrics(self):
    return [self.loss_tracker]


def _trainer(learning_rate=1e-3, size=2):
  trainer = _Trainer(size)
  trainer.compile(optimizer=keras.optimizers.Adam(learning_rate))
  trainer.optimizer.build([trainer.weight])
  trainer.loss_tracker.update_state(0.5)
  return trainer


def _manager(trainer, folder):
  ckpt = tf.train.Checkpoint(optimizer=trainer.optimizer)
  return tf.train.CheckpointManager(ckpt, str(folder / "checkpoints"), max_to_keep=3)


def _progress(trainer, manager, folder, *, every=2, log_every=1):
  return training_loop.Progress(manager=manager, trainer=trainer,
                                weights=[trainer.weight, trainer.ema],
                                sample_fn=lambda: tf.zeros([4, 8, 8, 1]), workdir=str(folder),
                                every=every, log_every=log_every, global_batch=4,
                                image_tag="samples")


def _healthy(loss=0.5):
  return {"step_loss": loss, "step_grad_norm": 1.0, "nonfinite": 0.0}


def _checkpointed_at_step_2(tmp_path):
  """(trainer, manager, progress) after a healthy step 2, which wrote ckpt-2 (checkpoints every 2)."""
  trainer = _trainer()
  manager = _manager(trainer, tmp_path)
  progress = _progress(trainer, manager, tmp_path, every=2)
  progress.on_train_begin()
  trainer.optimizer.iterations.assign(2)
  progress.on_train_batch_end(0, _healthy())
  return trainer, manager, progress


@pytest.mark.parametrize("bad", [{"step_loss": float("nan")}, {"step_grad_norm": float("inf")}])
def test_nonfinite_step_raises_before_its_checkpoint(tmp_path, bad):
  trainer, manager, progress = _checkpointed_at_step_2(tmp_path)
  assert manager.latest_checkpoint.endswith("ckpt-2")
  trainer.optimizer.iterations.assign(4)  # A checkpoint step: the guard must come first.
  logs = dict(_healthy(), **bad)
  logs["nonfinite"] = float(training_loop.nonfinite_replicas(
      tf.constant(logs["step_loss"]), tf.constant(logs["step_grad_norm"])))
  with pytest.raises(training_loop.NonFiniteError, match=r"^step 4: non-finite") as error:
    progress.on_train_batch_end(0, logs)
  assert manager.latest_checkpoint in str(error.value)
  assert manager.latest_checkpoint.endswith("ckpt-2")
  assert not os.path.exists(tmp_path / "checkpoints" / "ckpt-4.index")
  assert not os.path.exists(tmp_path / "samples" / "step_0000004.png")


@pytest.mark.parametrize("name, value", [("weight", np.nan), ("weight_ema", np.inf)])
def test_nonfinite_weight_stops_before_its_checkpoint(tmp_path, name, value):
  # A finite step whose update overflowed a weight (or its EMA): the state is not saved.
  trainer, manager, progress = _checkpointed_at_step_2(tmp_path)
  variable = trainer.weight if name == "weight" else trainer.ema
  variable.assign([1.0, value])
  trainer.optimizer.iterations.assign(3)
  progress.on_train_batch_end(0, _healthy())  # Not a checkpoint step: nothing to check yet.
  trainer.optimizer.iterations.assign(4)
  with pytest.raises(training_loop.NonFiniteError,
                     match=rf"^step 4: non-finite weight {name}; .*ckpt-2") as error:
    progress.on_train_batch_end(0, _healthy())
  assert "\n" not in str(error.value)
  assert manager.latest_checkpoint.endswith("ckpt-2")
  assert not os.path.exists(tmp_path / "checkpoints" / "ckpt-4.index")
  assert not os.path.exists(tmp_path / "samples" / "step_0000004.png")


def test_first_nonfinite_names_the_first_bad_variable():
  variables = [tf.Variable([1.0, 2.0]), tf.Variable([np.inf]), tf.Variable([np.nan])]
  assert training_loop.first_nonfinite(variables[:1]) is None
  assert training_loop.first_nonfinite(variables) is variables[1]
  assert training_loop.first_nonfinite(variables[2:]) is variables[2]


def test_nonfinite_replicas_counts_inf_and_nan():
  count = training_loop.nonfinite_replicas
  assert float(count(tf.constant(1.0), tf.constant(2.0))) == 0.0
  assert float(count(tf.constant(np.nan), tf.constant(2.0))) == 1.0
  assert float(count(tf.constant(1.0), tf.constant(np.inf))) == 1.0


def test_progress_writes_on_its_steps(tmp_path):
  trainer = _trainer()
  manager = _manager(trainer, tmp_path)
  progress = _progress(trainer, manager, tmp_path, every=3, log_every=2)
  progress.on_train_begin()
  for step in range(1, 7):
    trainer.optimizer.iterations.assign(step)
    progress.on_train_batch_end(step - 1, _healthy())
  assert sorted(os.listdir(tmp_path / "samples")) == ["step_0000003.png", "step_0000006.png"]
  assert [int(p.rsplit("-", 1)[1]) for p in manager.checkpoints] == [3, 6]
  assert any(name.startswith("events") for name in os.listdir(tmp_path / "tensorboard"))


def test_progress_advances_the_bar_with_the_metrics(tmp_path):
  trainer = _trainer()
  progress = _progress(trainer, _manager(trainer, tmp_path), tmp_path, every=100, log_every=100)
  stream = io.StringIO()
  progress.bar = console.progress(4, desc="pretrain", unit="steps", initial=2, stream=stream)
  progress.on_train_begin()
  for step in (3, 4):
    trainer.optimizer.iterations.assign(step)
    progress.on_train_batch_end(step - 1, _healthy())
  progress.bar.close()
  last = stream.getvalue().split("\r")[-1]
  assert last.startswith("pretrain: 4/4 steps (100%) [") and "loss=0.5" in last


def test_resume_restores_the_step_and_takes_the_flag_learning_rate(tmp_path):
  first = _trainer(learning_rate=1e-3)
  first.optimizer.iterations.assign(7)
  _manager(first, tmp_path).save(checkpoint_number=7)

  def initialize():
    raise AssertionError("a workdir with a checkpoint must resume, not initialize")

  second = _trainer(learning_rate=1e-4)
  training_loop.restore_or_initialize(_manager(second, tmp_path), initialize,
                                      learning_rate=1e-4)
  assert training_loop.step_of(second) == 7
  np.testing.assert_allclose(float(second.optimizer.learning_rate.numpy()), 1e-4, rtol=1e-6)

  initialized = []
  fresh = _trainer()
  training_loop.restore_or_initialize(_manager(fresh, tmp_path / "empty"),
                                      lambda: initialized.append(True), learning_rate=1e-3)
  assert initialized == [True] and training_loop.step_of(fresh) == 0


def test_a_checkpoint_that_does_not_restore_is_a_one_line_resume_error(tmp_path):
  # Another run's checkpoint: its Adam slots have 2 entries, this run's weight has 3.
  saved = _trainer()
  saved.optimizer.iterations.assign(3)
  _manager(saved, tmp_path).save(checkpoint_number=3)

  def initialize():
    raise AssertionError("a workdir with a checkpoint must not start over")

  with pytest.raises(checkpoints.CheckpointError) as error:
    training_loop.restore_or_initialize(_manager(_trainer(size=3), tmp_path), initialize,
                                        learning_rate=1e-3)
  message = str(error.value)
  assert message.startswith(f"cannot resume from {tmp_path / 'checkpoints' / 'ckpt-3'}: ")
  assert "(3,)" in message and "use another workdir" in message and "\n" not in message
