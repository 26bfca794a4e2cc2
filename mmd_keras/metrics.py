"""Sample-quality metrics from feature activations: FID, KID, precision/recall, density/coverage.

Statistics live on the host in float64 NumPy: a 2048-d covariance and its eigendecomposition need the
precision, and nothing here is differentiated (the training loss is `mmd.mmd2_unbiased`).
"""

import numpy as np
import tensorflow as tf

from mmd_keras import mmd
from mmd_keras.errors import ParameterError
from mmd_keras.errors import UserError

# Rows per block of a pairwise-distance matrix: 1000 × 5000 float64 is 40 MB.
_CHUNK = 1000


def check_enough_samples(num_images, dim):
  """FID needs N > d: with N ≤ d samples the d × d covariance is singular and FID is meaningless."""
  if num_images <= dim:
    raise ParameterError("num_images", f"is smaller than the feature dimension needs: a {dim}-d "
                         f"covariance for FID needs more than {dim} samples", value=num_images)


class StreamingStats:
  """Running count, Σ x and Σ x xᵀ of activations, so N = 10 000 × d = 2048 never sits in memory.

  Sums are taken of x − s with s the first batch's mean, which keeps Σ x xᵀ − N μ μᵀ free of
  cancellation when |μ| ≫ std (the usual case for post-ReLU features).
  """

  def __init__(self):
    self.count = 0
    self._shift = self._sum = self._outer = self._root = None

  @property
  def dim(self):
    return None if self._shift is None else int(self._shift.shape[0])

  def update(self, activations):
    a = np.asarray(activations, dtype=np.float64)
    if a.ndim != 2:
      raise ValueError(f"activations must be [n, d], got shape {a.shape}")
    if not len(a):
      return self
    if self._shift is None:
      self._shift = a.mean(axis=0)
      self._sum = np.zeros_like(self._shift)
      self._outer = np.zeros((a.shape[1], a.shape[1]))
    if a.shape[1] != self.dim:
      raise ValueError(f"activations have dimension {a.shape[1]}, the statistics {self.dim}")
    a = a - self._shift
    self._root = None
    self.count += len(a)
    self._sum += a.sum(axis=0)
    self._outer += a.T @ a
    return self

  @property
  def mean(self):
    """μ = (1/N) Σ x."""
    self._check_count(1)
    return self._shift + self._sum / self.count

  @property
  def covariance(self):
    """Σ = (Σ x xᵀ − N μ μᵀ) / (N − 1), unbiased; defined (but singular) for N ≤ d."""
    self._check_count(2)
    centred = self._sum / self.count
    cov = (self._outer - self.count * np.outer(centred, centred)) / (self.count - 1)
    return (cov + cov.T) / 2

  @property
  def covariance_sqrt(self):
    """Σ^{1/2}, cached until the next update: the reference side of many FIDs needs it once."""
    if self._root is None:
      self._root = psd_sqrt(self.covariance)
    return self._root

  def _check_count(self, minimum):
    if self.count < minimum:
      raise ParameterError("num_images", f"is too small: statistics need at least {minimum} "
                           f"sample(s)", value=self.count)


def psd_sqrt(sigma):
  """The symmetric PSD square root V diag(sqrt(max(λ, 0))) Vᵀ of a covariance."""
  w, v = np.linalg.eigh(sigma)
  # Rounding leaves eigenvalues of about −1e−12 on singular covariances.
  return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(sigma1, sigma2, *, sqrt_sigma1=None):
  """tr((Σ1 Σ2)^{1/2}) = Σ sqrt(eig(Σ1^{1/2} Σ2 Σ1^{1/2})).

  Σ1 Σ2 is similar to the symmetric PSD matrix Σ1^{1/2} Σ2 Σ1^{1/2}, whose eigh is stable even for
  singular Σ (unlike sqrtm of the non-symmetric product).
  """
  root1 = psd_sqrt(sigma1) if sqrt_sigma1 is None else sqrt_sigma1
  inner = root1 @ sigma2 @ root1
  return float(np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0.0, None)).sum())


def fid_from_stats(mu1, sigma1, mu2, sigma2, *, counts=None, sqrt_sigma1=None):
  """FID = ‖μ1 − μ2‖² + tr Σ1 + tr Σ2 − 2 tr((Σ1 Σ2)^{1/2})  (Heusel et al. 2017).

  counts: the (N1, N2) the statistics came from; if given, each must exceed the dimension.
  sqrt_sigma1: Σ1^{1/2} if already known (the eigh of a 2048-d Σ takes seconds).
  """
  mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
  sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise UserError(f"FID statistics come from different feature spaces: μ {mu1.shape} vs "
                    f"{mu2.shape}, Σ {sigma1.shape} vs {sigma2.shape}; both sets must be embedded "
                    f"by the same feature network")
  for count in counts or ():
    check_enough_samples(count, mu1.shape[0])
  diff = mu1 - mu2
  fid_value = (diff @ diff + np.trace(sigma1) + np.trace(sigma2)
               - 2.0 * trace_sqrt_product(sigma1, sigma2, sqrt_sigma1=sqrt_sigma1))
  # Exact value is ≥ 0; rounding can make identical statistics come out at −1e−12.
  return max(float(fid_value), 0.0)


