"""Checks that `mmd_keras/features/efficientnet_lite.py` is the ImageNet network it claims to be, and
measures what its resolution costs and keeps.

  python scripts/check_efficientnet_lite.py [--resolutions=224,160,128,96,64] [--num_images=1000]

1. ImageNet labels of the sample photos of the Debian package `darknet` (`apt-get install -y
   darknet`): top-3 at the first resolution, top-1 at each. ImageNet-1k class i is the i-th of
   darknet's first 1000 WordNet ids in sorted order (the order TF and PyTorch ImageNet models use).
2. Per resolution, on Fashion-MNIST through the feature network evaluation uses: wall-clock and
   CPU seconds per 5000 images (the wall clock depends on what else runs), and the accuracy of the
   nearest class mean of the 1280-d features (means of `num_images` training images, accuracy on
   `num_images` test images), beside raw pixels.
"""

import os
import sys
import time

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mmd_keras import data as data_lib
from mmd_keras.features import efficientnet_lite

DARKNET_DATA = "/usr/share/darknet/data"
PHOTOS = ("eagle", "dog", "horses", "person", "giraffe", "kite", "scream")

flags.DEFINE_list("resolutions", ["224", "160", "128", "96", "64"], "Input sizes R to check.")
flags.DEFINE_integer("num_images", 1000, "Fashion-MNIST training and test images per check.",
                     lower_bound=10)
flags.DEFINE_integer("batch_size", 250, "Images per feature-network call.", lower_bound=1)
FLAGS = flags.FLAGS


def imagenet_names():
  """The 1000 ImageNet-1k class names in class-index order, from darknet's lists."""
  with open(os.path.join(DARKNET_DATA, "imagenet.labels.list")) as f:
    wnids = f.read().split()[:1000]
  with open(os.path.join(DARKNET_DATA, "imagenet.shortnames.list")) as f:
    names = f.read().split("\n")[:1000]
  order = sorted(range(1000), key=lambda i: wnids[i])
  return [f"{names[i]} ({wnids[i]})" for i in order]


def photo(name, resolution):
  """The central square of darknet's `<name>.jpg`, resized to R×R with antialiasing, in [-1, 1]."""
  image = tf.io.decode_jpeg(tf.io.read_file(os.path.join(DARKNET_DATA, f"{name}.jpg")), channels=3)
  height, width = image.shape[:2]
  side = min(height, width)
  image = tf.image.crop_to_bounding_box(image, (height - side) // 2, (width - side) // 2, side,
                                        side)
  image = tf.image.resize(tf.cast(image, tf.float32), [resolution, resolution], method="bicubic",
                          antialias=True)
  return tf.clip_by_value(image / 127.5 - 1.0, -1.0, 1.0)


def check_photos(resolutions):
  names = imagenet_names()
  top1 = {name: [] for name in PHOTOS}
  for i, resolution in enumerate(resolutions):
    model = efficientnet_lite.build_model(efficientnet_lite.load_state_dict(),
                                          resolution=resolution)
    images = tf.stack([photo(name, resolution) for name in PHOTOS])
    inputs = efficientnet_lite.network_input(images, resolution=resolution)
    probs = tf.nn.softmax(model(inputs, training=False)["logits"]).numpy()
    for name, p in zip(PHOTOS, probs):
      best = np.argsort(-p)[:3]
      top1[name].append(names[best[0]].split(" (")[0])
      if i == 0:
        print(f"{name}.jpg at {resolution}: " + "; ".join(
            f"{names[c]} {p[c]:.2f}" for c in best))
  print(f"\ntop-1 at R = {', '.join(map(str, resolutions))}")
  for name in PHOTOS:
    print(f"  {name}.jpg: {' | '.join(top1[name])}")


def nearest_mean_accuracy(train, train_labels, test, test_labels):
  means = np.stack([train[train_labels == c].mean(0) for c in range(10)])
  distances = ((test[:, None, :] - means[None]) ** 2).sum(-1)
  return float((distances.argmin(1) == test_labels).mean())


def check_fashion_mnist(resolutions, *, num_images, batch_size):
  (train, train_labels), (test, test_labels) = (
      (images[:num_images] / np.float32(127.5) - 1, labels[:num_images])
      for images, labels in (data_lib.load_fashion_mnist(split=s) for s in ("train", "test")))
  pixels = nearest_mean_accuracy(train.reshape(num_images, -1), train_labels,
                                 test.reshape(num_images, -1), test_labels)
  print(f"\nFashion-MNIST, nearest class mean over {num_images} training / {num_images} test "
        f"images: raw pixels {pixels:.3f}")
  for resolution in resolutions:
    network = efficientnet_lite.feature_network(channels=1, resolution=resolution)
    network(train[:batch_size])  # Traces the graph outside the timing.
    started, started_cpu = time.time(), time.process_time()
    phi = [np.concatenate([network(x[i:i + batch_size]).numpy()
                           for i in range(0, num_images, batch_size)]) for x in (train, test)]
    per_5000 = 5000 / (2 * num_images)
    wall, cpu = (time.time() - started) * per_5000, (time.process_time() - started_cpu) * per_5000
    accuracy = nearest_mean_accuracy(phi[0], train_labels, phi[1], test_labels)
    print(f"  R = {resolution:3d}: {accuracy:.3f}; per 5000 images {wall:5.1f} s wall, "
          f"{cpu:5.1f} CPU-s", flush=True)


def main(argv):
  del argv
  resolutions = [int(r) for r in FLAGS.resolutions]
  print(f"weights: {efficientnet_lite.weights_path()} (SHA-256 {efficientnet_lite.WEIGHTS_SHA256})")
  if os.path.isdir(DARKNET_DATA):
    check_photos(resolutions)
  else:
    print(f"skipping the photos: {DARKNET_DATA} is missing (apt-get install -y darknet)")
  check_fashion_mnist(resolutions, num_images=FLAGS.num_images, batch_size=FLAGS.batch_size)


if __name__ == "__main__":
  app.run(main)
