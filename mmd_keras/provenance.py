"""What a result was made from: the fingerprint of a model's weights, the digest of an input file,
the settings that decide generated images, and those that decide a finetune's weights.

`weights_sha256` is the one fingerprint of a model: evaluation reports and exports record it, so
the same weights carry the same value in report.json and in sampler.json. `sampler_settings` and
`samples_settings` say which settings decide a sampler's images and a set of samples: the export
tells "the same model again" by them, evaluation keys its finished rows by them.
"""

import dataclasses
import hashlib
import json
import os

import numpy as np
import tensorflow as tf

from mmd_keras import features as features_lib


def weights_sha256(weights):
  """sha256 over the dtypes, shapes and values of `weights` (a model's `weights`) in order.

  Names are left out: Keras numbers them per process, and they do not change what is computed. The
  value does not depend on the file the weights were loaded from.
  """
  digest = hashlib.sha256()
  for weight in weights:
    value = np.ascontiguousarray(np.asarray(weight))
    digest.update(f"{value.dtype.str}{value.shape};".encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


# What decides the images a sampler makes from given noise (not how many it may make at once, nor
# how it is served).
SAMPLER_KEYS = ("sampler", "weights_sha256", "alphas_cumprod_sha256", "num_steps", "timesteps",
                "eta", "clip_x0", "image_shape", "num_timesteps")
# What decides the images `sampling.batches` draws: the sampler and its noise (x_T of batch i is
# keyed by (seed, i), so the batch size counts too).
SAMPLES_KEYS = SAMPLER_KEYS + ("seed", "batch_size", "num_images")
# Settings that records written before they existed leave out, at the value they then had.
SAMPLER_DEFAULTS = {"sampler": "ddim"}
FINETUNE_DEFAULTS = {"sampler.sampler": "ddim", "finetune.learn_timesteps": False,
                     "finetune.timesteps_lr": 1e-2, "finetune.lora_rank": 0,
                     "finetune.lora_targets": "all"}


def sampler_settings(*, sampler, weights_sha256, alphas_cumprod, timesteps, eta, clip_x0,
                     image_shape):
  """{SAMPLER_KEYS: JSON value} of the K-step sampler `sampler` (a name of `samplers.SAMPLERS`)
  of a UNet whose weights have the fingerprint `weights_sha256`."""
  alphas_cumprod = np.asarray(alphas_cumprod, np.float32)
  return dict(sampler=sampler, weights_sha256=weights_sha256,
              alphas_cumprod_sha256=hashlib.sha256(alphas_cumprod.tobytes()).hexdigest(),
              num_steps=len(timesteps), timesteps=json_timesteps(timesteps), eta=float(eta),
              clip_x0=bool(clip_x0), image_shape=[int(d) for d in image_shape],
              num_timesteps=len(alphas_cumprod))


def json_timesteps(timesteps):
  """Timesteps as JSON values: ints, or floats for continuous (e.g. learned) ones."""
  values = np.asarray(timesteps)
  convert = float if np.issubdtype(values.dtype, np.floating) else int
  return [convert(t) for t in values]


def samples_settings(sampler, *, seed, batch_size, num_images):
  """{SAMPLES_KEYS: JSON value} of the samples `sampling.batches` draws with the sampler of
  `sampler_settings` `sampler`."""
  return dict(sampler, seed=int(seed), batch_size=int(batch_size), num_images=int(num_images))


def sampler_record(record):
  """`record` (a sampler's settings read back from a file; None if it could not be read) with
  `SAMPLER_DEFAULTS` for the settings it leaves out."""
  return None if record is None else dict(SAMPLER_DEFAULTS, **record)


def same_sampler(record, settings):
  """Whether `record` (read back from a file; None if it could not be read) holds the sampler
  settings `settings` (`sampler_settings` or a dict that contains them)."""
  settings = json.loads(json.dumps(settings))  # Tuples as lists, as read back from a file.
  record = sampler_record(record)
  return record is not None and all(record.get(key) == settings[key] for key in SAMPLER_KEYS)


def files_sha256(path):
  """sha256 of an input named by path, before it is loaded: of a file's bytes (what `sha256sum`
  prints); of a checkpoint prefix's (its .index and .data files) or a directory's (a SavedModel)
  files, every name and its bytes in name order. None if `path` names no file."""
  if tf.io.gfile.isdir(path):
    files = sorted(os.path.join(root, name) for root, _, names in tf.io.gfile.walk(path)
                   for name in names)
    base = path
  elif tf.io.gfile.exists(path):
    files, base = [path], None
  else:
    files, base = sorted(tf.io.gfile.glob(path + ".*")), os.path.dirname(path)
  if not files:
    return None
  h = hashlib.sha256()
  for name in files:
    if base is not None:
      h.update(os.path.relpath(name, base).encode() + b"\0")
    with tf.io.gfile.GFile(name, "rb") as f:
      while chunk := f.read(1 << 20):
        h.update(chunk)
  return h.hexdigest()


# Fields of a config.Config that change how a finetune is computed, logged or stored, not its
# weights; every other field of the sections below decides them.
FINETUNE_SECTIONS = ("run", "data", "diffusion", "unet", "sampler", "features", "finetune")
FINETUNE_NOT_DECIDING = frozenset({
    "run.mode", "run.workdir", "run.init_checkpoint", "run.deterministic", "run.checkpoint_every",
    "run.log_every", "run.flags_text", "data.data_dir", "data.batch_size", "sampler.num_images",
    "sampler.batch_size", "features.classifier_path", "features.inception_weights",
    "features.inception_graph", "features.classifier_epochs", "finetune.recompute"})


def finetune_settings(cfg, *, init_checkpoint):
  """{config field: JSON value} of everything a finetune of the config.Config `cfg` from
  `init_checkpoint` depends on; its input files (starting weights, feature network) by digest."""
  settings = {}
  for section in FINETUNE_SECTIONS:
    for field, value in dataclasses.asdict(getattr(cfg, section)).items():
      name = f"{section}.{field}"
      if name not in FINETUNE_NOT_DECIDING:
        settings[name] = value
  digest = lambda path: f"sha256:{(files_sha256(path) or 'none')[:16]}"
  name = cfg.features.feature_net
  files = features_lib.input_files(name, inception_weights=cfg.features.inception_weights,
                                   inception_graph=cfg.features.inception_graph,
                                   classifier_path=cfg.features.classifier_path)
  digests = ", ".join(digest(path) for path in files)
  if features_lib.model_file(name) or name == "efficientnet_lite0":
    # A model file's path is in its name, a packaged network has no path flag: the name stands
    # with its files' digests.
    settings["features.feature_net"] = f"{name} ({digests})"
  else:
    settings[{"inception_v3": "features.inception_weights",
              "inception_fid": "features.inception_graph"}.get(
                  name, "features.classifier_path")] = digests
  settings["run.init_checkpoint"] = digest(init_checkpoint)
  return json.loads(json.dumps(settings))  # Tuples as lists, as read back from the record.
