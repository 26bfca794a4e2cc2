"""The run's configuration: one frozen dataclass per concern, built and checked once.

`build(values)` takes {"<section>.<field>": value} (the command line fills it from its flags through
one table) and returns a `Config`; every value error is a `ParameterError` naming the field
("finetune.learning_rate"), which the command line spells as the flag the user set. An unset
`finetune.batch_size` takes `data.batch_size`.
Checks that need files or a device (checkpoints, feature networks, replicas) belong to the modes.
"""

import dataclasses
from typing import Optional

from mmd_keras import data as data_lib
from mmd_keras import distribute
from mmd_keras import evaluate as evaluate_lib
from mmd_keras import features as features_lib
from mmd_keras import mmd
from mmd_keras import samplers
from mmd_keras import schedule as schedule_lib
from mmd_keras import unet as unet_lib
from mmd_keras.errors import ParameterError
from mmd_keras.errors import renamed


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """What every mode shares: where it writes, its seed, the weights it starts from, its cadence."""
  mode: str
  workdir: str
  seed: int = 0
  init_checkpoint: Optional[str] = None
  use_ema: bool = True
  deterministic: bool = False
  checkpoint_every: int = 1000
  log_every: int = 100
  flags_text: str = ""  # The run's flags record, written into its run directory.

  def __post_init__(self):
    # Our checks and writes (makedirs, os.replace, os.access) are POSIX calls: on gs://… they would
    # act on a local folder named "gs:".
    if "://" in self.workdir:
      raise ParameterError("run.workdir", "is a remote (scheme://) path, which is not supported; "
                           "expected a local directory or a shared POSIX filesystem (e.g. NFS, or "
                           "a bucket mounted with gcsfuse)", value=self.workdir)
    _positive(self, "checkpoint_every", "log_every")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str
  image_size: int
  channels: int
  batch_size: int
  data_dir: Optional[str] = None
  random_flip: bool = False

  def __post_init__(self):
    _positive(self, "batch_size")


@dataclasses.dataclass(frozen=True)
class DiffusionConfig:
  num_timesteps: int = 1000
  beta_start: float = 1e-4
  beta_end: float = 0.02

  def __post_init__(self):
    with renamed(num_timesteps="diffusion.num_timesteps", beta_start="diffusion.beta_start",
                 beta_end="diffusion.beta_end"):
      self.schedule()

  def schedule(self):
    return schedule_lib.NoiseSchedule.linear(num_timesteps=self.num_timesteps,
                                             beta_start=self.beta_start, beta_end=self.beta_end)


