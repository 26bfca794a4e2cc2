"""MMD finetuning (Aiello et al. 2023): train the K-step DDIM sampler end to end.

  z ~ N(0, I) ─► x̂0 = DDIM_K(ε_θ, z) ─► φ(x̂0), φ(x_real) ─► L(θ) = MMD²_u(φ(x̂0), φ(x_real))

and θ ← Adam(∇_θ L) through all K UNet calls. Each call runs under `tf.recompute_grad`: the backward
pass replays one UNet forward at a time, so activation memory is that of one call instead of K.

Under a tf.distribute strategy the features of all replicas are gathered, so every replica computes
the MMD² of the *global* batch (the estimator is not a mean over examples: a per-replica MMD² would
be a different, noisier loss).
"""

import os

import keras
import tensorflow as tf
from absl import logging

from mmd_keras import checkpoints
from mmd_keras import ddim
from mmd_keras import distribute
from mmd_keras import mmd
from mmd_keras import streams
from mmd_keras import training_loop
from mmd_keras.errors import UserError


def example_noise(shape, *, seed, step):
  """x_T of this replica's examples: z_g ~ N(0, I) seeded by (seed, step, g), g the global index.

  Replica r holds global examples r·b … r·b + b − 1 (how `experimental_distribute_dataset` splits a
  batch), so the global batch's noise is the same however many replicas share it.
  """
  replica = tf.distribute.get_replica_context()
  replica_id = replica.replica_id_in_sync_group if replica is not None else 0
  batch = shape[0]
  first = tf.cast(replica_id, tf.int32) * batch
  base = streams.fold_in(seed, streams.FINETUNE_EXAMPLES, step)
  # The stateless random ops have no vectorised form; pfor's while_loop fallback is what we want,
  # without its warning at every trace.
  seeds = tf.vectorized_map(lambda g: tf.random.experimental.stateless_fold_in(base, g),
                            first + tf.range(batch), warn=False)
  return tf.vectorized_map(lambda s: tf.random.stateless_normal(shape[1:], s), seeds, warn=False)


class MMDFinetuner(keras.Model):
  """Minimises MMD²_u(φ(DDIM_K(ε_θ, z)), φ(x_real)) over all UNet weights θ."""

  def __init__(self, unet, *, feature_net, schedule, num_steps, kernel, timestep_kind="uniform",
               eta=0.0, grad_clip=None, recompute=True, dropout=False, clip_x0=False, seed=0,
               **kwargs):
    super().__init__(**kwargs)
    self.unet = unet
    self.feature_net = feature_net
    self.kernel = kernel
    self.timesteps = schedule.timesteps(num_steps, timestep_kind)  # Raises for K outside [1, T].
    self.alphas_cumprod = schedule.alphas_cumprod_tf()
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
    return [self.mmd2_tracker, self.grad_norm_tracker]

  def _eps_fn(self, dropout_seed):
    """ε_θ(x, t) for `ddim.sample`; dropout masks are a function of (dropout_seed, t) alone."""
    def call(x, t, seed):
      if self.dropout:
        return self.unet(x, t, training=True, dropout_seed=seed)
      return self.unet(x, t, training=False)

    if self.recompute:
      # The seed is an explicit input: the replayed forward pass draws the same masks. t and the
      # seed are arguments, not closed over, because recompute_grad makes only its arguments wait
      # for the incoming gradient; closed-over inputs would let grappler merge the replayed masks
      # with the forward ones and keep K calls' masks alive. (The tape warns, at most 5 times per
      # process, that it watches integer arguments.)
      call = tf.recompute_grad(call)

    def eps(x, t):
      return call(x, t, tf.random.experimental.stateless_fold_in(dropout_seed, t[0]))
    return eps

  def sample(self, z, *, seed):
    """x̂0 = DDIM_K(ε_θ, z), differentiable in θ; `seed` fixes dropout masks and η-noise."""
    dropout_seed, eta_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    return ddim.sample(self._eps_fn(dropout_seed), z, timesteps=self.timesteps,
                       alphas_cumprod=self.alphas_cumprod, eta=self.eta, clip_x0=self.clip_x0,
                       seed=eta_seed)

  def compute_gradients(self, x_real, z=None):
    """(MMD² of the global batch, ∇_θ MMD² summed over replicas) for this replica's real batch.

    `z` defaults to `example_noise` of this step.
    """
    replica = tf.distribute.get_replica_context()
    num_replicas = replica.num_replicas_in_sync
    step = self.optimizer.iterations
    if z is None:
      z = example_noise(tf.shape(x_real), seed=self.seed, step=step)
    real_features = replica.all_gather(tf.stop_gradient(self.feature_net(x_real)), axis=0)
    weights = self.unet.trainable_weights
    with tf.GradientTape() as tape:
      x_fake = self.sample(z, seed=streams.step_seed(self.seed, step))
      fake_features = replica.all_gather(self.feature_net(x_fake), axis=0)
      loss = mmd.mmd2_unbiased(fake_features, real_features, kernel=self.kernel)
      # all_gather's gradient sums the (identical) upstream gradients of all N replicas, so the
      # local gradient of L/N is exactly this replica's examples' share of ∇L.
      scaled_loss = loss / num_replicas
    grads = tape.gradient(scaled_loss, weights)
    return loss, replica.all_reduce(tf.distribute.ReduceOp.SUM, grads)

  def train_step(self, x_real):
    loss, grads = self.compute_gradients(x_real)
    grad_norm = tf.linalg.global_norm(grads)
    # Clipped here, on the global gradient: Keras' own `global_clipnorm` clips each replica's
    # partial gradient before the all-reduce, which is not the single-device update.
    if self.grad_clip:
      grads, _ = tf.clip_by_global_norm(grads, self.grad_clip, use_norm=grad_norm)
    # The optimizer all-reduces (SUM) once more: hand it 1/N of the global gradient.
    num_replicas = tf.distribute.get_replica_context().num_replicas_in_sync
    self.optimizer.apply_gradients(
        zip([g / num_replicas for g in grads], self.unet.trainable_weights))
    self.mmd2_tracker.update_state(loss)
    self.grad_norm_tracker.update_state(grad_norm)
    return distribute.fit_logs({
        **{m.name: m.result() for m in self.metrics}, "step_loss": loss,
        "step_grad_norm": grad_norm,
        "nonfinite": training_loop.nonfinite_replicas(loss, grad_norm)})


