"""The loop `pretrain` and `finetune` share: the global-gradient update, building and resuming a
run, fitting to an exact step with progress lines, checkpoints and sample grids.

A run is a function of its flags and of the step it is at: the step counter, the optimizer state
and the EMA are in the checkpoint, the trainers key noise and dropout by (seed, step), and the data
stream starts at the batch of the step (`data.make_dataset(start_batch=...)`). So rerunning the same
command after a crash continues from the last checkpoint as if nothing had happened.

`tf.train.CheckpointManager` writes a checkpoint's files before it names it in the `checkpoint`
state file (an atomic rename), so a kill mid-save leaves the previous checkpoint as the latest.
"""

import dataclasses
import math
import os
import time

import keras
import tensorflow as tf
from absl import logging

from mmd_keras import checkpoints
from mmd_keras import console
from mmd_keras import distribute
from mmd_keras import grid
from mmd_keras import samplers
from mmd_keras.errors import UserError


class NonFiniteError(UserError):
  """A training step produced a non-finite loss or gradient."""


def nonfinite_replicas(loss, grad_norm, also_finite=()):
  """How many replicas saw a non-finite loss or gradient norm (or value of `also_finite`) this step
  (all-reduced, so every replica reports the global count; 0 on a healthy step)."""
  finite = tf.reduce_all([tf.math.is_finite(v) for v in (loss, grad_norm, *also_finite)])
  return tf.distribute.get_replica_context().all_reduce(
      tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))


def apply_global_gradients(optimizer, grads, weights, *, grad_clip):
  """Applies the global gradient `grads` (summed over replicas) to `weights`, clipped to the global
  norm `grad_clip` (None or 0: not clipped); returns its norm before clipping."""
  grad_norm = tf.linalg.global_norm(grads)
  # Clipped here, on the global gradient: Keras' own `global_clipnorm` clips each replica's
  # partial gradient before the all-reduce, which is not the single-device update.
  if grad_clip:
    grads, _ = tf.clip_by_global_norm(grads, grad_clip, use_norm=grad_norm)
  # The optimizer all-reduces (SUM) once more: hand it 1/N of the global gradient.
  num_replicas = tf.distribute.get_replica_context().num_replicas_in_sync
  optimizer.apply_gradients(zip([g / num_replicas for g in grads], weights))
  return grad_norm


def make_ema(weights):
  """EMA copies of `weights`: every replica computes the same value, the first one's is kept."""
  return [keras.Variable(w, trainable=False, name=w.name + "_ema",
                         aggregation="only_first_replica") for w in weights]


def reset_ema(ema, weights):
  """ema ← w (nothing for `ema` None: a trainer that keeps no EMA)."""
  for e, w in zip(ema or [], weights):
    e.assign(w)


def update_ema(ema, weights, decay):
  """ema ← decay·ema + (1 − decay)·w."""
  for e, w in zip(ema, weights):
    e.assign(decay * e + (1.0 - decay) * w)


