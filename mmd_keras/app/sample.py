"""--mode=sample: images of the K-step sampler, as a grid (.png) and an array (.npz); weights
finetuned with learned timesteps are sampled at those (`runs.learned_timesteps`), --adapters merged
into the weights."""

import os

import numpy as np

from mmd_keras import ddim
from mmd_keras import grid
from mmd_keras import sampling
from mmd_keras.app import runs


def run(cfg):
  init_checkpoint = runs.init_checkpoint(cfg)
  s = cfg.sampler
  learned = runs.learned_timesteps(cfg, init_checkpoint, num_steps=s.num_steps)
  run_dir = runs.mode_dir(cfg.run, "sample")
  unet = runs.restored_unet(cfg, init_checkpoint, adapters=cfg.run.adapters)
  runs.write_record(cfg, run_dir)
  images = sampling.generate(unet, num_images=s.num_images, num_steps=s.num_steps,
                             schedule=cfg.diffusion.schedule(), sampler=s.sampler,
                             timestep_kind=s.timesteps if learned is None else learned, eta=s.eta,
                             clip_x0=s.clip_x0, seed=cfg.run.seed, batch_size=s.batch_size)
  name = f"samples_{s.sampler}_k{s.num_steps}_eta{s.eta:g}_seed{cfg.run.seed}"
  grid.write_png(os.path.join(run_dir, name + ".png"), images[:256],
                 scale=max(1, 64 // images.shape[1]))
  np.savez_compressed(os.path.join(run_dir, name + ".npz"),
                      images=np.asarray(ddim.to_uint8(images)))
  print(f"wrote {s.num_images} samples to {os.path.join(run_dir, name)}.png/.npz")
