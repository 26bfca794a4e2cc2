"""grid.py: tile layout and the PNG written to disk."""

import numpy as np
import tensorflow as tf

from mmd_keras import grid


def _constant_images(count, height, width, channels):
  # Image k is filled with the value that maps to uint8 10·(k + 1).
  values = (10.0 * (np.arange(count) + 1)) / 127.5 - 1.0
  return np.broadcast_to(values[:, None, None, None],
                         (count, height, width, channels)).astype(np.float32)


def test_tile_is_row_major_with_one_pixel_gaps():
  canvas = grid.tile(_constant_images(5, 2, 3, 1))
  # ceil(sqrt(5)) = 3 columns, 2 rows; cells of 2x3 separated by white 1-pixel lines.
  assert canvas.shape == (2 * 3 - 1, 3 * 4 - 1, 1) and canvas.dtype == np.uint8
  expected = np.full((5, 11, 1), 255, np.uint8)
  for k in range(5):
    row, column = divmod(k, 3)
    expected[row * 3:row * 3 + 2, column * 4:column * 4 + 3] = 10 * (k + 1)
  np.testing.assert_array_equal(canvas, expected)


def test_tile_with_explicit_columns():
  canvas = grid.tile(_constant_images(4, 2, 2, 3), columns=4)
  assert canvas.shape == (2, 4 * 3 - 1, 3)
  np.testing.assert_array_equal(canvas[:, 9:11, :], 40)


def test_write_png_round_trips(tmp_path):
  path = str(tmp_path / "sub" / "grid.png")
  canvas = grid.write_png(path, _constant_images(4, 3, 3, 1), scale=2)
  assert canvas.shape == (2 * (2 * 4 - 1), 2 * (2 * 4 - 1), 1)
  decoded = tf.io.decode_png(tf.io.read_file(path)).numpy()
  np.testing.assert_array_equal(decoded, canvas)
  np.testing.assert_array_equal(canvas[::2, ::2], grid.tile(_constant_images(4, 3, 3, 1)))