def _check_positive(flag, value):
  if not value > 0:
    raise UserError(f"--{flag} must be > 0, got {value}")


def finetune(*, unet_factory, feature_net_factory, kernel, dataset_fn, schedule, workdir, num_steps,
             finetune_steps, learning_rate, grad_clip, global_batch_size, checkpoint_every,
             log_every, seed, strategy, init_checkpoint, batch_flag="--finetune_batch_size",
             use_ema=True, timestep_kind="uniform", eta=0.0, clip_x0=False, recompute=True,
             dropout=False, num_sample_images=64):
  """MMD-finetunes (or resumes) the UNet in `workdir`; writes `<workdir>/unet.weights.h5` at the end.

  `dataset_fn(start_batch)` yields the global batches of real images from batch `start_batch` on;
  Keras' fit splits them across replicas. `batch_flag` is the flag that set `global_batch_size`
  (--batch_size when --finetune_batch_size is not given), for the error messages.
  """
  batch_flag = batch_flag.lstrip("-")
  for flag, value in (("learning_rate", learning_rate), ("finetune_steps", finetune_steps),
                      (batch_flag, global_batch_size), ("checkpoint_every", checkpoint_every),
                      ("log_every", log_every)):
    _check_positive(flag, value)
  if grad_clip < 0:
    raise UserError(f"--grad_clip must be >= 0 (0 disables clipping), got {grad_clip}")
  distribute.check_global_batch(global_batch_size, strategy, flag=batch_flag)
  final_weights = os.path.join(workdir, "unet.weights.h5")
  out_dir = distribute.write_dir(workdir, strategy)  # `workdir` on the chief, else a throwaway.
  with strategy.scope():
    unet = unet_factory().build_for_inference()
    trainer = MMDFinetuner(unet, feature_net=feature_net_factory(), schedule=schedule,
                           num_steps=num_steps, kernel=kernel, timestep_kind=timestep_kind,
                           eta=eta, grad_clip=grad_clip, recompute=recompute, dropout=dropout,
                           clip_x0=clip_x0, seed=seed)
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    trainer.compile(optimizer=optimizer, jit_compile=False)
    optimizer.build(unet.trainable_weights)
  ckpt = checkpoints.training_checkpoint(unet=unet, optimizer=optimizer)
  manager = tf.train.CheckpointManager(ckpt, os.path.join(out_dir, "checkpoints"), max_to_keep=3)

  def initialize():
    source = checkpoints.restore_unet(unet, init_checkpoint, use_ema=use_ema)
    logging.info("finetuning %s (%s weights), K=%d", init_checkpoint, source, num_steps)

  # Every worker resumes from the chief's checkpoints.
  training_loop.restore_or_initialize(manager, initialize, learning_rate=learning_rate,
                                      checkpoint_dir=os.path.join(workdir, "checkpoints"))
  start = training_loop.step_of(trainer)
  distribute.check_same_start(start, strategy, workdir=workdir)

  sampler_unet = unet_factory().build_for_inference()
  noise = tf.random.stateless_normal(
      [num_sample_images, unet.image_size, unet.image_size, unet.channels],
      seed=streams.key(seed, streams.FINETUNE_GRID))
  # A plain call: nothing for AutoGraph to convert (and it fails to find this lambda's source).
  eps_fn = tf.function(lambda x, t: sampler_unet(x, t), autograph=False)

  def sync_sampler():
    for target, source in zip(sampler_unet.weights, unet.weights):
      target.assign(source)
    return sampler_unet

  def sample_fn():
    sync_sampler()
    return ddim.sample(eps_fn, noise, timesteps=trainer.timesteps,
                       alphas_cumprod=schedule.alphas_cumprod, clip_x0=clip_x0)

  if start < finetune_steps:
    if os.path.exists(final_weights):
      raise UserError(f"{final_weights} exists (a finished run); move it away or use another "
                      f"--workdir before finetuning further")
    progress = training_loop.Progress(manager=manager, trainer=trainer, weights=unet.weights,
                                      sample_fn=sample_fn, workdir=out_dir,
                                      every=checkpoint_every, log_every=log_every,
                                      global_batch=global_batch_size, image_tag="samples")
    # Each worker takes its part of every global batch.
    sharded = lambda start_batch: distribute.shard_global_batches(dataset_fn(start_batch))
    training_loop.fit(trainer=trainer, dataset_fn=sharded, max_steps=finetune_steps,
                      progress=progress)
  else:
    logging.info("already finetuned for %d >= --finetune_steps=%d steps", start, finetune_steps)
  if not os.path.exists(final_weights):
    checkpoints.save_weights_h5(sync_sampler(), os.path.join(out_dir, "unet.weights.h5"))
    logging.info("wrote %s", final_weights)
  return trainer
