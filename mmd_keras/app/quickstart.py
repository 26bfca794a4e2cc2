"""--mode=quickstart: finetune at K from the base model, compare the base model's sampler at K (and
the training-free samplers of --eval_samplers at K) / MMD-DDM-K / DDIM-100 on a small evaluation,
export the finetuned sampler. A rerun reuses a finetune (of this mode or --mode=finetune) only if
the settings it was made with (its record beside it) are the same."""

import os

from mmd_keras import adapters
from mmd_keras import checkpoints
from mmd_keras import errors
from mmd_keras import provenance
from mmd_keras import samplers
from mmd_keras.app import evaluate
from mmd_keras.app import export
from mmd_keras.app import finetune
from mmd_keras.app import inputs
from mmd_keras.app import runs
from mmd_keras.errors import ParameterError

REFERENCE_STEPS = 100  # The many-step DDIM row, whatever sampler the run finetunes through.


def reference_steps(cfg):
  """The K of the many-step DDIM row: REFERENCE_STEPS, or T if smaller."""
  return min(REFERENCE_STEPS, cfg.diffusion.num_timesteps)


def check_reuse(cfg, settings):
  """A ParameterError if the workdir holds a finetune at this K that other (or unrecorded)
  settings made, in any of its runs, since this run would reuse it."""
  run_dir = os.path.join(cfg.run.workdir, finetune.run_dir_name(cfg))
  if not any(os.path.exists(os.path.join(run_dir, name))
             for name in (runs.product_name(cfg), "checkpoints")):
    return
  k = cfg.sampler.num_steps
  retry = f"pass another {{run.workdir}} (or delete {run_dir})"
  records, record = [], runs.read_record(run_dir)
  while record is not None:  # This run's record, then those of the runs it resumed.
    records.append(record)
    record = record.get("before")
  if not records or any(finetune.DECIDING not in r for r in records):
    raise ParameterError("run.workdir", f"holds a finetune at K={k} whose settings were not "
                         f"recorded (made by older code); {retry}", value=cfg.run.workdir,
                         refs=("run.workdir",))
  for record in records:
    saved = dict(provenance.FINETUNE_DEFAULTS, **record[finetune.DECIDING])
    for name, value in settings.items():
      if saved.get(name) != value:
        raise ParameterError("run.workdir", f"holds a finetune at K={k} made with another "
                             f"{{{name}}} ({saved.get(name)} then, {value} now), which this run "
                             f"would reuse; {retry}", value=cfg.run.workdir,
                             refs=(name, "run.workdir"))


def run(cfg):
  k = cfg.sampler.num_steps
  reference_k = reference_steps(cfg)
  num_images = cfg.eval.quickstart_images
  # The evaluation's and export's settings are checked before minutes of finetuning.
  inputs.check_eval_split(cfg, num_images=num_images, images_field="eval.quickstart_images")
  plan = finetune.check(cfg)
  evaluate.check_steps(cfg, (reference_k,), field="diffusion.num_timesteps")
  evaluate.check_samplers(cfg, (k,))
  evaluate.check_reuse_rows(cfg)
  export.check(cfg)
  spaces = inputs.feature_spaces(cfg, num_images=num_images, images_field="eval.quickstart_images",
                                 skip_too_wide=True)
  # A directory stands for its latest checkpoint: that one is what the finetune starts from.
  settings = provenance.finetune_settings(
      cfg, init_checkpoint=checkpoints.latest(plan.init_checkpoint))
  check_reuse(cfg, settings)
  print(f"[1/3] MMD finetuning at K={k} ({cfg.finetune.steps} steps)")
  finetuned = finetune.run(cfg, plan)
  base = samplers.LABELS[cfg.sampler.sampler]
  others = "".join(f", {evaluate.sampler_label(*pair)} K={k}"
                   for pair in evaluate.extra_samplers(cfg))
  print(f"[2/3] evaluating {base} K={k}{others}, MMD-DDM K={k} and DDIM K={reference_k} on "
        f"{num_images} images")
  compare(cfg, finetuned={k: finetuned}, spaces=spaces, init_checkpoint=plan.init_checkpoint)
  print(f"[3/3] exporting the MMD-DDM K={k} sampler")
  if adapters.is_file(finetuned):
    export.run(cfg, init_checkpoint=plan.init_checkpoint, adapters=finetuned,
               next_free_version=True)
  else:
    export.run(cfg, init_checkpoint=finetuned, next_free_version=True)


def compare(cfg, *, finetuned, spaces, init_checkpoint):
  """The quickstart's report in <workdir>/quickstart: the base model with the run's sampler at K,
  with the training-free samplers of eval.samplers at K (the comparison MMD-DDM is made for) and
  with DDIM at the reference K, and the `finetuned` models ({K: path}); returns it."""
  k = cfg.sampler.num_steps
  with errors.renamed(num_images="eval.quickstart_images"):
    return evaluate.sweep(
        cfg, ddim_steps=(k,), reference_steps=(reference_steps(cfg),),
        sampler_steps=(k,), finetuned=finetuned, spaces=spaces,
        num_images=cfg.eval.quickstart_images, out_dir=runs.mode_dir(cfg.run, "quickstart"),
        init_checkpoint=init_checkpoint)
