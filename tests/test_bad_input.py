"""The bad-input table: `python main.py` with one mistake per row, as a user would make it.

Every row must end in exit code != 0, exactly one stderr line `error: ...` that names what was wrong
(the flag or file) and what was expected, no Python traceback, and no file on disk changed: all
runs share one tree pre-populated with what earlier runs leave (a finished finetune, a pretrain
checkpoint, an export version and its .tflite, a report), hashed (path, size, sha256) before and
after each row, together with the bundled pretrained/ files. A failed run may leave no new file,
except the rows marked `late`, whose mistake only shows after the data is read, and which may leave
their run's flags record (flags_<mode>_<time>.cfg).
"""

import collections
import gzip
import hashlib
import os

import keras
import pytest
import tensorflow as tf

from helpers import REPO_ROOT
from helpers import randomize_weights
from helpers import run_main
from helpers import tiny_unet
from mmd_keras import adapters
from mmd_keras import checkpoints
from mmd_keras import learned_timesteps
from mmd_keras import provenance

# The tiny UNet of the tree's checkpoints (helpers.tiny_unet at 28 px: the bundled classifiers'
# size), and the flags that describe it.
TINY_UNET = ["--image_size=28", "--ch=32", "--ch_mult=1,2", "--num_res_blocks=1",
             "--attn_resolutions=", "--dropout=0", "--num_timesteps=20"]
COMMON = ["--workdir={root}/run", "--init_checkpoint={root}/base.weights.h5",
          "--export_dir={root}/run/export", "--num_steps=5", "--eval_steps=5,10", *TINY_UNET]

Case = collections.namedtuple("Case", "id args names late", defaults=(False,))

