"""MMD finetuning (Aiello et al. 2023): train the K-step sampler (DDIM or DPM-Solver++) end to end.

  z ~ N(0, I) ─► x̂0 = S_K(ε_θ, z) ─► φ(x̂0), φ(x_real) ─► L(θ) = MMD²_u(φ(x̂0), φ(x_real))

and θ ← Adam(∇_θ L) through all K UNet calls. With `recompute` (the default) the gradient comes from
`replay.value_and_gradients`: the backward pass replays one sampler step at a time in a
`tf.while_loop`, so activation memory is that of one UNet call and the graph does not grow with K.

With learned timesteps (`learned_timesteps`) the K timesteps are trained too, by the same backward
pass.

Under a tf.distribute strategy the features of all replicas are gathered, so every replica computes
the MMD² of the *global* batch (the estimator is not a mean over examples: a per-replica MMD² would
be a different, noisier loss).
"""

import os
import shutil

import keras
import tensorflow as tf
from absl import logging

from mmd_keras import adapters as adapters_lib
from mmd_keras import atomic
from mmd_keras import checkpoints
from mmd_keras import console
from mmd_keras import distribute
from mmd_keras import errors
from mmd_keras import learned_timesteps as learned_lib
from mmd_keras import micro_batches
from mmd_keras import mmd
from mmd_keras import replay
from mmd_keras import samplers
from mmd_keras import schedule as schedule_lib
from mmd_keras import steps as steps_lib
from mmd_keras import streams
from mmd_keras import training_loop
from mmd_keras import validation as validation_lib
from mmd_keras.errors import ParameterError