def step_logs(trainer, *, loss, grad_norm, also_finite=()):
  """What a `train_step` returns: the trainer's metrics and the step's loss, gradient norm and
  non-finite count (of those and of `also_finite`, e.g. other gradient norms), which `Progress`
  reads."""
  return distribute.fit_logs({
      **{m.name: m.result() for m in trainer.metrics}, "step_loss": loss,
      "step_grad_norm": grad_norm,
      "nonfinite": nonfinite_replicas(loss, grad_norm, also_finite)})


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
  checked finite. `describe()` (optional) returns more text for the progress line and more
  scalars for TensorBoard ({tag: value}).

  The trainer's `train_step` returns `step_loss`, `step_grad_norm` and `nonfinite` (see
  `nonfinite_replicas`) besides its metrics.
  """

  def __init__(self, *, manager, trainer, weights, sample_fn, workdir, every, log_every,
               global_batch, image_tag, describe=None, validator=None, max_steps=None):
    super().__init__()
    self.validator = validator
    self.max_steps = max_steps
    self.describe = describe
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
    if validator is not None:
      validator.writer = self.writer
    self.last_time = None
    self.last_step = None
    self.bar = None

  def on_train_begin(self, logs=None):
    self.last_time, self.last_step = time.time(), step_of(self.trainer)
    v = self.validator
    # The start is validated once: step 0, or a validation step whose record a kill lost.
    if v is not None and (not v.history or (self.last_step % v.every == 0
                                            and not v.done(self.last_step))):
      self.validate(self.last_step)
    elif v is not None and v.done(self.last_step):
      # Its checkpoint was saved before its validation: a rewind that followed is made again.
      v.rewind_if_worse(self.last_step)

  def on_train_batch_end(self, batch, logs=None):
    step = step_of(self.trainer)
    self.check_finite(step, logs)
    if self.bar is not None:
      self.bar.set_postfix({m.name: f"{float(m.result()):.3g}" for m in self.trainer.metrics},
                           refresh=False)
      self.bar.update(1)
    if step % self.log_every == 0:
      self.log(step)
    validating = self.validator is not None and step % self.validator.every == 0
    # A validation step is a checkpoint too: a resumed run never repeats or loses a validation.
    if step % self.every == 0 or validating:
      self.save(step)
    if validating:
      self.validate(step)

  def validate(self, step):
    record = self.validator(step)
    best = self.validator.best
    console.note(f"validation at step {step}: score {record['score']:.3f} ("
                 + ", ".join(f"FID {name} {s['fid']:.2f}" for name, s in record["spaces"].items())
                 + f"); best step {best['step']}")
    if self.validator.exhausted():
      console.note(f"stopping: {self.validator.patience} validations without improvement on step "
                   f"{best['step']}")
      self.trainer.stop_training = True
    # Not at the last step: nothing trains after it, and the last weights stay what they were (a
    # longer rerun makes the rewind when it resumes from this step).
    elif step != self.max_steps and self.validator.rewind_if_worse(step):
      console.note(f"rewound to step {best['step']}'s weights; the learning rate is now "
                   f"{self.validator.learning_rate_factor():g} times the flag's")

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
    text, scalars = self.describe() if self.describe else ("", {})
    logging.info("step %d  %s  %.2f steps/s  %.1f img/s%s", step,
                 "  ".join(f"{name} {value:.5f}" for name, value in values.items()),
                 steps_per_second, steps_per_second * self.global_batch,
                 f"  {text}" if text else "")
    with self.writer.as_default(step=step):
      for name, value in {**values, **scalars}.items():
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


@dataclasses.dataclass(frozen=True)
class Run:
  """A trainer built under its strategy and resumed (or initialised); see `start`."""

  trainer: keras.Model
  manager: tf.train.CheckpointManager
  out_dir: str  # Where this process writes: the workdir on the chief, else a throwaway.
  start_step: int


def start(*, strategy, workdir, unet_factory, make_trainer, learning_rate, initialize,
          jit_compile=False):
  """Builds a UNet and `make_trainer(unet)` with Adam under `strategy`, then resumes the latest
  checkpoint in `<workdir>/checkpoints` or, for a new run, calls `initialize(trainer)`.

  The trainer has the attributes `unet`, `ema` (its EMA weights, None if it keeps none) and
  `learned_timesteps` (a `learned_timesteps.LearnedTimesteps`, or None): the checkpoint holds them
  and the optimizer (`checkpoints.training_checkpoint`).
  """
  with strategy.scope():
    unet = unet_factory().build_for_inference()
    trainer = make_trainer(unet)
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    trainer.compile(optimizer=optimizer, jit_compile=jit_compile)
    optimizer.build(unet.trainable_weights)
  ckpt = checkpoints.training_checkpoint(unet=unet, ema=trainer.ema, optimizer=optimizer,
                                         learned_timesteps=trainer.learned_timesteps)
  out_dir = distribute.write_dir(workdir, strategy)
  manager = tf.train.CheckpointManager(ckpt, os.path.join(out_dir, "checkpoints"), max_to_keep=3)
  # Every worker resumes from the chief's checkpoints.
  restore_or_initialize(manager, lambda: initialize(trainer), learning_rate=learning_rate,
                        checkpoint_dir=os.path.join(workdir, "checkpoints"))
  start_step = step_of(trainer)
  distribute.check_same_start(start_step, strategy, workdir=workdir)
  return Run(trainer=trainer, manager=manager, out_dir=out_dir, start_step=start_step)


class GridSampler:
  """Draws the progress grid: fixed noise sampled in K steps of `sampler` (η = 0) with the current
  values of `weights`, copied into a UNet of `unet_factory` outside the strategy, at `timesteps`
  (or at `timesteps()`, the current ones, when it is a function), `batch_size` images at a time
  (default: all at once). `weights` may be a function returning them (values computed from the
  trainer's, e.g. adapters merged into their kernels)."""

  def __init__(self, unet_factory, *, weights, noise_seed, num_images, timesteps, alphas_cumprod,
               clip_x0, sampler="ddim", batch_size=None):
    self.unet = unet_factory().build_for_inference()
    self.weights = weights if callable(weights) else list(weights)
    self.noise = tf.random.stateless_normal(
        [num_images, self.unet.image_size, self.unet.image_size, self.unet.channels],
        seed=noise_seed)
    self.sampler = sampler
    self.timesteps = timesteps
    self.alphas_cumprod = alphas_cumprod
    self.clip_x0 = clip_x0
    self.batch_size = batch_size or num_images
    # A plain call: nothing for AutoGraph to convert (and it fails to find this lambda's source).
    self.eps_fn = tf.function(lambda x, t: self.unet(x, t), autograph=False)

  def synced_unet(self):
    """The grid's UNet, holding the current values of `weights`."""
    sources = self.weights() if callable(self.weights) else self.weights
    for target, source in zip(self.unet.weights, sources, strict=True):
      target.assign(source)
    return self.unet

  def __call__(self):
    self.synced_unet()
    timesteps = self.timesteps() if callable(self.timesteps) else self.timesteps
    # In batches of `batch_size`: a validation set of a large UNet need not fit at once.
    return tf.concat([
        samplers.sample(self.sampler, self.eps_fn, self.noise[i:i + self.batch_size],
                        timesteps=timesteps, alphas_cumprod=self.alphas_cumprod,
                        clip_x0=self.clip_x0)
        for i in range(0, self.noise.shape[0], self.batch_size)], axis=0)


def train_to(run, *, max_steps, dataset_fn, sample_fn, checkpoint_every, log_every,
             global_batch_size, image_tag, describe=None, validator=None):
  """Trains `run` from its step to exactly `max_steps` on `dataset_fn(start_batch)` (the run's
  global batches from batch `start_batch` on), or until `validator` (a `validation.Validator`)
  runs out of patience, and checkpoints the last step. `describe`: see `Progress`."""
  trainer = run.trainer
  learned = trainer.learned_timesteps
  progress = Progress(manager=run.manager, trainer=trainer,
                      weights=(trainer.unet.weights + list(trainer.ema or [])
                               + ([learned.logits] if learned is not None else [])),
                      sample_fn=sample_fn, workdir=run.out_dir, every=checkpoint_every,
                      log_every=log_every, global_batch=global_batch_size, image_tag=image_tag,
                      describe=describe, validator=validator, max_steps=max_steps)
  start_step = step_of(trainer)
  progress.bar = console.progress(max_steps, desc=os.path.basename(run.out_dir), unit="steps",
                                  initial=start_step)
  with progress.bar:
    # Each worker takes its part of every global batch. The stream is already shuffled, keyed by
    # (seed, position); Keras' shuffle does not apply to it.
    trainer.fit(distribute.shard_global_batches(dataset_fn(start_step)), epochs=1,
                steps_per_epoch=max_steps - start_step, callbacks=[progress], verbose=0,
                shuffle=False)
  final = step_of(trainer)
  if final % progress.every:
    progress.save(final)
  progress.writer.close()
