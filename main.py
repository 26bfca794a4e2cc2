"""mmd_keras command line: flags, the table that maps them onto the configuration, the modes, and
the one error handler. What each mode does lives in `mmd_keras.app`.

  python main.py --flagfile=configs/fashion_mnist.cfg                 # the offline quickstart
  python main.py --flagfile=configs/fashion_mnist.cfg --mode=pretrain --init_checkpoint=
  python main.py --flagfile=configs/cifar10.cfg --mode=finetune --init_checkpoint=<ckpt>
"""

import gc
import sys

from mmd_keras import console

console.quiet(console.verbosity_from_argv(sys.argv))  # Before TF loads (its start-up lines).

from absl import app
from absl import flags

from mmd_keras import config as config_lib
from mmd_keras import errors
from mmd_keras import features as features_lib
from mmd_keras import mmd
from mmd_keras import samplers
from mmd_keras import schedule
from mmd_keras.app import evaluate
from mmd_keras.app import export
from mmd_keras.app import finetune
from mmd_keras.app import merge_reports
from mmd_keras.app import pretrain
from mmd_keras.app import quickstart
from mmd_keras.app import runs
from mmd_keras.app import runtime
from mmd_keras.app import sample
from mmd_keras.app import train_classifier
from mmd_keras.errors import ParameterError
from mmd_keras.errors import UserError

# mode -> what runs it with the checked configuration.
MODES = {
    "pretrain": pretrain.run,
    "train_classifier": train_classifier.run,
    "finetune": finetune.run,
    "sample": sample.run,
    "evaluate": evaluate.run,
    "export": export.run,
    "quickstart": quickstart.run,
    "merge_reports": merge_reports.run,
}

# Run
flags.DEFINE_enum("mode", "quickstart", list(MODES), "What to run.")
flags.DEFINE_string("workdir", "runs/default", "Run directory; each mode writes into a subfolder.")
flags.DEFINE_integer("seed", 0, "Seed of every random draw (data order, noise, dropout).")
flags.DEFINE_string(
    "init_checkpoint", None,
    "Weights a mode starts from: a .weights.h5 file, a checkpoint prefix or directory, or a "
    "released DDPM checkpoint. Default: the workdir's latest pretrain checkpoint.")
flags.DEFINE_bool("use_ema", True, "Take the EMA weights of --init_checkpoint when it has them.")
flags.DEFINE_bool("deterministic", False,
                  "Seed Keras' initializers with --seed and enable TF op determinism: a rerun, or "
                  "a run killed and resumed, ends with the same weights (slower).")
flags.DEFINE_integer("checkpoint_every", 1000, "Steps between checkpoints (and sample grids).")
flags.DEFINE_integer("log_every", 100, "Steps between progress lines and TensorBoard scalars.")

# Data
flags.DEFINE_string("dataset", "fashion_mnist",
                    "fashion_mnist (offline) or tfds:<name> (cifar10, celeb_a, lsun/church_outdoor).")
flags.DEFINE_string("data_dir", None, "Where the dataset files are (default: the dataset's own).")
flags.DEFINE_integer("image_size", None, "Image side in pixels (default: the dataset's native).")
flags.DEFINE_bool("random_flip", False, "Random horizontal flips of the real images.")
flags.DEFINE_integer("batch_size", 64, "Global batch size (split across replicas).")

# Diffusion
flags.DEFINE_integer("num_timesteps", 1000, "T, the number of diffusion steps of the base model.")
flags.DEFINE_float("beta_start", 1e-4, "β_0 of the linear schedule.")
flags.DEFINE_float("beta_end", 0.02, "β_{T-1} of the linear schedule.")

# UNet
flags.DEFINE_integer("ch", 128, "Base channel count.")
flags.DEFINE_list("ch_mult", ["1", "2", "2", "2"], "Channel multiplier per resolution.")
flags.DEFINE_integer("num_res_blocks", 2, "Residual blocks per resolution.")
flags.DEFINE_list("attn_resolutions", ["16"], "Resolutions with self-attention.")
flags.DEFINE_float("dropout", 0.1, "Dropout rate in the residual blocks.")

# Pretraining
flags.DEFINE_integer("train_steps", 100_000, "Pretraining steps (total, resumes count).")
flags.DEFINE_float("pretrain_learning_rate", 2e-4, "Adam learning rate of pretraining.")
flags.DEFINE_float("pretrain_grad_clip", 1.0, "Global-norm gradient clip of pretraining (0: off).")
flags.DEFINE_float("ema_decay", 0.9999, "EMA decay of the pretrained weights.")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the pretraining step.")

