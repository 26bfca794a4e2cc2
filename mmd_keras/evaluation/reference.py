"""The reference set of an evaluation: the first N real images embedded in every feature space,
cached on disk under the feature network's key (`feature_cache_key`)."""

import hashlib
import os
import re

import numpy as np
import tensorflow as tf
from absl import logging

from mmd_keras import atomic
from mmd_keras import console
from mmd_keras.errors import ParameterError


def _network_weights(network):
  """The values of a feature network's variables: its Keras model's weights, or every variable a
  loaded SavedModel tracks (it has no `weights`)."""
  model = getattr(network, "model", network)
  weights = getattr(model, "weights", None)
  if weights is None:
    weights = [v for v in tf.train.TrackableView(model).descendants()
               if isinstance(v, tf.Variable)]
  return [np.asarray(w) for w in weights]


def feature_cache_key(space):
  """The key of a feature space's cached features (its name in the report too): sha256 of its
  network's weights, dimension and `settings`, so that features cached with another network (a
  retrained classifier, another resolution) are never reused."""
  return digest(_network_weights(space.network), repr((space.network.dim, space.settings)))


def _image_batches(images, batch_size):
  """Batches of an array [M, H, W, C], or of `images()` when it is a function (a data stream)."""
  if callable(images):
    yield from images()
    return
  for i in range(0, len(images), batch_size):
    yield images[i:i + batch_size]


def reference_features(spaces, real_images, *, num_images, batch_size, digests, cache_dir=None,
                       real_set="real"):
  """{space name: float64 [N, D]}: features of the first N real images in every space, in one pass
  over the images for the spaces not cached yet.

  The cache is `<cache_dir>/<real_set>_<space>_<N>_<digest>.npz` (float32, staged and renamed),
  keyed by the network's `feature_cache_key`, which is stored in the file and compared on load.
  """
  # A model file's name (savedmodel:/path/dir) in a file name: its path's separators replaced.
  paths = {s.name: cache_dir and os.path.join(
      cache_dir, f"{real_set}_{re.sub(r'[^A-Za-z0-9_.-]', '_', s.name)}_{num_images}_"
                 f"{digests[s.name][:16]}.npz") for s in spaces}
  features, missing = {}, []
  for space in spaces:
    path = paths[space.name]
    if path and os.path.exists(path):
      with np.load(path) as cached:
        stored, digest = cached["features"], str(cached["digest"]) if "digest" in cached else ""
      if digest == digests[space.name] and stored.shape == (num_images, space.network.dim):
        features[space.name] = stored.astype(np.float64)
        continue
      logging.info("ignoring %s: it was computed for other images or another network", path)
    missing.append(space)
  if not missing:
    return features
  chunks = {s.name: [] for s in missing}
  count = 0
  with console.progress(num_images, desc=f"embedding real images in "
                        f"{', '.join(s.name for s in missing)}", unit="images") as bar:
    for batch in _image_batches(real_images, batch_size):
      batch = np.asarray(batch)[:num_images - count]
      for space in missing:
        chunks[space.name].append(np.asarray(space.network(batch), np.float64))
      count += len(batch)
      bar.update(len(batch))
      if count >= num_images:
        break
  if count < num_images:
    raise ParameterError("num_images", f"exceeds the {count} real images available for the "
                         f"reference statistics", value=num_images)
  for space in missing:
    features[space.name] = np.concatenate(chunks[space.name], axis=0)
    path = paths[space.name]
    if path:
      os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
      # Evaluations sharing a cache may write the same file at once.
      with atomic.staged(path, unique=True) as staging:
        np.savez(staging, features=features[space.name].astype(np.float32),
                 digest=np.array(digests[space.name]))
  return features


def digest(arrays, text=""):
  """sha256 hex digest of arrays' bytes and a string."""
  h = hashlib.sha256(text.encode())
  for a in arrays:
    h.update(np.ascontiguousarray(a).tobytes())
  return h.hexdigest()