def fid_between(reference, stats):
  """FID between two StreamingStats, refusing N ≤ d; the reference's Σ^{1/2} is computed once."""
  check_enough_samples(reference.count, reference.mean.shape[0])
  return fid_from_stats(reference.mean, reference.covariance, stats.mean, stats.covariance,
                        counts=(reference.count, stats.count),
                        sqrt_sigma1=reference.covariance_sqrt)


def fid(acts1, acts2):
  """FID between two activation arrays [N, d]."""
  return fid_between(StreamingStats().update(acts1), StreamingStats().update(acts2))


def kid(acts1, acts2, *, num_subsets=100, subset_size=1000, seed=0):
  """KID (Bińkowski et al. 2018): mean ± std over random subsets of the unbiased MMD² with
  k(x, y) = (xᵀy/d + 1)³; each subset draws subset_size rows of each set without replacement."""
  acts1, acts2 = np.asarray(acts1, np.float64), np.asarray(acts2, np.float64)
  size = min(subset_size, len(acts1), len(acts2))
  if size < 2:
    raise ParameterError("num_images", f"is too small: KID needs at least 2 samples per set, "
                         f"got {len(acts1)} and {len(acts2)}")
  rng = np.random.default_rng(seed)
  kernel = mmd.make_kernel("polynomial")
  estimate = tf.function(lambda x, y: mmd.mmd2_unbiased(x, y, kernel=kernel))
  values = np.array([
      float(estimate(acts1[rng.choice(len(acts1), size, replace=False)],
                     acts2[rng.choice(len(acts2), size, replace=False)]))
      for _ in range(num_subsets)])
  return float(values.mean()), float(values.std())


def _sq_distances(a, b):
  """‖a_i − b_j‖² for a [n, d], b [m, d], clipped at 0 against rounding."""
  d2 = (a * a).sum(axis=1)[:, None] + (b * b).sum(axis=1)[None, :] - 2.0 * a @ b.T
  return np.maximum(d2, 0.0)


def _knn_sq_radii(x, k):
  """Squared distance from each x_i to its k-th nearest neighbour in x, itself excluded."""
  if len(x) <= k:
    raise ParameterError("num_images", f"is too small: k-NN manifolds with k={k} need more than "
                         f"{k} samples", value=len(x))
  # Column 0 of each sorted row is x_i itself (distance 0), so index k is the k-th neighbour.
  return np.concatenate([np.partition(_sq_distances(x[i:i + _CHUNK], x), k, axis=1)[:, k]
                         for i in range(0, len(x), _CHUNK)])


def _ball_counts(points, centres, sq_radii, *, strict):
  """For each point: how many balls B(centre_i, r_i) contain it."""
  counts = []
  for i in range(0, len(points), _CHUNK):
    d2 = _sq_distances(points[i:i + _CHUNK], centres)
    inside = d2 < sq_radii[None, :] if strict else d2 <= sq_radii[None, :]
    counts.append(inside.sum(axis=1))
  return np.concatenate(counts)


def precision_recall(real, fake, *, k=3):
  """Improved precision and recall (Kynkäänniemi et al. 2019).

  precision = fraction of fake samples inside the real manifold ∪_i B(r_i, NN_k(r_i)),
  recall    = fraction of real samples inside the fake manifold ∪_j B(f_j, NN_k(f_j)).
  """
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  precision = (_ball_counts(fake, real, _knn_sq_radii(real, k), strict=False) > 0).mean()
  recall = (_ball_counts(real, fake, _knn_sq_radii(fake, k), strict=False) > 0).mean()
  return dict(precision=float(precision), recall=float(recall))


def density_coverage(real, fake, *, k=5):
  """Density and coverage (Naeem et al. 2020), balls B(r_i, NN_k(r_i)) around real samples only.

  density  = (1 / (k M)) Σ_j Σ_i 1[f_j ∈ B_i]   (≈ 1 when fake matches real; > 1 when it clumps),
  coverage = (1 / N) Σ_i 1[∃ j: f_j ∈ B_i]       (the share of real modes that fakes reach).
  """
  real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
  sq_radii = _knn_sq_radii(real, k)
  density = _ball_counts(fake, real, sq_radii, strict=True).sum() / (k * len(fake))
  covered = np.concatenate([
      _sq_distances(real[i:i + _CHUNK], fake).min(axis=1) < sq_radii[i:i + _CHUNK]
      for i in range(0, len(real), _CHUNK)])
  return dict(density=float(density), coverage=float(covered.mean()))