# Rows run as `python main.py` subprocesses (~3-4 s of CPU each, mostly importing TensorFlow).
CASES = [
    # Flags absl refuses while parsing, and flagfiles.
    Case("unknown_mode", ["--mode=foo"], ["--mode=foo", "pretrain|"]),
    Case("unknown_kernel", ["--mode=finetune", "--kernel=gaussian"],
         ["--kernel", "polynomial|rbf"]),
    Case("unknown_feature_net", ["--mode=finetune", "--feature_net=vgg16"],
         ["--feature_net", "inception_v3|classifier"]),
    Case("flagfile_missing", ["--mode=sample", "--flagfile={root}/nope.cfg"],
         ["--flagfile", "nope.cfg", "No such file"]),
    Case("flagfile_unknown_flag", ["--mode=sample", "--flagfile={root}/flagfiles/unknown_flag.cfg"],
         ["no_such_flag", "--helpfull"]),
    # Flags main.py checks before it loads data or builds a model.
    Case("unknown_dataset", ["--mode=finetune", "--dataset=mnist"], ["--dataset", "fashion_mnist"]),
    Case("k_above_t", ["--mode=finetune", "--num_steps=21"], ["--num_steps", "[1, 20]"]),
    Case("timesteps_list_not_k", ["--mode=sample", "--timesteps=1,2,3"],
         ["--timesteps=1,2,3", "expected K=5", "--num_steps"]),
    Case("timesteps_unknown", ["--mode=export", "--timesteps=cosine"],
         ["--timesteps=cosine", "trailing|linspace"]),
    Case("image_size_not_divisible", ["--mode=pretrain", "--image_size=27"],
         ["--image_size=27", "divisible by 2"]),
    Case("learning_rate_zero", ["--mode=finetune", "--learning_rate=0"],
         ["--learning_rate", "> 0"]),
    Case("batch_zero", ["--mode=pretrain", "--batch_size=0"], ["--batch_size", "> 0"]),
    Case("batch_not_divisible_by_replicas",
         ["--mode=finetune", "--strategy=mirrored", "--num_cpu_devices=2", "--batch_size=5"],
         ["--batch_size=5", "divisible", "replicas (2)"]),
    Case("quickstart_eval_images_below_feature_dim",
         ["--mode=quickstart", "--quickstart_eval_images=100"],
         ["--quickstart_eval_images=100", "more than 128"]),
    # Files: data, checkpoints, outputs.
    Case("data_files_missing", ["--mode=finetune", "--data_dir={root}/data/empty"],
         ["--data_dir", "train-images-idx3-ubyte.gz", "dataset-fashion-mnist"]),
    Case("data_file_garbage", ["--mode=finetune", "--data_dir={root}/data/garbage"],
         ["train-images-idx3-ubyte.gz", "gzip-compressed idx"]),
    Case("checkpoint_missing", ["--mode=sample", "--init_checkpoint={root}/nope.weights.h5"],
         ["--init_checkpoint", "nope.weights.h5", "does not exist"]),
    Case("checkpoint_garbage_h5",
         ["--mode=finetune", "--init_checkpoint={root}/garbage.weights.h5"],
         ["--init_checkpoint", "garbage.weights.h5", "HDF5"]),
    Case("weights_h5_not_matching_unet_flags", ["--mode=sample", "--ch=64"],
         ["--init_checkpoint", "base.weights.h5", "--ch",
          "(3, 3, 1, 32) in the file, (3, 3, 1, 64) in the UNet"]),
    # K=4: no earlier .tflite of that K stands in the way of the checkpoint.
    Case("checkpoint_not_matching_unet_flags",
         ["--mode=export", "--num_steps=4", "--model_version=4",
          "--init_checkpoint={root}/run/pretrain", "--ch=64"],
         ["--init_checkpoint", "ckpt-4", "does not match the UNet (--image_size, --ch, --ch_mult"]),
    # A rerun resumes from the workdir's own checkpoint: the tree's pretrain checkpoint has ch 32.
    Case("resume_checkpoint_not_matching_unet_flags", ["--mode=pretrain", "--ch=64"],
         ["cannot resume from", "pretrain/checkpoints/ckpt-4", "--ch", "--workdir"]),
    Case("resume_checkpoint_truncated",
         ["--mode=finetune", "--workdir={root}/truncated_resume"],
         ["cannot resume from", "finetune_k5/checkpoints/ckpt-3", "cannot be read",
          "complete checkpoint", "--workdir"]),
    Case("workdir_unwritable", ["--mode=finetune", "--workdir={root}/a_file/run"],
         ["--workdir", "a_file", "not writable"]),
    Case("export_version_exists", ["--mode=export"],
         ["mmd_ddm/1", "--model_version", "--overwrite"]),
    Case("tflite_exists", ["--mode=export", "--model_version=2"],
         ["mmd_ddm_k5.tflite", "--overwrite"]),
    Case("finetune_past_a_finished_run", ["--mode=finetune", "--finetune_steps=3",
                                          "--batch_size=4", "--checkpoint_every=1"],
         ["finetune_k5/unet.weights.h5", "--workdir"], late=True),
]

