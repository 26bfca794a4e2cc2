"""What a result was made from: the fingerprint of a model's weights, the digest of an input file.

`weights_sha256` is the one fingerprint of a model: evaluation reports and exports record it, so
the same weights carry the same value in report.json and in sampler.json.
"""

import hashlib
import os

import numpy as np
import tensorflow as tf


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
