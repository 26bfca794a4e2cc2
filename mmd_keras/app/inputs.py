"""What a mode reads: the training stream, the reference images and the feature spaces."""

import numpy as np

from mmd_keras import config as config_lib
from mmd_keras import console
from mmd_keras import data as data_lib
from mmd_keras import errors
from mmd_keras import evaluation as evaluate_lib
from mmd_keras import features as features_lib
from mmd_keras import metrics
from mmd_keras import provenance
from mmd_keras import validation as validation_lib
from mmd_keras.errors import ParameterError


def training_data(cfg, *, batch_size, batch_field):
  """start_batch -> the shuffled, repeated training stream from that batch on; the data is read
  now, so a missing file fails before any model is built."""
  make = lambda start_batch: data_lib.make_dataset(
      dataset=cfg.data.dataset, split="train", global_batch_size=batch_size,
      image_size=cfg.data.image_size, data_dir=cfg.data.data_dir,
      random_flip=cfg.data.random_flip, seed=cfg.run.seed, start_batch=start_batch)
  with errors.renamed(global_batch_size=batch_field):
    make(0)
  return make


def check_eval_split(cfg, *, num_images, images_field):
  """`eval.split` names a split with at least `num_images` images (when its size is known without
  reading it)."""
  available = data_lib.num_examples(dataset=cfg.data.dataset, split=cfg.eval.split,
                                    data_dir=cfg.data.data_dir)
  if available is not None and num_images > available:
    raise ParameterError(images_field, f"exceeds the {available} images of {{eval.split}}="
                         f"{cfg.eval.split} (the reference set is as many real images as samples)",
                         value=num_images, refs=("eval.split",))


def real_set(cfg):
  """(a name of the reference images for the report and cache files, a function returning their
  batches); the data is opened now, so a missing file fails before any sampling."""
  dataset = data_lib.make_dataset(
      dataset=cfg.data.dataset, split=cfg.eval.split, global_batch_size=cfg.sampler.batch_size,
      image_size=cfg.data.image_size, data_dir=cfg.data.data_dir, shuffle=False, repeat=False,
      drop_remainder=False)
  name = "".join(c if c.isalnum() or c in "-_." else "_"
                 for c in f"{cfg.data.dataset}_{cfg.eval.split}_{cfg.data.image_size}px")
  return name, lambda: (batch.numpy() for batch in dataset)


def _feature_fields(cfg, name, field=None):
  """The field that named feature network `name` (its files' fields are settings.LIBRARY_NAMES):
  `field`, else the trained one's or the report's."""
  return dict(feature_net=field or ("features.feature_net" if name == cfg.features.feature_net
                                    else "eval.feature_nets"))


def _network_args(cfg, name):
  f = cfg.features
  return dict(image_size=cfg.data.image_size, channels=cfg.data.channels,
              inception_weights=f.inception_weights, inception_resolution=f.inception_resolution,
              classifier_path=f.classifier_path_of(name), inception_graph=f.inception_graph,
              feature_image_size=f.feature_image_size, feature_image_range=f.feature_image_range)


def _space_settings(cfg, name):
  """What a feature network's variables do not show: the input size, Inception's resize; for a
  frozen graph (constants, no variables) or a model file, the digests of its files and what is
  declared for it."""
  settings = dict(image_size=cfg.data.image_size, channels=cfg.data.channels,
                  inception_resolution=cfg.features.inception_resolution
                  if name == "inception_v3" else None)
  if name == "inception_fid" or features_lib.model_file(name):
    f = cfg.features
    files = features_lib.input_files(name, inception_graph=f.inception_graph)
    settings.update(files_sha256=[provenance.files_sha256(path) for path in files],
                    feature_image_size=f.feature_image_size,
                    feature_image_range=f.feature_image_range)
  return repr(settings)


def check_feature_network(cfg, name, *, field=None):
  """The files of feature network `name` (named by `field`) exist and fit; nothing is loaded."""
  with errors.renamed(**_feature_fields(cfg, name, field)):
    features_lib.check_feature_network(name, **_network_args(cfg, name))