class MMDFinetuner(keras.Model):
  """Minimises MMD²_u(φ(S_K(ε_θ, z)), φ(x_real)) over all UNet weights θ, S_K the K-step
  sampler of `samplers` named `sampler`; with `learn_timesteps` over S_K's timesteps too
  (`learned_timesteps.LearnedTimesteps`, learning rate `timesteps_lr`).

  `ema_decay` > 0 keeps an EMA of the finetuned weights (`ema`), which the run validates and saves.

  `generated_batch_size`: the global number of generated images per step (default: as many as the
  real batch), so the real batch may be larger (a lower-variance MMD² for a few more feature
  passes). `micro_batches` > 1 samples them in that many parts one after another: the gradient of
  the whole batch in the memory of one part (module `micro_batches`).
  """

  ema = None  # Without `ema_decay`: the checkpoints hold the raw weights alone.

  def __init__(self, unet, *, feature_net, schedule, num_steps, kernel, sampler="ddim",
               timestep_kind="uniform", eta=0.0, grad_clip=None, recompute=True, dropout=False,
               clip_x0=False, seed=0, learn_timesteps=False, timesteps_lr=None,
               generated_batch_size=None, micro_batches=1, ema_decay=0.0, **kwargs):
    super().__init__(**kwargs)
    if generated_batch_size is not None and generated_batch_size < 2:
      raise ParameterError("generated_batch_size", "must be >= 2 (the unbiased MMD² compares at "
                           "least two images per set)", value=generated_batch_size)
    if micro_batches < 1 or (generated_batch_size or micro_batches) % micro_batches:
      raise ParameterError("micro_batches", f"must be >= 1 and divide the generated batch "
                           f"({generated_batch_size})", value=micro_batches)
    self.generated_batch_size = generated_batch_size
    self.micro_batches = micro_batches
    self.ema_decay = ema_decay
    if ema_decay:
      self.ema = training_loop.make_ema(unet.weights)
    samplers.check(sampler, eta=eta)
    self.sampler = sampler
    self.unet = unet
    self.feature_net = feature_net
    self.kernel = kernel
    self.timesteps = schedule.timesteps(num_steps, timestep_kind)  # Raises for K outside [1, T].
    self.learned_timesteps = None
    if learn_timesteps:
      if eta:
        raise ParameterError("learn_timesteps", "needs {eta}=0 (deterministic DDIM)", value=True,
                             refs=("eta",))
      _check_positive("timesteps_lr", timesteps_lr)
      self.learned_timesteps = learned_lib.LearnedTimesteps(self.timesteps,
                                                            num_timesteps=schedule.num_timesteps,
                                                            learning_rate=timesteps_lr)
      self.timesteps_grad_norm_tracker = keras.metrics.Mean(name="timesteps_grad_norm")
    self.alphas_cumprod = schedule.alphas_cumprod_tf()
    # Continuous timesteps interpolate the float64 ᾱ, as evaluation and export do.
    self._alphas_cumprod_float64 = schedule.alphas_cumprod
    self.eta = eta
    self.grad_clip = grad_clip
    self.recompute = recompute
    self.dropout = dropout
    self.clip_x0 = clip_x0
    self.seed = seed
    self.mmd2_tracker = keras.metrics.Mean(name="mmd2")
    self.grad_norm_tracker = keras.metrics.Mean(name="grad_norm")
    # Nothing to build: the UNet comes built, and there is no forward `call` for Keras to trace.
    self.built = True

  @property
  def metrics(self):
    trackers = [self.mmd2_tracker, self.grad_norm_tracker]
    if self.learned_timesteps is not None:
      trackers.append(self.timesteps_grad_norm_tracker)
    return trackers

  def current_timesteps(self):
    """The K timesteps the sampler visits now: ints, or the learned values (float32)."""
    if self.learned_timesteps is None:
      return self.timesteps
    return self.learned_timesteps.values()

  def _eps_fn(self, dropout_seed):
    """ε_θ(x, t) for the sampler; dropout masks are a function of (dropout_seed, t) alone, so a
    replayed step draws the same masks."""
    def eps(x, t):
      if self.dropout:
        # A continuous t keys the masks by its bits: the replay sees the very same value.
        key = t[0] if t.dtype.is_integer else tf.bitcast(t[0], tf.int32)
        return self.unet(x, t, training=True,
                         dropout_seed=tf.random.experimental.stateless_fold_in(dropout_seed, key))
      return self.unet(x, t, training=False)
    return eps

  def _steps(self, seed, timesteps):
    """(the sampler's K steps over `timesteps`, ε_θ) of one finetuning step; `seed` fixes dropout
    masks and η-noise."""
    dropout_seed, eta_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    alphas_cumprod = (self._alphas_cumprod_float64 if steps_lib.is_continuous(timesteps)
                      else self.alphas_cumprod)
    steps = samplers.steps(self.sampler, timesteps=timesteps, alphas_cumprod=alphas_cumprod,
                           eta=self.eta, clip_x0=self.clip_x0, seed=eta_seed)
    return steps, self._eps_fn(dropout_seed)

  def sample(self, z, *, seed):
    """x̂0 = S_K(ε_θ, z), unrolled and differentiable in θ (and ψ); `seed` fixes dropout masks and
    η-noise."""
    timesteps = self.timesteps if self.learned_timesteps is None else self.learned_timesteps()
    steps, eps = self._steps(seed, timesteps)
    return steps_lib.run(steps, eps, z)

  def compute_gradients(self, x_real, z=None):
    """(MMD² of the global batch, its gradient with respect to θ, the UNet's trainable weights, then
    ψ, the timestep logits when learned, summed over replicas) for this replica's real batch.

    `z` defaults to `example_noise` of this step.
    """
    replica = tf.distribute.get_replica_context()
    num_replicas = replica.num_replicas_in_sync
    step = self.optimizer.iterations
    if z is None:
      shape = tf.shape(x_real)
      if self.generated_batch_size is not None:
        shape = tf.concat([[self.generated_batch_size // num_replicas], shape[1:]], axis=0)
      z = streams.example_noise(shape, seed=self.seed, step=step)
    real_features = replica.all_gather(tf.stop_gradient(self.feature_net(x_real)), axis=0)
    weights = self.unet.trainable_weights

    def loss_fn(x_fake):
      fake_features = replica.all_gather(self.feature_net(x_fake), axis=0)
      return mmd.mmd2_unbiased(fake_features, real_features, kernel=self.kernel)

    timesteps, timesteps_tape = self.timesteps, None
    if self.learned_timesteps is not None:
      with tf.GradientTape() as timesteps_tape:
        timesteps = self.learned_timesteps()
      # Differentiated like a weight; ψ's gradient follows by the chain rule below.
      weights = weights + [timesteps]
    steps, eps = self._steps(streams.step_seed(self.seed, step), timesteps)
    # all_gather's gradient sums the (identical) upstream gradients of all N replicas, so the
    # local gradient of L/N is exactly this replica's examples' share of ∇L.
    if self.micro_batches > 1:
      loss, grads = micro_batches.value_and_gradients(
          steps, eps, z, parts=self.micro_batches, feature_net=self.feature_net,
          loss_fn=lambda fake: mmd.mmd2_unbiased(fake, real_features, kernel=self.kernel),
          weights=weights, recompute=self.recompute)
    elif self.recompute:
      loss, grads = replay.value_and_gradients(steps, eps, z, loss_fn=loss_fn, weights=weights,
                                               gradient_scale=1.0 / num_replicas)
    else:
      with tf.GradientTape() as tape:
        tape.watch([w for w in weights if isinstance(w, tf.Tensor)])
        loss = loss_fn(steps_lib.run(steps, eps, z))
        scaled_loss = loss / num_replicas
      grads = tape.gradient(scaled_loss, weights,
                            unconnected_gradients=tf.UnconnectedGradients.ZERO)
    if timesteps_tape is not None:
      grads[-1] = timesteps_tape.gradient(timesteps, self.learned_timesteps.logits,
                                          output_gradients=tf.convert_to_tensor(grads[-1]))
    return loss, replica.all_reduce(tf.distribute.ReduceOp.SUM, grads)

  def train_step(self, x_real):
    loss, grads = self.compute_gradients(x_real)
    num_weights = len(self.unet.trainable_weights)
    grad_norm = training_loop.apply_global_gradients(self.optimizer, grads[:num_weights],
                                                     self.unet.trainable_weights,
                                                     grad_clip=self.grad_clip)
    if self.ema is not None:
      training_loop.update_ema(self.ema, self.unet.weights, self.ema_decay)
    self.mmd2_tracker.update_state(loss)
    self.grad_norm_tracker.update_state(grad_norm)
    also_finite = []
    if self.learned_timesteps is not None:
      timesteps_grad_norm = training_loop.apply_global_gradients(
          self.learned_timesteps.optimizer, grads[num_weights:], [self.learned_timesteps.logits],
          grad_clip=None)
      self.timesteps_grad_norm_tracker.update_state(timesteps_grad_norm)
      also_finite.append(timesteps_grad_norm)
    return training_loop.step_logs(self, loss=loss, grad_norm=grad_norm, also_finite=also_finite)


def _check_positive(parameter, value):
  if value is None or not value > 0:
    raise ParameterError(parameter, "must be > 0", value=value)


def finetune(*, unet_factory, feature_net_factory, kernel, dataset_fn, schedule, workdir, num_steps,
             finetune_steps, learning_rate, grad_clip, global_batch_size, checkpoint_every,
             log_every, seed, strategy, init_checkpoint, use_ema=True, sampler="ddim",
             timestep_kind="uniform", eta=0.0, clip_x0=False, recompute=True, dropout=False,
             learn_timesteps=False, timesteps_lr=None, num_sample_images=64, validation=None,
             real_batch_size=None, micro_batches=1, ema_decay=0.0, lora_rank=0,
             lora_targets="all"):
  """MMD-finetunes (or resumes) the UNet in `workdir`; writes `<workdir>/unet.weights.h5` at the end
  and, for continuous timesteps (`learn_timesteps`, or a `timestep_kind` of float values), the
  timesteps beside it (`checkpoints.save_timesteps`).

  With `lora_rank` > 0 only low-rank adapters of that rank (on the layers `lora_targets` names,
  module `adapters`) train, on the frozen weights of `init_checkpoint`, and the run writes them
  alone wherever a full finetune writes weights: `<workdir>/unet.adapters.npz` at the end.

  With `ema_decay` > 0 an EMA of the weights is kept from the start, and it is what the run
  validates and saves (its grids and `unet.weights.h5`).

  With `validation` (a `validation.Settings`) the run is guarded: validated at the start and every
  `validation.every` steps, stopped after `validation.patience` validations without improvement,
  and `unet.weights.h5` holds the best validated weights (the last ones: `unet_last.weights.h5`).

  `dataset_fn(start_batch)` yields the global batches of real images (`real_batch_size`, default
  `global_batch_size`) from batch `start_batch` on; Keras' fit splits them across replicas. Each
  step generates `global_batch_size` images, in `micro_batches` parts per replica.
  """
  for parameter, value in (("learning_rate", learning_rate), ("finetune_steps", finetune_steps),
                           ("global_batch_size", global_batch_size),
                           ("checkpoint_every", checkpoint_every), ("log_every", log_every),
                           *([("timesteps_lr", timesteps_lr)] if learn_timesteps else [])):
    _check_positive(parameter, value)
  if not grad_clip >= 0:
    raise ParameterError("grad_clip", "must be >= 0 (0 disables clipping)", value=grad_clip)
  with errors.renamed(global_batch="global_batch_size"):
    distribute.check_global_batch(global_batch_size, strategy)
  with errors.renamed(global_batch="real_batch_size"):
    distribute.check_global_batch(real_batch_size or global_batch_size, strategy)
  if lora_rank and (ema_decay or learn_timesteps):
    raise ParameterError("lora_rank", "cannot be combined with ema_decay or learn_timesteps "
                         "(an adapters file holds adapters alone)", value=lora_rank)
  final_weights = os.path.join(workdir, "unet.adapters.npz" if lora_rank else "unet.weights.h5")
  base_sha256 = []  # Of the weights the adapters go onto.

  def make_trainer(unet):
    if lora_rank:
      # The adapters go onto the base weights, loaded first in a new run and a resumed one alike
      # (the checkpoint then restores the same values, and the adapters).
      checkpoints.restore_unet(unet, init_checkpoint, use_ema=use_ema)
      base_sha256.append(adapters_lib.enable(unet, lora_rank, lora_targets, seed=seed))
    return MMDFinetuner(
        unet, feature_net=feature_net_factory(), schedule=schedule, num_steps=num_steps,
        kernel=kernel, sampler=sampler, timestep_kind=timestep_kind, eta=eta, grad_clip=grad_clip,
        recompute=recompute, dropout=dropout, clip_x0=clip_x0, seed=seed,
        learn_timesteps=learn_timesteps, timesteps_lr=timesteps_lr,
        generated_batch_size=global_batch_size, micro_batches=micro_batches, ema_decay=ema_decay)

  def initialize(trainer):
    source = (f"rank-{lora_rank} adapters on the" if lora_rank else
              checkpoints.restore_unet(trainer.unet, init_checkpoint, use_ema=use_ema))
    training_loop.reset_ema(trainer.ema, trainer.unet.weights)
    logging.info("finetuning %s (%s weights), %s K=%d", init_checkpoint, source, sampler,
                 num_steps)

  # A resumed guarded run goes on at the rate its rewinds so far left (see `validation`).
  rate = learning_rate * (1.0 if validation is None else validation_lib.learning_rate_factor(
      validation_lib.read_history(workdir), validation.lr_backoff))
  run = training_loop.start(
      strategy=strategy, workdir=workdir, unet_factory=unet_factory,
      make_trainer=make_trainer, learning_rate=rate, initialize=initialize)
  trainer = run.trainer
  learned = trainer.learned_timesteps
  # What grids, validations and saves see: the EMA, or the weights (the adapters merged in).
  shipped = trainer.ema or (
      (lambda: adapters_lib.merged_weights(trainer.unet)) if lora_rank else trainer.unet.weights)
  grid = training_loop.GridSampler(
      unet_factory, weights=shipped,
      noise_seed=streams.key(seed, streams.FINETUNE_GRID), num_images=num_sample_images,
      sampler=sampler, timesteps=trainer.current_timesteps,
      alphas_cumprod=schedule.alphas_cumprod, clip_x0=clip_x0)
  validator = None if validation is None else validation_lib.Validator(
      settings=validation, out_dir=run.out_dir,
      sample_fn=training_loop.GridSampler(
          unet_factory, weights=shipped,
          noise_seed=streams.key(seed, streams.FINETUNE_VALIDATION),
          num_images=validation.num_images, sampler=sampler, timesteps=trainer.current_timesteps,
          alphas_cumprod=schedule.alphas_cumprod, clip_x0=clip_x0,
          batch_size=validation.batch_size),
      save_best=lambda path: save(path),
      rewind=lambda path, factor: _rewind(trainer, path, learning_rate=learning_rate * factor,
                                          num_timesteps=schedule.num_timesteps))

  def save(weights_path):
    """What the run ships, at `weights_path` (its adapters `beside` it with adapters)."""
    if lora_rank:
      adapters_lib.save(trainer.unet, adapters_lib.beside(weights_path),
                        base_sha256=base_sha256[0], rank=lora_rank, targets=lora_targets)
    else:
      _save(grid, trainer, weights_path, schedule=schedule, sampler=sampler)
  if validator is not None and validator.exhausted():
    console.note(f"already stopped early: {validation.patience} validations without improvement "
                 f"on step {validator.best['step']}")
  elif run.start_step < finetune_steps:
    if os.path.exists(final_weights):
      raise ParameterError("workdir", f"holds a finished run: {final_weights} exists; move it "
                           f"away or use another {{workdir}} before finetuning further",
                           refs=("workdir",))
    training_loop.train_to(run, max_steps=finetune_steps, dataset_fn=dataset_fn, sample_fn=grid,
                           checkpoint_every=checkpoint_every, log_every=log_every,
                           global_batch_size=global_batch_size, image_tag="samples",
                           describe=None if learned is None else (
                               lambda: learned_lib.describe(learned.values())),
                           validator=validator)
  else:
    console.note(f"already finetuned for {run.start_step} >= {finetune_steps} steps")
  if not os.path.exists(final_weights):
    weights_path = os.path.join(run.out_dir, "unet.weights.h5")
    if validator is None:
      save(weights_path)
    else:
      save(os.path.join(run.out_dir, "unet_last.weights.h5"))
      best = validator.best_weights()
      if os.path.exists(checkpoints.timesteps_path(best)):
        shutil.copyfile(checkpoints.timesteps_path(best), checkpoints.timesteps_path(weights_path))
      if lora_rank:
        best, weights_path = adapters_lib.beside(best), adapters_lib.beside(weights_path)
      with atomic.staged(weights_path) as staging:  # The weights last: they mark a finished run.
        shutil.copyfile(best, staging)
      console.note(f"finetuned weights: the best validated, step {validator.best['step']} "
                   f"({os.path.join(run.out_dir, validation_lib.RECORD)})")
    logging.info("wrote %s", final_weights)
  return trainer


def _save(grid, trainer, path, *, schedule, sampler):
  """The trainer's current weights (and learned timesteps) to `path`, from the grid's UNet, a plain
  copy outside the strategy."""
  timesteps = trainer.current_timesteps()
  if steps_lib.is_continuous(timesteps):  # Learned, or learned by the run it started from.
    # Before the weights: finished weights always have their timesteps beside.
    checkpoints.save_timesteps(path, timesteps, num_timesteps=schedule.num_timesteps,
                               sampler=sampler)
    logging.info("finetuned at %s", learned_lib.describe(timesteps)[0])
  checkpoints.save_weights_h5(grid.synced_unet(), path, overwrite=True)


def _rewind(trainer, path, *, learning_rate, num_timesteps):
  """The trainer back at the weights (and learned timesteps) of `path`, going on at
  `learning_rate` with Adam's momentum zeroed: it points the way that did not improve (its second
  moments, the gradients' scale, are kept). With adapters, they alone go back (those `beside`)."""
  if adapters_lib.adapter_weights(trainer.unet):
    adapters_lib.restore(trainer.unet, adapters_lib.beside(path))
  else:
    checkpoints.restore_unet(trainer.unet, path, parameter="workdir")
  training_loop.reset_ema(trainer.ema, trainer.unet.weights)  # The best weights were the EMA's.
  optimizers = [trainer.optimizer]
  if trainer.learned_timesteps is not None:
    learned = trainer.learned_timesteps
    learned.logits.assign(schedule_lib.timestep_logits(
        checkpoints.learned_timesteps(path, num_timesteps=num_timesteps, parameter="workdir"),
        num_timesteps=num_timesteps))
    optimizers.append(learned.optimizer)
  for optimizer in optimizers:
    for momentum in optimizer._momentums:  # Keras' Adam keeps its first moments here.
      momentum.assign(tf.zeros_like(momentum))
  trainer.optimizer.learning_rate.assign(learning_rate)
