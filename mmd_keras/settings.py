"""Every setting of a run, declared once: its flag, type, default, help, the configuration field it
fills (<section>.<name>), how its text is parsed and the rule its value keeps (`setting_rules`), and
the names library functions give it.

main.py generates the absl flags from `SETTINGS`; `config.build` makes the frozen configuration
from the same declarations, parsing and checking each value here, once. An error about a field is
spelled as its flag by `flag_name`, and a library parameter in `LIBRARY_NAMES` is renamed to the
field it always means. No other module writes a setting's default.
"""

import dataclasses
from typing import Callable, Optional

from absl import flags

from mmd_keras import adapters
from mmd_keras import features as features_lib
from mmd_keras import mmd
from mmd_keras import samplers
from mmd_keras import sampling
from mmd_keras import schedule as schedule_lib
from mmd_keras import setting_rules as rules
from mmd_keras import unet as unet_lib
from mmd_keras.errors import ParameterError
from mmd_keras.export import sampler_module

# Sections in the order --helpfull shows them (and the Config lists them).
SECTIONS = ("run", "data", "diffusion", "unet", "pretrain", "sampler", "features", "finetune",
            "eval", "export", "distribution", "merge")
MODES = ("pretrain", "train_classifier", "finetune", "sample", "evaluate", "export", "quickstart",
         "merge_reports")


@dataclasses.dataclass(frozen=True)
class Setting:
  """One setting. `kind` is the absl flag type (string, integer, float, bool, enum, list);
  `parse(text)` turns the flag's value into the configuration's (a ParameterError naming the
  field); `check(value)` returns what is wrong with a parsed, set value, or None; `library` lists
  the parameter names library functions give this setting wherever a mode passes it; an unset
  value takes the field `fallback`'s."""
  flag: str
  field: str
  kind: str
  default: object
  help: str
  choices: tuple = ()
  parse: Optional[Callable] = None
  check: Optional[Callable] = None
  library: tuple = ()
  fallback: Optional[str] = None

  @property
  def section(self):
    return self.field.split(".")[0]

  @property
  def name(self):
    return self.field.split(".")[1]


