"""The run's configuration: one frozen dataclass per section, built and checked once from the
settings declared in `settings.SETTINGS` (their defaults, parsers and rules live there alone).

`build(values)` takes {"<section>.<field>": value} (the command line fills it from its flags) and
returns a `Config`; every value error is a `ParameterError` naming the field
("finetune.learning_rate"), which the command line spells as the flag the user set. The dataclasses
add what a section derives from the others (image shape, the dataset of the features) and the rules
that tie settings together. Checks that need files or a device (checkpoints, feature networks,
replicas) belong to the modes.
"""

import dataclasses
from typing import Optional

from mmd_keras import data as data_lib
from mmd_keras import features as features_lib
from mmd_keras import mmd
from mmd_keras import samplers
from mmd_keras import schedule as schedule_lib
from mmd_keras import settings as settings_lib
from mmd_keras import unet as unet_lib
from mmd_keras.errors import ParameterError
from mmd_keras.errors import renamed


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """What every mode shares: where it writes, its seed, the weights it starts from, its cadence."""
  mode: str
  workdir: str
  seed: int
  init_checkpoint: Optional[str]
  use_ema: bool
  adapters: Optional[str]  # Applied to init_checkpoint by sample and export.
  deterministic: bool
  checkpoint_every: int
  log_every: int
  flags_text: str  # The run's flags record, written into its run directory.


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str
  image_size: int
  channels: int
  batch_size: int
  data_dir: Optional[str]
  random_flip: bool


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  num_timesteps: int
  beta_start: float
  beta_end: float

  def __post_init__(self):
    self.schedule()

  def schedule(self):
    return schedule_lib.NoiseSchedule.linear(num_timesteps=self.num_timesteps,
                                             beta_start=self.beta_start, beta_end=self.beta_end)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  image_size: int
  channels: int
  ch: int
  ch_mult: tuple
  num_res_blocks: int
  attn_resolutions: tuple
  dropout: float

  def __post_init__(self):
    unet_lib.check_architecture(image_size=self.image_size, ch=self.ch, ch_mult=self.ch_mult)

  def factory(self):
    """() -> a new, unbuilt UNet of this architecture."""
    kwargs = dataclasses.asdict(self)
    return lambda: unet_lib.UNet(**kwargs)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """The K-step sampler of sample / finetune / export (evaluation sweeps its own K)."""
  sampler: str  # One of samplers.SAMPLERS.
  num_steps: int
  timesteps: object  # A spacing of schedule.TIMESTEP_KINDS, or the K timesteps.
  eta: float
  clip_x0: bool
  num_images: int  # --mode=sample
  batch_size: int  # Images per sampler call.

  def __post_init__(self):
    with renamed(sampler="sampler.sampler", eta="sampler.eta"):
      samplers.check(self.sampler, eta=self.eta)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  steps: int
  learning_rate: float
  grad_clip: float
  ema_decay: float
  jit_compile: bool


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  """The frozen feature network φ finetuning matches statistics in (the trained space)."""
  feature_net: str
  classifier_path: str  # Resolved: the flag, or the bundled file of `feature_net`.
  inception_weights: Optional[str]
  inception_resolution: int
  inception_graph: Optional[str]  # The FID Inception GraphDef of inception_fid.
  # What savedmodel:/keras: networks take (None: their metadata says); the range as (lo, hi).
  feature_image_size: Optional[int]
  feature_image_range: Optional[tuple]
  classifier_epochs: int
  dataset: str

  def __post_init__(self):
    with renamed(feature_net="features.feature_net"):
      features_lib.check_name(self.feature_net)

  def classifier_path_of(self, name):
    """The weights file of the feature network `name` (this config's own path for the trained one,
    the bundled file for the others)."""
    if name == self.feature_net:
      return self.classifier_path
    return features_lib.default_classifier_path(self.dataset, name)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  steps: int
  batch_size: int  # Generated images per step.
  real_batch_size: int
  micro_batches: int
  learning_rate: float
  grad_clip: float
  ema_decay: float
  recompute: bool
  dropout: bool
  lora_rank: int  # 0: every weight is finetuned; else adapters of this rank.
  lora_targets: str
  kernel: str
  rbf_bandwidths: tuple
  learn_timesteps: bool  # The K timesteps trained too (learned_timesteps.LearnedTimesteps).
  timesteps_lr: float
  validate: bool
  validate_every: int
  patience: int
  lr_backoff: float
  num_val_images: int
  val_split: tuple  # (split, start, stop or None)
  val_feature_nets: tuple

  def __post_init__(self):
    with renamed(name="finetune.kernel", bandwidths="finetune.rbf_bandwidths"):
      self.make_kernel()
    # An adapters file holds adapters alone: no EMA copy of them, no timesteps beside.
    for field, on in (("finetune.ema_decay", self.ema_decay),
                      ("finetune.learn_timesteps", self.learn_timesteps)):
      if self.lora_rank and on:
        raise ParameterError(field, "cannot be combined with {finetune.lora_rank} > 0 (adapters "
                             "finetune without an EMA and at fixed timesteps)", value=on,
                             refs=("finetune.lora_rank",))

  def make_kernel(self):
    return mmd.make_kernel(self.kernel, bandwidths=self.rbf_bandwidths)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  steps: tuple
  num_images: int
  finetuned_checkpoints: tuple  # ((K, path), ...) as given; empty: the workdir's.
  feature_nets: tuple
  split: str
  quickstart_images: int
  # ((sampler, spacing), ...): training-free samplers also run on the base model.
  samplers: tuple
  # Directories of finished rows reused read only (see evaluate.run's reuse_dirs).
  reuse_rows: tuple

  def __post_init__(self):
    for name in self.feature_nets:
      try:
        features_lib.check_name(name)
      except ParameterError:
        raise ParameterError("eval.feature_nets", f"must name {features_lib.NAMES_HELP}, got "
                             f"{name!r}") from None


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  export_dir: str
  model_name: str
  model_version: int
  max_images: int
  overwrite: bool
  tflite_float16: bool


