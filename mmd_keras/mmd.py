"""Kernels and estimators of the squared maximum mean discrepancy MMD²(P, Q) (Gretton et al. 2012).

MMD²(P, Q) = E k(x, x') + E k(y, y') − 2 E k(x, y),   x, x' ~ P,  y, y' ~ Q.

Everything here is a differentiable TF function of the feature batches, so the finetuner can take
∂MMD²/∂θ through the feature network and the sampler. Inputs are computed in float32 (float64 is kept
as is): a cubic kernel in float16 would overflow.
"""

import tensorflow as tf

from mmd_keras.errors import ParameterError
from mmd_keras.errors import UserError

KERNELS = ("polynomial", "rbf")


def _as_float(x):
  x = tf.convert_to_tensor(x)
  return x if x.dtype == tf.float64 else tf.cast(x, tf.float32)


def _check_pair(x, y):
  """x [m, d], y [n, d] in one dtype (float64 only if both are)."""
  x, y = _as_float(x), _as_float(y)
  if x.dtype != y.dtype:
    x, y = tf.cast(x, tf.float32), tf.cast(y, tf.float32)
  if x.shape.rank != 2 or y.shape.rank != 2:
    raise ValueError(f"features must be [batch, dim], got {x.shape} and {y.shape}")
  if x.shape[1] is not None and y.shape[1] is not None and x.shape[1] != y.shape[1]:
    raise ValueError(f"feature dimensions differ: {x.shape} vs {y.shape}")
  return x, y


def polynomial_kernel(x, y, *, gamma=None, coef0=1.0, degree=3):
  """k(x, y) = (γ xᵀy + c)^d, γ = 1/dim by default (the KID kernel of Bińkowski et al. 2018)."""
  x, y = _check_pair(x, y)
  if gamma is None:
    gamma = 1.0 / tf.cast(tf.shape(x)[1], x.dtype)
  return (tf.cast(gamma, x.dtype) * tf.matmul(x, y, transpose_b=True)
          + tf.cast(coef0, x.dtype)) ** degree


def rbf_kernel(x, y, *, bandwidths=(1.0,)):
  """k(x, y) = Σ_σ exp(−‖x − y‖² / (2σ²)) over the bandwidths σ."""
  x, y = _check_pair(x, y)
  if not bandwidths:
    raise ParameterError("bandwidths", "must list at least one RBF bandwidth", value=bandwidths)
  # ‖x‖² + ‖y‖² − 2xᵀy can dip below 0 by rounding when x ≈ y; exp of a positive would exceed 1.
  sq_dist = tf.maximum(
      tf.reduce_sum(x * x, axis=1)[:, None] + tf.reduce_sum(y * y, axis=1)[None, :]
      - 2.0 * tf.matmul(x, y, transpose_b=True), 0.0)
  return tf.add_n([tf.exp(-sq_dist / tf.cast(2.0 * sigma ** 2, x.dtype)) for sigma in bandwidths])


def make_kernel(name, *, gamma=None, coef0=1.0, degree=3, bandwidths=(1.0,)):
  """The kernel k(x, y) -> [n, m] called `name`, with its parameters bound."""
  if name == "polynomial":
    return lambda x, y: polynomial_kernel(x, y, gamma=gamma, coef0=coef0, degree=degree)
  if name == "rbf":
    bandwidths = tuple(float(b) for b in bandwidths)
    if not bandwidths or min(bandwidths) <= 0:
      raise ParameterError("bandwidths", "must be positive numbers (RBF bandwidths σ > 0)",
                           value=[f"{b:g}" for b in bandwidths])
    return lambda x, y: rbf_kernel(x, y, bandwidths=bandwidths)
  raise ParameterError("kernel", f"must be one of {'|'.join(KERNELS)}", value=name)


def _check_sizes(x, y, minimum):
  for name, t in (("first", x), ("second", y)):
    if t.shape[0] is not None and t.shape[0] < minimum:
      raise UserError(f"MMD² needs at least {minimum} samples per set; the {name} set has "
                      f"{t.shape[0]} (raise the batch size)")


def _off_diagonal_mean(k):
  """(Σ_{i≠j} k_ij) / (m(m−1)) for a square [m, m] kernel matrix."""
  m = tf.cast(tf.shape(k)[0], k.dtype)
  # Zeroing the diagonal (rather than subtracting the trace) avoids cancellation in float32.
  off = tf.linalg.set_diag(k, tf.zeros_like(tf.linalg.diag_part(k)))
  return tf.reduce_sum(off) / (m * (m - 1.0))


def mmd2_unbiased(x, y, *, kernel):
  """Unbiased MMD²_u: Σ_{i≠j} k(x_i,x_j)/(m(m−1)) + Σ_{i≠j} k(y_i,y_j)/(n(n−1)) − 2 mean k(x_i,y_j).

  x [m, d], y [n, d] with m, n ≥ 2; a scalar that can be negative (its expectation is MMD² ≥ 0).
  """
  x, y = _check_pair(x, y)
  _check_sizes(x, y, 2)
  return (_off_diagonal_mean(kernel(x, x)) + _off_diagonal_mean(kernel(y, y))
          - 2.0 * tf.reduce_mean(kernel(x, y)))


def mmd2_biased(x, y, *, kernel):
  """Biased MMD²_b = mean k(x_i,x_j) + mean k(y_i,y_j) − 2 mean k(x_i,y_j), diagonals included; ≥ 0."""
  x, y = _check_pair(x, y)
  _check_sizes(x, y, 1)
  return (tf.reduce_mean(kernel(x, x)) + tf.reduce_mean(kernel(y, y))
          - 2.0 * tf.reduce_mean(kernel(x, y)))
