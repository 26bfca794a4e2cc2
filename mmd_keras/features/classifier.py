"""The penultimate layer of the project's classifiers (`classifier.py`), trained with
`--mode=train_classifier`: `classifier` and `classifier_heldout`, weights at `--classifier_path`
(bundled for Fashion-MNIST under pretrained/)."""

import os

import keras

from mmd_keras import classifier as classifier_lib
from mmd_keras.features import network as network_lib
from mmd_keras.features.network import FeatureError

_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def default_classifier_path(dataset, feature_net):
  """pretrained/<dataset>/<feature_net>.weights.h5 in the project (where the bundled files are)."""
  folder = dataset.split(":", 1)[-1].replace("/", "_")
  return os.path.join(_PROJECT_ROOT, "pretrained", folder, f"{feature_net}.weights.h5")


def check(name, *, image_size, channels, path):
  if not path:
    raise FeatureError("feature_net", f"needs {{classifier_path}} (a .weights.h5 file written by "
                       f"{{mode}}=train_classifier {{feature_net}}={name})", value=name,
                       refs=("classifier_path", "feature_net", "mode"))
  if not os.path.exists(path):
    raise FeatureError("classifier_path", f"does not exist; train it with "
                       f"{{mode}}=train_classifier {{feature_net}}={name}", value=path,
                       refs=("feature_net", "mode"))
  meta = classifier_lib.read_metadata(path) or {}
  for key, want in (("arch", name), ("image_size", image_size), ("channels", channels)):
    if key in meta and meta[key] != want:
      raise FeatureError("classifier_path", f"holds a classifier with {key}={meta[key]}, but "
                         f"{{feature_net}}/{{image_size}}/{{dataset}} ask for {key}={want}",
                         value=path, refs=("dataset", "feature_net", "image_size"))


def build(name, *, image_size, channels, path):
  check(name, image_size=image_size, channels=channels, path=path)
  model = classifier_lib.build_classifier(name, image_size=image_size, channels=channels)
  try:
    model.load_weights(path)
  except Exception as e:  # Keras/h5py raise many types for a mismatched or corrupt file.
    raise FeatureError("classifier_path", f"cannot be loaded into the {name} architecture at "
                       f"{image_size}x{image_size}x{channels}: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}", value=path) from e
  layer = model.get_layer(classifier_lib.FEATURE_LAYER)
  features = keras.Model(model.input, layer.output, name=f"{name}_features")
  model, call = network_lib.frozen(features)
  return network_lib.FeatureNetwork(name=name, dim=int(layer.units), model=model, call=call,
                                    preprocess=lambda x: x, channels=channels)