@dataclasses.dataclass(frozen=True)
class DistributionConfig:
  strategy: str
  tpu: Optional[str]
  num_cpu_devices: Optional[int]

  def __post_init__(self):
    if self.num_cpu_devices is not None and self.strategy != "mirrored":
      raise ParameterError("distribution.num_cpu_devices",
                           f"needs {{distribution.strategy}}=mirrored, got "
                           f"{{distribution.strategy}}={self.strategy}",
                           refs=("distribution.strategy",))


@dataclasses.dataclass(frozen=True)
class Config:
  run: RunConfig
  data: DataConfig
  diffusion: DiffusionConfig
  unet: UNetConfig
  sampler: SamplerConfig
  pretrain: PretrainConfig
  features: FeatureConfig
  finetune: FinetuneConfig
  eval: EvalConfig
  export: ExportConfig
  distribution: DistributionConfig

  def timesteps(self, num_steps):
    """The K visited timesteps of this run's spacing; a ParameterError on `num_steps` (or `kind`)
    if K does not fit T (or the spacing)."""
    return _timestep_subsequence(self.diffusion, self.sampler, num_steps)


# Fields a section derives from other settings; every other field is a setting of its own.
DERIVED = ("run.flags_text", "data.channels", "unet.image_size", "unet.channels",
           "features.dataset")
SECTIONS = {"run": RunConfig, "data": DataConfig, "diffusion": DiffusionConfig,
            "sampler": SamplerConfig, "unet": UNetConfig, "pretrain": PretrainConfig,
            "features": FeatureConfig, "finetune": FinetuneConfig, "eval": EvalConfig,
            "export": ExportConfig, "distribution": DistributionConfig}


def _timestep_subsequence(diffusion, sampler, num_steps):
  return schedule_lib.timestep_subsequence(num_timesteps=diffusion.num_timesteps,
                                           num_steps=num_steps, kind=sampler.timesteps)


@dataclasses.dataclass(frozen=True)
class MergeConfig:
  """--mode=merge_reports: the evaluations to merge; no model is built."""
  run: RunConfig
  reports: tuple


def from_flagfile(path, *args):
  """The `Config` of the flagfile `path` and `args` (more flags), e.g. the UNet of a preset."""
  return build(settings_lib.flagfile_values(path, *args))


def build_merge(values):
  """A checked `MergeConfig` from the same {field: value} mapping `build` takes."""
  flags_text = values.get("run.flags_text", "")
  values = settings_lib.parsed_values(
      {f: v for f, v in values.items() if f.startswith(("run.", "merge."))})
  values["run.flags_text"] = flags_text
  run = RunConfig(**{f.name: values[f"run.{f.name}"] for f in dataclasses.fields(RunConfig)})
  return MergeConfig(run=run, reports=values["merge.reports"])


