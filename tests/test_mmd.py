"""mmd.py against an independent loop-based NumPy MMD², finite differences and statistics."""

import numpy as np
import pytest
import tensorflow as tf

from mmd_keras import mmd
from mmd_keras.errors import UserError


def np_polynomial(a, b, *, gamma, coef0, degree):
  return (gamma * float(np.dot(a, b)) + coef0) ** degree


def np_rbf(a, b, *, bandwidths):
  d2 = float(np.sum((a - b) ** 2))
  return sum(np.exp(-d2 / (2.0 * s * s)) for s in bandwidths)


def np_mmd2(x, y, k, *, unbiased):
  """MMD² by explicit loops over pairs."""
  def within(z):
    n = len(z)
    pairs = [(i, j) for i in range(n) for j in range(n) if i != j or not unbiased]
    return sum(k(z[i], z[j]) for i, j in pairs) / len(pairs)
  cross = np.mean([k(a, b) for a in x for b in y])
  return within(x) + within(y) - 2.0 * cross


def random_features(seed, m=7, n=9, d=5, shift=0.0):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(m, d)), rng.normal(size=(n, d)) + shift


KERNEL_CASES = [
    ("polynomial", dict(), lambda d: dict(gamma=1.0 / d, coef0=1.0, degree=3)),
    ("polynomial", dict(gamma=0.3, coef0=0.5, degree=2),
     lambda d: dict(gamma=0.3, coef0=0.5, degree=2)),
    ("rbf", dict(bandwidths=(1.5,)), lambda d: dict(bandwidths=(1.5,))),
    ("rbf", dict(bandwidths=(0.5, 2.0, 4.0)), lambda d: dict(bandwidths=(0.5, 2.0, 4.0))),
]


@pytest.mark.parametrize("name,kwargs,np_kwargs", KERNEL_CASES)
@pytest.mark.parametrize("unbiased", [True, False])
def test_mmd2_matches_numpy_loops(name, kwargs, np_kwargs, unbiased):
  x, y = random_features(0, shift=0.3)
  np_k = np_polynomial if name == "polynomial" else np_rbf
  expected = np_mmd2(x, y, lambda a, b: np_k(a, b, **np_kwargs(x.shape[1])), unbiased=unbiased)
  estimator = mmd.mmd2_unbiased if unbiased else mmd.mmd2_biased
  got = estimator(x, y, kernel=mmd.make_kernel(name, **kwargs))
  assert got.dtype == tf.float64
  np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


@pytest.mark.parametrize("name,kwargs,np_kwargs", KERNEL_CASES)
def test_kernel_matrix_matches_numpy(name, kwargs, np_kwargs):
  x, y = random_features(1, m=4, n=6, d=3)
  np_k = np_polynomial if name == "polynomial" else np_rbf
  expected = np.array([[np_k(a, b, **np_kwargs(3)) for b in y] for a in x])
  got = mmd.make_kernel(name, **kwargs)(x, y)
  assert got.shape == (4, 6)
  np.testing.assert_allclose(got.numpy(), expected, rtol=1e-6)


def test_rbf_bandwidths_sum_and_self_similarity():
  x, y = random_features(2, d=4)
  total = mmd.rbf_kernel(x, y, bandwidths=(0.5, 3.0))
  parts = mmd.rbf_kernel(x, y, bandwidths=(0.5,)) + mmd.rbf_kernel(x, y, bandwidths=(3.0,))
  np.testing.assert_allclose(total.numpy(), parts.numpy(), rtol=1e-12)
  # Huge-norm identical rows: the clipped squared distance keeps k(x, x) at exactly 1 per bandwidth.
  big = np.full((3, 4), 1e4, np.float32)
  np.testing.assert_array_equal(mmd.rbf_kernel(big, big, bandwidths=(1.0, 2.0)).numpy(), 2.0)


def test_float32_by_default_and_close_to_float64():
  x, y = random_features(3, m=32, n=32, d=16, shift=0.2)
  k = mmd.make_kernel("polynomial")
  got32 = mmd.mmd2_unbiased(x.astype(np.float32), y.astype(np.float16), kernel=k)
  got64 = mmd.mmd2_unbiased(x, y, kernel=k)
  assert got32.dtype == tf.float32
  np.testing.assert_allclose(got32.numpy(), got64.numpy(), rtol=1e-2)