@dataclasses.dataclass(frozen=True)
class UNetConfig:
  image_size: int
  channels: int
  ch: int = 128
  ch_mult: tuple = (1, 2, 2, 2)
  num_res_blocks: int = 2
  attn_resolutions: tuple = (16,)
  dropout: float = 0.1

  def __post_init__(self):
    with renamed(image_size="data.image_size", ch="unet.ch", ch_mult="unet.ch_mult"):
      unet_lib.check_architecture(image_size=self.image_size, ch=self.ch, ch_mult=self.ch_mult)
    _positive(self, "num_res_blocks")
    _fraction(self, "dropout", include_one=False)

  def factory(self):
    """() -> a new, unbuilt UNet of this architecture."""
    kwargs = dataclasses.asdict(self)
    return lambda: unet_lib.UNet(**kwargs)


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
  """The K-step sampler of sample / finetune / export (evaluation sweeps its own K)."""
  sampler: str = "ddim"  # One of samplers.SAMPLERS.
  num_steps: int = 5
  timesteps: object = "uniform"  # A spacing of schedule.TIMESTEP_KINDS, or the K timesteps.
  eta: float = 0.0
  clip_x0: bool = False
  num_images: int = 64  # --mode=sample
  batch_size: int = 256  # Images per sampler call.

  def __post_init__(self):
    _fraction(self, "eta", include_one=True)
    _positive(self, "num_images", "batch_size")
    with renamed(sampler="sampler.sampler", eta="sampler.eta"):
      samplers.check(self.sampler, eta=self.eta)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
  steps: int = 100_000
  learning_rate: float = 2e-4
  grad_clip: float = 1.0
  ema_decay: float = 0.9999
  jit_compile: bool = False

  def __post_init__(self):
    _positive(self, "steps", "learning_rate")
    _non_negative(self, "grad_clip", why="0 disables clipping")
    _fraction(self, "ema_decay", include_one=True)


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
  """The frozen feature network φ finetuning matches statistics in (the trained space)."""
  feature_net: str = "classifier"
  classifier_path: str = ""  # Resolved: the flag, or the bundled file of `feature_net`.
  inception_weights: Optional[str] = None
  inception_resolution: int = 299
  inception_graph: Optional[str] = None  # The FID Inception GraphDef of inception_fid.
  # What savedmodel:/keras: networks take (None: their metadata says); the range as (lo, hi).
  feature_image_size: Optional[int] = None
  feature_image_range: Optional[tuple] = None
  classifier_epochs: int = 5
  dataset: str = "fashion_mnist"

  def __post_init__(self):
    with renamed(feature_net="features.feature_net"):
      features_lib.check_name(self.feature_net)
    _positive(self, "classifier_epochs")
    if self.feature_image_size is not None:
      _positive(self, "feature_image_size")

  def classifier_path_of(self, name):
    """The weights file of the feature network `name` (this config's own path for the trained one,
    the bundled file for the others)."""
    if name == self.feature_net:
      return self.classifier_path
    return features_lib.default_classifier_path(self.dataset, name)


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
  steps: int = 300
  batch_size: int = 64
  learning_rate: float = 5e-6
  grad_clip: float = 0.5
  recompute: bool = True
  dropout: bool = False
  kernel: str = "polynomial"
  rbf_bandwidths: tuple = (1.0,)
  learn_timesteps: bool = False  # The K timesteps trained too (finetune.LearnedTimesteps).
  timesteps_lr: float = 1e-2

  def __post_init__(self):
    _positive(self, "steps", "learning_rate", "batch_size", "timesteps_lr")
    _non_negative(self, "grad_clip", why="0 disables clipping")
    with renamed(name="finetune.kernel", bandwidths="finetune.rbf_bandwidths"):
      self.make_kernel()

  def make_kernel(self):
    return mmd.make_kernel(self.kernel, bandwidths=self.rbf_bandwidths)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
  steps: tuple = (5, 10, 20, 50, 100)
  num_images: int = 5000
  finetuned_checkpoints: tuple = ()  # ((K, path), ...) as given; empty: the workdir's.
  feature_nets: tuple = ("classifier", "classifier_heldout")
  split: str = "test"
  quickstart_images: int = 1000
  # ((sampler, spacing), ...): training-free samplers also run on the base model.
  samplers: tuple = ()
  # Directories of finished rows reused read only (see evaluate.run's reuse_dirs).
  reuse_rows: tuple = ()

  def __post_init__(self):
    _positive(self, "num_images", "quickstart_images")
    for name in self.feature_nets:
      try:
        features_lib.check_name(name)
      except ParameterError:
        raise ParameterError("eval.feature_nets", f"must name {features_lib.NAMES_HELP}, got "
                             f"{name!r}") from None


@dataclasses.dataclass(frozen=True)
class ExportConfig:
  export_dir: str = "exports"
  model_name: str = "mmd_ddm"
  model_version: int = 1
  max_images: int = 64
  overwrite: bool = False
  tflite_float16: bool = False

  def __post_init__(self):
    if self.model_version < 1:
      raise ParameterError("export.model_version", "must be >= 1 (TF Serving versions)",
                           value=self.model_version)
    if self.max_images < 1:
      raise ParameterError("export.max_images", "must be >= 1", value=self.max_images)


@dataclasses.dataclass(frozen=True)
class DistributionConfig:
  strategy: str = "default"
  tpu: Optional[str] = None
  num_cpu_devices: Optional[int] = None

  def __post_init__(self):
    if self.strategy not in distribute.STRATEGIES:
      raise ParameterError("distribution.strategy",
                           f"must be one of {'|'.join(distribute.STRATEGIES)}", value=self.strategy)
    if self.num_cpu_devices is not None:
      if self.strategy != "mirrored":
        raise ParameterError("distribution.num_cpu_devices",
                             f"needs {{distribution.strategy}}=mirrored, got "
                             f"{{distribution.strategy}}={self.strategy}",
                             refs=("distribution.strategy",))
      if self.num_cpu_devices < 1:
        raise ParameterError("distribution.num_cpu_devices", "must be >= 1",
                             value=self.num_cpu_devices)


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


def _timestep_subsequence(diffusion, sampler, num_steps):
  return schedule_lib.timestep_subsequence(num_timesteps=diffusion.num_timesteps,
                                           num_steps=num_steps, kind=sampler.timesteps)