# Sampling
flags.DEFINE_enum("sampler", "ddim", list(samplers.SAMPLERS),
                  "The K-step sampler of sample, finetune, evaluate and export: ddim, or "
                  "dpm_solver_pp (DPM-Solver++(2M), deterministic: needs --eta=0).")
flags.DEFINE_integer("num_steps", 5, "K, the sampler's step budget.")
flags.DEFINE_float("eta", 0.0, "DDIM η: 0 deterministic, 1 DDPM-like (ddim only).")
flags.DEFINE_string("timesteps", "uniform",
                    "The K timesteps the sampler visits: uniform (i·⌊T/K⌋, 'leading'), trailing "
                    "(from T-1 down by T/K), linspace (0 … T-1), quadratic (DDIM's CIFAR-10), or "
                    "an explicit comma-separated list of K increasing integers in [0, T-1].")
flags.DEFINE_bool("clip_x0", False, "Clip the x0 prediction to [-1, 1] at every step.")
flags.DEFINE_integer("num_images", 64, "Images to generate in --mode=sample.")
flags.DEFINE_integer("sample_batch_size", 256, "Images per sampler call.")

# Features
flags.DEFINE_string(
    "feature_net", "classifier",
    f"Frozen feature network φ: {features_lib.NAMES_HELP} (an image model file: see "
    "--feature_image_size, --feature_image_range); also the classifier --mode=train_classifier "
    "trains.")
flags.DEFINE_string("inception_weights", None,
                    "Local Keras InceptionV3 weights (.h5/.keras, e.g. "
                    "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5) or a TF-GAN FID "
                    "Inception SavedModel directory.")
flags.DEFINE_integer("inception_resolution", 299, "Side images are resized to for Inception-V3.")
flags.DEFINE_string(
    "inception_graph", None,
    "The frozen FID Inception GraphDef of --feature_net=inception_fid (FID comparable with "
    "published numbers): TTUR's classify_image_graph_def.pb or TF-GAN's "
    "inceptionv1_for_inception_score.pb.")
flags.DEFINE_integer(
    "feature_image_size", None,
    "Side S that savedmodel:/keras: feature networks take images at (resized bilinearly). Default: "
    "image_size in the model's feature_net.json, else its fixed input size.")
flags.DEFINE_string(
    "feature_image_range", None,
    "Value range lo,hi that savedmodel:/keras: feature networks take images in: -1,1, 0,1 or 0,255 "
    "([-1, 1] is mapped onto it). Default: image_range in the model's feature_net.json.")
flags.DEFINE_string("classifier_path", None,
                    "Classifier weights (.weights.h5; default: "
                    "pretrained/<dataset>/<feature_net>.weights.h5).")
flags.DEFINE_integer("classifier_epochs", 5, "Epochs of --mode=train_classifier.")

# Finetuning
flags.DEFINE_integer("finetune_steps", 300, "MMD finetuning steps (total, resumes count).")
flags.DEFINE_integer("finetune_batch_size", None,
                     "Global batch of MMD finetuning (default: --batch_size); the paper's code "
                     "uses 64 on CIFAR-10 and 32 on LSUN church.")
flags.DEFINE_float("learning_rate", 5e-6, "Adam learning rate of MMD finetuning.")
flags.DEFINE_float("grad_clip", 0.5, "Global-norm clip of the finetuning gradient (0: off).")
flags.DEFINE_bool("recompute", True,
                  "Replay one sampler step at a time in the backward pass (activation memory of "
                  "one UNet call instead of K; a graph that does not grow with K).")
flags.DEFINE_bool("finetune_dropout", False, "Dropout on in the UNet while finetuning.")
flags.DEFINE_enum("kernel", "polynomial", mmd.KERNELS,
                  "MMD kernel: polynomial (γxᵀy + 1)³, γ = 1/dim (KID's), or rbf.")
flags.DEFINE_list("rbf_bandwidths", ["1.0"], "Bandwidths σ of --kernel=rbf (summed).")
flags.DEFINE_bool("learn_timesteps", False,
                  "Also learn the K timesteps (continuous, monotone, starting at --timesteps; "
                  "needs --eta=0). They are saved with the weights (<name>.timesteps.json beside "
                  "the .weights.h5), and evaluate, export and sample use them without this flag.")
