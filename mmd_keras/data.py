"""Datasets as tf.data pipelines of NHWC float32 images in [-1, 1].

`fashion_mnist` reads the idx files of the Debian package `dataset-fashion-mnist` offline;
`tfds:<name>` goes through tensorflow-datasets with the crops of the DDPM/DDIM papers.

A training stream (shuffled and repeated) is a pure function of (seed, position), so a resumed run
can start it at the batch it stopped at (`start_batch`) and see exactly the batches an uninterrupted
run would: random flips are keyed by (seed, position), and an in-memory dataset visits its images
in epoch e in the order of a stateless permutation keyed by (seed, e).
"""

import gzip
import os

import numpy as np
import tensorflow as tf

from mmd_keras import streams
from mmd_keras.errors import ParameterError
from mmd_keras.errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot")
# name -> (native image size, channels, centre-crop size or None for the largest square).
TFDS_DATASETS = {
    "cifar10": (32, 3, None),
    "celeb_a": (64, 3, 140),
    "lsun/church_outdoor": (256, 3, None),
}


class DataError(UserError):
  """A dataset that cannot be read; the message names the flag or file."""


def dataset_shape(dataset):
  """(native image size, channels) of a `--dataset` value."""
  if dataset == "fashion_mnist":
    return 28, 1
  if dataset.startswith("tfds:"):
    name = dataset[len("tfds:"):]
    if name in TFDS_DATASETS:
      return TFDS_DATASETS[name][:2]
    return None, 3
  raise ParameterError("dataset", "must be 'fashion_mnist' or 'tfds:<name>' (e.g. tfds:cifar10, "
                       "tfds:celeb_a, tfds:lsun/church_outdoor)", value=dataset)


def _read_idx(path, expected_dims):
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise DataError(f"cannot read Fashion-MNIST file {path} (expected a gzip-compressed idx file): "
                    f"{e}") from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] != expected_dims:
    raise DataError(f"{path} is not an idx file of uint8 with {expected_dims} dimensions")
  dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(expected_dims)]
  body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * expected_dims)
  if body.size != int(np.prod(dims)):
    raise DataError(f"{path} is truncated: header says {dims}, found {body.size} bytes of data")
  return body.reshape(dims)


def _fashion_mnist_paths(split, data_dir):
  """(images file, labels file) of a split, checked to exist."""
  if split not in FASHION_MNIST_FILES:
    raise ParameterError("split", f"must be one of {' or '.join(FASHION_MNIST_FILES)} for "
                         f"Fashion-MNIST", value=split)
  data_dir = data_dir or FASHION_MNIST_DIR
  paths = [os.path.join(data_dir, name) for name in FASHION_MNIST_FILES[split]]
  missing = [p for p in paths if not os.path.exists(p)]
  if missing:
    raise ParameterError(
        "data_dir", f"lacks the Fashion-MNIST file {missing[0]}; install the data with 'apt-get "
        f"install -y dataset-fashion-mnist' or point {{data_dir}} at a folder with "
        f"{', '.join(FASHION_MNIST_FILES[split])}", value=data_dir, refs=("data_dir",))
  return paths


def load_fashion_mnist(*, split="train", data_dir=None):
  """(images uint8 [N, 28, 28, 1], labels int64 [N]) from the idx files."""
  paths = _fashion_mnist_paths(split, data_dir)
  images = _read_idx(paths[0], 3)
  labels = _read_idx(paths[1], 1).astype(np.int64)
  if images.shape[0] != labels.shape[0]:
    raise DataError(f"{paths[0]} has {images.shape[0]} images but {paths[1]} has "
                    f"{labels.shape[0]} labels")
  return images[..., None], labels


def num_examples(*, dataset, split, data_dir=None):
  """The number of images of a split, read cheaply (the idx header, TFDS's dataset info), so a run
  can check a count before reading the data; None when TFDS cannot tell (not prepared yet)."""
  if dataset == "fashion_mnist":
    path = _fashion_mnist_paths(split, data_dir)[0]
    try:
      with gzip.open(path, "rb") as f:
        header = f.read(8)
    except (OSError, EOFError) as e:
      raise DataError(f"cannot read Fashion-MNIST file {path} (expected a gzip-compressed idx "
                      f"file): {e}") from e
    if len(header) < 8 or header[:4] != bytes([0, 0, 0x08, 3]):
      raise DataError(f"{path} is not an idx file of uint8 with 3 dimensions")
    return int.from_bytes(header[4:8], "big")
  dataset_shape(dataset)
  try:
    import tensorflow_datasets as tfds
    return int(tfds.builder(dataset[len("tfds:"):], data_dir=data_dir).info.splits[split]
               .num_examples)
  except Exception:  # Not prepared, unknown, or a split TFDS cannot size: counted when read.
    return None