@dataclasses.dataclass(frozen=True)
class MergeConfig:
  """--mode=merge_reports: the evaluations to merge; no model is built."""
  run: RunConfig
  reports: tuple


def build_merge(values):
  """A checked `MergeConfig` from the same {field: value} mapping `build` takes."""
  run = RunConfig(**{f.name: values[f"run.{f.name}"] for f in dataclasses.fields(RunConfig)})
  return MergeConfig(run=run, reports=tuple(values["merge.reports"]))


def build(values):
  """A checked `Config` from {"<section>.<field>": value}; list fields may be given as lists of
  strings (as flags give them). Unset optional fields are None."""
  values = dict(values)
  native_size, channels = _dataset_shape(values["data.dataset"])
  image_size = values.get("data.image_size") or native_size
  if image_size is None:
    raise ParameterError("data.image_size", f"is needed for {{data.dataset}}="
                         f"{values['data.dataset']} (a dataset of no fixed size)",
                         refs=("data.dataset",))
  values.update({"data.image_size": image_size, "data.channels": channels,
                 "unet.image_size": image_size, "unet.channels": channels,
                 "features.dataset": values["data.dataset"]})
  if values.get("finetune.batch_size") is None:
    values["finetune.batch_size"] = values["data.batch_size"]
  feature_net = values["features.feature_net"]
  if not values.get("features.classifier_path"):
    values["features.classifier_path"] = (
        features_lib.default_classifier_path(values["data.dataset"], feature_net)
        if feature_net in features_lib.FEATURE_NETS else "")
  if isinstance(values.get("features.feature_image_range"), str):
    with renamed(feature_image_range="features.feature_image_range"):
      values["features.feature_image_range"] = features_lib.parse_image_range(
          values["features.feature_image_range"])
  for field in ("unet.ch_mult", "unet.attn_resolutions"):
    values[field] = _ints(field, values[field])
  with renamed(steps="eval.steps"):
    values["eval.steps"] = evaluate_lib.parse_steps(values["eval.steps"])
  values["sampler.timesteps"] = _timesteps(values["sampler.timesteps"])
  values["finetune.rbf_bandwidths"] = _floats("finetune.rbf_bandwidths",
                                              values["finetune.rbf_bandwidths"])
  values["eval.finetuned_checkpoints"] = _finetuned_entries(values["eval.finetuned_checkpoints"])
  values["eval.samplers"] = _eval_samplers(values["eval.samplers"])
  values["eval.reuse_rows"] = tuple(values.get("eval.reuse_rows") or ())
  values["eval.feature_nets"] = tuple(dict.fromkeys([feature_net,
                                                     *values["eval.feature_nets"]]))
  section = lambda cls, name: cls(**{f.name: values[f"{name}.{f.name}"]
                                     for f in dataclasses.fields(cls)
                                     if f"{name}.{f.name}" in values})
  run, data = section(RunConfig, "run"), section(DataConfig, "data")
  diffusion, sampler = section(DiffusionConfig, "diffusion"), section(SamplerConfig, "sampler")
  # K against T (and the spacing) before the UNet's shapes, as the sampling modes always did.
  with renamed(num_steps="sampler.num_steps", num_timesteps="diffusion.num_timesteps",
               kind="sampler.timesteps"):
    _timestep_subsequence(diffusion, sampler, sampler.num_steps)
  finetune = section(FinetuneConfig, "finetune")
  if finetune.learn_timesteps:
    _check_learn_timesteps(run, sampler)
  return Config(
      run=run, data=data, diffusion=diffusion,
      unet=section(UNetConfig, "unet"),
      sampler=sampler,
      pretrain=section(PretrainConfig, "pretrain"),
      features=section(FeatureConfig, "features"),
      finetune=finetune,
      eval=section(EvalConfig, "eval"),
      export=section(ExportConfig, "export"),
      distribution=section(DistributionConfig, "distribution"))


# The modes that finetune; the others sample weights finetuned with learned timesteps at those
# timesteps without being told (see app.runs.learned_timesteps).
LEARN_TIMESTEPS_MODES = ("finetune", "quickstart")


def _check_learn_timesteps(run, sampler):
  if run.mode not in LEARN_TIMESTEPS_MODES:
    raise ParameterError("finetune.learn_timesteps", f"is for {{run.mode}}="
                         f"{' and {run.mode}='.join(LEARN_TIMESTEPS_MODES)}; {{run.mode}}="
                         f"{run.mode} takes the timesteps saved with finetuned weights without it",
                         refs=("run.mode",))
  if sampler.eta:
    raise ParameterError("finetune.learn_timesteps", f"needs {{sampler.eta}}=0: learned timesteps "
                         f"are continuous, and only deterministic sampling takes them "
                         f"(got {sampler.eta:g})", refs=("sampler.eta",))


