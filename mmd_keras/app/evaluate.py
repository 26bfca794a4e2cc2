"""--mode=evaluate: the base model with the sampler at every K of eval.steps (and with each
training-free sampler of eval.samplers) and each MMD-DDM model at its own K, scored in every feature
space; report.json/.md, fid_vs_steps.png and sample grids."""

import os

from mmd_keras import adapters as adapters_lib
from mmd_keras import checkpoints
from mmd_keras import errors
from mmd_keras import evaluation as evaluate_lib
from mmd_keras import samplers
from mmd_keras import schedule as schedule_lib
from mmd_keras.app import finetune as finetune_app
from mmd_keras.app import inputs
from mmd_keras.app import runs
from mmd_keras.errors import ParameterError


def check_steps(cfg, steps, *, field):
  """Every K of `steps` fits T and the spacing; errors name `field`."""
  with errors.renamed(num_steps=field, kind="sampler.timesteps"):
    for k in steps:
      cfg.timesteps(k)


def extra_samplers(cfg):
  """The (sampler, spacing) pairs of eval.samplers other than the run's own (sampler.sampler,
  sampler.timesteps), whose rows the base model's rows are."""
  own = (cfg.sampler.sampler, cfg.sampler.timesteps)
  return tuple(pair for pair in cfg.eval.samplers if pair != own)


def sampler_label(name, spacing):
  """How a report names the base model sampled by `name` over `spacing` (an eval.samplers row)."""
  return f"{samplers.LABELS[name]} ({spacing})"


def check_samplers(cfg, steps):
  """Every sampler of `extra_samplers` takes sampler.eta (η > 0: DDIM only), and its spacing gives
  K distinct timesteps for every K of `steps`."""
  num_timesteps = cfg.diffusion.num_timesteps
  for name, spacing in extra_samplers(cfg):
    with errors.renamed(sampler="eval.samplers", eta="sampler.eta"):
      samplers.check(name, eta=cfg.sampler.eta)
    for k in steps:
      try:
        schedule_lib.timestep_subsequence(num_timesteps=num_timesteps, num_steps=k, kind=spacing)
      except ParameterError:
        raise ParameterError("eval.samplers", f"entry {name}:{spacing} has no K={k} distinct "
                             f"timesteps out of T={num_timesteps} ({{diffusion.num_timesteps}}); "
                             f"use another spacing", refs=("diffusion.num_timesteps",)) from None


def check_reuse_rows(cfg):
  """Every directory of eval.reuse_rows exists."""
  for folder in cfg.eval.reuse_rows:
    if not os.path.isdir(folder):
      raise ParameterError("eval.reuse_rows", f"entry {folder!r} is not a directory (expected one "
                           f"of finished report rows, e.g. the rows/ of an evaluation)")


def finetuned_timesteps(cfg, k, path):
  """The timesteps learned with the MMD-DDM weights `path` at K = `k`, or None (see
  `runs.learned_timesteps`)."""
  if adapters_lib.is_file(path):  # Adapters are finetuned at fixed timesteps.
    return None
  return runs.learned_timesteps(cfg, path, num_steps=k, parameter="eval.finetuned_checkpoints",
                                steps_field="eval.finetuned_checkpoints")


def sweep(cfg, *, ddim_steps, sampler_steps, finetuned, spaces, num_images, out_dir,
          init_checkpoint, reference_steps=()):
  """Samples and scores every (model, K): the base model with the run's sampler at `ddim_steps` and
  with each of `extra_samplers` at `sampler_steps`, with DDIM (uniform) at `reference_steps`, each
  finetuned model at its K; prints the table; returns the report."""
  base = runs.restored_unet(cfg, init_checkpoint)
  # A directory stands for its latest checkpoint: the report names (and hashes) that one.
  base_path = checkpoints.latest(init_checkpoint)
  s = cfg.sampler
  if (s.sampler, s.timesteps) == ("ddim", "uniform"):
    ddim_steps, reference_steps = sorted({*ddim_steps, *reference_steps}), ()
  models = [evaluate_lib.ModelSpec(samplers.LABELS[s.sampler], base, tuple(ddim_steps),
                                   path=base_path)]
  if reference_steps:
    models.append(evaluate_lib.ModelSpec(samplers.LABELS["ddim"], base, tuple(reference_steps),
                                         path=base_path, sampler="ddim", timesteps="uniform"))
  models += [evaluate_lib.ModelSpec(sampler_label(name, spacing), base, tuple(sampler_steps),
                                    path=base_path, sampler=name, timesteps=spacing)
             for name, spacing in extra_samplers(cfg)]
  for k, path in sorted(finetuned.items()):
    unet = runs.finetuned_unet(cfg, path)
    models.append(evaluate_lib.ModelSpec(evaluate_lib.FINETUNED, unet, (k,), path=path,
                                         timesteps=finetuned_timesteps(cfg, k, path),
                                         finetune=finetune_app.recorded_settings(path)))
  real_set, real_batches = inputs.real_set(cfg)
  runs.write_record(cfg, out_dir)
  report = evaluate_lib.run(
      models=models, feature_spaces=spaces, real_images=real_batches,
      schedule=cfg.diffusion.schedule(), num_images=num_images, seed=cfg.run.seed,
      out_dir=out_dir, sampler=s.sampler, timestep_kind=s.timesteps, eta=s.eta, clip_x0=s.clip_x0,
      batch_size=s.batch_size, real_set=real_set,
      cache_dir=os.path.join(cfg.run.workdir, "reference"), reuse_dirs=cfg.eval.reuse_rows)
  print(evaluate_lib.markdown_table(report), end="")
  print(f"report: {os.path.join(out_dir, 'report.md')}")
  return report


def run(cfg):
  steps = cfg.eval.steps
  check_steps(cfg, steps, field="eval.steps")
  check_samplers(cfg, steps)
  check_reuse_rows(cfg)
  inputs.check_eval_split(cfg, num_images=cfg.eval.num_images, images_field="eval.num_images")
  finetuned = runs.finetuned_checkpoints(cfg, steps)
  for k, path in finetuned.items():
    finetuned_timesteps(cfg, k, path)
  inputs.check_feature_spaces(cfg)
  init_checkpoint = runs.init_checkpoint(cfg)
  out_dir = runs.mode_dir(cfg.run, "evaluate")
  spaces = inputs.feature_spaces(cfg, num_images=cfg.eval.num_images,
                                 images_field="eval.num_images")
  with errors.renamed(num_images="eval.num_images"):
    sweep(cfg, ddim_steps=steps, sampler_steps=steps, finetuned=finetuned, spaces=spaces,
          num_images=cfg.eval.num_images, out_dir=out_dir, init_checkpoint=init_checkpoint)
