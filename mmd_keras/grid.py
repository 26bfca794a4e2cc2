"""Sample grids: a batch of images in [-1, 1] tiled into one uint8 picture, written as PNG."""

import math
import os

import numpy as np
import tensorflow as tf

from mmd_keras import ddim


def tile(images, *, columns=None):
  """[N, H, W, C] in [-1, 1] -> uint8 [rows·H, columns·W, C], 1-pixel gaps, row-major."""
  images = np.asarray(ddim.to_uint8(tf.convert_to_tensor(images, tf.float32)))
  count, height, width, channels = images.shape
  columns = columns or int(math.ceil(math.sqrt(count)))
  rows = int(math.ceil(count / columns))
  canvas = np.full((rows * (height + 1) - 1, columns * (width + 1) - 1, channels), 255, np.uint8)
  for index in range(count):
    row, column = divmod(index, columns)
    canvas[row * (height + 1):row * (height + 1) + height,
           column * (width + 1):column * (width + 1) + width] = images[index]
  return canvas


def write_png(path, images, *, columns=None, scale=1):
  """Writes the tiled grid to `path` (nearest-neighbour upscaled by `scale` for small images)."""
  canvas = tile(images, columns=columns)
  if scale > 1:
    canvas = np.repeat(np.repeat(canvas, scale, axis=0), scale, axis=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tf.io.write_file(path, tf.io.encode_png(canvas))
  return canvas