S = Setting
_UNET = unet_lib.DDPM_CIFAR10  # The architecture's defaults are the UNet's own.
_text = lambda items: ",".join(str(v) for v in items)
SETTINGS = (
    # Run
    S("mode", "run.mode", "enum", "quickstart", "What to run.", choices=MODES, library=("mode",)),
    S("workdir", "run.workdir", "string", "runs/default",
      "Run directory; each mode writes into a subfolder.", check=rules.local_path,
      library=("workdir",)),
    S("seed", "run.seed", "integer", 0, "Seed of every random draw (data order, noise, dropout)."),
    S("init_checkpoint", "run.init_checkpoint", "string", None,
      "Weights a mode starts from: a .weights.h5 file, a checkpoint prefix or directory, or a "
      "released DDPM checkpoint. Default: the workdir's latest pretrain checkpoint.",
      library=("init_checkpoint",)),
    S("use_ema", "run.use_ema", "bool", True,
      "Take the EMA weights of --init_checkpoint when it has them."),
    S("adapters", "run.adapters", "string", None,
      "An adapters file (unet.adapters.npz of a --lora_rank finetune) that --mode=sample and "
      "--mode=export apply to the weights of --init_checkpoint, merged into the UNet. "
      "--mode=evaluate takes them as K:file entries of --finetuned_checkpoints.",
      library=("adapters",)),
    S("deterministic", "run.deterministic", "bool", False,
      "Seed Keras' initializers with --seed and enable TF op determinism: a rerun, or a run killed "
      "and resumed, ends with the same weights (slower)."),
    S("checkpoint_every", "run.checkpoint_every", "integer", 1000,
      "Steps between checkpoints (and sample grids).", check=rules.positive),
    S("log_every", "run.log_every", "integer", 100,
      "Steps between progress lines and TensorBoard scalars.", check=rules.positive),
    # Data
    S("dataset", "data.dataset", "string", "fashion_mnist",
      "fashion_mnist (offline) or tfds:<name> (cifar10, celeb_a, lsun/church_outdoor).",
      library=("dataset",)),
    S("data_dir", "data.data_dir", "string", None,
      "Where the dataset files are (default: the dataset's own).", library=("data_dir",)),
    S("image_size", "data.image_size", "integer", None,
      "Image side in pixels (default: the dataset's native).", library=("image_size",)),
    S("random_flip", "data.random_flip", "bool",
      False, "Random horizontal flips of the real images."),
    S("batch_size", "data.batch_size", "integer", 64, "Global batch size (split across replicas).",
      check=rules.positive),
    # Diffusion
    S("num_timesteps", "diffusion.num_timesteps", "integer", schedule_lib.DDPM_NUM_TIMESTEPS,
      "T, the number of diffusion steps of the base model.", library=("num_timesteps",)),
    S("beta_start", "diffusion.beta_start", "float",
      schedule_lib.DDPM_BETA_START, "β_0 of the linear schedule.",
      library=("beta_start",)),
    S("beta_end", "diffusion.beta_end", "float",
      schedule_lib.DDPM_BETA_END, "β_{T-1} of the linear schedule.",
      library=("beta_end",)),
    # UNet
    S("ch", "unet.ch", "integer", _UNET["ch"], "Base channel count.", library=("ch",)),
    S("ch_mult", "unet.ch_mult", "list",
      _text(_UNET["ch_mult"]), "Channel multiplier per resolution.",
      parse=rules.ints, library=("ch_mult",)),
    S("num_res_blocks", "unet.num_res_blocks", "integer",
      _UNET["num_res_blocks"], "Residual blocks per resolution.",
      check=rules.positive, library=("num_res_blocks",)),
    S("attn_resolutions", "unet.attn_resolutions", "list", _text(_UNET["attn_resolutions"]),
      "Resolutions with self-attention.", parse=rules.ints, library=("attn_resolutions",)),
    S("dropout", "unet.dropout", "float", _UNET["dropout"], "Dropout rate in the residual blocks.",
      check=rules.fraction(include_one=False)),
    # Pretraining
    S("train_steps", "pretrain.steps", "integer", 100_000,
      "Pretraining steps (total, resumes count).", check=rules.positive),
    S("pretrain_learning_rate", "pretrain.learning_rate", "float", 2e-4,
      "Adam learning rate of pretraining.", check=rules.positive),
    S("pretrain_grad_clip", "pretrain.grad_clip", "float", 1.0,
      "Global-norm gradient clip of pretraining (0: off).", check=rules.non_negative_clip),
    S("ema_decay", "pretrain.ema_decay", "float", 0.9999, "EMA decay of the pretrained weights.",
      check=rules.fraction(include_one=True)),
    S("jit_compile", "pretrain.jit_compile", "bool", False, "XLA-compile the pretraining step."),
    # Sampling
    S("sampler", "sampler.sampler", "enum", "ddim",
      "The K-step sampler of sample, finetune, evaluate and export: ddim, or dpm_solver_pp "
      "(DPM-Solver++(2M), deterministic: needs --eta=0).", choices=samplers.SAMPLERS),
    S("num_steps", "sampler.num_steps", "integer", 5, "K, the sampler's step budget."),
    S("eta", "sampler.eta", "float", 0.0, "DDIM η: 0 deterministic, 1 DDPM-like (ddim only).",
      check=rules.fraction(include_one=True)),
    S("timesteps", "sampler.timesteps", "string", "uniform",
      "The K timesteps the sampler visits: uniform (i·⌊T/K⌋, 'leading'), trailing (from T-1 down "
      "by T/K), linspace (0 … T-1), quadratic (DDIM's CIFAR-10), or an explicit comma-separated "
      "list of K increasing integers in [0, T-1].", parse=rules.timesteps),
    S("clip_x0", "sampler.clip_x0", "bool",
      False, "Clip the x0 prediction to [-1, 1] at every step."),
    S("num_images", "sampler.num_images", "integer", 64, "Images to generate in --mode=sample.",
      check=rules.positive),
    S("sample_batch_size", "sampler.batch_size", "integer",
      sampling.BATCH_SIZE, "Images per sampler call.",
      check=rules.positive),
    # Features
    S("feature_net", "features.feature_net", "string", "classifier",
      f"Frozen feature network φ: {features_lib.NAMES_HELP} (an image model file: see "
      "--feature_image_size, --feature_image_range); also the classifier --mode=train_classifier "
      "trains."),
    S("inception_weights", "features.inception_weights", "string", None,
      "Local Keras InceptionV3 weights (.h5/.keras, e.g. "
      "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5) or a TF-GAN FID Inception "
      "SavedModel directory.", library=("inception_weights",)),
    S("inception_resolution", "features.inception_resolution", "integer",
      features_lib.INCEPTION_RESOLUTION,
      "Side images are resized to for Inception-V3.", library=("inception_resolution",)),
    S("inception_graph", "features.inception_graph", "string", None,
      "The frozen FID Inception GraphDef of --feature_net=inception_fid (FID comparable with "
      "published numbers): TTUR's classify_image_graph_def.pb or TF-GAN's "
      "inceptionv1_for_inception_score.pb.", library=("inception_graph",)),
    S("feature_image_size", "features.feature_image_size", "integer", None,
      "Side S that savedmodel:/keras: feature networks take images at (resized bilinearly). "
      "Default: image_size in the model's feature_net.json, else its fixed input size.",
      check=rules.positive, library=("feature_image_size",)),
    S("feature_image_range", "features.feature_image_range", "string", None,
      "Value range lo,hi that savedmodel:/keras: feature networks take images in: -1,1, 0,1 or "
      "0,255 ([-1, 1] is mapped onto it). Default: image_range in the model's feature_net.json.",
      parse=rules.image_range, library=("feature_image_range",)),
    S("classifier_path", "features.classifier_path", "string", None,
      "Classifier weights (.weights.h5; default: pretrained/<dataset>/<feature_net>.weights.h5).",
      library=("classifier_path",)),
    S("classifier_epochs", "features.classifier_epochs", "integer", 5,
      "Epochs of --mode=train_classifier.", check=rules.positive),
    # Finetuning
    S("finetune_steps", "finetune.steps", "integer", 300,
      "MMD finetuning steps (total, resumes count).", check=rules.positive),
    S("finetune_batch_size", "finetune.batch_size", "integer", None,
      "Global batch of MMD finetuning (default: --batch_size); the paper's code uses 64 on "
      "CIFAR-10 and 32 on LSUN church.", check=rules.positive, fallback="data.batch_size"),
    S("real_batch_size", "finetune.real_batch_size", "integer", None,
      "Global batch of real images each MMD step compares the generated batch with (default: "
      "--finetune_batch_size); larger lowers the MMD² estimate's variance for a few feature "
      "passes (no sampler).", fallback="finetune.batch_size"),
    S("micro_batches", "finetune.micro_batches", "integer", 1,
      "Sample each replica's generated batch in this many parts one after another: the same "
      "gradient as the whole batch (features of all parts first, then each part's share) in the "
      "activation memory of one part, for one more sampler pass per part.", check=rules.positive),
    S("learning_rate", "finetune.learning_rate", "float", 5e-6,
      "Adam learning rate of MMD finetuning.", check=rules.positive),
    S("grad_clip", "finetune.grad_clip", "float", 0.5,
      "Global-norm clip of the finetuning gradient (0: off).", check=rules.non_negative_clip),
    S("finetune_ema_decay", "finetune.ema_decay", "float", 0.0,
      "Keep an EMA of the finetuned weights with this decay (0: none); the EMA is then what is "
      "validated, saved and exported.", check=rules.fraction(include_one=False),
      library=("ema_decay",)),
    S("recompute", "finetune.recompute", "bool", True,
      "Replay one sampler step at a time in the backward pass (activation memory of one UNet call "
      "instead of K; a graph that does not grow with K)."),
    S("finetune_dropout", "finetune.dropout", "bool",
      False, "Dropout on in the UNet while finetuning."),
    S("lora_rank", "finetune.lora_rank", "integer", 0,
      "Finetune low-rank adapters of this rank (LoRA, Keras' enable_lora) on the base weights, "
      "which stay frozen, instead of every weight (0). The run saves the adapters alone "
      "(unet.adapters.npz, with the base weights' fingerprint); --adapters applies them.",
      check=rules.at_least(0), library=("lora_rank",)),
    S("lora_targets", "finetune.lora_targets", "enum", "all",
      "Layers that take adapters with --lora_rank: every convolution and dense layer, those of the "
      "attention blocks, or those of the up-sampling half.", choices=tuple(adapters.TARGETS),
      library=("lora_targets",)),
    S("kernel", "finetune.kernel", "enum", "polynomial",
      "MMD kernel: polynomial (γxᵀy + 1)³, γ = 1/dim (KID's), or rbf.", choices=mmd.KERNELS),
    S("rbf_bandwidths", "finetune.rbf_bandwidths", "list", "1.0",
      "Bandwidths σ of --kernel=rbf (summed).", parse=rules.floats),
    S("learn_timesteps", "finetune.learn_timesteps", "bool", False,
      "Also learn the K timesteps (continuous, monotone, starting at --timesteps; needs --eta=0). "
      "They are saved with the weights (<name>.timesteps.json beside the .weights.h5), and "
      "evaluate, export and sample use them without this flag."),
    S("timesteps_lr", "finetune.timesteps_lr", "float", 1e-2,
      "Adam learning rate of the learned timesteps' logits (their gradient is not clipped).",
      check=rules.positive, library=("timesteps_lr",)),
    # Guarded finetuning
    S("validate", "finetune.validate", "bool", False,
      "Validate while finetuning: at the start and every --validate_every steps, sample "
      "--num_val_images images from fixed noise, score them against --val_split images in "
      "--val_feature_nets, keep the best weights (unet.weights.h5; the last: unet_last.weights.h5) "
      "and stop after --patience validations without improvement."),
    S("validate_every", "finetune.validate_every", "integer", 20,
      "Finetuning steps between validations.", check=rules.positive),
    S("patience", "finetune.patience", "integer", 3,
      "Validations without improvement before finetuning stops.", check=rules.at_least(1)),
    S("lr_backoff", "finetune.lr_backoff", "float", 0.5,
      "With --validate: after a validation without improvement, go back to the best weights and on "
      "at this times the learning rate, so the rate that fits K and the sampler is found on "
      "validation (1: go on as before).", check=rules.positive_fraction),
    S("num_val_images", "finetune.num_val_images", "integer", 256,
      "Samples per validation (more than the widest validation space's dimension, for FID).",
      check=rules.positive),
    S("val_split", "finetune.val_split", "string", "test[5000:]",
      "The real validation images: a split and a slice of it, e.g. test[5000:]; never images a "
      "report uses (the first --num_eval_images of --eval_split).", parse=rules.split_slice),
    S("val_feature_nets", "finetune.val_feature_nets", "list", "classifier,classifier_val",
      "Feature spaces of validation; the best step is chosen in those no report scores (not in "
      "--eval_feature_nets), the others are shown.", parse=rules.strings),
    # Evaluation
    S("eval_steps", "eval.steps", "list", "5,10,20,50,100",
      "Step budgets K at which --mode=evaluate samples the base model with --sampler (and "
      "--eval_samplers).", parse=rules.step_budgets),
    S("num_eval_images", "eval.num_images", "integer", 5000,
      "Samples per (model, K); the reference is as many real images.", check=rules.positive),
    S("finetuned_checkpoints", "eval.finetuned_checkpoints", "list", "",
      "MMD-DDM models as K:path entries, a path a .weights.h5 file, a checkpoint or an adapters "
      "file (applied to --init_checkpoint); default: <workdir>/finetune_k<K>/unet.weights.h5 (or "
      "unet.adapters.npz) for every K of --eval_steps that has one.", parse=rules.finetuned_entries,
      library=("finetuned_checkpoints",)),
    S("eval_feature_nets", "eval.feature_nets", "list", "classifier,classifier_heldout",
      "Feature spaces of the report, each a --feature_net value (an image model file too); "
      "--feature_net is the trained one, the others are held out.", parse=rules.strings),
    S("eval_split", "eval.split", "string", "test", "Split of the real reference images.",
      library=("split",)),
    S("quickstart_eval_images", "eval.quickstart_images", "integer", 1000,
      "Samples per (model, K) in --mode=quickstart (kept small for a CPU).", check=rules.positive),
    S("eval_samplers", "eval.samplers", "list", "",
      "Training-free samplers to score beside --sampler with --timesteps, on the same noise: "
      "--mode=evaluate runs each on the base model at every K of --eval_steps, --mode=quickstart "
      f"at --num_steps. Entries <sampler>:<spacing>, sampler {'|'.join(samplers.SAMPLERS)}, "
      f"spacing {'|'.join(schedule_lib.TIMESTEP_KINDS)} (an explicit timestep list only through "
      "--timesteps), e.g. ddim:trailing,dpm_solver_pp:trailing. Empty: --sampler with --timesteps "
      "only.", parse=rules.sampler_spacings),
    S("eval_reuse_rows", "eval.reuse_rows", "list", "",
      "Directories of finished report rows (<model>_k<K>_<key>.json and .png) that evaluate and "
      "quickstart reuse, read only, for every row whose key matches: the same weights, sampler, "
      "timesteps, seed, number of images, sample batch size, real set and feature networks. E.g. "
      "the rows/ of another evaluation, or the base-model rows bundled with a pretrained model. "
      "Rows not found there are sampled into the run's own rows/.", parse=rules.strings),
    # Export
    S("export_dir", "export.export_dir", "string", "exports",
      "Where --mode=export writes <model_name>/<version>/."),
    S("model_name", "export.model_name", "string", "mmd_ddm",
      "TF Serving model name (a directory under --export_dir)."),
    S("model_version", "export.model_version", "integer", 1,
      "TF Serving version number (a directory under the name).",
      check=rules.at_least(1, " (TF Serving versions)")),
    S("max_images", "export.max_images", "integer", sampler_module.MAX_IMAGES,
      "Largest num_images / noise batch a request may ask for.", check=rules.at_least(1)),
    S("overwrite", "export.overwrite", "bool", False, "Replace an existing export version."),
    S("tflite_float16", "export.tflite_float16", "bool", False,
      "Also write a TFLite file with float16 weights."),
    # Distribution
    S("strategy", "distribution.strategy", "enum", "default",
      "tf.distribute strategy (multi_worker reads TF_CONFIG).",
      choices=("default", "mirrored", "multi_worker", "tpu")),
    S("tpu", "distribution.tpu", "string", None, "TPU address for --strategy=tpu."),
    S("num_cpu_devices", "distribution.num_cpu_devices", "integer", None,
      "Split the CPU into N logical devices that --strategy=mirrored mirrors across when there is "
      "no GPU: distribution tried out on a CPU-only machine.", check=rules.at_least(1)),
    # Merging reports
    S("reports", "merge.reports", "list", "",
      "--mode=merge_reports: the evaluations to merge (report.json files or their directories); "
      "the merged report goes to <workdir>/merged.", parse=rules.strings),
)
del S, _UNET, _text

