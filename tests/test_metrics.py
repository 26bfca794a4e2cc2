"""metrics.py against SciPy's sqrtm, closed forms and brute-force NumPy loops."""

import numpy as np
import pytest
import scipy.linalg

from mmd_keras import metrics
from mmd_keras.errors import UserError


def sqrtm_fid(mu1, sigma1, mu2, sigma2):
  """The textbook FID with scipy.linalg.sqrtm of the non-symmetric product Σ1 Σ2."""
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  return float(np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * np.trace(covmean).real)


def factored_covariance(rng, d, rank, *, smallest=1.0):
  """Σ = A Aᵀ with A [d, rank] and singular values spread down to `smallest`."""
  q, _ = np.linalg.qr(rng.normal(size=(d, rank)))
  return q * np.geomspace(1.0, smallest, rank)


@pytest.fixture
def small_chunks(monkeypatch):
  # Exercise the chunk boundaries on tiny data.
  monkeypatch.setattr(metrics, "_CHUNK", 7)


def test_fid_matches_scipy_sqrtm_on_random_activations():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12))
  b = rng.normal(size=(250, 12)) * 1.5 + 0.3
  expected = sqrtm_fid(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
  np.testing.assert_allclose(metrics.fid(a, b), expected, rtol=1e-4)


@pytest.mark.parametrize("rank,smallest", [(16, 1e-5), (10, 1.0), (4, 1e-2)])
def test_fid_on_near_singular_and_rank_deficient_covariances(rank, smallest):
  rng = np.random.default_rng(rank)
  d = 16
  a1, a2 = factored_covariance(rng, d, rank, smallest=smallest), factored_covariance(rng, d, d)
  sigma1, sigma2 = a1 @ a1.T, a2 @ a2.T
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  got = metrics.fid_from_stats(mu1, sigma1, mu2, sigma2)
  # Independent exact reference: eig(Σ1 Σ2) = σ(A1ᵀ A2)², so tr((Σ1 Σ2)^{1/2}) = ‖A1ᵀ A2‖_*.
  nuclear = np.linalg.svd(a1.T @ a2, compute_uv=False).sum()
  exact = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * nuclear
  np.testing.assert_allclose(got, exact, rtol=1e-8)
  np.testing.assert_allclose(got, sqrtm_fid(mu1, sigma1, mu2, sigma2), rtol=1e-4)


def test_fid_of_identical_statistics_is_zero():
  rng = np.random.default_rng(1)
  a = factored_covariance(rng, 32, 20, smallest=1e-3)
  sigma, mu = a @ a.T, rng.normal(size=32)
  assert metrics.fid_from_stats(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)


def test_fid_of_diagonal_gaussians_matches_closed_form():
  rng = np.random.default_rng(2)
  var1, var2 = rng.uniform(0.1, 3.0, size=20), rng.uniform(0.1, 3.0, size=20)
  mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
  # For commuting (diagonal) Σ: FID = ‖μ1 − μ2‖² + Σ_i (sqrt(v1_i) − sqrt(v2_i))².
  closed = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(var1) - np.sqrt(var2)) ** 2)
  got = metrics.fid_from_stats(mu1, np.diag(var1), mu2, np.diag(var2))
  np.testing.assert_allclose(got, closed, rtol=1e-10)


def test_streaming_stats_over_chunks_equal_whole_array():
  rng = np.random.default_rng(3)
  # A large common offset: the naive Σxxᵀ − Nμμᵀ would lose most digits here.
  acts = rng.normal(size=(1000, 24)) * rng.uniform(0.01, 2.0, size=24) + 1e4
  stats = metrics.StreamingStats()
  for chunk in np.array_split(acts, [1, 100, 101, 640]):
    stats.update(chunk)
  stats.update(np.zeros((0, 24)))
  assert stats.count == 1000
  np.testing.assert_allclose(stats.mean, acts.mean(axis=0), rtol=1e-12)
  np.testing.assert_allclose(stats.covariance, np.cov(acts, rowvar=False), rtol=1e-8, atol=1e-12)


def test_fid_between_reuses_the_reference_square_root_until_an_update():
  rng = np.random.default_rng(11)
  reference = metrics.StreamingStats().update(rng.normal(size=(60, 5)) @ rng.normal(size=(5, 5)))
  samples = [rng.normal(size=(40, 5)) + 0.1 * i for i in range(2)]
  for acts in samples:
    stats = metrics.StreamingStats().update(acts)
    expected = sqrtm_fid(reference.mean, reference.covariance, stats.mean, stats.covariance)
    np.testing.assert_allclose(metrics.fid_between(reference, stats), expected, rtol=1e-8)
  reference.update(rng.normal(size=(30, 5)) * 3.0)
  root = reference.covariance_sqrt
  np.testing.assert_allclose(root @ root, reference.covariance, rtol=1e-8, atol=1e-12)


def test_too_few_samples_for_the_dimension_is_a_one_line_user_error():
  rng = np.random.default_rng(6)
  a, b = rng.normal(size=(16, 16)), rng.normal(size=(100, 16))
  assert metrics.StreamingStats().update(a).covariance.shape == (16, 16)
  with pytest.raises(UserError) as err:
    metrics.fid(a, b)
  message = str(err.value)
  assert "num_images" in message and "16" in message and "\n" not in message
  metrics.check_enough_samples(17, 16)
  with pytest.raises(UserError):
    metrics.check_enough_samples(16, 16)


