"""mmd_keras command line: flags and dispatch only (the math lives in the `mmd_keras` package).

  python main.py --flagfile=configs/fashion_mnist.cfg                 # the offline quickstart
  python main.py --flagfile=configs/fashion_mnist.cfg --mode=pretrain --init_checkpoint=
  python main.py --flagfile=configs/cifar10.cfg --mode=finetune --init_checkpoint=<ckpt>
"""

import datetime
import glob
import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Before TF loads: keep its C++ chatter out.

import keras
import numpy as np
import tensorflow as tf
from absl import app
from absl import flags
from absl import logging

from mmd_keras.export import sampler_module as export_sampler
from mmd_keras.export import writers as export_writers

from mmd_keras import checkpoints
from mmd_keras import classifier as classifier_lib
from mmd_keras import data as data_lib
from mmd_keras import ddim
from mmd_keras import distribute
from mmd_keras import errors
from mmd_keras import evaluate as evaluate_lib
from mmd_keras import features as features_lib
from mmd_keras import finetune as finetune_lib
from mmd_keras import grid
from mmd_keras import metrics
from mmd_keras import mmd
from mmd_keras import pretrain
from mmd_keras import sampling
from mmd_keras import schedule as schedule_lib
from mmd_keras import unet as unet_lib
from mmd_keras.errors import UserError

MODES = ("pretrain", "train_classifier", "finetune", "sample", "evaluate", "export", "quickstart")

# Run
flags.DEFINE_enum("mode", "quickstart", MODES, "What to run.")
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
flags.DEFINE_float("pretrain_grad_clip", 1.0, "Global-norm gradient clip of pretraining.")
flags.DEFINE_float("ema_decay", 0.9999, "EMA decay of the pretrained weights.")
flags.DEFINE_integer("checkpoint_every", 1000, "Steps between checkpoints (and sample grids).")
flags.DEFINE_integer("log_every", 100, "Steps between progress lines and TensorBoard scalars.")
flags.DEFINE_bool("jit_compile", False, "XLA-compile the train step.")

# Sampling
flags.DEFINE_integer("num_steps", 5, "K, the DDIM step budget.")
flags.DEFINE_float("eta", 0.0, "DDIM η: 0 deterministic, 1 DDPM-like.")
flags.DEFINE_enum("timesteps", "uniform", ["uniform", "quadratic"], "K-step timestep spacing.")
flags.DEFINE_bool("clip_x0", False, "Clip the x0 prediction to [-1, 1] at every step.")
flags.DEFINE_integer("num_images", 64, "Images to generate in --mode=sample.")
flags.DEFINE_integer("sample_batch_size", 256, "Images per sampler call.")

# Features
flags.DEFINE_enum("feature_net", "classifier", features_lib.FEATURE_NETS,
                  "Frozen feature network φ (and the classifier --mode=train_classifier trains).")
flags.DEFINE_string("inception_weights", None,
                    "Local Keras InceptionV3 weights (.h5/.keras, e.g. "
                    "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5) or a TF-GAN FID "
                    "Inception SavedModel directory.")
flags.DEFINE_integer("inception_resolution", 299, "Side images are resized to for Inception-V3.")
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
                  "Wrap each UNet call of the unrolled sampler in tf.recompute_grad (memory of "
                  "one call instead of K).")
flags.DEFINE_bool("finetune_dropout", False, "Dropout on in the UNet while finetuning.")
flags.DEFINE_enum("kernel", "polynomial", mmd.KERNELS,
                  "MMD kernel: polynomial (γxᵀy + 1)³, γ = 1/dim (KID's), or rbf.")
flags.DEFINE_list("rbf_bandwidths", ["1.0"], "Bandwidths σ of --kernel=rbf (summed).")

# Export
flags.DEFINE_string("export_dir", "exports", "Where --mode=export writes <model_name>/<version>/.")
flags.DEFINE_string("model_name", "mmd_ddm", "TF Serving model name (a directory under --export_dir).")
flags.DEFINE_integer("model_version", 1, "TF Serving version number (a directory under the name).")
flags.DEFINE_integer("max_images", 64, "Largest num_images / noise batch a request may ask for.")
flags.DEFINE_bool("overwrite", False, "Replace an existing export version.")
flags.DEFINE_bool("tflite_float16", False, "Also write a TFLite file with float16 weights.")

# Evaluation
flags.DEFINE_list("eval_steps", ["5", "10", "20", "50", "100"],
                  "Step budgets K at which --mode=evaluate samples the base model with DDIM.")