def define_flags(flag_values):
  """Defines every setting's absl flag in `flag_values`, grouped by section in --helpfull."""
  define = {"string": flags.DEFINE_string, "integer": flags.DEFINE_integer,
            "float": flags.DEFINE_float, "bool": flags.DEFINE_bool, "list": flags.DEFINE_list}
  for s in SETTINGS:
    where = dict(flag_values=flag_values, module_name=f"{s.section} settings")
    if s.kind == "enum":
      flags.DEFINE_enum(s.flag, s.default, list(s.choices), s.help, **where)
    else:
      define[s.kind](s.flag, s.default, s.help, **where)


def flagfile_values(path, *args):
  """{field: flag value} of the flagfile `path` and `args` (more flags), parsed as main.py parses
  them: what benchmarks and tests read a flagfile's settings (its UNet) from."""
  flag_values = flags.FlagValues()
  define_flags(flag_values)
  flag_values(["flagfile_values", f"--flagfile={path}", *args])
  return {s.field: flag_values[s.flag].value for s in SETTINGS}


BY_FIELD = {s.field: s for s in SETTINGS}
BY_FLAG = {s.flag: s for s in SETTINGS}
# Library parameter -> the field it always means (modes rename the ambiguous ones where they know).
LIBRARY_NAMES = {name: s.field for s in SETTINGS for name in s.library}