def test_fid_rejects_statistics_of_different_dimensions():
  with pytest.raises(UserError, match="different feature spaces.*same feature network"):
    metrics.fid_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def np_kid_mmd2(x, y):
  """Unbiased MMD² with (xᵀy/d + 1)³, by loops."""
  d = x.shape[1]
  k = lambda a, b: (a @ b / d + 1.0) ** 3
  m, n = len(x), len(y)
  kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
  kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
  kxy = sum(k(a, b) for a in x for b in y) / (m * n)
  return kxx + kyy - 2.0 * kxy


def test_kid_with_whole_sets_equals_the_unbiased_mmd2():
  rng = np.random.default_rng(7)
  a, b = rng.normal(size=(30, 8)), rng.normal(size=(30, 8)) + 0.4
  # Subsets of the whole set are permutations, and MMD²_u is permutation invariant.
  mean, std = metrics.kid(a, b, num_subsets=5, subset_size=1000)
  np.testing.assert_allclose(mean, np_kid_mmd2(a, b), rtol=1e-6)
  assert std < 1e-9 * abs(mean)


def test_kid_subsets_average_unbiased_mmd2_of_the_drawn_subsets():
  rng = np.random.default_rng(8)
  a, b = rng.normal(size=(40, 6)), rng.normal(size=(35, 6)) * 1.3
  mean, std = metrics.kid(a, b, num_subsets=4, subset_size=12, seed=3)
  # Standard KID draw order: per subset, rows of the first set, then of the second.
  draw = np.random.default_rng(3)
  values = []
  for _ in range(4):
    x = a[draw.choice(40, 12, replace=False)]
    values.append(np_kid_mmd2(x, b[draw.choice(35, 12, replace=False)]))
  np.testing.assert_allclose([mean, std], [np.mean(values), np.std(values)], rtol=1e-6)


def brute_radii(x, k):
  return np.array([np.sort([np.linalg.norm(p - q) for q in x])[k] for p in x])


def brute_precision_recall(real, fake, k):
  r_real, r_fake = brute_radii(real, k), brute_radii(fake, k)
  precision = np.mean([any(np.linalg.norm(f - r) <= rr for r, rr in zip(real, r_real))
                       for f in fake])
  recall = np.mean([any(np.linalg.norm(r - f) <= rf for f, rf in zip(fake, r_fake))
                    for r in real])
  return precision, recall


def brute_density_coverage(real, fake, k):
  radii = brute_radii(real, k)
  inside = np.array([[np.linalg.norm(f - r) < rr for r, rr in zip(real, radii)] for f in fake])
  return inside.sum() / (k * len(fake)), inside.any(axis=0).mean()


@pytest.mark.parametrize("seed", range(3))
def test_precision_recall_density_coverage_match_brute_force(small_chunks, seed):
  rng = np.random.default_rng(seed)
  real = rng.normal(size=(40, 3))
  fake = rng.normal(size=(33, 3)) * 0.6 + 0.5 * seed
  pr = metrics.precision_recall(real, fake, k=3)
  dc = metrics.density_coverage(real, fake, k=5)
  np.testing.assert_allclose([pr["precision"], pr["recall"]],
                             brute_precision_recall(real, fake, 3), rtol=1e-12)
  np.testing.assert_allclose([dc["density"], dc["coverage"]],
                             brute_density_coverage(real, fake, 5), rtol=1e-12)


def test_identical_and_disjoint_sets(small_chunks):
  rng = np.random.default_rng(9)
  real = rng.normal(size=(30, 4))
  same_pr, same_dc = metrics.precision_recall(real, real), metrics.density_coverage(real, real)
  assert same_pr == dict(precision=1.0, recall=1.0)
  assert same_dc["coverage"] == 1.0
  far = real + 1e3
  assert metrics.precision_recall(real, far) == dict(precision=0.0, recall=0.0)
  assert metrics.density_coverage(real, far) == dict(density=0.0, coverage=0.0)


def test_mode_collapse_lowers_recall_and_coverage_but_not_precision():
  rng = np.random.default_rng(10)
  centres = rng.normal(size=(10, 8)) * 10
  real = centres[rng.integers(0, 10, 400)] + rng.normal(size=(400, 8))
  fair = centres[rng.integers(0, 10, 400)] + rng.normal(size=(400, 8))
  collapsed = centres[rng.integers(0, 2, 400)] + rng.normal(size=(400, 8))
  fair_pr, fair_dc = metrics.precision_recall(real, fair), metrics.density_coverage(real, fair)
  pr, dc = metrics.precision_recall(real, collapsed), metrics.density_coverage(real, collapsed)
  # Two of ten modes: recall and coverage fall to about 1/5 of the fair set's, precision stays.
  assert pr["precision"] > 0.9 * fair_pr["precision"]
  assert pr["recall"] < 0.3 * fair_pr["recall"] and dc["coverage"] < 0.3 * fair_dc["coverage"]


def test_knn_needs_more_samples_than_k():
  with pytest.raises(UserError, match="^num_images=3 is too small: k-NN"):
    metrics.precision_recall(np.zeros((3, 2)), np.ones((10, 2)), k=3)