def _dataset_shape(dataset):
  with renamed(dataset="data.dataset"):
    return data_lib.dataset_shape(dataset)


def _ints(field, items):
  try:
    return tuple(int(v) for v in items)
  except ValueError:
    raise ParameterError(field, "must be a comma-separated list of integers",
                         value=list(items)) from None


def _timesteps(value):
  """A spacing name, or "t1,t2,…" (the timesteps themselves) as a tuple of ints."""
  if not isinstance(value, str) or value in schedule_lib.TIMESTEP_KINDS:
    return value
  items = [v.strip() for v in value.split(",")]
  if not all(v.lstrip("-").isdigit() for v in items):
    raise ParameterError("sampler.timesteps", f"must be one of "
                         f"{'|'.join(schedule_lib.TIMESTEP_KINDS)} or a comma-separated list of "
                         f"K increasing timesteps", value=value)
  return tuple(int(v) for v in items)


def _floats(field, items):
  try:
    values = tuple(float(v) for v in items)
  except ValueError:
    raise ParameterError(field, "must be a comma-separated list of numbers",
                         value=list(items)) from None
  return values


def _finetuned_entries(entries):
  """((K, path), ...) from "K:path" strings."""
  parsed = []
  for entry in entries:
    if isinstance(entry, tuple):
      parsed.append(entry)
      continue
    k, sep, path = entry.partition(":")
    if not sep or not k.strip().isdigit() or not path:
      raise ParameterError("eval.finetuned_checkpoints", f"entries must look like "
                           f"5:/path/to/unet.weights.h5, got {entry!r}")
    parsed.append((int(k), path))
  return tuple(parsed)


def _eval_samplers(entries):
  """((sampler, spacing), ...) from "sampler:spacing" strings. Whether each fits η and every K is
  checked by the modes that run them (a flagfile's entries must not refuse --eta in other modes)."""
  parsed = []
  for entry in (e.strip() for e in entries if e.strip()):
    name, sep, spacing = (part.strip() for part in entry.partition(":"))
    if not sep:
      raise ParameterError("eval.samplers", f"entries must look like <sampler>:<spacing> (e.g. "
                           f"dpm_solver_pp:trailing), got {entry!r}")
    if name not in samplers.SAMPLERS:
      raise ParameterError("eval.samplers", f"entry {entry!r}: the sampler must be one of "
                           f"{'|'.join(samplers.SAMPLERS)}")
    if spacing not in schedule_lib.TIMESTEP_KINDS:
      raise ParameterError("eval.samplers", f"entry {entry!r}: the spacing must be one of "
                           f"{'|'.join(schedule_lib.TIMESTEP_KINDS)} (explicit timesteps only "
                           f"through {{sampler.timesteps}})", refs=("sampler.timesteps",))
    if (name, spacing) in parsed:
      raise ParameterError("eval.samplers", f"lists {name}:{spacing} more than once")
    parsed.append((name, spacing))
  return tuple(parsed)


def _positive_value(field, value):
  if not value > 0:  # NaN fails too.
    raise ParameterError(field, "must be > 0", value=value)


def _positive(config, *names):
  section = _SECTIONS[type(config)]
  for name in names:
    _positive_value(f"{section}.{name}", getattr(config, name))


def _non_negative(config, name, *, why):
  value = getattr(config, name)
  if not value >= 0:
    raise ParameterError(f"{_SECTIONS[type(config)]}.{name}", f"must be >= 0 ({why})",
                         value=value)


def _fraction(config, name, *, include_one):
  value = getattr(config, name)
  if not (0 <= value <= 1 if include_one else 0 <= value < 1):
    raise ParameterError(f"{_SECTIONS[type(config)]}.{name}",
                         f"must be in [0, 1{']' if include_one else ')'}", value=value)


_SECTIONS = {RunConfig: "run", DataConfig: "data", DiffusionConfig: "diffusion",
             UNetConfig: "unet", SamplerConfig: "sampler", PretrainConfig: "pretrain",
             FeatureConfig: "features", FinetuneConfig: "finetune", EvalConfig: "eval",
             ExportConfig: "export", DistributionConfig: "distribution"}
