"""Run directories, flags records and the weights a mode starts from."""

import dataclasses
import json
import os

from absl import logging

from mmd_keras import adapters as adapters_lib
from mmd_keras import atomic
from mmd_keras import checkpoints
from mmd_keras import config as config_lib
from mmd_keras import errors
from mmd_keras import schedule as schedule_lib
from mmd_keras.errors import ParameterError


def mode_dir(run, name):
  """<workdir>/<name> of the RunConfig `run`, created and checked writable."""
  return errors.writable_dir(os.path.join(run.workdir, name), parameter="run.workdir",
                             value=run.workdir)


# A run directory's one record: its flags as a flagfile that reproduces it, and the settings JSON.
FLAGS = "flags.cfg"
RECORD = "settings.json"


def config_values(cfg):
  """{"<section>.<field>": JSON value} of every setting of the config.Config `cfg`."""
  values = {f"{section}.{field}": value
            for section in config_lib.SECTIONS
            for field, value in dataclasses.asdict(getattr(cfg, section)).items()}
  values.pop("run.flags_text")  # In the flagfile beside.
  return json.loads(json.dumps(values))  # Tuples as lists, as read back.


def write_record(cfg, run_dir, **facts):
  """The run's record in `run_dir`: its flags (FLAGS, a flagfile: `--flagfile=<run_dir>/flags.cfg`
  reruns it) and RECORD, JSON of {mode, flagfile, settings: every setting, **facts} (e.g. what
  decides a finetune's weights). A rerun in the same directory whose record differs keeps the
  earlier record in it, under "before"."""
  record = dict(mode=cfg.run.mode, flagfile=FLAGS, settings=config_values(cfg), **facts)
  before = read_record(run_dir)
  if before is not None:
    earlier = {k: v for k, v in before.items() if k != "before"}
    if earlier != record:
      record["before"] = before
    elif "before" in before:
      record["before"] = before["before"]
  try:
    atomic.write_text(os.path.join(run_dir, FLAGS), cfg.run.flags_text)
    atomic.write_json(os.path.join(run_dir, RECORD), record)
  except OSError as e:
    raise ParameterError("run.workdir", f"is not writable: {run_dir}: {e.strerror}",
                         value=cfg.run.workdir) from None


def read_record(run_dir):
  """The record `write_record` left in `run_dir`, or None."""
  path = os.path.join(run_dir, RECORD)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


def init_checkpoint(cfg):
  """The weights a mode starts from: `run.init_checkpoint` (checked readable), else the workdir's
  latest pretrain checkpoint."""
  path = cfg.run.init_checkpoint
  if path:
    if "://" not in path:  # Remote (gs://…) paths are left to TF.
      checkpoints.check_readable(path)
    return path
  found = checkpoints.latest(os.path.join(cfg.run.workdir, "pretrain"))
  if not found:
    raise ParameterError("run.init_checkpoint", f"is not set and {cfg.run.workdir}/pretrain holds "
                         f"no checkpoint; pass {{run.init_checkpoint}}=<.weights.h5 or checkpoint>",
                         refs=("run.init_checkpoint",))
  checkpoints.check_readable(found)
  return found


def check_resume(cfg, run_dir_name):
  """The checkpoint a rerun in <workdir>/<run_dir_name> resumes from (None if there is none),
  checked against the UNet settings; after the strategy exists (it builds a UNet), before the data
  is read."""
  return checkpoints.check_resume(os.path.join(cfg.run.workdir, run_dir_name, "checkpoints"),
                                  unet_factory=cfg.unet.factory())


