"""Loading the exported sampler in another TensorFlow program (needs only tensorflow and numpy).

  python export/load_example.py --model_dir=exports/mmd_ddm/1 --seed=3 --num_images=16 --out=samples.png

The SavedModel carries its own settings (K, timesteps, η, image shape), so nothing of the training
code is needed here.
"""

import argparse
import math

import numpy as np
import tensorflow as tf


def image_grid(images):
  """uint8 [N, H, W, C] -> one uint8 [rows·H, cols·W, C] grid, cols = ⌈sqrt(N)⌉."""
  count, height, width, channels = images.shape
  cols = math.ceil(math.sqrt(count))
  rows = math.ceil(count / cols)
  grid = np.zeros([rows * height, cols * width, channels], np.uint8)
  for i, image in enumerate(images):
    row, col = divmod(i, cols)
    grid[row * height:(row + 1) * height, col * width:(col + 1) * width] = image
  return grid


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model_dir", required=True, help="A version directory, e.g. exports/mmd_ddm/1.")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--num_images", type=int, default=16)
  parser.add_argument("--out", default="samples.png")
  args = parser.parse_args()

  sampler = tf.saved_model.load(args.model_dir)
  print(f"K={int(sampler.num_steps)} timesteps={sampler.timesteps.numpy().tolist()} "
        f"eta={float(sampler.eta):g} image_shape={sampler.image_shape.numpy().tolist()}")
  generate = sampler.signatures["serving_default"]
  images = generate(seed=tf.constant(args.seed, tf.int64),
                    num_images=tf.constant(args.num_images, tf.int32))["images"].numpy()
  tf.io.write_file(args.out, tf.io.encode_png(image_grid(images)))
  print(f"wrote {images.shape[0]} images {images.shape[1:]} to {args.out}")


if __name__ == "__main__":
  main()