def center_crop(image, size=None):
  """Central size×size crop (the largest square when size is None)."""
  shape = tf.shape(image)
  height, width = shape[0], shape[1]
  side = tf.minimum(height, width) if size is None else tf.minimum(
      tf.minimum(height, width), size)
  top = (height - side) // 2
  left = (width - side) // 2
  return image[top:top + side, left:left + side]


def to_model_range(image, image_size):
  """uint8 [H, W, C] -> float32 [image_size, image_size, C] in [-1, 1]."""
  image = tf.cast(image, tf.float32)
  if image.shape[0] != image_size or image.shape[1] != image_size:
    image = tf.image.resize(image, [image_size, image_size], method="bilinear", antialias=True)
  return tf.clip_by_value(image / 127.5 - 1.0, -1.0, 1.0)


def _tfds_source(name, *, split, data_dir, seed):
  import tensorflow_datasets as tfds  # Only online users need it; keep the offline import light.
  try:
    # A seeded file order: the stream is the same in every process (a resume replays it).
    ds = tfds.load(name, split=split, data_dir=data_dir, shuffle_files=True,
                   read_config=tfds.ReadConfig(shuffle_seed=seed))
  except Exception as e:  # TFDS raises many types (download, not-found, registry); name them all.
    raise ParameterError(
        "dataset", f"could not be loaded by tensorflow-datasets (split {split!r}, "
        f"{{data_dir}}={data_dir or ''}): {type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}", value=f"tfds:{name}", refs=("data_dir",)
    ) from e
  crop = TFDS_DATASETS.get(name, (None, None, None))[2]
  return ds.map(lambda ex: (center_crop(ex["image"], crop), ex.get("label", tf.constant(-1, tf.int64))),
                num_parallel_calls=tf.data.AUTOTUNE)


def _shuffled_positions(count, *, seed, start):
  """(position p, index of the image at p) for p = start, start + 1, …: epoch e = p // count
  visits all `count` images in the order of a permutation keyed by (seed, e)."""
  def at(position):
    epoch_key = streams.fold_in(seed, streams.DATA_ORDER, position // count, dtype=tf.int64)
    index = tf.random.experimental.index_shuffle(position % count, epoch_key,
                                                 tf.constant(count - 1, tf.int64))
    return position, index
  return tf.data.Dataset.range(start, tf.int64.max).map(at)


def make_dataset(*, dataset, split="train", global_batch_size, image_size=None, data_dir=None,
                 random_flip=False, shuffle=True, repeat=True, seed=0, with_labels=False,
                 drop_remainder=True, start_batch=0):
  """Batches of images (and labels, if asked) in [-1, 1], batched by the *global* batch size.

  Under a tf.distribute strategy, `strategy.experimental_distribute_dataset` splits each global
  batch across replicas. A repeated stream starts at its `start_batch`-th batch: directly for
  Fashion-MNIST (random access), by replaying and dropping the first examples for TFDS sources.
  """
  native_size, _ = dataset_shape(dataset)
  image_size = image_size or native_size
  if global_batch_size < 1:
    raise ParameterError("global_batch_size", "must be >= 1", value=global_batch_size)
  start = start_batch * global_batch_size
  if dataset == "fashion_mnist":
    images, labels = load_fashion_mnist(split=split, data_dir=data_dir)
    if shuffle and repeat:
      images, labels = tf.constant(images), tf.constant(labels)
      ds = _shuffled_positions(images.shape[0], seed=seed, start=start).map(
          lambda position, index: (position, images[index], labels[index]))
    else:
      ds = tf.data.Dataset.from_tensor_slices((images, labels))
      if shuffle:
        ds = ds.shuffle(min(images.shape[0], 50_000), seed=seed, reshuffle_each_iteration=True)
      if repeat:
        ds = ds.repeat()
      ds = ds.enumerate().skip(start).map(lambda position, example: (position, *example))
  else:
    ds = _tfds_source(dataset[len("tfds:"):], split=split, data_dir=data_dir, seed=seed)
    if shuffle:
      ds = ds.shuffle(50_000, seed=seed, reshuffle_each_iteration=True)
    if repeat:
      ds = ds.repeat()
    ds = ds.enumerate().skip(start).map(lambda position, example: (position, *example))

  def preprocess(position, image, label):
    image = to_model_range(image, image_size)
    if random_flip:
      image = tf.image.stateless_random_flip_left_right(
          image, seed=streams.fold_in(seed, streams.DATA_FLIP, position, dtype=tf.int64))
    return (image, label) if with_labels else image

  ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(global_batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
  # No autotuning thread: in TF 2.21 deleting an iterator waits for it to wake from its current
  # optimization period (doubling up to 60 s), so every `fit` ended up to a minute late (24 s after
  # the quickstart's finetune). AUTOTUNE then means a parallelism of the CPU's cores and the
  # prefetch buffer's own tuning, plenty for images decoded and rescaled.
  options = tf.data.Options()
  options.autotune.enabled = False
  return ds.with_options(options)