@pytest.mark.parametrize("name,kwargs", [("polynomial", {}), ("rbf", dict(bandwidths=(1.0, 2.0)))])
def test_gradient_matches_finite_differences(name, kwargs):
  x, y = random_features(4, m=4, n=5, d=3, shift=0.5)
  kernel = mmd.make_kernel(name, **kwargs)
  xt, yt = tf.constant(x), tf.constant(y)
  with tf.GradientTape() as tape:
    tape.watch([xt, yt])
    loss = mmd.mmd2_unbiased(xt, yt, kernel=kernel)
  grad_x, grad_y = tape.gradient(loss, [xt, yt])

  def numeric(z, other, first):
    g, h = np.zeros_like(z), 1e-6
    for idx in np.ndindex(*z.shape):
      plus, minus = z.copy(), z.copy()
      plus[idx] += h
      minus[idx] -= h
      f = lambda v: float(mmd.mmd2_unbiased(*((v, other) if first else (other, v)), kernel=kernel))
      g[idx] = (f(plus) - f(minus)) / (2 * h)
    return g

  np.testing.assert_allclose(grad_x.numpy(), numeric(x, y, True), rtol=1e-5, atol=1e-8)
  np.testing.assert_allclose(grad_y.numpy(), numeric(y, x, False), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("name", mmd.KERNELS)
def test_unbiased_is_zero_in_expectation_for_identical_distributions(name):
  estimate = tf.function(lambda x, y: mmd.mmd2_unbiased(x, y, kernel=mmd.make_kernel(name)))
  rng = np.random.default_rng(5)
  draws = np.array([float(estimate(rng.normal(size=(16, 4)), rng.normal(size=(16, 4))))
                    for _ in range(300)])
  stderr = draws.std(ddof=1) / np.sqrt(len(draws))
  assert abs(draws.mean()) < 3 * stderr
  # The biased estimator is not centred: it stays positive on the same draws.
  x, y = rng.normal(size=(16, 4)), rng.normal(size=(16, 4))
  assert float(mmd.mmd2_biased(x, y, kernel=mmd.make_kernel(name))) > 0


@pytest.mark.parametrize("name", mmd.KERNELS)
def test_clearly_positive_for_shifted_distribution(name):
  rng = np.random.default_rng(6)
  kernel = mmd.make_kernel(name)
  same = [float(mmd.mmd2_unbiased(rng.normal(size=(64, 4)), rng.normal(size=(64, 4)),
                                  kernel=kernel)) for _ in range(20)]
  shifted = float(mmd.mmd2_unbiased(rng.normal(size=(64, 4)), rng.normal(size=(64, 4)) + 1.0,
                                    kernel=kernel))
  assert shifted > 10 * np.std(same)


@pytest.mark.parametrize("seed", range(5))
def test_biased_exceeds_unbiased_for_rbf(seed):
  # With k(x, x) = s ≥ k(x, y): MMD²_b − MMD²_u = (s − U_xx)/m + (s − U_yy)/n ≥ 0.
  x, y = random_features(seed, shift=0.1 * seed)
  kernel = mmd.make_kernel("rbf", bandwidths=(0.7, 2.0))
  assert float(mmd.mmd2_biased(x, y, kernel=kernel)) >= float(mmd.mmd2_unbiased(x, y, kernel=kernel))


def test_unknown_kernel_is_a_one_line_user_error():
  with pytest.raises(UserError) as err:
    mmd.make_kernel("laplace")
  message = str(err.value)
  assert message.startswith("kernel=laplace ") and "polynomial" in message and "rbf" in message
  assert "\n" not in message


@pytest.mark.parametrize("bandwidths", [(), (1.0, -2.0)])
def test_bad_bandwidths_are_user_errors(bandwidths):
  with pytest.raises(UserError, match="^bandwidths="):
    mmd.make_kernel("rbf", bandwidths=bandwidths)


def test_fewer_than_two_samples_is_a_user_error():
  x, y = random_features(7, m=1, n=5)
  with pytest.raises(UserError, match="at least 2"):
    mmd.mmd2_unbiased(x, y, kernel=mmd.make_kernel("polynomial"))
  with pytest.raises(UserError, match="at least 2"):
    mmd.mmd2_unbiased(y, x, kernel=mmd.make_kernel("polynomial"))