# More mistakes, run in this process through main.py's own flag parser and error handler (the
# subprocess rows show that path ends in one line and exit 2 in a real run): each fails before a
# model is built, so a process per row would mostly time TensorFlow's import.
IN_PROCESS_CASES = [
    Case("unknown_strategy", ["--mode=finetune", "--strategy=horovod"], ["--strategy", "mirrored"]),
    Case("non_integer_k", ["--mode=sample", "--num_steps=five"], ["--num_steps=five", "int"]),
    Case("flagfile_line_without_dashes",
         ["--mode=sample", "--flagfile={root}/flagfiles/no_dashes.cfg"],
         ["batch_size=64", "--flag"]),
    Case("positional_argument", ["--mode=sample", "finetune"], ["unexpected", "--flag"]),
    Case("k_zero", ["--mode=sample", "--num_steps=0"], ["--num_steps", "[1, 20]"]),
    Case("quadratic_k_too_large", ["--mode=sample", "--timesteps=quadratic", "--num_steps=20"],
         ["--timesteps=quadratic", "--num_steps=20", "uniform"]),
    Case("num_timesteps_zero", ["--mode=sample", "--num_timesteps=0"], ["--num_timesteps", ">= 1"]),
    Case("ch_not_multiple_of_32", ["--mode=pretrain", "--ch=20"], ["--ch=20", "32"]),
    Case("dropout_one", ["--mode=pretrain", "--dropout=1"], ["--dropout", "[0, 1)"]),
    Case("ema_decay_above_one", ["--mode=pretrain", "--ema_decay=1.5"], ["--ema_decay", "[0, 1]"]),
    Case("pretrain_learning_rate_negative", ["--mode=pretrain", "--pretrain_learning_rate=-1e-4"],
         ["--pretrain_learning_rate", "> 0"]),
    Case("train_steps_zero", ["--mode=pretrain", "--train_steps=0"], ["--train_steps", "> 0"]),
    Case("eta_above_one", ["--mode=sample", "--eta=1.5"], ["--eta", "[0, 1]"]),
    Case("unknown_sampler", ["--mode=sample", "--sampler=plms"],
         ["--sampler", "ddim|dpm_solver_pp"]),
    Case("eta_with_dpm_solver_pp", ["--mode=sample", "--sampler=dpm_solver_pp", "--eta=0.5"],
         ["--eta=0.5", "--sampler=dpm_solver_pp"]),
    Case("num_images_zero", ["--mode=sample", "--num_images=0"], ["--num_images", "> 0"]),
    Case("finetune_batch_one", ["--mode=finetune", "--finetune_batch_size=1"],
         ["--finetune_batch_size", ">= 2"]),
    Case("finetune_steps_zero", ["--mode=finetune", "--finetune_steps=0"],
         ["--finetune_steps", "> 0"]),
    Case("grad_clip_negative", ["--mode=finetune", "--grad_clip=-1"], ["--grad_clip", ">= 0"]),
    Case("finetune_ema_decay_one", ["--mode=finetune", "--finetune_ema_decay=1"],
         ["--finetune_ema_decay=1.0", "must be in [0, 1)"]),
    # Adapters: a rank a layer can take, on the base weights and UNet they were trained on.
    Case("lora_rank_negative", ["--mode=finetune", "--lora_rank=-1"], ["--lora_rank", ">= 0"]),
    Case("lora_rank_above_every_layer", ["--mode=finetune", "--lora_rank=100000"],
         ["--lora_rank=100000", "between 1 and 128"]),
    Case("lora_with_an_ema", ["--mode=finetune", "--lora_rank=2", "--finetune_ema_decay=0.9"],
         ["--finetune_ema_decay", "--lora_rank"]),
    Case("adapters_of_another_base", ["--mode=sample", "--adapters={root}/other.adapters.npz"],
         ["--adapters", "other base weights"]),
    Case("adapters_not_an_adapters_file", ["--mode=export", "--adapters={root}/base.weights.h5"],
         ["--adapters", "not an adapters file"]),
    Case("adapters_of_another_architecture",
         ["--mode=evaluate", "--eval_steps=5",
          "--finetuned_checkpoints=5:{root}/other_unet.adapters.npz"],
         ["--finetuned_checkpoints", "another UNet architecture"]),
    Case("rbf_bandwidths_not_numbers", ["--mode=finetune", "--kernel=rbf", "--rbf_bandwidths=wide"],
         ["--rbf_bandwidths", "numbers"]),
    Case("rbf_bandwidth_zero", ["--mode=finetune", "--kernel=rbf", "--rbf_bandwidths=1,0"],
         ["--rbf_bandwidths", "positive"]),
    # One-device modes: every worker of a cluster would run them whole, on the same files.
    Case("quickstart_multi_worker", ["--mode=quickstart", "--strategy=multi_worker"],
         ["--strategy=multi_worker", "--mode=pretrain and --mode=finetune",
          "--mode=finetune --strategy=multi_worker", "--mode=evaluate"]),
    Case("evaluate_multi_worker", ["--mode=evaluate", "--strategy=multi_worker"],
         ["--strategy=multi_worker", "--mode=evaluate runs on one device"]),
    Case("export_tpu", ["--mode=export", "--strategy=tpu"],
         ["--strategy=tpu", "--mode=export runs on one device"]),
    Case("sample_multi_worker", ["--mode=sample", "--strategy=multi_worker"],
         ["--strategy=multi_worker", "--mode=sample runs on one device"]),
    Case("train_classifier_tpu", ["--mode=train_classifier", "--strategy=tpu"],
         ["--strategy=tpu", "--mode=train_classifier runs on one device"]),
    Case("workdir_remote", ["--mode=finetune", "--workdir=gs://bucket/run"],
         ["--workdir=gs://bucket/run", "not supported", "POSIX"]),
    Case("num_cpu_devices_without_mirrored", ["--mode=finetune", "--num_cpu_devices=2"],
         ["--num_cpu_devices", "--strategy=mirrored"]),
    Case("num_cpu_devices_zero", ["--mode=finetune", "--strategy=mirrored", "--num_cpu_devices=0"],
         ["--num_cpu_devices", ">= 1"]),
    Case("eval_steps_empty", ["--mode=evaluate", "--eval_steps="], ["--eval_steps", "5,10,20"]),
    Case("eval_steps_above_t", ["--mode=evaluate", "--eval_steps=5,50"],
         ["--eval_steps", "[1, 20]", "50"]),
    Case("eval_split_unknown", ["--mode=evaluate", "--eval_split=validation"],
         ["--eval_split", "train or test"]),
    Case("eval_feature_net_unknown", ["--mode=evaluate", "--eval_feature_nets=classifier,vgg"],
         ["--eval_feature_nets", "vgg"]),
    Case("finetuned_checkpoints_malformed", ["--mode=evaluate", "--finetuned_checkpoints=5=x.h5"],
         ["--finetuned_checkpoints", "5:/path/to/unet.weights.h5"]),
    Case("num_eval_images_below_feature_dim", ["--mode=evaluate", "--num_eval_images=50"],
         ["--num_eval_images=50", "more than 128"]),
    Case("eval_samplers_unknown_sampler",
         ["--mode=evaluate", "--eval_samplers=ddim:trailing,plms:uniform"],
         ["--eval_samplers", "'plms:uniform'", "ddim|dpm_solver_pp"]),
    Case("eval_samplers_unknown_spacing", ["--mode=quickstart", "--eval_samplers=ddim:cosine"],
         ["--eval_samplers", "'ddim:cosine'", "uniform|trailing|linspace|quadratic",
          "--timesteps"]),
    Case("eval_samplers_without_spacing", ["--mode=evaluate", "--eval_samplers=dpm_solver_pp"],
         ["--eval_samplers", "<sampler>:<spacing>"]),
    Case("eval_samplers_dpm_solver_pp_with_eta",
         ["--mode=evaluate", "--eta=0.5", "--eval_samplers=ddim:trailing,dpm_solver_pp:trailing"],
         ["--eta=0.5", "--eval_samplers=dpm_solver_pp", "deterministic"]),
    # T=20: quadratic spacing repeats timesteps at K=10 of --eval_steps, not at K=5.
    Case("eval_samplers_spacing_repeats_timesteps",
         ["--mode=evaluate", "--eval_samplers=ddim:quadratic"],
         ["--eval_samplers", "ddim:quadratic", "K=10", "T=20", "--num_timesteps"]),
    Case("model_version_zero", ["--mode=export", "--model_version=0"], ["--model_version", ">= 1"]),
    Case("max_images_zero", ["--mode=export", "--model_version=3", "--max_images=0"],
         ["--max_images", ">= 1"]),
    Case("model_name_with_slash", ["--mode=export", "--model_name=a/b"], ["--model_name", "a/b"]),
    # Input files and outputs whose check needs no model.
    Case("flagfile_bad_value", ["--mode=sample", "--flagfile={root}/flagfiles/bad_value.cfg"],
         ["--batch_size=sixty", "int"]),
    Case("inception_without_weights", ["--mode=finetune", "--feature_net=inception_v3"],
         ["--inception_weights", "inception_v3_weights"]),
    Case("classifier_path_missing", ["--mode=finetune", "--classifier_path={root}/nope.weights.h5"],
         ["--classifier_path", "nope.weights.h5", "does not exist"]),
    Case("classifier_for_another_image_size", ["--mode=finetune", "--image_size=8"],
         ["--classifier_path", "image_size=28", "image_size=8"]),
    Case("inception_fid_without_graph", ["--mode=finetune", "--feature_net=inception_fid"],
         ["--feature_net=inception_fid", "--inception_graph", "classify_image_graph_def.pb"]),
    Case("inception_graph_missing",
         ["--mode=evaluate", "--eval_feature_nets=inception_fid",
          "--inception_graph={root}/nope.pb"],
         ["--inception_graph", "nope.pb", "does not exist"]),
    Case("feature_saved_model_missing", ["--mode=finetune", "--feature_net=savedmodel:{root}/nope"],
         ["--feature_net=savedmodel:", "nope", "does not exist", "SavedModel"]),
    Case("feature_keras_model_not_keras",
         ["--mode=evaluate", "--eval_feature_nets=keras:{root}/base.weights.h5"],
         ["--eval_feature_nets=keras:", "base.weights.h5", "not a .keras file"]),
    Case("feature_model_range_undeclared",
         ["--mode=finetune", "--feature_net=savedmodel:{root}/feature_model"],
         ["--feature_net=savedmodel:", "--feature_image_range", "assets.extra/feature_net.json"]),
    Case("feature_image_range_malformed", ["--mode=finetune", "--feature_image_range=0-255"],
         ["--feature_image_range=0-255", "lo,hi"]),
    Case("data_file_truncated", ["--mode=pretrain", "--data_dir={root}/data/truncated"],
         ["train-images-idx3-ubyte.gz", "truncated", "[60000, 28, 28]"]),
    Case("checkpoint_truncated_h5",
         ["--mode=sample", "--init_checkpoint={root}/truncated.weights.h5"],
         ["--init_checkpoint", "truncated.weights.h5", "HDF5"]),
    # K=4: no earlier .tflite of that K stands in the way of the checkpoint.
    Case("checkpoint_index_garbage",
         ["--mode=export", "--num_steps=4", "--model_version=4",
          "--init_checkpoint={root}/garbage_ckpt/ckpt-1"],
         ["--init_checkpoint", "ckpt-1", "TF checkpoint"]),
    Case("finetuned_checkpoint_missing",
         ["--mode=evaluate", "--finetuned_checkpoints=5:{root}/nope.weights.h5"],
         ["--finetuned_checkpoints", "nope.weights.h5", "does not exist"]),
    Case("export_dir_unwritable", ["--mode=export", "--export_dir={root}/a_file/export"],
         ["--export_dir", "a_file", "not writable"]),
    # Learned timesteps: only a finetune learns them; weights finetuned with them sample at them.
    Case("learn_timesteps_with_sample", ["--mode=sample", "--learn_timesteps"],
         ["--learn_timesteps", "--mode=finetune and --mode=quickstart", "--mode=sample"]),
    Case("learn_timesteps_with_pretrain", ["--mode=pretrain", "--learn_timesteps"],
         ["--learn_timesteps", "--mode=pretrain"]),
    Case("learn_timesteps_with_eta", ["--mode=finetune", "--learn_timesteps", "--eta=0.5"],
         ["--learn_timesteps", "--eta=0", "0.5"]),
    Case("timesteps_lr_zero", ["--mode=finetune", "--learn_timesteps", "--timesteps_lr=0"],
         ["--timesteps_lr", "> 0"]),
    Case("learned_weights_with_explicit_timesteps_export",
         ["--mode=export", "--export_dir={root}/run/export_learned",
          "--init_checkpoint={root}/learned/unet.weights.h5", "--timesteps=0,4,8,12,16"],
         ["--timesteps=0,4,8,12,16", "learned timesteps (0.50,4.25", "--init_checkpoint"]),
    Case("learned_weights_with_explicit_timesteps_evaluate",
         ["--mode=evaluate", "--eval_steps=5", "--timesteps=0,4,8,12,16",
          "--finetuned_checkpoints=5:{root}/learned/unet.weights.h5"],
         ["--timesteps=0,4,8,12,16", "learned timesteps", "--finetuned_checkpoints"]),
    Case("learned_weights_at_another_k", ["--mode=sample", "--num_steps=4",
                                          "--init_checkpoint={root}/learned/unet.weights.h5"],
         ["--num_steps=4", "5 learned timesteps", "--init_checkpoint"]),
    Case("learned_weights_with_eta", ["--mode=sample", "--eta=0.5",
                                      "--init_checkpoint={root}/learned/unet.weights.h5"],
         ["--eta=0.5", "must be 0", "--init_checkpoint"]),
    Case("resume_of_learned_timesteps_without_the_flag",
         ["--mode=finetune", "--workdir={root}/learned_resume"],
         ["--learn_timesteps is off", "finetune_k5/checkpoints/ckpt-3", "with learned timesteps",
          "--workdir"]),
    Case("resume_without_an_ema_with_one",
         ["--mode=finetune", "--workdir={root}/learned_resume", "--learn_timesteps",
          "--finetune_ema_decay=0.99"],
         ["--finetune_ema_decay=0.99 is set", "finetune_k5/checkpoints/ckpt-3", "without an EMA",
          "--workdir"]),
    Case("learned_weights_finetuned_further_with_explicit_timesteps",
         ["--mode=finetune", "--workdir={root}/learned_run", "--timesteps=0,4,8,12,16",
          "--init_checkpoint={root}/learned/unet.weights.h5"],
         ["--timesteps=0,4,8,12,16", "learned timesteps", "--init_checkpoint"]),
]