flags.DEFINE_integer("num_eval_images", 5000,
                     "Samples per (model, K); the reference is as many real images.")
flags.DEFINE_list("finetuned_checkpoints", [],
                  "MMD-DDM models as K:path entries (default: <workdir>/finetune_k<K>/"
                  "unet.weights.h5 for every K of --eval_steps that has one).")
flags.DEFINE_list("eval_feature_nets", ["classifier", "classifier_heldout"],
                  "Feature spaces of the report; --feature_net is the trained one, the others are "
                  "held out.")
flags.DEFINE_string("eval_split", "test", "Split of the real reference images.")
flags.DEFINE_integer("quickstart_eval_images", 1000,
                     "Samples per (model, K) in --mode=quickstart (kept small for a CPU).")

# Distribution
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multi_worker", "tpu"],
                  "tf.distribute strategy (multi_worker reads TF_CONFIG).")
flags.DEFINE_string("tpu", None, "TPU address for --strategy=tpu.")
flags.DEFINE_integer("num_cpu_devices", None,
                     "Split the CPU into N logical devices that --strategy=mirrored mirrors across "
                     "when there is no GPU: distribution tried out on a CPU-only machine.")

FLAGS = flags.FLAGS


# Checks. Every mode checks its flags and input files before it loads data or builds a model, and
# writes its flags record only once its data is read: a bad run adds at most that record and never
# touches an earlier run's files.

def _int_list(name):
  try:
    return tuple(int(v) for v in getattr(FLAGS, name))
  except ValueError:
    raise UserError(f"--{name} must be a comma-separated list of integers, "
                    f"got {','.join(getattr(FLAGS, name))}") from None


def _check_positive(*names):
  for name in names:
    value = getattr(FLAGS, name)
    if not value > 0:  # NaN fails too.
      raise UserError(f"--{name} must be > 0, got {value}")


def _check_fraction(name, *, include_one):
  value = getattr(FLAGS, name)
  if not (0 <= value <= 1 if include_one else 0 <= value < 1):
    raise UserError(f"--{name} must be in [0, 1{']' if include_one else ')'}, got {value}")


def _schedule():
  return schedule_lib.NoiseSchedule.linear(num_timesteps=FLAGS.num_timesteps,
                                           beta_start=FLAGS.beta_start, beta_end=FLAGS.beta_end)


def _image_shape():
  native_size, channels = data_lib.dataset_shape(FLAGS.dataset)
  image_size = FLAGS.image_size or native_size
  if image_size is None:
    raise UserError(f"--image_size is needed for --dataset={FLAGS.dataset}")
  return image_size, channels


def _unet_factory():
  image_size, channels = _image_shape()
  kwargs = dict(image_size=image_size, channels=channels, ch=FLAGS.ch,
                ch_mult=_int_list("ch_mult"), num_res_blocks=FLAGS.num_res_blocks,
                attn_resolutions=_int_list("attn_resolutions"), dropout=FLAGS.dropout)
  unet_lib.check_architecture(image_size=image_size, ch=FLAGS.ch, ch_mult=kwargs["ch_mult"])
  _check_fraction("dropout", include_one=False)
  return lambda: unet_lib.UNet(**kwargs)


def _check_sampler_flags(steps=None, *, flag="--num_steps"):
  """T and β, η, and every K of `steps` (default: --num_steps)."""
  schedule = _schedule()
  _check_fraction("eta", include_one=True)
  for k in steps or (FLAGS.num_steps,):
    schedule_lib.timestep_subsequence(num_timesteps=schedule.num_timesteps, num_steps=k,
                                      kind=FLAGS.timesteps, flag=flag)


def _check_global_batch(batch_size, flag):
  strategy = distribute.make_strategy(FLAGS.strategy, tpu=FLAGS.tpu)
  distribute.check_global_batch(batch_size, strategy, flag=flag.lstrip("-"))
  return strategy


def _mode_dir(name):
  return errors.writable_dir(os.path.join(FLAGS.workdir, name), flag="workdir",
                             value=FLAGS.workdir)


def _write_flags(run_dir):
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  path = os.path.join(run_dir, f"flags_{FLAGS.mode}_{stamp}.cfg")
  try:
    with open(path, "w") as f:
      f.write(FLAGS.flags_into_string())
  except OSError as e:
    raise UserError(f"--workdir={FLAGS.workdir} is not writable: {path}: {e.strerror}") from None
  return path


