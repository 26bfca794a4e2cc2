"""--mode=finetune: MMD finetuning of the base model at K = sampler.num_steps in
<workdir>/finetune_k<K> (finetune_<sampler>_k<K> through another sampler than DDIM). The run's
record (`runs.write_record`, settings.json beside the weights) holds, under DECIDING, the settings
that decide its weights: evaluation reports carry them, so `merge_reports` can tell seeds of one
setting from different settings, and the quickstart reuses a finetune only if they are its own."""

import dataclasses
import json
import os

from mmd_keras import adapters as adapters_lib
from mmd_keras import checkpoints
from mmd_keras import distribute
from mmd_keras import errors
from mmd_keras import finetune as finetune_lib
from mmd_keras import provenance
from mmd_keras import schedule as schedule_lib
from mmd_keras.app import inputs
from mmd_keras.app import runs
from mmd_keras.app import runtime
from mmd_keras.errors import ParameterError

DECIDING = "decides_weights"  # The record's key of `provenance.finetune_settings`.
OLD_RECORD = "finetune_settings.json"  # What older code wrote beside the weights instead.


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the checks of a finetune found: the strategy it runs under, its starting weights and the
  timesteps it samples at (those learned with the starting weights, else `sampler.timesteps`)."""
  strategy: object
  init_checkpoint: str
  timesteps: object


def run_dir_name(cfg):
  return runs.finetune_dir_name(cfg, cfg.sampler.num_steps)


def check(cfg):
  """Every setting and input file of the finetune, before any data is read."""
  # Only a finetune needs two images (--batch_size=1 is a valid pretraining batch).
  f = cfg.finetune
  for field, value in (("finetune.batch_size", f.batch_size),
                       ("finetune.real_batch_size", f.real_batch_size)):
    if value < 2:
      raise ParameterError(field, "must be >= 2 (the unbiased MMD² compares at least two images "
                           "per batch)", value=value)
  inputs.check_feature_network(cfg, cfg.features.feature_net)
  if cfg.finetune.validate:
    inputs.check_validation(cfg)
  strategy = runtime.strategy_for(cfg, batch_size=f.batch_size,
                                  batch_field="finetune.batch_size")
  runtime.strategy_for(cfg, batch_size=f.real_batch_size, batch_field="finetune.real_batch_size")
  if (f.batch_size // strategy.num_replicas_in_sync) % f.micro_batches:
    raise ParameterError("finetune.micro_batches", f"must divide each replica's generated batch "
                         f"({{finetune.batch_size}}={f.batch_size} over "
                         f"{strategy.num_replicas_in_sync} replica(s))", value=f.micro_batches,
                         refs=("finetune.batch_size",))
  if f.lora_rank:
    with errors.renamed(lora_rank="finetune.lora_rank", lora_targets="finetune.lora_targets"):
      unet = cfg.unet.factory()().build_for_inference()
      adapters_lib.check_rank(f.lora_rank, adapters_lib.rank_limits(unet, f.lora_targets))
  init_checkpoint = runs.init_checkpoint(cfg)
  learned = runs.learned_timesteps(cfg, init_checkpoint, num_steps=cfg.sampler.num_steps)
  resumed = runs.check_resume(cfg, run_dir_name(cfg))
  _check_resumed_timesteps(cfg, resumed)
  _check_resumed_ema(cfg, resumed)
  return Plan(strategy=strategy, init_checkpoint=init_checkpoint,
              timesteps=cfg.sampler.timesteps if learned is None else learned)


def _check_resumed_ema(cfg, prefix):
  """A rerun keeps an EMA exactly if the run it resumes did (the checkpoint holds it or not)."""
  if prefix is None or checkpoints.has_ema(prefix) == bool(cfg.finetune.ema_decay):
    return
  raise ParameterError("finetune.ema_decay", f"is {'set' if cfg.finetune.ema_decay else '0'}, but "
                       f"{prefix}, which this rerun resumes from, was finetuned "
                       f"{'without' if cfg.finetune.ema_decay else 'with'} an EMA; rerun with the "
                       f"flags of the run that wrote it (its flags.cfg) or use another "
                       f"{{run.workdir}}", value=cfg.finetune.ema_decay, refs=("run.workdir",))


def _check_resumed_timesteps(cfg, prefix):
  """A rerun learns timesteps exactly if the run it resumes did."""
  if prefix is None:
    return
  learned = checkpoints.learned_timesteps(prefix, num_timesteps=cfg.diffusion.num_timesteps,
                                          parameter=None) is not None
  if learned != cfg.finetune.learn_timesteps:
    raise ParameterError("finetune.learn_timesteps", f"is {'off' if learned else 'on'}, but "
                         f"{prefix}, which this rerun resumes from, was finetuned "
                         f"{'with' if learned else 'without'} learned timesteps; rerun with the "
                         f"flags of the run that wrote it (its flags.cfg) or use another "
                         f"{{run.workdir}}", refs=("run.workdir",))


def run(cfg, plan=None):
  """Finetunes; `plan` is what `check` returned, if it ran. Returns the path of the finetuned
  weights (of the adapters alone with finetune.lora_rank)."""
  plan = plan or check(cfg)
  run_dir = runs.mode_dir(cfg.run, run_dir_name(cfg))
  f, s = cfg.finetune, cfg.sampler
  dataset_fn = inputs.training_data(cfg, batch_size=f.real_batch_size,
                                    batch_field="finetune.real_batch_size")
  validation = inputs.validation(cfg) if f.validate else None
  weights = os.path.join(run_dir, runs.product_name(cfg))
  # Workers of a cluster share the workdir: one record. A finished run's record stays as it is.
  if distribute.is_chief(plan.strategy) and not os.path.exists(weights):
    runs.write_record(cfg, run_dir, **{DECIDING: provenance.finetune_settings(
        cfg, init_checkpoint=checkpoints.latest(plan.init_checkpoint))})
  with errors.renamed(global_batch_size="finetune.batch_size", workdir="run.workdir",
                      real_batch_size="finetune.real_batch_size",
                      micro_batches="finetune.micro_batches",
                      val_feature_nets="finetune.val_feature_nets"):
    finetune_lib.finetune(
        unet_factory=cfg.unet.factory(),
        feature_net_factory=lambda: inputs.feature_network(cfg, cfg.features.feature_net),
        kernel=f.make_kernel(), dataset_fn=dataset_fn, schedule=cfg.diffusion.schedule(),
        workdir=run_dir, num_steps=s.num_steps, sampler=s.sampler, timestep_kind=plan.timesteps,
        eta=s.eta, clip_x0=s.clip_x0, finetune_steps=f.steps, learning_rate=f.learning_rate,
        grad_clip=f.grad_clip, global_batch_size=f.batch_size,
        checkpoint_every=cfg.run.checkpoint_every, log_every=cfg.run.log_every,
        seed=cfg.run.seed, strategy=plan.strategy, init_checkpoint=plan.init_checkpoint,
        use_ema=cfg.run.use_ema, recompute=f.recompute, dropout=f.dropout,
        learn_timesteps=f.learn_timesteps, timesteps_lr=f.timesteps_lr, validation=validation,
        real_batch_size=f.real_batch_size, micro_batches=f.micro_batches,
        ema_decay=f.ema_decay, lora_rank=f.lora_rank, lora_targets=f.lora_targets)
  if not distribute.is_chief(plan.strategy):
    # The chief writes `weights`, maybe after this worker is done: a worker must not read them.
    return weights
  if adapters_lib.is_file(weights):
    print(f"finetuned adapters: {weights} (--adapters={weights} applies them to "
          f"{plan.init_checkpoint})")
    return weights
  print(f"finetuned weights: {weights}")
  learned = checkpoints.learned_timesteps(weights, num_timesteps=cfg.diffusion.num_timesteps)
  if learned is not None:
    print(f"finetuned at the learned timesteps {schedule_lib.format_timesteps(learned)} "
          f"({checkpoints.timesteps_path(weights)})")
  return weights


def recorded_settings(weights):
  """The settings that decided `weights`, from the record of the finetune that wrote them (beside
  them), or None for weights without one (copied elsewhere)."""
  record = runs.read_record(os.path.dirname(weights))
  if record is not None:
    return record.get(DECIDING)
  old = os.path.join(os.path.dirname(weights), OLD_RECORD)
  if not os.path.isfile(old):
    return None
  with open(old) as f:
    return json.load(f)