flags.DEFINE_float("timesteps_lr", 1e-2,
                   "Adam learning rate of the learned timesteps' logits (their gradient is not "
                   "clipped).")

# Evaluation
flags.DEFINE_list("eval_steps", ["5", "10", "20", "50", "100"],
                  "Step budgets K at which --mode=evaluate samples the base model with --sampler "
                  "(and --eval_samplers).")
flags.DEFINE_integer("num_eval_images", 5000,
                     "Samples per (model, K); the reference is as many real images.")
flags.DEFINE_list("finetuned_checkpoints", [],
                  "MMD-DDM models as K:path entries (default: <workdir>/finetune_k<K>/"
                  "unet.weights.h5 for every K of --eval_steps that has one).")
flags.DEFINE_list("eval_feature_nets", ["classifier", "classifier_heldout"],
                  "Feature spaces of the report, each a --feature_net value (an image model file "
                  "too); --feature_net is the trained one, the others are held out.")
flags.DEFINE_string("eval_split", "test", "Split of the real reference images.")
flags.DEFINE_integer("quickstart_eval_images", 1000,
                     "Samples per (model, K) in --mode=quickstart (kept small for a CPU).")
flags.DEFINE_list(
    "eval_samplers", [],
    "Training-free samplers to score beside --sampler with --timesteps, on the same noise: "
    "--mode=evaluate runs each on the base model at every K of --eval_steps, --mode=quickstart at "
    f"--num_steps. Entries <sampler>:<spacing>, sampler {'|'.join(samplers.SAMPLERS)}, spacing "
    f"{'|'.join(schedule.TIMESTEP_KINDS)} (an explicit timestep list only through --timesteps), "
    "e.g. ddim:trailing,dpm_solver_pp:trailing. Empty: --sampler with --timesteps only.")
flags.DEFINE_list(
    "eval_reuse_rows", [],
    "Directories of finished report rows (<model>_k<K>_<key>.json and .png) that evaluate and "
    "quickstart reuse, read only, for every row whose key matches: the same weights, sampler, "
    "timesteps, seed, number of images, sample batch size, real set and feature networks. E.g. "
    "the rows/ of another evaluation, or the base-model rows bundled with a pretrained model. "
    "Rows not found there are sampled into the run's own rows/.")
flags.DEFINE_list("reports", [],
                  "--mode=merge_reports: the evaluations to merge (report.json files or their "
                  "directories); the merged report goes to <workdir>/merged.")

# Export
flags.DEFINE_string("export_dir", "exports", "Where --mode=export writes <model_name>/<version>/.")
flags.DEFINE_string("model_name", "mmd_ddm", "TF Serving model name (a directory under --export_dir).")
flags.DEFINE_integer("model_version", 1, "TF Serving version number (a directory under the name).")
flags.DEFINE_integer("max_images", 64, "Largest num_images / noise batch a request may ask for.")
flags.DEFINE_bool("overwrite", False, "Replace an existing export version.")
flags.DEFINE_bool("tflite_float16", False, "Also write a TFLite file with float16 weights.")

# Distribution
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker", "tpu"],
                  "tf.distribute strategy (multi_worker reads TF_CONFIG).")
flags.DEFINE_string("tpu", None, "TPU address for --strategy=tpu.")
flags.DEFINE_integer("num_cpu_devices", None,
                     "Split the CPU into N logical devices that --strategy=mirrored mirrors across "
                     "when there is no GPU: distribution tried out on a CPU-only machine.")

FLAGS = flags.FLAGS

