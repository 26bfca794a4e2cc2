"""Base DDPM training: ε-prediction MSE on uniformly drawn t, with an EMA of the weights.

Randomness is stateless and keyed by (seed, step): t and ε are drawn for the whole global batch and
each replica takes its slice, so N replicas take the steps of one device on the same global batch
(dropout masks are keyed by (seed, step, replica)). A resumed run draws exactly what an
uninterrupted one would.
"""

import os

import keras
import tensorflow as tf
from absl import logging

from mmd_keras import checkpoints
from mmd_keras import ddim
from mmd_keras import distribute
from mmd_keras import schedule as schedule_lib
from mmd_keras import streams
from mmd_keras import training_loop


def make_ema(weights):
  """EMA copies of `weights`: every replica computes the same value, the first one's is kept."""
  return [keras.Variable(w, trainable=False, name=w.name + "_ema",
                         aggregation="only_first_replica") for w in weights]


def update_ema(ema, weights, decay):
  """ema ← decay·ema + (1 − decay)·w."""
  for e, w in zip(ema, weights):
    e.assign(decay * e + (1.0 - decay) * w)


class DDPMTrainer(keras.Model):
  """Trains `unet` on L = E_{t, ε} ‖ε − ε_θ(sqrt(ᾱ_t) x0 + sqrt(1 − ᾱ_t) ε, t)‖²."""

  def __init__(self, unet, *, schedule, ema_decay=0.9999, grad_clip=None, seed=0, **kwargs):
    super().__init__(**kwargs)
    self.unet = unet
    self.grad_clip = grad_clip
    self.alphas_cumprod = schedule.alphas_cumprod_tf()
    self.num_timesteps = schedule.num_timesteps
    self.ema_decay = ema_decay
    self.seed = seed
    self.ema = make_ema(unet.weights)
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
    grad_norm = tf.linalg.global_norm(grads)
    # Clipped here, on the global gradient: Keras' own `global_clipnorm` clips each replica's
    # partial gradient before the all-reduce, which is not the single-device update.
    if self.grad_clip:
      grads, _ = tf.clip_by_global_norm(grads, self.grad_clip, use_norm=grad_norm)
    # The optimizer all-reduces (SUM) once more: hand it 1/N of the global gradient.
    self.optimizer.apply_gradients(zip([g / num_replicas for g in grads], weights))
    update_ema(self.ema, self.unet.weights, self.ema_decay)
    self.loss_tracker.update_state(tf.reduce_mean(per_example))
    return distribute.fit_logs({
        "loss": self.loss_tracker.result(), "step_loss": tf.reduce_mean(per_example),
        "step_grad_norm": grad_norm,
        "nonfinite": training_loop.nonfinite_replicas(loss, grad_norm)})

  def ema_unet(self, like):
    """`like` (a UNet of the same architecture) loaded with the EMA weights."""
    for target, e in zip(like.weights, self.ema):
      target.assign(e)
    return like


def train(*, unet_factory, dataset_fn, schedule, workdir, train_steps, learning_rate, ema_decay,
          checkpoint_every, log_every, grad_clip, seed, sample_steps, num_sample_images,
          strategy, global_batch_size, init_checkpoint=None, jit_compile=False):
  """Trains (or resumes) a base DDPM in `workdir` to exactly `train_steps`; returns the trainer.

  `dataset_fn(start_batch)` yields the global batches of the run from batch `start_batch` on.
  """
  with strategy.scope():
    unet = unet_factory().build_for_inference()
    trainer = DDPMTrainer(unet, schedule=schedule, ema_decay=ema_decay, grad_clip=grad_clip,
                          seed=seed)
    optimizer = keras.optimizers.Adam(learning_rate=learning_rate)
    trainer.compile(optimizer=optimizer, jit_compile=jit_compile)
    optimizer.build(unet.trainable_weights)
  ckpt = checkpoints.training_checkpoint(unet=unet, ema=trainer.ema, optimizer=optimizer)
  out_dir = distribute.write_dir(workdir, strategy)  # `workdir` on the chief, else a throwaway.
  manager = tf.train.CheckpointManager(ckpt, os.path.join(out_dir, "checkpoints"), max_to_keep=3)

  def initialize():
    if init_checkpoint:
      source = checkpoints.restore_unet(unet, init_checkpoint, use_ema=True)
      for e, w in zip(trainer.ema, unet.weights):
        e.assign(w)
      logging.info("initialised from %s (%s weights)", init_checkpoint, source)

  # Every worker resumes from the chief's checkpoints.
  training_loop.restore_or_initialize(manager, initialize, learning_rate=learning_rate,
                                      checkpoint_dir=os.path.join(workdir, "checkpoints"))
  start = training_loop.step_of(trainer)
  distribute.check_same_start(start, strategy, workdir=workdir)
  if start >= train_steps:
    logging.info("already trained for %d >= --train_steps=%d steps", start, train_steps)
    return trainer

  sampler_unet = unet_factory().build_for_inference()
  timesteps = schedule.timesteps(sample_steps)
  noise = tf.random.stateless_normal(
      [num_sample_images, unet.image_size, unet.image_size, unet.channels],
      seed=streams.key(seed, streams.PRETRAIN_GRID))
  # A plain call: nothing for AutoGraph to convert (and it fails to find this lambda's source).
  eps_fn = tf.function(lambda x, t: sampler_unet(x, t), autograph=False)

  def sample_fn():
    trainer.ema_unet(sampler_unet)
    return ddim.sample(eps_fn, noise, timesteps=timesteps,
                       alphas_cumprod=schedule.alphas_cumprod, clip_x0=True)

  progress = training_loop.Progress(manager=manager, trainer=trainer,
                                    weights=unet.weights + trainer.ema, sample_fn=sample_fn,
                                    workdir=out_dir, every=checkpoint_every, log_every=log_every,
                                    global_batch=global_batch_size, image_tag="ema_samples")
  # Each worker takes its part of every global batch.
  sharded = lambda start_batch: distribute.shard_global_batches(dataset_fn(start_batch))
  training_loop.fit(trainer=trainer, dataset_fn=sharded, max_steps=train_steps,
                    progress=progress)
  return trainer