def default(field):
  """The declared default of `field`, parsed as the configuration holds it."""
  setting = BY_FIELD[field]
  value = setting.default
  if setting.kind == "list":
    value = [v for v in (value or "").split(",") if v]
  return setting.parse(field, value) if setting.parse and value is not None else value


def flag_name(field, is_set=lambda flag: False):
  """How the user spells `field`: "--<flag>"; the fallback's flag where the field's own flag is not
  set (`is_set(flag)`), since that one supplied the value. Other names are returned as they are."""
  setting = BY_FIELD.get(field)
  if setting is None:
    return field
  if setting.fallback and not is_set(setting.flag):
    return flag_name(setting.fallback, is_set)
  return f"--{setting.flag}"


def parsed_values(raw):
  """{field: value} of `raw` ({field: flag value}) parsed and checked by each setting; a fallback
  field supplies an unset value. A ParameterError names the first bad field."""
  values = {}
  for setting in SETTINGS:
    if setting.field not in raw:
      continue
    value = raw[setting.field]
    if value is None and setting.fallback:
      value = values.get(setting.fallback, raw.get(setting.fallback))
    if setting.parse and value is not None:
      value = setting.parse(setting.field, value)
    detail = setting.check(value) if setting.check and value is not None else None
    if detail:
      raise ParameterError(setting.field, detail, value=value)
    values[setting.field] = value
  return values