def _init_checkpoint():
  """--init_checkpoint (checked readable), or the workdir's latest pretrain checkpoint."""
  path = FLAGS.init_checkpoint
  if path:
    # Remote (gs://…) paths are left to TF.
    if "://" not in path:
      checkpoints.check_readable(path)
    return path
  found = checkpoints.latest(os.path.join(FLAGS.workdir, "pretrain"))
  if not found:
    raise UserError(f"--init_checkpoint is not set and {FLAGS.workdir}/pretrain holds no "
                    f"checkpoint; pass --init_checkpoint=<.weights.h5 or checkpoint>")
  checkpoints.check_readable(found)
  return found


def _check_resume(run_dir_name):
  """The checkpoint a rerun in <workdir>/<run_dir_name> resumes from, if any, checked against the
  UNet flags; after the strategy exists (it builds a UNet), before the data is read."""
  checkpoints.check_resume(os.path.join(FLAGS.workdir, run_dir_name, "checkpoints"),
                           unet_factory=_unet_factory())


def _restored_unet(path=None):
  """The UNet of the flags with the weights of `path` (default: --init_checkpoint's)."""
  path = path or _init_checkpoint()
  unet = _unet_factory()().build_for_inference()
  source = checkpoints.restore_unet(unet, path, use_ema=FLAGS.use_ema)
  logging.info("loaded %s (%s)", path, source)
  return unet


def _training_data(batch_size):
  """start_batch -> the shuffled, repeated training stream from that batch on."""
  image_size, _ = _image_shape()
  make = lambda start_batch: data_lib.make_dataset(
      dataset=FLAGS.dataset, split="train", global_batch_size=batch_size, image_size=image_size,
      data_dir=FLAGS.data_dir, random_flip=FLAGS.random_flip, seed=FLAGS.seed,
      start_batch=start_batch)
  make(0)  # Reads the data now: a missing file fails before any model is built.
  return make


def run_pretrain():
  unet_factory = _unet_factory()
  schedule = _schedule()
  _check_positive("batch_size", "train_steps", "pretrain_learning_rate", "checkpoint_every",
                  "log_every")
  if not FLAGS.pretrain_grad_clip >= 0:
    raise UserError(f"--pretrain_grad_clip must be >= 0 (0 disables clipping), "
                    f"got {FLAGS.pretrain_grad_clip}")
  _check_fraction("ema_decay", include_one=True)
  if FLAGS.init_checkpoint and "://" not in FLAGS.init_checkpoint:
    checkpoints.check_readable(FLAGS.init_checkpoint)
  strategy = _check_global_batch(FLAGS.batch_size, "--batch_size")
  _check_resume("pretrain")
  run_dir = _mode_dir("pretrain")
  dataset_fn = _training_data(FLAGS.batch_size)
  if distribute.is_chief(strategy):  # Workers of a cluster share the workdir: one flags file.
    _write_flags(run_dir)
  pretrain.train(unet_factory=unet_factory, dataset_fn=dataset_fn, schedule=schedule,
                 global_batch_size=FLAGS.batch_size,
                 workdir=run_dir, train_steps=FLAGS.train_steps,
                 learning_rate=FLAGS.pretrain_learning_rate, ema_decay=FLAGS.ema_decay,
                 checkpoint_every=FLAGS.checkpoint_every, log_every=FLAGS.log_every,
                 grad_clip=FLAGS.pretrain_grad_clip, seed=FLAGS.seed,
                 sample_steps=min(100, FLAGS.num_timesteps), num_sample_images=64,
                 strategy=strategy, init_checkpoint=FLAGS.init_checkpoint,
                 jit_compile=FLAGS.jit_compile)