def learned_timesteps(cfg, path, *, num_steps, parameter="run.init_checkpoint",
                      steps_field="sampler.num_steps"):
  """The timesteps learned with the weights of `path` (see `checkpoints.learned_timesteps`), which
  they are sampled at, or None. A ParameterError if there are such timesteps and
  `sampler.timesteps` lists others, η > 0, or K = `num_steps` is not their number; `parameter` and
  `steps_field` are the fields that gave `path` and K."""
  with errors.renamed(num_timesteps="diffusion.num_timesteps"):
    learned = checkpoints.learned_timesteps(path, num_timesteps=cfg.diffusion.num_timesteps,
                                            parameter=parameter)
  if learned is None:
    return None
  shown = schedule_lib.format_timesteps(learned)
  if not isinstance(cfg.sampler.timesteps, str):
    raise ParameterError("sampler.timesteps", f"lists timesteps, but {path} ({{{parameter}}}) was "
                         f"finetuned with learned timesteps ({shown}), which it is sampled at; "
                         f"drop {{sampler.timesteps}}", value=cfg.sampler.timesteps,
                         refs=("sampler.timesteps", parameter))
  if cfg.sampler.eta:
    raise ParameterError("sampler.eta", f"must be 0 to sample {path} ({{{parameter}}}) at the "
                         f"timesteps learned with it ({shown})", value=cfg.sampler.eta,
                         refs=(parameter,))
  if len(learned) != num_steps:
    raise ParameterError(steps_field, f"does not match {path} ({{{parameter}}}), finetuned with "
                         f"{len(learned)} learned timesteps ({shown})", value=num_steps,
                         refs=(parameter,))
  return learned


def restored_unet(cfg, path, *, adapters=None, parameter="run.adapters"):
  """The UNet of the configuration with the weights of `path`, and the adapters file `adapters`
  (trained on those weights; `parameter` gave it) merged into them."""
  unet = cfg.unet.factory()().build_for_inference()
  source = checkpoints.restore_unet(unet, path, use_ema=cfg.run.use_ema)
  logging.info("loaded %s (%s)", path, source)
  if adapters is None:
    return unet
  plain = cfg.unet.factory()().build_for_inference()
  with errors.renamed(adapters=parameter):
    meta = adapters_lib.load(unet, adapters)
  logging.info("merged the rank-%d adapters of %s", meta["rank"], adapters)
  return adapters_lib.merged_into(unet, plain)


def finetuned_unet(cfg, path, *, parameter="eval.finetuned_checkpoints"):
  """The UNet of finetuned weights `path`: weights of their own, or an adapters file applied to
  the base model of `run.init_checkpoint`."""
  if adapters_lib.is_file(path):
    return restored_unet(cfg, init_checkpoint(cfg), adapters=path, parameter=parameter)
  unet = cfg.unet.factory()().build_for_inference()
  checkpoints.restore_unet(unet, path, use_ema=False, parameter=parameter.split(".")[-1])
  return unet


def product_name(cfg):
  """The file a finetune of `cfg` ends with: its weights, or with adapters, those alone."""
  return "unet.adapters.npz" if cfg.finetune.lora_rank else "unet.weights.h5"


def finetune_dir_name(cfg, num_steps):
  """The workdir's directory of a finetune at K = `num_steps` through the configured sampler:
  finetune_k<K> for DDIM (the name it had before there was a choice), else finetune_<sampler>_k<K>,
  so a finetune never resumes one through another sampler; with adapters _lora<rank> follows (and
  _<targets> unless all layers take them), so it never resumes a full finetune either."""
  sampler = cfg.sampler.sampler
  name = f"finetune_k{num_steps}" if sampler == "ddim" else f"finetune_{sampler}_k{num_steps}"
  f = cfg.finetune
  if f.lora_rank:
    name += f"_lora{f.lora_rank}" + ("" if f.lora_targets == "all" else f"_{f.lora_targets}")
  return name


def finetuned_checkpoints(cfg, steps):
  """{K: path} of `eval.finetuned_checkpoints` (checked readable), else the workdir's
  `finetune_dir_name`/unet.weights.h5 for every K of `steps` that has one."""
  found = {}
  for k, path in cfg.eval.finetuned_checkpoints:
    with errors.renamed(num_steps="eval.finetuned_checkpoints", kind="sampler.timesteps"):
      cfg.timesteps(k)
    if k in found:
      raise ParameterError("eval.finetuned_checkpoints", f"gives K={k} twice ({found[k]} and "
                           f"{path}); expected one model per K")
    if adapters_lib.is_file(path):
      with errors.renamed(adapters="eval.finetuned_checkpoints"):
        adapters_lib.read(path)
    else:
      checkpoints.check_readable(path, parameter="finetuned_checkpoints")
    found[k] = path
  if cfg.eval.finetuned_checkpoints:
    return found
  for k in steps:
    path = os.path.join(cfg.run.workdir, finetune_dir_name(cfg, k), product_name(cfg))
    if os.path.exists(path):
      found[k] = path
  return found

