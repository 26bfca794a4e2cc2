"""data.py: idx parsing on synthetic files, clear errors, the real Fashion-MNIST, the tf.data pipeline."""

import gzip
import os

import numpy as np
import pytest
import tensorflow as tf

from mmd_keras import data as data_lib
from mmd_keras.errors import UserError


def write_idx(path, array):
  """Writes a uint8 idx file (magic 0x00000803-style header, big-endian dims), gzipped."""
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def write_fashion_mnist(folder, images, labels, split="train"):
  image_file, label_file = data_lib.FASHION_MNIST_FILES[split]
  write_idx(os.path.join(folder, image_file), images)
  write_idx(os.path.join(folder, label_file), labels)


@pytest.fixture
def synthetic_dir(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, size=[10, 28, 28], dtype=np.uint8)
  labels = np.arange(10, dtype=np.uint8)
  write_fashion_mnist(tmp_path, images, labels)
  return tmp_path, images, labels


def test_idx_files_are_parsed(synthetic_dir):
  folder, images, labels = synthetic_dir
  got_images, got_labels = data_lib.load_fashion_mnist(split="train", data_dir=str(folder))
  assert got_images.shape == (10, 28, 28, 1) and got_images.dtype == np.uint8
  np.testing.assert_array_equal(got_images[..., 0], images)
  np.testing.assert_array_equal(got_labels, labels)


def test_missing_files_say_how_to_install(tmp_path):
  with pytest.raises(UserError) as info:
    data_lib.load_fashion_mnist(split="train", data_dir=str(tmp_path))
  message = str(info.value)
  assert "apt-get install -y dataset-fashion-mnist" in message
  assert message.startswith(f"data_dir={tmp_path} lacks") and "point data_dir at" in message
  assert "\n" not in message


def test_truncated_file_is_reported(tmp_path):
  image_file, label_file = data_lib.FASHION_MNIST_FILES["train"]
  write_idx(tmp_path / label_file, np.zeros([3], np.uint8))
  header = bytes([0, 0, 8, 3]) + b"".join(d.to_bytes(4, "big") for d in (3, 28, 28))
  with gzip.open(tmp_path / image_file, "wb") as f:
    f.write(header + bytes(28 * 28 * 2))  # Two of the three promised images.
  with pytest.raises(UserError, match="truncated"):
    data_lib.load_fashion_mnist(split="train", data_dir=str(tmp_path))


def test_corrupt_files_are_reported(tmp_path):
  image_file, label_file = data_lib.FASHION_MNIST_FILES["train"]
  write_idx(tmp_path / label_file, np.zeros([3], np.uint8))
  (tmp_path / image_file).write_bytes(b"this is not gzip")
  with pytest.raises(UserError, match=image_file):
    data_lib.load_fashion_mnist(split="train", data_dir=str(tmp_path))
  with gzip.open(tmp_path / image_file, "wb") as f:
    f.write(b"\x00\x00\x0d\x03" + bytes(64))  # An idx file of float32, not uint8.
  with pytest.raises(UserError, match="not an idx file"):
    data_lib.load_fashion_mnist(split="train", data_dir=str(tmp_path))


def test_image_and_label_counts_must_agree(tmp_path):
  write_fashion_mnist(tmp_path, np.zeros([3, 28, 28]), np.zeros([4]))
  with pytest.raises(UserError, match="labels"):
    data_lib.load_fashion_mnist(split="train", data_dir=str(tmp_path))


def test_real_fashion_mnist_loads():
  train_images, train_labels = data_lib.load_fashion_mnist(split="train")
  test_images, test_labels = data_lib.load_fashion_mnist(split="test")
  assert train_images.shape == (60000, 28, 28, 1) and train_images.dtype == np.uint8
  assert test_images.shape == (10000, 28, 28, 1)
  assert train_labels.shape == (60000,) and test_labels.shape == (10000,)
  # Fashion-MNIST is balanced: 6000 training and 1000 test images per class.
  np.testing.assert_array_equal(np.bincount(train_labels), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(test_labels), [1000] * 10)


def test_num_examples_reads_the_idx_header_only(synthetic_dir, tmp_path):
  folder, images, _ = synthetic_dir
  assert data_lib.num_examples(dataset="fashion_mnist", split="train",
                               data_dir=str(folder)) == len(images)
  assert data_lib.num_examples(dataset="fashion_mnist", split="test") == 10000
  assert data_lib.num_examples(dataset="fashion_mnist", split="train") == 60000
  with pytest.raises(UserError, match="apt-get install -y dataset-fashion-mnist"):
    data_lib.num_examples(dataset="fashion_mnist", split="test", data_dir=str(folder))
  # A TFDS dataset that is not prepared cannot tell: the count is checked when it is read.
  assert data_lib.num_examples(dataset="tfds:cifar10", split="test",
                               data_dir=str(tmp_path / "tfds")) is None


def test_make_dataset_batches_by_the_global_batch_size(synthetic_dir):
  folder, images, labels = synthetic_dir
  ds = data_lib.make_dataset(dataset="fashion_mnist", global_batch_size=4, data_dir=str(folder),
                             shuffle=False, with_labels=True)
  batch_images, batch_labels = next(iter(ds))
  assert batch_images.shape == (4, 28, 28, 1) and batch_images.dtype == tf.float32
  np.testing.assert_allclose(batch_images.numpy()[..., 0], images[:4] / 127.5 - 1.0, atol=1e-6)
  np.testing.assert_array_equal(batch_labels.numpy(), labels[:4])
  for batch in ds.take(5):  # Repeats past the 10 images, every batch full.
    assert batch[0].shape[0] == 4
    assert -1.0 <= batch[0].numpy().min() and batch[0].numpy().max() <= 1.0