# Configuration field -> the flag that sets it; a tuple names flags in order of precedence (the
# first one that is set supplies the value). Errors about a field name this flag.
PARAMETERS = {
    "run.mode": "mode", "run.workdir": "workdir", "run.seed": "seed",
    "run.init_checkpoint": "init_checkpoint", "run.use_ema": "use_ema",
    "run.deterministic": "deterministic", "run.checkpoint_every": "checkpoint_every",
    "run.log_every": "log_every",
    "data.dataset": "dataset", "data.data_dir": "data_dir", "data.image_size": "image_size",
    "data.random_flip": "random_flip", "data.batch_size": "batch_size",
    "diffusion.num_timesteps": "num_timesteps", "diffusion.beta_start": "beta_start",
    "diffusion.beta_end": "beta_end",
    "unet.ch": "ch", "unet.ch_mult": "ch_mult", "unet.num_res_blocks": "num_res_blocks",
    "unet.attn_resolutions": "attn_resolutions", "unet.dropout": "dropout",
    "pretrain.steps": "train_steps", "pretrain.learning_rate": "pretrain_learning_rate",
    "pretrain.grad_clip": "pretrain_grad_clip", "pretrain.ema_decay": "ema_decay",
    "pretrain.jit_compile": "jit_compile",
    "sampler.sampler": "sampler", "sampler.num_steps": "num_steps",
    "sampler.timesteps": "timesteps", "sampler.eta": "eta",
    "sampler.clip_x0": "clip_x0", "sampler.num_images": "num_images",
    "sampler.batch_size": "sample_batch_size",
    "features.feature_net": "feature_net", "features.inception_weights": "inception_weights",
    "features.inception_resolution": "inception_resolution",
    "features.inception_graph": "inception_graph",
    "features.feature_image_size": "feature_image_size",
    "features.feature_image_range": "feature_image_range",
    "features.classifier_path": "classifier_path",
    "features.classifier_epochs": "classifier_epochs",
    "finetune.steps": "finetune_steps",
    "finetune.batch_size": ("finetune_batch_size", "batch_size"),
    "finetune.learning_rate": "learning_rate", "finetune.grad_clip": "grad_clip",
    "finetune.recompute": "recompute", "finetune.dropout": "finetune_dropout",
    "finetune.kernel": "kernel", "finetune.rbf_bandwidths": "rbf_bandwidths",
    "finetune.learn_timesteps": "learn_timesteps", "finetune.timesteps_lr": "timesteps_lr",
    "eval.steps": "eval_steps", "eval.num_images": "num_eval_images",
    "eval.finetuned_checkpoints": "finetuned_checkpoints", "eval.feature_nets": "eval_feature_nets",
    "eval.split": "eval_split", "eval.quickstart_images": "quickstart_eval_images",
    "eval.samplers": "eval_samplers", "eval.reuse_rows": "eval_reuse_rows",
    "export.export_dir": "export_dir", "export.model_name": "model_name",
    "export.model_version": "model_version", "export.max_images": "max_images",
    "export.overwrite": "overwrite", "export.tflite_float16": "tflite_float16",
    "distribution.strategy": "strategy", "distribution.tpu": "tpu",
    "distribution.num_cpu_devices": "num_cpu_devices",
    "merge.reports": "reports",
}


def flag_of(field):
  """The flag the user set for configuration field `field` ("--name"), or the field itself."""
  names = PARAMETERS.get(field)
  if names is None:
    return field
  if isinstance(names, str):
    return f"--{names}"
  return f"--{next((n for n in names if FLAGS[n].value is not None), names[-1])}"


def configuration():
  """The checked configuration of the parsed flags (only the run's and the reports' for
  --mode=merge_reports, which builds no model)."""
  values = {}
  for field, names in PARAMETERS.items():
    values[field] = FLAGS[names if isinstance(names, str) else names[0]].value
  values["run.flags_text"] = FLAGS.flags_into_string()
  if FLAGS.mode == "merge_reports":
    return config_lib.build_merge(values)
  return config_lib.build(values)


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; every option is a --flag (flagfile lines "
                    f"too)")
  cfg = configuration()
  with errors.renamed(**runs.LIBRARY_FIELDS):
    if isinstance(cfg, config_lib.Config):
      runtime.prepare(cfg)
    MODES[FLAGS.mode](cfg)


def _parse_flags(argv):
  """absl's flag parsing with its errors (unknown flag, bad value, unreadable flagfile) in one line
  `error: ...` and exit code 2, like every other user error."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    message = "; ".join(line.strip() for line in str(e).splitlines() if line.strip())
    if isinstance(e, flags.CantOpenFlagFileError):
      message = message.replace("ERROR:: Unable to open flagfile:", "--flagfile cannot be read:")
    print(f"error: {message} (python main.py --helpfull lists every flag)", file=sys.stderr)
    sys.exit(2)


def _run_main(argv):
  try:
    main(argv)
    # Python's exit would collect the whole heap of traced graphs, seconds (11 s after the
    # quickstart) spent freeing memory the OS takes back anyway. Writers are closed by now.
    gc.freeze()
  except ParameterError as e:
    print(f"error: {e.message(flag_of)}", file=sys.stderr)
    sys.exit(2)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(_run_main, flags_parser=_parse_flags)