def run_sample():
  _check_sampler_flags()
  _check_positive("num_images", "sample_batch_size")
  init_checkpoint = _init_checkpoint()
  _unet_factory()
  run_dir = _mode_dir("sample")
  unet = _restored_unet(init_checkpoint)
  _write_flags(run_dir)
  schedule = _schedule()
  images = sampling.generate(unet, num_images=FLAGS.num_images, num_steps=FLAGS.num_steps,
                             schedule=schedule, timestep_kind=FLAGS.timesteps, eta=FLAGS.eta,
                             clip_x0=FLAGS.clip_x0, seed=FLAGS.seed,
                             batch_size=FLAGS.sample_batch_size)
  name = f"samples_k{FLAGS.num_steps}_eta{FLAGS.eta:g}_seed{FLAGS.seed}"
  grid.write_png(os.path.join(run_dir, name + ".png"), images[:256],
                 scale=max(1, 64 // images.shape[1]))
  np.savez_compressed(os.path.join(run_dir, name + ".npz"),
                      images=np.asarray(ddim.to_uint8(images)))
  print(f"wrote {FLAGS.num_images} samples to {os.path.join(run_dir, name)}.png/.npz")


def _classifier_path():
  return FLAGS.classifier_path or features_lib.default_classifier_path(FLAGS.dataset,
                                                                       FLAGS.feature_net)


def run_train_classifier():
  if FLAGS.feature_net not in classifier_lib.ARCHITECTURES:
    raise UserError(f"--mode=train_classifier trains --feature_net="
                    f"{' or '.join(classifier_lib.ARCHITECTURES)}, got {FLAGS.feature_net}")
  _check_positive("batch_size")
  image_size, _ = _image_shape()
  classifier_lib.train_classifier(arch=FLAGS.feature_net, dataset=FLAGS.dataset,
                                  data_dir=FLAGS.data_dir, image_size=image_size,
                                  epochs=FLAGS.classifier_epochs, batch_size=FLAGS.batch_size,
                                  seed=FLAGS.seed, out_path=_classifier_path())


def _finetune_batch_size():
  """(global batch of finetuning, the flag that set it)."""
  if FLAGS.finetune_batch_size is None:
    return FLAGS.batch_size, "--batch_size"
  return FLAGS.finetune_batch_size, "--finetune_batch_size"


def _check_finetune():
  """Every flag and input file of finetuning: (global batch, kernel, strategy, init checkpoint)."""
  _check_sampler_flags()
  _unet_factory()
  image_size, channels = _image_shape()
  batch_size, batch_flag = _finetune_batch_size()
  if batch_size < 2:
    raise UserError(f"{batch_flag} must be >= 2 (the unbiased MMD² compares at least two images "
                    f"per batch), got {batch_size}")
  _check_positive("finetune_steps", "learning_rate", "checkpoint_every", "log_every")
  if not FLAGS.grad_clip >= 0:
    raise UserError(f"--grad_clip must be >= 0 (0 disables clipping), got {FLAGS.grad_clip}")
  try:
    bandwidths = tuple(float(b) for b in FLAGS.rbf_bandwidths)
  except ValueError:
    raise UserError(f"--rbf_bandwidths must be a comma-separated list of numbers, "
                    f"got {','.join(FLAGS.rbf_bandwidths)}") from None
  kernel = mmd.make_kernel(FLAGS.kernel, bandwidths=bandwidths)
  features_lib.check_feature_network(
      FLAGS.feature_net, image_size=image_size, channels=channels,
      inception_weights=FLAGS.inception_weights, inception_resolution=FLAGS.inception_resolution,
      classifier_path=_classifier_path())
  strategy = _check_global_batch(batch_size, batch_flag)
  init_checkpoint = _init_checkpoint()
  _check_resume(f"finetune_k{FLAGS.num_steps}")
  return batch_size, kernel, strategy, init_checkpoint


def run_finetune(checked=None):
  """Finetunes at K = --num_steps; `checked` is what `_check_finetune` returned, if it ran."""
  batch_size, kernel, strategy, init_checkpoint = checked or _check_finetune()
  unet_factory = _unet_factory()
  image_size, channels = _image_shape()
  run_dir = _mode_dir(f"finetune_k{FLAGS.num_steps}")
  dataset_fn = _training_data(batch_size)
  if distribute.is_chief(strategy):  # Workers of a cluster share the workdir: one flags file.
    _write_flags(run_dir)
  feature_net_factory = lambda: features_lib.make_feature_network(
      FLAGS.feature_net, image_size=image_size, channels=channels,
      inception_weights=FLAGS.inception_weights,
      inception_resolution=FLAGS.inception_resolution, classifier_path=_classifier_path())
  finetune_lib.finetune(
      unet_factory=unet_factory, feature_net_factory=feature_net_factory, kernel=kernel,
      dataset_fn=dataset_fn, schedule=_schedule(), workdir=run_dir, num_steps=FLAGS.num_steps,
      timestep_kind=FLAGS.timesteps, eta=FLAGS.eta, clip_x0=FLAGS.clip_x0,
      finetune_steps=FLAGS.finetune_steps, learning_rate=FLAGS.learning_rate,
      grad_clip=FLAGS.grad_clip, global_batch_size=batch_size,
      batch_flag=_finetune_batch_size()[1],
      checkpoint_every=FLAGS.checkpoint_every, log_every=FLAGS.log_every, seed=FLAGS.seed,
      strategy=strategy, init_checkpoint=init_checkpoint, use_ema=FLAGS.use_ema,
      recompute=FLAGS.recompute, dropout=FLAGS.finetune_dropout)
  weights = os.path.join(run_dir, "unet.weights.h5")
  print(f"finetuned weights: {weights}")
  return weights


def _check_export_flags():
  if FLAGS.model_version < 1:
    raise UserError(f"--model_version must be >= 1 (TF Serving versions), got {FLAGS.model_version}")
  if FLAGS.max_images < 1:
    raise UserError(f"--max_images must be >= 1, got {FLAGS.max_images}")
  export_writers.check_model_name(FLAGS.model_name)


def run_export(init_checkpoint=None, next_free_version=False):
  """Writes the K-step sampler to --model_version, refusing to replace files without --overwrite.

  `next_free_version` (the quickstart, which re-exports on every run): reuse the latest version if
  it holds the same weights and settings, else write the next free version, with TFLite files named
  after it (<name>_k<K>_v<version>.tflite); nothing existing is replaced.
  """
  _check_sampler_flags()
  _check_export_flags()
  _unet_factory()
  variants = () if FLAGS.eta else ((False, True) if FLAGS.tflite_float16 else (False,))
  tflite_path = lambda version, float16: export_writers.tflite_path(
      export_dir=FLAGS.export_dir, model_name=FLAGS.model_name, num_steps=FLAGS.num_steps,
      float16=float16, version=version)
  if not next_free_version:  # Refused before the checkpoint is even read.
    export_writers.check_version_free(export_writers.version_dir(
        export_dir=FLAGS.export_dir, model_name=FLAGS.model_name, version=FLAGS.model_version),
        overwrite=FLAGS.overwrite)
    existing = [p for p in (tflite_path(None, f16) for f16 in variants) if os.path.exists(p)]
    if existing and not FLAGS.overwrite:
      raise UserError(f"{existing[0]} already exists; pass --overwrite to replace it")
  init_checkpoint = init_checkpoint or _init_checkpoint()
  export_writers.make_model_dir(export_dir=FLAGS.export_dir, model_name=FLAGS.model_name)
  sampler = export_sampler.Sampler.from_schedule(
      _restored_unet(init_checkpoint), schedule=_schedule(), num_steps=FLAGS.num_steps,
      timestep_kind=FLAGS.timesteps, eta=FLAGS.eta, clip_x0=FLAGS.clip_x0,
      max_images=FLAGS.max_images)
  metadata = sampler.metadata()
  version, reused = FLAGS.model_version, False
  if next_free_version:
    version, reused = export_writers.next_free_version(
        metadata, export_dir=FLAGS.export_dir, model_name=FLAGS.model_name,
        first_version=FLAGS.model_version, num_steps=FLAGS.num_steps, tflite_variants=variants)
  path = export_writers.version_dir(export_dir=FLAGS.export_dir, model_name=FLAGS.model_name,
                                    version=version)
  if reused:
    print(f"reusing SavedModel {path}: exported from the same weights (sha256 "
          f"{metadata['weights_sha256'][:12]}) and settings; no new version written")
  else:
    export_writers.write_saved_model(sampler, export_dir=FLAGS.export_dir,
                                     model_name=FLAGS.model_name, version=version,
                                     overwrite=FLAGS.overwrite)
    print(f"wrote SavedModel {path}")
  if FLAGS.eta:
    print("skipped TFLite: it is the deterministic noise -> images sampler (needs --eta=0)")
    return
  for float16 in variants:
    path = tflite_path(version if next_free_version else None, float16)
    if reused and os.path.exists(path):  # next_free_version checked it is the same model.
      print(f"kept TFLite {path} (the same model)")
    else:
      export_writers.write_tflite(sampler, path, float16=float16, version=version)
      print(f"wrote TFLite {path}")
    plain = tflite_path(None, float16)
    record = export_writers.read_tflite_record(plain)
    if next_free_version and os.path.exists(plain) and not export_writers.same_model(record,
                                                                                     metadata):
      origin = (f"version {record.get('saved_model_version')}, weights sha256 "
                f"{str(record.get('weights_sha256'))[:12]}") if record else "no record"
      print(f"note: {plain} holds another model ({origin}); this export's TFLite is {path}")


def _finetuned_checkpoints(steps):
  """{K: path} from --finetuned_checkpoints (checked readable), else the workdir's
  finetune_k<K>/unet.weights.h5."""
  found = {}
  for entry in FLAGS.finetuned_checkpoints:
    k, sep, path = entry.partition(":")
    if not sep or not k.strip().isdigit() or not path:
      raise UserError(f"--finetuned_checkpoints entries must look like 5:/path/to/unet.weights.h5, "
                      f"got {entry!r}")
    _check_sampler_flags((int(k),), flag="--finetuned_checkpoints")
    if int(k) in found:
      raise UserError(f"--finetuned_checkpoints gives K={int(k)} twice ({found[int(k)]} and "
                      f"{path}); expected one model per K")
    checkpoints.check_readable(path, flag="--finetuned_checkpoints")
    found[int(k)] = path
  if FLAGS.finetuned_checkpoints:
    return found
  for k in steps:
    path = os.path.join(FLAGS.workdir, f"finetune_k{k}", "unet.weights.h5")
    if os.path.exists(path):
      found[k] = path
  return found


def _check_feature_spaces():
  """The names of the report's feature spaces, their files checked; nothing is loaded."""
  image_size, channels = _image_shape()
  names = list(dict.fromkeys([FLAGS.feature_net] + list(FLAGS.eval_feature_nets)))
  unknown = [n for n in names if n not in features_lib.FEATURE_NETS]
  if unknown:
    raise UserError(f"--eval_feature_nets must name {'|'.join(features_lib.FEATURE_NETS)}, "
                    f"got {unknown[0]!r}")
  for name in names:
    features_lib.check_feature_network(
        name, image_size=image_size, channels=channels, inception_weights=FLAGS.inception_weights,
        inception_resolution=FLAGS.inception_resolution, classifier_path=_space_path(name))
  return names


def _space_path(name):
  return (_classifier_path() if name == FLAGS.feature_net
          else features_lib.default_classifier_path(FLAGS.dataset, name))


def _feature_spaces(num_images, flag):
  """The report's feature networks, each with more dimensions than `num_images` (FID's Σ)."""
  image_size, channels = _image_shape()
  spaces = []
  for name in _check_feature_spaces():
    network = features_lib.make_feature_network(
        name, image_size=image_size, channels=channels, inception_weights=FLAGS.inception_weights,
        inception_resolution=FLAGS.inception_resolution, classifier_path=_space_path(name))
    metrics.check_enough_samples(num_images, network.dim, flag=flag)
    # What the weights do not show: the input size, and Inception's resize.
    settings = repr(dict(image_size=image_size, channels=channels,
                         inception_resolution=FLAGS.inception_resolution
                         if name == "inception_v3" else None))
    spaces.append(evaluate_lib.FeatureSpace(name, network, trained=name == FLAGS.feature_net,
                                            settings=settings))
  return spaces


def _check_eval_split(num_images, flag):
  """--eval_split names a split with at least `num_images` images (when its size is known
  without reading it)."""
  if FLAGS.dataset == "fashion_mnist" and FLAGS.eval_split not in data_lib.FASHION_MNIST_FILES:
    raise UserError(f"--eval_split must be {' or '.join(data_lib.FASHION_MNIST_FILES)} for "
                    f"--dataset=fashion_mnist, got {FLAGS.eval_split!r}")
  available = data_lib.num_examples(dataset=FLAGS.dataset, split=FLAGS.eval_split,
                                    data_dir=FLAGS.data_dir)
  if available is not None and num_images > available:
    raise UserError(f"{flag}={num_images} exceeds the {available} images of --eval_split="
                    f"{FLAGS.eval_split} (the reference set is as many real images as samples)")


def _real_set():
  """(a name of the reference images for the report and cache files, a function returning their
  batches); the data is opened now, so a missing file fails before any sampling."""
  image_size, _ = _image_shape()
  dataset = data_lib.make_dataset(dataset=FLAGS.dataset, split=FLAGS.eval_split,
                                  global_batch_size=FLAGS.sample_batch_size,
                                  image_size=image_size, data_dir=FLAGS.data_dir, shuffle=False,
                                  repeat=False, drop_remainder=False)
  name = "".join(c if c.isalnum() or c in "-_." else "_"
                 for c in f"{FLAGS.dataset}_{FLAGS.eval_split}_{image_size}px")
  return name, lambda: (batch.numpy() for batch in dataset)


def _evaluate(*, ddim_steps, finetuned, spaces, num_images, out_dir):
  """Runs the sweep: the base model with DDIM at every K, each MMD-DDM model at its own K."""
  factory = _unet_factory()
  init_checkpoint = _init_checkpoint()
  base = _restored_unet(init_checkpoint)
  # A directory stands for its latest checkpoint: the report names (and hashes) that one.
  models = [evaluate_lib.ModelSpec("DDIM", base, tuple(ddim_steps),
                                   path=checkpoints.latest(init_checkpoint))]
  for k, path in sorted(finetuned.items()):
    unet = factory().build_for_inference()
    checkpoints.restore_unet(unet, path, use_ema=False, flag="--finetuned_checkpoints")
    models.append(evaluate_lib.ModelSpec("MMD-DDM", unet, (k,), path=path))
  real_set, real_batches = _real_set()
  _write_flags(out_dir)
  report = evaluate_lib.run(
      models=models, feature_spaces=spaces, real_images=real_batches,
      schedule=_schedule(), num_images=num_images, seed=FLAGS.seed, out_dir=out_dir,
      timestep_kind=FLAGS.timesteps, eta=FLAGS.eta, clip_x0=FLAGS.clip_x0,
      batch_size=FLAGS.sample_batch_size, real_set=real_set,
      cache_dir=os.path.join(FLAGS.workdir, "reference"))
  print(evaluate_lib.markdown_table(report), end="")
  print(f"report: {os.path.join(out_dir, 'report.md')}")
  return report


def run_evaluate():
  steps = evaluate_lib.parse_steps(FLAGS.eval_steps)
  _check_sampler_flags(steps, flag="--eval_steps")
  _unet_factory()
  _check_positive("num_eval_images", "sample_batch_size")
  _check_eval_split(FLAGS.num_eval_images, "--num_eval_images")
  finetuned = _finetuned_checkpoints(steps)
  _check_feature_spaces()
  _init_checkpoint()
  out_dir = _mode_dir("evaluate")
  spaces = _feature_spaces(FLAGS.num_eval_images, "--num_eval_images")
  _evaluate(ddim_steps=steps, finetuned=finetuned, spaces=spaces,
            num_images=FLAGS.num_eval_images, out_dir=out_dir)


# What a finetune's weights depend on besides --init_checkpoint, the feature network's file and
# the image size and batch (resolved below). --recompute, --strategy, --data_dir and the logging
# flags change how it is computed, not what.
_QUICKSTART_FINETUNE_FLAGS = (
    "use_ema", "dataset", "random_flip", "num_timesteps", "beta_start", "beta_end", "ch", "ch_mult",
    "num_res_blocks", "attn_resolutions", "dropout", "num_steps", "timesteps", "eta", "clip_x0",
    "feature_net", "inception_resolution", "kernel", "rbf_bandwidths", "finetune_steps",
    "learning_rate", "grad_clip", "finetune_dropout", "seed")


def _quickstart_finetune_settings(init_checkpoint):
  """{flag: value} of everything the quickstart's finetune depends on; files by their sha256."""
  sha = lambda path: f"sha256:{(evaluate_lib.weights_sha256(path) or 'none')[:16]}"
  settings = {f"--{name}": getattr(FLAGS, name) for name in _QUICKSTART_FINETUNE_FLAGS}
  feature_flag, feature_file = (("--inception_weights", FLAGS.inception_weights)
                                if FLAGS.feature_net == "inception_v3"
                                else ("--classifier_path", _classifier_path()))
  settings.update({
      "--init_checkpoint": sha(checkpoints.latest(init_checkpoint)),
      feature_flag: sha(feature_file),
      "--image_size": _image_shape()[0],
      "--finetune_batch_size": _finetune_batch_size()[0],
  })
  return settings


def _check_quickstart_finetune(settings):
  """The path of the quickstart's record of its finetune's settings; a UserError if the workdir
  holds a finetune at this K that other (or unrecorded) settings made, since it would be reused."""
  run_dir = os.path.join(FLAGS.workdir, f"finetune_k{FLAGS.num_steps}")
  record = os.path.join(run_dir, "quickstart_settings.json")
  if not any(os.path.exists(os.path.join(run_dir, name))
             for name in ("unet.weights.h5", "checkpoints")):
    return record
  retry = f"pass another --workdir (or delete {run_dir})"
  if glob.glob(os.path.join(run_dir, "flags_finetune_*.cfg")) or not os.path.exists(record):
    raise UserError(f"--workdir={FLAGS.workdir} holds a finetune at K={FLAGS.num_steps} whose "
                    f"settings the quickstart did not record (made or resumed by --mode=finetune "
                    f"or older code); {retry}")
  with open(record) as f:
    saved = json.load(f)
  for name, value in settings.items():
    if saved.get(name) != value:
      raise UserError(f"--workdir={FLAGS.workdir} holds a finetune at K={FLAGS.num_steps} made "
                      f"with another {name} ({saved.get(name)} then, {value} now), which this run "
                      f"would reuse; {retry}")
  return record


def run_quickstart():
  """Finetune K steps from --init_checkpoint, compare DDIM-K / MMD-DDM-K / DDIM-100, export."""
  k = FLAGS.num_steps
  reference_k = min(100, FLAGS.num_timesteps)
  # The evaluation's and export's flags are checked before minutes of finetuning.
  checked = _check_finetune()
  _check_sampler_flags((reference_k,), flag="the quickstart's reference K")
  _check_export_flags()
  _check_positive("quickstart_eval_images", "sample_batch_size")
  _check_eval_split(FLAGS.quickstart_eval_images, "--quickstart_eval_images")
  spaces = _feature_spaces(FLAGS.quickstart_eval_images, "--quickstart_eval_images")
  settings = _quickstart_finetune_settings(checked[3])
  record = _check_quickstart_finetune(settings)
  print(f"[1/3] MMD finetuning at K={k} ({FLAGS.finetune_steps} steps)")
  if distribute.is_chief(checked[2]):  # Workers of a cluster share the workdir: one record.
    _mode_dir(f"finetune_k{k}")
    with open(record + ".tmp", "w") as f:
      json.dump(settings, f, indent=2)
    os.replace(record + ".tmp", record)
  finetuned = run_finetune(checked)
  print(f"[2/3] evaluating DDIM K={k}, MMD-DDM K={k} and DDIM K={reference_k} "
        f"on {FLAGS.quickstart_eval_images} images")
  out_dir = _mode_dir("quickstart")
  _evaluate(ddim_steps=sorted({k, reference_k}), finetuned={k: finetuned}, spaces=spaces,
            num_images=FLAGS.quickstart_eval_images, out_dir=out_dir)
  print(f"[3/3] exporting the MMD-DDM K={k} sampler")
  run_export(init_checkpoint=finetuned, next_free_version=True)


# Modes that train under --strategy; the others run on one device, and every worker of a cluster
# would run them whole and race on the same files.
DISTRIBUTED_MODES = ("pretrain", "finetune")


def _check_strategy_mode():
  if FLAGS.strategy not in ("multi_worker", "tpu") or FLAGS.mode in DISTRIBUTED_MODES:
    return
  hint = (f"; for the quickstart run --mode=finetune --strategy={FLAGS.strategy}, then "
          f"--mode=evaluate and --mode=export on one machine" if FLAGS.mode == "quickstart"
          else "")
  raise UserError(f"--strategy={FLAGS.strategy} is only for --mode="
                  f"{' and --mode='.join(DISTRIBUTED_MODES)}; --mode={FLAGS.mode} runs on one "
                  f"device (use --strategy=default){hint}")


def _check_workdir():
  # Our checks and writes (makedirs, os.replace, os.access) are POSIX calls: on gs://… they would
  # act on a local folder named "gs:".
  if "://" in FLAGS.workdir:
    raise UserError(f"--workdir={FLAGS.workdir}: remote (scheme://) paths are not supported; "
                    f"expected a local directory or a shared POSIX filesystem (e.g. NFS, or a "
                    f"bucket mounted with gcsfuse)")


def main(argv):
  if len(argv) > 1:
    raise UserError(f"unexpected arguments {argv[1:]}; every option is a --flag (flagfile lines "
                    f"too)")
  _check_workdir()
  _check_strategy_mode()
  if FLAGS.num_cpu_devices is not None:
    if FLAGS.strategy != "mirrored":
      raise UserError(f"--num_cpu_devices needs --strategy=mirrored, "
                      f"got --strategy={FLAGS.strategy}")
    distribute.split_cpu(FLAGS.num_cpu_devices)  # Before anything initialises TF's devices.
  if FLAGS.deterministic:
    keras.utils.set_random_seed(FLAGS.seed)
    tf.config.experimental.enable_op_determinism()
  runners = dict(pretrain=run_pretrain, train_classifier=run_train_classifier,
                 finetune=run_finetune, sample=run_sample, evaluate=run_evaluate,
                 export=run_export, quickstart=run_quickstart)
  runners[FLAGS.mode]()


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
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(_run_main, flags_parser=_parse_flags)