def _write(path, data):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(data)


def _idx(dims, body):
  """An idx file of uint8: magic 0x0000080N, the big-endian dims, then `body`."""
  header = bytes([0, 0, 8, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)
  return gzip.compress(header + body)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
  """The shared tree: inputs of every row, and what earlier runs leave in the workdir."""
  root = str(tmp_path_factory.mktemp("bad_input"))
  unet = tiny_unet(image_size=28)
  base = os.path.join(root, "base.weights.h5")
  checkpoints.save_weights_h5(unet, base)
  with open(base, "rb") as f:
    weights = f.read()
  _write(os.path.join(root, "truncated.weights.h5"), weights[:len(weights) // 2])
  _write(os.path.join(root, "garbage.weights.h5"), b"not an HDF5 file\n" * 64)
  _write(os.path.join(root, "garbage_ckpt", "ckpt-1.index"), b"not a checkpoint index\n" * 64)
  _write(os.path.join(root, "garbage_ckpt", "ckpt-1.data-00000-of-00001"), b"\0" * 256)
  _write(os.path.join(root, "a_file"), b"a regular file: no directory can be made under it\n")
  # Adapters trained on other weights of this UNet, and on these weights of another UNet (with
  # the fingerprint of these, so only the shapes differ).
  other = randomize_weights(tiny_unet(image_size=28), seed=1)
  adapters.save(other, os.path.join(root, "other.adapters.npz"),
                base_sha256=adapters.enable(other, 2), rank=2, targets="all")
  wider = tiny_unet(image_size=28, attn_resolutions=(14,)).build_for_inference()
  adapters.enable(wider, 2)
  adapters.save(wider, os.path.join(root, "other_unet.adapters.npz"),
                base_sha256=provenance.weights_sha256(unet.build_for_inference().weights),
                rank=2, targets="all")
  # A feature model without the value range it takes (its check reads no model).
  _write(os.path.join(root, "feature_model", "saved_model.pb"), b"a SavedModel")
  # Weights finetuned with learned timesteps (K=5 of T=20), the timesteps beside them.
  _write(os.path.join(root, "learned", "unet.weights.h5"), weights)
  checkpoints.save_timesteps(os.path.join(root, "learned", "unet.weights.h5"),
                             [0.5, 4.25, 8.75, 12.0, 16.5], num_timesteps=20, sampler="ddim")

  # An earlier pretrain run (checkpoint with EMA weights), a finished finetune, an export, a report.
  run = os.path.join(root, "run")
  ckpt = checkpoints.training_checkpoint(unet=unet, ema=[tf.Variable(w) for w in unet.weights])
  tf.train.CheckpointManager(ckpt, os.path.join(run, "pretrain", "checkpoints"),
                             max_to_keep=1).save(checkpoint_number=4)
  _write(os.path.join(run, "finetune_k5", "unet.weights.h5"), weights)
  _write(os.path.join(run, "finetune_k5", "flags.cfg"), b"--ch=32\n")
  _write(os.path.join(run, "export", "mmd_ddm", "1", "saved_model.pb"), b"an earlier export")
  _write(os.path.join(run, "export", "mmd_ddm", "1", "variables", "variables.index"), b"index")
  _write(os.path.join(run, "export", "mmd_ddm_k5.tflite"), b"an earlier tflite")
  _write(os.path.join(run, "evaluate", "report.md"), b"| model | K |\n")
  # A finetune checkpoint with learned timesteps, which a rerun would resume.
  learned = learned_timesteps.LearnedTimesteps([0, 4, 8, 12, 16], num_timesteps=20,
                                               learning_rate=1e-2)
  tf.train.CheckpointManager(
      checkpoints.training_checkpoint(unet=unet, learned_timesteps=learned),
      os.path.join(root, "learned_resume", "finetune_k5", "checkpoints"),
      max_to_keep=1).save(checkpoint_number=3)
  # A finetune checkpoint whose data file lost its second half (a copy that stopped midway).
  optimizer = keras.optimizers.Adam()
  optimizer.build(unet.trainable_weights)
  prefix = tf.train.CheckpointManager(
      checkpoints.training_checkpoint(unet=unet, optimizer=optimizer),
      os.path.join(root, "truncated_resume", "finetune_k5", "checkpoints"),
      max_to_keep=1).save(checkpoint_number=3)
  [data] = tf.io.gfile.glob(prefix + ".data-*")
  with open(data, "rb") as f:
    content = f.read()
  _write(data, content[:len(content) // 2])

  os.makedirs(os.path.join(root, "data", "empty"))
  for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"):
    _write(os.path.join(root, "data", "garbage", name), b"not gzip data\n" * 16)
  # A valid header for 60000 images with the data of ten.
  _write(os.path.join(root, "data", "truncated", "train-images-idx3-ubyte.gz"),
         _idx([60000, 28, 28], bytes(10 * 28 * 28)))
  _write(os.path.join(root, "data", "truncated", "train-labels-idx1-ubyte.gz"),
         _idx([60000], bytes(60000)))

  _write(os.path.join(root, "flagfiles", "unknown_flag.cfg"), b"--batch_size=8\n--no_such_flag=1\n")
  _write(os.path.join(root, "flagfiles", "bad_value.cfg"), b"# a comment\n--batch_size=sixty\n")
  _write(os.path.join(root, "flagfiles", "no_dashes.cfg"), b"batch_size=64\n")
  return root


def snapshot(folders):
  """{path: (size, sha256)} of every file under `folders`."""
  files = {}
  for folder in folders:
    for dirpath, _, names in os.walk(folder):
      for name in names:
        path = os.path.join(dirpath, name)
        with open(path, "rb") as f:
          files[path] = (os.path.getsize(path), hashlib.sha256(f.read()).hexdigest())
  return files


def test_the_tables_cover_the_issue():
  ids = [case.id for case in CASES + IN_PROCESS_CASES]
  assert len(CASES) >= 20 and len(set(ids)) == len(ids)


def _check_one_line_error(stderr, case, root):
  assert "Traceback" not in stderr, stderr
  errors = [line for line in stderr.splitlines() if line.startswith("error:")]
  assert len(errors) == 1, stderr
  for name in case.names:
    assert name.format(root=root) in errors[0], errors[0]


def _check_untouched(before, after, *, late):
  assert {path: after.get(path) for path in before} == before  # Nothing changed or deleted.
  new = sorted(set(after) - set(before))
  if late:
    new = [p for p in new if not (os.path.basename(p).startswith("flags_") and p.endswith(".cfg"))]
  assert new == []


def _watched(root):
  return [root, str(REPO_ROOT / "pretrained")]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_and_touches_nothing(tree, case):
  before = snapshot(_watched(tree))
  result = run_main(*[arg.format(root=tree) for arg in COMMON + case.args])
  assert result.returncode != 0, result.stdout + result.stderr
  _check_one_line_error(result.stderr, case, tree)
  _check_untouched(before, snapshot(_watched(tree)), late=case.late)


@pytest.mark.parametrize("case", IN_PROCESS_CASES, ids=[case.id for case in IN_PROCESS_CASES])
def test_flag_mistake_in_process(tree, case, main_module, capsys):
  before = snapshot(_watched(tree))
  with pytest.raises(SystemExit) as exit_info:
    argv = main_module._parse_flags(["main.py", *[a.format(root=tree) for a in COMMON + case.args]])
    main_module._run_main(argv)
  assert exit_info.value.code == 2
  _check_one_line_error(capsys.readouterr().err, case, tree)
  _check_untouched(before, snapshot(_watched(tree)), late=case.late)