def build(values):
  """A checked `Config` from {"<section>.<field>": value}, every setting's field given (flag values:
  lists as lists of strings; unset optional fields None) plus "run.flags_text"."""
  flags_text = values.get("run.flags_text", "")
  with renamed(**settings_lib.LIBRARY_NAMES):
    values = settings_lib.parsed_values(values)
    native_size, channels = data_lib.dataset_shape(values["data.dataset"])
  image_size = values["data.image_size"] or native_size
  if image_size is None:
    raise ParameterError("data.image_size", f"is needed for {{data.dataset}}="
                         f"{values['data.dataset']} (a dataset of no fixed size)",
                         refs=("data.dataset",))
  feature_net = values["features.feature_net"]
  values.update({"run.flags_text": flags_text, "data.image_size": image_size,
                 "data.channels": channels, "unet.image_size": image_size,
                 "unet.channels": channels, "features.dataset": values["data.dataset"]})
  if not values["features.classifier_path"]:
    values["features.classifier_path"] = (
        features_lib.default_classifier_path(values["data.dataset"], feature_net)
        if feature_net in features_lib.FEATURE_NETS else "")
  values["eval.feature_nets"] = tuple(dict.fromkeys([feature_net, *values["eval.feature_nets"]]))
  sections = {}
  with renamed(**settings_lib.LIBRARY_NAMES):
    for name, cls in SECTIONS.items():
      sections[name] = cls(**{f.name: values[f"{name}.{f.name}"] for f in dataclasses.fields(cls)})
      if name == "sampler":  # K against T (and the spacing) before the UNet's shapes.
        with renamed(num_steps="sampler.num_steps", kind="sampler.timesteps"):
          _timestep_subsequence(sections["diffusion"], sections["sampler"],
                                sections["sampler"].num_steps)
  if sections["finetune"].learn_timesteps:
    _check_learn_timesteps(sections["run"], sections["sampler"])
  return Config(**sections)


def check_validation(finetune, evaluation):
  """Validation selects in a space no report scores, on images no report uses (checked by the
  modes that finetune: others leave it alone)."""
  for name in finetune.val_feature_nets:
    with renamed(feature_net="finetune.val_feature_nets"):
      features_lib.check_name(name)
  if not validation_select(finetune, evaluation):
    raise ParameterError("finetune.val_feature_nets", "must name a space no report scores (one "
                         "not in {eval.feature_nets}): the best step is chosen there",
                         value=finetune.val_feature_nets, refs=("eval.feature_nets",))
  split, start, _ = finetune.val_split
  used = max(evaluation.num_images, evaluation.quickstart_images)
  if split == evaluation.split and start < used:
    raise ParameterError("finetune.val_split", f"overlaps the reports' real images, the first "
                         f"{used} of {{eval.split}}={split}; start it at {used} or later (e.g. "
                         f"{split}[{used}:])", value=_split_text(finetune.val_split),
                         refs=("eval.split",))


def validation_select(finetune, evaluation):
  """The validation spaces the best step is chosen in: those no report scores."""
  return tuple(n for n in finetune.val_feature_nets if n not in evaluation.feature_nets)


def _split_text(split_slice):
  split, start, stop = split_slice
  return f"{split}[{start}:{'' if stop is None else stop}]"


# The modes that finetune; the others sample weights finetuned with learned timesteps at those
# timesteps without being told (see app.runs.learned_timesteps).
FINETUNING_MODES = ("finetune", "quickstart")


def _check_learn_timesteps(run, sampler):
  if run.mode not in FINETUNING_MODES:
    raise ParameterError("finetune.learn_timesteps", f"is for {{run.mode}}="
                         f"{' and {run.mode}='.join(FINETUNING_MODES)}; {{run.mode}}="
                         f"{run.mode} takes the timesteps saved with finetuned weights without it",
                         refs=("run.mode",))
  if sampler.eta:
    raise ParameterError("finetune.learn_timesteps", f"needs {{sampler.eta}}=0: learned timesteps "
                         f"are continuous, and only deterministic sampling takes them "
                         f"(got {sampler.eta:g})", refs=("sampler.eta",))