def test_make_dataset_resizes(synthetic_dir):
  folder, _, _ = synthetic_dir
  ds = data_lib.make_dataset(dataset="fashion_mnist", global_batch_size=2, image_size=16,
                             data_dir=str(folder))
  batch = next(iter(ds))
  assert batch.shape == (2, 16, 16, 1)
  assert -1.0 <= batch.numpy().min() and batch.numpy().max() <= 1.0


@pytest.mark.parametrize("random_flip", [False, True])
def test_random_flip_flag(tmp_path, random_flip):
  image = np.zeros([1, 28, 28], np.uint8)
  image[..., :14] = 255  # Left half white: a flip moves it to the right.
  write_fashion_mnist(tmp_path, np.repeat(image, 8, axis=0), np.zeros([8]))
  ds = data_lib.make_dataset(dataset="fashion_mnist", global_batch_size=8, data_dir=str(tmp_path),
                             random_flip=random_flip, shuffle=False)
  batch = np.concatenate([b.numpy() for b in ds.take(4)])
  left_white = batch[:, 0, 0, 0] == 1.0
  right_white = batch[:, 0, -1, 0] == 1.0
  assert np.all(left_white ^ right_white)
  if random_flip:
    assert 0 < right_white.sum() < len(batch)
  else:
    assert not right_white.any()


def test_unknown_dataset_names_the_parameter():
  with pytest.raises(UserError, match="^dataset=foo "):
    data_lib.make_dataset(dataset="foo", global_batch_size=4)
  with pytest.raises(UserError, match="^dataset=imagenet "):
    data_lib.dataset_shape("imagenet")


def test_bad_batch_size_names_the_parameter(synthetic_dir):
  with pytest.raises(UserError, match="^global_batch_size=0 must be >= 1$"):
    data_lib.make_dataset(dataset="fashion_mnist", global_batch_size=0,
                          data_dir=str(synthetic_dir[0]))


def test_dataset_shapes():
  assert data_lib.dataset_shape("fashion_mnist") == (28, 1)
  assert data_lib.dataset_shape("tfds:cifar10") == (32, 3)
  assert data_lib.dataset_shape("tfds:celeb_a") == (64, 3)
  assert data_lib.dataset_shape("tfds:lsun/church_outdoor") == (256, 3)


@pytest.mark.parametrize("size, top, left, side", [(None, 20, 0, 178), (140, 39, 19, 140)])
def test_center_crop(size, top, left, side):
  # A CelebA-shaped image (218 x 178): the DDIM crop is the central 140 x 140.
  image = np.arange(218 * 178, dtype=np.int32).reshape(218, 178, 1)
  got = data_lib.center_crop(tf.constant(image), size).numpy()
  np.testing.assert_array_equal(got, image[top:top + side, left:left + side])


def _stream(folder, *, start_batch=0, seed=0, random_flip=True):
  ds = data_lib.make_dataset(dataset="fashion_mnist", global_batch_size=4, data_dir=str(folder),
                             random_flip=random_flip, seed=seed, with_labels=True,
                             start_batch=start_batch)
  return [(images.numpy(), labels.numpy()) for images, labels in ds.take(8)]


def test_training_stream_visits_every_image_once_per_epoch(synthetic_dir):
  folder, _, labels = synthetic_dir
  # 8 batches of 4 = 32 positions: epochs 0, 1, 2 complete (10 images each) and 2 of epoch 3.
  order = np.concatenate([batch_labels for _, batch_labels in _stream(folder, random_flip=False)])
  epochs = [order[i:i + 10] for i in range(0, 30, 10)]
  for epoch in epochs:
    np.testing.assert_array_equal(np.sort(epoch), np.sort(labels))
  assert not np.array_equal(epochs[0], epochs[1])  # Reshuffled every epoch.
  assert not np.array_equal(epochs[0], labels)


def test_training_stream_starts_at_any_batch(synthetic_dir):
  # What a resumed run relies on: batch k of a stream started at batch s is batch s + k of the
  # stream from the beginning (same images, same order, same flips), in any process.
  folder, _, _ = synthetic_dir
  full = _stream(folder)
  resumed = _stream(folder, start_batch=3)
  for (a_images, a_labels), (b_images, b_labels) in zip(full[3:], resumed):
    np.testing.assert_array_equal(a_labels, b_labels)
    np.testing.assert_array_equal(a_images, b_images)
  other_seed = np.concatenate([labels for _, labels in _stream(folder, seed=1)])
  assert not np.array_equal(np.concatenate([labels for _, labels in full]), other_seed)


def test_training_stream_flips_are_keyed_by_position(synthetic_dir):
  folder, images, _ = synthetic_dir
  flipped = unflipped = 0
  for (batch, labels), (plain, _) in zip(_stream(folder), _stream(folder, random_flip=False)):
    for image, label, reference in zip(batch[..., 0], labels, plain[..., 0]):
      np.testing.assert_allclose(reference, images[label] / 127.5 - 1.0, atol=1e-6)
      if np.array_equal(image, reference):
        unflipped += 1
      else:
        np.testing.assert_array_equal(image, reference[:, ::-1])
        flipped += 1
  assert flipped and unflipped


@pytest.mark.parametrize("shuffle", [True, False])
def test_streams_run_without_the_autotuning_thread(synthetic_dir, shuffle):
  # Deleting an iterator waits for that thread's optimization period (up to 60 s in TF 2.21): the
  # end of every fit. Without it, the stream still yields its batches.
  folder, _, _ = synthetic_dir
  ds = data_lib.make_dataset(dataset="fashion_mnist", global_batch_size=4, data_dir=str(folder),
                             shuffle=shuffle, repeat=shuffle)
  assert ds.options().autotune.enabled is False
  assert next(iter(ds)).shape == (4, 28, 28, 1)
