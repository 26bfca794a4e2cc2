"""Base DDPM training: ε-prediction MSE on uniformly drawn t, with an EMA of the weights.

Randomness is stateless and keyed by (seed, step): t and ε are drawn for the whole global batch and
each replica takes its slice, so N replicas take the steps of one device on the same global batch
(dropout masks are keyed by (seed, step, replica)). A resumed run draws exactly what an
uninterrupted one would.
"""

import keras
import tensorflow as tf
from absl import logging

from mmd_keras import checkpoints
from mmd_keras import console
from mmd_keras import schedule as schedule_lib
from mmd_keras import streams
from mmd_keras import training_loop


class DDPMTrainer(keras.Model):
  """Trains `unet` on L = E_{t, ε} ‖ε − ε_θ(sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε, t)‖²."""

  learned_timesteps = None  # Pretraining samples at fixed timesteps.

  def __init__(self, unet, *, schedule, ema_decay, grad_clip=None, seed=0, **kwargs):
    super().__init__(**kwargs)
    self.unet = unet
    self.grad_clip = grad_clip
    self.alphas_cumprod = schedule.alphas_cumprod_tf()
    self.num_timesteps = schedule.num_timesteps
    self.ema_decay = ema_decay
    self.seed = seed
    self.ema = training_loop.make_ema(unet.weights)
    self.loss_tracker = keras.metrics.Mean(name="loss")
    # Nothing to build: the UNet comes built, and under a strategy fit() would otherwise try to
    # trace a forward `call` this trainer does not have.
    self.built = True

  @property
  def metrics(self):
    return [self.loss_tracker]

  def train_step(self, data):
    # fit() on a dataset of images passes the images; train_on_batch passes (x, None, None).
    x0, _, _ = keras.utils.unpack_x_y_sample_weight(data)
    replica = tf.distribute.get_replica_context()
    num_replicas = replica.num_replicas_in_sync
    batch = tf.shape(x0)[0]
    global_batch = batch * num_replicas
    step = self.optimizer.iterations
    # t and ε of the whole global batch, the same on every replica; replica r holds examples
    # r·b … r·b + b − 1 of it (how a global batch is split). With replica 0's seeds one device
    # draws what it drew before t and ε were shared.
    shared = tf.random.experimental.stateless_split(
        streams.step_seed(self.seed, step, replica_id=0), 3)
    first = tf.cast(replica.replica_id_in_sync_group, tf.int32) * batch
    t = tf.random.stateless_uniform([global_batch], shared[0], 0, self.num_timesteps,
                                    dtype=tf.int32)[first:first + batch]
    noise = tf.random.stateless_normal(
        tf.concat([[global_batch], tf.shape(x0)[1:]], axis=0), shared[1])[first:first + batch]
    dropout_seed = tf.random.experimental.stateless_split(
        streams.step_seed(self.seed, step), 3)[2]
    x_t = schedule_lib.q_sample(x0, t, noise, alphas_cumprod=self.alphas_cumprod)
    with tf.GradientTape() as tape:
      eps = self.unet(x_t, t, training=True, dropout_seed=dropout_seed)
      per_example = tf.reduce_mean(tf.square(noise - eps), axis=[1, 2, 3])
      # This replica's share of the global mean (the sum over replicas is the global mean).
      loss = tf.reduce_sum(per_example) / tf.cast(global_batch, tf.float32)
    weights = self.unet.trainable_weights
    grads = replica.all_reduce(tf.distribute.ReduceOp.SUM, tape.gradient(loss, weights))
    grad_norm = training_loop.apply_global_gradients(self.optimizer, grads, weights,
                                                     grad_clip=self.grad_clip)
    training_loop.update_ema(self.ema, self.unet.weights, self.ema_decay)
    self.loss_tracker.update_state(tf.reduce_mean(per_example))
    return training_loop.step_logs(self, loss=tf.reduce_mean(per_example), grad_norm=grad_norm)


def train(*, unet_factory, dataset_fn, schedule, workdir, train_steps, learning_rate, ema_decay,
          checkpoint_every, log_every, grad_clip, seed, sample_steps, num_sample_images,
          strategy, global_batch_size, init_checkpoint=None, jit_compile=False):
  """Trains (or resumes) a base DDPM in `workdir` to exactly `train_steps`; returns the trainer.

  `dataset_fn(start_batch)` yields the global batches of the run from batch `start_batch` on.
  """
  def initialize(trainer):
    if init_checkpoint:
      source = checkpoints.restore_unet(trainer.unet, init_checkpoint, use_ema=True)
      training_loop.reset_ema(trainer.ema, trainer.unet.weights)
      logging.info("initialised from %s (%s weights)", init_checkpoint, source)

  run = training_loop.start(
      strategy=strategy, workdir=workdir, unet_factory=unet_factory,
      make_trainer=lambda unet: DDPMTrainer(unet, schedule=schedule, ema_decay=ema_decay,
                                            grad_clip=grad_clip, seed=seed),
      learning_rate=learning_rate, initialize=initialize, jit_compile=jit_compile)
  trainer = run.trainer
  if run.start_step >= train_steps:
    console.note(f"already trained for {run.start_step} >= {train_steps} steps")
    return trainer
  grid = training_loop.GridSampler(
      unet_factory, weights=trainer.ema, noise_seed=streams.key(seed, streams.PRETRAIN_GRID),
      num_images=num_sample_images, timesteps=schedule.timesteps(sample_steps),
      alphas_cumprod=schedule.alphas_cumprod, clip_x0=True)
  training_loop.train_to(run, max_steps=train_steps, dataset_fn=dataset_fn, sample_fn=grid,
                         checkpoint_every=checkpoint_every, log_every=log_every,
                         global_batch_size=global_batch_size, image_tag="ema_samples")
  return trainer
