"""--mode=pretrain: trains (or resumes) the base DDPM in <workdir>/pretrain."""

from mmd_keras import checkpoints
from mmd_keras import distribute
from mmd_keras import pretrain as pretrain_lib
from mmd_keras.app import inputs
from mmd_keras.app import runs
from mmd_keras.app import runtime

# Pretraining's progress grids: 64 images of a 100-step DDIM (or T steps when T < 100).
SAMPLE_STEPS = 100
SAMPLE_IMAGES = 64


def run(cfg):
  if cfg.run.init_checkpoint and "://" not in cfg.run.init_checkpoint:
    checkpoints.check_readable(cfg.run.init_checkpoint)
  strategy = runtime.strategy_for(cfg, batch_size=cfg.data.batch_size,
                                  batch_field="data.batch_size")
  runs.check_resume(cfg, "pretrain")
  run_dir = runs.mode_dir(cfg.run, "pretrain")
  dataset_fn = inputs.training_data(cfg, batch_size=cfg.data.batch_size,
                                    batch_field="data.batch_size")
  if distribute.is_chief(strategy):  # Workers of a cluster share the workdir: one record.
    runs.write_record(cfg, run_dir)
  pretrain_lib.train(
      unet_factory=cfg.unet.factory(), dataset_fn=dataset_fn, schedule=cfg.diffusion.schedule(),
      global_batch_size=cfg.data.batch_size, workdir=run_dir, train_steps=cfg.pretrain.steps,
      learning_rate=cfg.pretrain.learning_rate, ema_decay=cfg.pretrain.ema_decay,
      checkpoint_every=cfg.run.checkpoint_every, log_every=cfg.run.log_every,
      grad_clip=cfg.pretrain.grad_clip, seed=cfg.run.seed,
      sample_steps=min(SAMPLE_STEPS, cfg.diffusion.num_timesteps),
      num_sample_images=SAMPLE_IMAGES, strategy=strategy,
      init_checkpoint=cfg.run.init_checkpoint, jit_compile=cfg.pretrain.jit_compile)