def feature_network(cfg, name, *, field=None):
  """The frozen feature network `name` (named by `field`), loaded."""
  with errors.renamed(**_feature_fields(cfg, name, field)):
    return features_lib.make_feature_network(name, **_network_args(cfg, name))


def check_validation(cfg):
  """Validation's settings against the reports', the validation spaces' files, and enough images
  in `finetune.val_split`'s slice."""
  f = cfg.finetune
  config_lib.check_validation(f, cfg.eval)
  for name in f.val_feature_nets:
    check_feature_network(cfg, name, field="finetune.val_feature_nets")
  split, start, stop = f.val_split
  size = data_lib.num_examples(dataset=cfg.data.dataset, split=split, data_dir=cfg.data.data_dir)
  available = None if size is None else min(size, stop or size) - start
  if available is not None and available < f.num_val_images:
    raise ParameterError("finetune.num_val_images", f"exceeds the {max(available, 0)} images of "
                         f"{{finetune.val_split}}", value=f.num_val_images,
                         refs=("finetune.val_split",))


def validation(cfg):
  """The `validation.Settings` of a guarded finetune: its spaces loaded (each narrower than
  `finetune.num_val_images`, for FID), the held-back images embedded in them, and the spaces no
  report scores chosen to select in."""
  f = cfg.finetune
  split, start, _ = f.val_split
  dataset = data_lib.make_dataset(
      dataset=cfg.data.dataset, split=split, global_batch_size=cfg.sampler.batch_size,
      image_size=cfg.data.image_size, data_dir=cfg.data.data_dir, shuffle=False, repeat=False,
      drop_remainder=False)
  images = np.concatenate([batch.numpy() for batch in dataset.unbatch().skip(start)
                           .take(f.num_val_images).batch(cfg.sampler.batch_size)], axis=0)
  spaces, real = {}, {}
  for name in f.val_feature_nets:
    spaces[name] = feature_network(cfg, name, field="finetune.val_feature_nets")
    with errors.renamed(num_images="finetune.num_val_images"):
      metrics.check_enough_samples(len(images), spaces[name].dim)
    real[name] = np.asarray(spaces[name](images), np.float64)
  return validation_lib.Settings(every=f.validate_every, patience=f.patience,
                                 num_images=f.num_val_images, batch_size=cfg.sampler.batch_size,
                                 spaces=spaces, real_features=real,
                                 select=config_lib.validation_select(f, cfg.eval),
                                 lr_backoff=f.lr_backoff)


def check_feature_spaces(cfg):
  """The files of the report's feature spaces (`eval.feature_nets`) checked; nothing is loaded."""
  for name in cfg.eval.feature_nets:
    check_feature_network(cfg, name)


def feature_spaces(cfg, *, num_images, images_field, skip_too_wide=False):
  """The report's feature networks, loaded, each with fewer dimensions than `num_images` (FID's
  covariance needs N > d). With `skip_too_wide` (the quickstart's small N), a space other than the
  trained one with too many dimensions is left out with a note instead of refused."""
  spaces = []
  for name in cfg.eval.feature_nets:
    trained = name == cfg.features.feature_net
    # Where the architecture fixes the dimension, a space too wide for N is not even loaded.
    dim = features_lib.known_dim(name)
    network = None if dim is not None else feature_network(cfg, name)
    dim = dim if network is None else network.dim
    if skip_too_wide and not trained and dim >= num_images:
      console.note(f"{name} is left out of this report: FID of its {dim}-d features needs more "
                   f"than the {num_images} images scored here (--mode=evaluate scores it)")
      continue
    with errors.renamed(num_images=images_field):
      metrics.check_enough_samples(num_images, dim)
    spaces.append(evaluate_lib.FeatureSpace(name, network or feature_network(cfg, name),
                                            trained=trained, settings=_space_settings(cfg, name)))
  return spaces
