"""The loop `pretrain` and `finetune` share: resume, fit to an exact step, progress, checkpoints.

A run is a function of its flags and of the step it is at: the step counter, the optimizer state
and the EMA are in the checkpoint, the trainers key noise and dropout by (seed, step), and the data
stream starts at the batch of the step (`data.make_dataset(start_batch=...)`). So rerunning the same
command after a crash continues from the last checkpoint as if nothing had happened.

`tf.train.CheckpointManager` writes a checkpoint's files before it names it in the `checkpoint`
state file (an atomic rename), so a kill mid-save leaves the previous checkpoint as the latest.
"""

import math
import os
import time

import keras
import tensorflow as tf
from absl import logging

from mmd_keras import checkpoints
from mmd_keras import console
from mmd_keras import grid
from mmd_keras.errors import UserError


class NonFiniteError(UserError):
  """A training step produced a non-finite loss or gradient."""


def nonfinite_replicas(loss, grad_norm):
  """How many replicas saw a non-finite loss or gradient norm this step (all-reduced, so every
  replica reports the global count; 0 on a healthy step)."""
  finite = tf.logical_and(tf.math.is_finite(loss), tf.math.is_finite(grad_norm))
  return tf.distribute.get_replica_context().all_reduce(
      tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))


def step_of(trainer):
  return int(trainer.optimizer.iterations.numpy())


def first_nonfinite(variables):
  """The first of `variables` holding a NaN or Inf, or None."""
  finite = [tf.reduce_all(tf.math.is_finite(v)) for v in variables]
  if bool(tf.reduce_all(finite)):  # One check on the usual path.
    return None
  return next(v for v, ok in zip(variables, finite) if not ok)


class Progress(keras.callbacks.Callback):
  """After every step: stop on a non-finite step before anything is saved, and advance `bar` (set
  by `fit`) with the trainer's metrics. Every `log_every` steps a progress log line and TensorBoard
  scalars (the trainer's metrics averaged since the last line); every `every` steps a checkpoint
  and a sample grid, once `weights` (what the checkpoint holds of the model: weights, EMA) are
  checked finite.

  The trainer's `train_step` returns `step_loss`, `step_grad_norm` and `nonfinite` (see
  `nonfinite_replicas`) besides its metrics.
  """

  def __init__(self, *, manager, trainer, weights, sample_fn, workdir, every, log_every,
               global_batch, image_tag):
    super().__init__()
    self.manager = manager
    self.trainer = trainer
    self.weights = list(weights)
    self.sample_fn = sample_fn
    self.workdir = workdir
    self.every = every
    self.log_every = log_every
    self.global_batch = global_batch
    self.image_tag = image_tag
    self.writer = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))
    self.last_time = None
    self.last_step = None
    self.bar = None

  def on_train_begin(self, logs=None):
    self.last_time, self.last_step = time.time(), step_of(self.trainer)

  def on_train_batch_end(self, batch, logs=None):
    step = step_of(self.trainer)
    self.check_finite(step, logs)
    if self.bar is not None:
      self.bar.update(1, **{m.name: float(m.result()) for m in self.trainer.metrics})
    if step % self.log_every == 0:
      self.log(step)
    if step % self.every == 0:
      self.save(step)

  def check_finite(self, step, logs):
    if logs["nonfinite"] != 0:
      self.raise_nonfinite(step, f"non-finite loss or gradient (loss {logs['step_loss']:g}, "
                                 f"gradient norm {logs['step_grad_norm']:g})")

  def raise_nonfinite(self, step, what):
    latest = self.manager.latest_checkpoint
    raise NonFiniteError(
        f"step {step}: {what}; stopped without saving this state, the last checkpoint is "
        f"{latest or 'none'} (a lower learning rate or a gradient clip may help)")

  def log(self, step):
    now = time.time()
    steps_per_second = (step - self.last_step) / max(now - self.last_time, 1e-9)
    values = {m.name: float(m.result()) for m in self.trainer.metrics}
    logging.info("step %d  %s  %.2f steps/s  %.1f img/s", step,
                 "  ".join(f"{name} {value:.5f}" for name, value in values.items()),
                 steps_per_second, steps_per_second * self.global_batch)
    with self.writer.as_default(step=step):
      for name, value in values.items():
        tf.summary.scalar(name, value)
      tf.summary.scalar("steps_per_second", steps_per_second)
      tf.summary.scalar("images_per_second", steps_per_second * self.global_batch)
    self.trainer.reset_metrics()
    self.last_time, self.last_step = now, step

  def save(self, step):
    # A finite step can still overflow a weight in its update; such a state is not saved.
    bad = first_nonfinite(self.weights)
    if bad is not None:
      self.raise_nonfinite(step, f"non-finite weight {getattr(bad, 'path', bad.name)}")
    path = self.manager.save(checkpoint_number=step)
    png = os.path.join(self.workdir, "samples", f"step_{step:07d}.png")
    canvas = grid.write_png(png, self.sample_fn(), scale=2)
    with self.writer.as_default(step=step):
      tf.summary.image(self.image_tag, canvas[None])
    self.writer.flush()
    logging.info("step %d: checkpoint %s, samples %s", step, path, png)


def restore_or_initialize(manager, initialize, *, learning_rate, checkpoint_dir=None):
  """Restores the latest checkpoint in `checkpoint_dir` (default: `manager`'s; a resume), else
  calls `initialize()`. A checkpoint that does not restore is a `checkpoints.resume_error`."""
  latest = (tf.train.latest_checkpoint(checkpoint_dir) if checkpoint_dir
            else manager.latest_checkpoint)
  if latest:
    try:
      manager.checkpoint.restore(latest).assert_existing_objects_matched()
    except checkpoints.RESTORE_ERRORS as e:
      raise checkpoints.resume_error(latest, checkpoints.first_line(e)) from e
    optimizer = manager.checkpoint.optimizer
    console.note(f"resumed from {latest} at step {int(optimizer.iterations.numpy())}")
    # The checkpoint holds the learning rate too; the flag wins, so that a run stopped by the
    # NaN guard can be rerun with a lower one.
    saved = float(optimizer.learning_rate.numpy())
    if not math.isclose(saved, learning_rate, rel_tol=1e-6):  # Stored as float32.
      console.note(f"learning rate {learning_rate:g} (the checkpoint's was {saved:g})")
      optimizer.learning_rate = learning_rate
  else:
    initialize()


def fit(*, trainer, dataset_fn, max_steps, progress):
  """Trains from the trainer's step to exactly `max_steps`, on `dataset_fn(start_batch)`, and
  checkpoints the last step."""
  start = step_of(trainer)
  progress.bar = console.ProgressBar(max_steps, desc=os.path.basename(progress.workdir),
                                     unit="steps", initial=start, rate_unit="img",
                                     rate_scale=progress.global_batch)
  with progress.bar:
    # The stream is already shuffled, keyed by (seed, position); Keras' shuffle does not apply.
    trainer.fit(dataset_fn(start), epochs=1, steps_per_epoch=max_steps - start,
                callbacks=[progress], verbose=0, shuffle=False)
  final = step_of(trainer)
  if final % progress.every:
    progress.save(final)
