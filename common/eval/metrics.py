"""Sample-quality metrics on Inception features: FID, sFID, Inception Score, precision and recall.

Each function follows the ADM evaluator (openai/guided-diffusion, `evaluations/evaluator.py`), which
the diffusion literature reports numbers with, and says where pytorch-fid
(mseitzer/pytorch-fid, `src/pytorch_fid/fid_score.py`) or clean-fid (GaParmar/clean-fid,
`cleanfid/fid.py`) differ:

* `frechet_distance`: FID (Heusel et al., arXiv 1706.08500, eq. 6) on the 2048-d `pool_3` features;
  sFID (Nash et al., arXiv 2103.03841, sec. 4.1) is the same distance on the first 7 channels of
  `mixed_6/conv` (17 x 17 x 7 = 2023-d).
* `check_statistics` / `check_finite`: statistics and features are finite, of matching shapes, and
  each covariance symmetric positive semi-definite, checked before any matrix square root
  (`scipy.linalg.sqrtm` of a product with NaN/inf runs for minutes).
* `FeatureStats` / `feature_statistics`: mean and covariance (`np.cov(x, rowvar=False)`, float64),
  accumulated batch by batch.
* `inception_score`: Salimans et al., arXiv 1606.03498, sec. 4, over splits of 5000 samples.
* `precision_recall`: Kynkaanniemi et al., arXiv 1904.06991, sec. 2 (k = 3), with ADM's
  `ManifoldEstimator` details (squared distances, float16 first).

Everything here is deterministic; the pairwise distances of precision/recall run in JAX (on the
accelerator when there is one), the rest in float64 numpy/scipy on the host.
"""

from collections.abc import Iterable
import functools
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
from scipy import linalg
from scipy import special

from common.errors import ShapeError


# ----------------------------------------------------------------------------------------------
# Frechet distance


def check_statistics(mu, sigma, where: str, *, rtol: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
  """Checks that (mu, sigma) can be the mean and covariance of features; returns them as float64.

  Run before any matrix square root: `scipy.linalg.sqrtm` of a product holding NaN or inf does not
  return in any useful time (it iterates for minutes at full CPU), and NaN in a mean makes the
  distance NaN without an error. A covariance must be symmetric (to `1e-6` of its largest entry)
  and positive semi-definite up to rounding: a Cholesky factorisation of
  `sigma + rtol * mean(diag(sigma)) * I` must succeed, which allows the small negative eigenvalues
  of a rank-deficient covariance (fewer samples than dimensions) or of one stored in float32, and
  refuses any real negative direction (whose square root would be imaginary).

  Args:
    mu: mean, [D].
    sigma: covariance, [D, D].
    where: what the statistics are, for the message (e.g. "reference 'ref.npz' (mu, sigma)").
    rtol: the positive semi-definiteness tolerance, relative to the mean variance.

  Returns:
    (mu [D], sigma [D, D]) as float64.

  Raises:
    ShapeError: wrong shapes, a NaN or inf, an asymmetric or not positive semi-definite sigma.
  """
  mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
  if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
    raise ShapeError(f"{where}: the mean must be [D] and the covariance [D, D], got "
                     f"{list(mu.shape)} and {list(sigma.shape)}")
  for name, a in (("mean", mu), ("covariance", sigma)):
    bad = a.size - int(np.count_nonzero(np.isfinite(a)))
    if bad:
      raise ShapeError(f"{where}: the {name} holds {bad} NaN or inf value(s) of {a.size}; the "
                       "statistics are corrupt: recompute them")
  largest = float(np.abs(sigma).max(initial=0.0))
  asymmetry = float(np.abs(sigma - sigma.T).max(initial=0.0))
  if asymmetry > 1e-6 * largest:
    raise ShapeError(f"{where}: the covariance is not symmetric (|sigma - sigma^T| up to "
                     f"{asymmetry:.3g}, entries up to {largest:.3g}); the statistics are corrupt")
  if largest == 0:  # all features equal (e.g. one image repeated): a valid, zero covariance
    return mu, sigma
  mean_variance = float(np.mean(np.diagonal(sigma)))
  offset = rtol * mean_variance
  try:
    if offset <= 0:
      raise np.linalg.LinAlgError(f"the mean variance is {mean_variance:.3g}")
    np.linalg.cholesky(sigma + offset * np.eye(len(mu)))
  except np.linalg.LinAlgError as e:
    why = (f"its mean variance is {mean_variance:.3g}" if offset <= 0 else
           f"an eigenvalue below -{offset:.3g}, {rtol:g} of the mean variance")
    raise ShapeError(f"{where}: the covariance is not positive semi-definite ({why}); the "
                     "statistics are corrupt or not a covariance") from e
  return mu, sigma


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *,
                     eps: float = 1e-6, names: tuple[str, str] = ("the first statistics",
                                                                  "the second statistics")) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2).

  d^2 = ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2))   (arXiv 1706.08500, eq. 6)

  Both sides are first checked with `check_statistics` (finite, symmetric, positive
  semi-definite), so corrupt statistics fail at once with a ShapeError instead of hanging in the
  square root or giving NaN. Then computed as ADM's `FIDStatistics.frechet_distance` and
  pytorch-fid's `calculate_frechet_distance` do: `scipy.linalg.sqrtm` of the product in float64;
  when the square root is not finite (a near-singular product, e.g. fewer samples than dimensions)
  it is recomputed with `eps * I` added to both covariances; an imaginary part left by rounding is
  dropped, unless the diagonal's is larger than 1e-3 (then ShapeError, where both references raise
  ValueError; clean-fid drops it without the check).

  Args:
    mu1, mu2: means, [D].
    sigma1, sigma2: covariances, [D, D].
    eps: the diagonal offset of the retry.
    names: what the two sides are, for error messages.

  Returns:
    The squared Frechet distance (what is reported as FID / sFID), a Python float.
  """
  mu1, sigma1 = check_statistics(np.atleast_1d(mu1), np.atleast_2d(sigma1), names[0])
  mu2, sigma2 = check_statistics(np.atleast_1d(mu2), np.atleast_2d(sigma2), names[1])
  if mu1.shape != mu2.shape:
    raise ShapeError(f"Frechet distance: the statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {sigma1.shape} vs {sigma2.shape} (were they computed with the same "
                     "network and layer?)")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    warnings.warn(f"Frechet distance: the covariance product is singular; adding {eps} to the "
                  "diagonal of both covariances", RuntimeWarning, stacklevel=2)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ShapeError(f"Frechet distance: the matrix square root has an imaginary component of "
                       f"{np.max(np.abs(covmean.imag)):.3g}; the covariances are not valid.")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def check_finite(x: np.ndarray, what: str) -> np.ndarray:
  """`x` unchanged; ShapeError when it holds NaN or inf (counted in the message)."""
  bad = x.size - int(np.count_nonzero(np.isfinite(x)))
  if bad:
    raise ShapeError(f"{what} hold {bad} NaN or inf value(s) of {x.size} (corrupt features or "
                     "network weights); no metric is computed from them")
  return x


# ----------------------------------------------------------------------------------------------
# Mean and covariance


class FeatureStats:
  """Streaming mean and covariance of feature vectors, float64.

  Batches are merged with Chan, Golub & LeVeque's pairwise update ("Updating formulae and a pairwise
  algorithm for computing sample variances", 1979), so the result equals `np.mean(x, 0)` and
  `np.cov(x, rowvar=False)` of all rows (to float64 rounding) while only one batch is ever copied to
  float64.
  """

  def __init__(self):
    self.count = 0
    self._mean: np.ndarray | None = None
    self._m2: np.ndarray | None = None  # sum of outer products of deviations from the mean

  def update(self, x: np.ndarray) -> None:
    """Adds a batch of feature vectors, [B, D] (any float dtype)."""
    x = np.asarray(x)
    if x.ndim != 2 or (self._mean is not None and x.shape[1] != self._mean.shape[0]):
      want = f"[B, {self._mean.shape[0]}]" if self._mean is not None else "[B, D]"
      raise ShapeError(f"feature statistics: a batch must be {want}, got {list(x.shape)}")
    if len(x) == 0:
      return
    x = check_finite(x.astype(np.float64), "feature statistics: the features")
    mean_b = x.mean(axis=0)
    xc = x - mean_b
    m2_b = xc.T @ xc
    n_b = len(x)
    if self.count == 0:
      self._mean, self._m2, self.count = mean_b, m2_b, n_b
      return
    n = self.count + n_b
    delta = mean_b - self._mean
    self._mean = self._mean + delta * (n_b / n)
    self._m2 += m2_b + np.outer(delta, delta) * (self.count * n_b / n)
    self.count = n

  def result(self) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]), float64; the covariance is unbiased (divides by N - 1)."""
    if self.count < 2:
      raise ShapeError(f"feature statistics need at least 2 feature vectors, got {self.count}")
    return self._mean.copy(), self._m2 / (self.count - 1)


def feature_statistics(features: np.ndarray | Iterable[np.ndarray], *,
                       chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Mean [D] and covariance [D, D] (float64) of features [N, D] or of an iterable of [B, D] batches.

  Matches ADM's `compute_statistics` and pytorch-fid's `calculate_activation_statistics`
  (`np.mean(x, 0)`, `np.cov(x, rowvar=False)`), computed `chunk_size` rows at a time.
  """
  stats = FeatureStats()
  if isinstance(features, np.ndarray):
    if features.ndim != 2:
      raise ShapeError(f"feature statistics: features must be [N, D], got {list(features.shape)}")
    for i in range(0, len(features), chunk_size):
      stats.update(features[i:i + chunk_size])
  else:
    for batch in features:
      stats.update(batch)
  return stats.result()


# ----------------------------------------------------------------------------------------------
# Inception Score


def inception_score(logits: np.ndarray, *, split_size: int = 5000,
                    num_splits: int | None = None) -> float:
  """Inception Score, exp(E_x KL(p(y|x) || p(y))) averaged over splits (arXiv 1606.03498, sec. 4).

  ADM's `compute_inception_score`: p(y|x) is the softmax over all 1008 outputs of the Inception
  network's final layer *without its bias* (ADM multiplies `pool_3` by the weight of
  `softmax/logits/MatMul`, as improved-gan's `inception_score/model.py` does); the samples are cut
  in order into splits of `split_size` (the last one may be shorter), p(y) is each split's mean
  p(y|x), and the score is the mean over splits of exp(mean KL). With 50000 samples that is ADM's 10
  splits. `num_splits` instead cuts N samples into that many near-equal splits at i * N // num_splits
  (improved-gan, torch-fidelity). Computed in float64 from log-softmax, which equals ADM's
  `p * (log p - log mean p)` without its float32 rounding.

  Args:
    logits: [N, K] pre-softmax outputs.
    split_size: samples per split (ADM: 5000).
    num_splits: if given, overrides `split_size`.

  Returns:
    The Inception Score, a Python float.
  """
  logits = np.asarray(logits)
  if logits.ndim != 2 or len(logits) == 0:
    raise ShapeError(f"inception score: logits must be [N, K] with N > 0, got {list(logits.shape)}")
  check_finite(logits, "inception score: the logits")
  n = len(logits)
  if num_splits is not None:
    bounds = [(i * n // num_splits, (i + 1) * n // num_splits) for i in range(num_splits)]
  else:
    bounds = [(i, min(i + split_size, n)) for i in range(0, n, split_size)]
  scores = []
  for lo, hi in bounds:
    part = logits[lo:hi].astype(np.float64)
    log_p = part - special.logsumexp(part, axis=1, keepdims=True)
    p = np.exp(log_p)
    log_marginal = np.log(np.mean(p, axis=0, keepdims=True))
    kl = np.mean(np.sum(p * (log_p - log_marginal), axis=1))
    scores.append(np.exp(kl))
  return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------
# Precision and recall


def pairwise_sq_distances(u: jax.Array, v: jax.Array, dtype=jnp.float16) -> jax.Array:
  """Squared Euclidean distances ||u_i - v_j||^2, [R, C] float32, from u [R, D] and v [C, D].

  ADM's `DistanceBlock` (after Kynkaanniemi et al.'s `precision_recall.py`): max(|u|^2 - 2 u.v +
  |v|^2, 0) with the features cast to float16, falling back to float32 for the whole block when any
  float16 distance is not finite. `dtype=jnp.float16` reproduces that: float16 inputs, norms and
  result, with the dot product accumulated in float32 (as a GPU float16 GEMM does);
  `dtype=jnp.float32` computes everything in float32.
  """
  def distances(dt):
    a, b = u.astype(dt), v.astype(dt)
    norm_a = jnp.sum(jnp.square(a).astype(jnp.float32), axis=1).astype(dt)
    norm_b = jnp.sum(jnp.square(b).astype(jnp.float32), axis=1).astype(dt)
    dots = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32).T,
                   precision=jax.lax.Precision.HIGHEST).astype(dt)
    return jnp.maximum(norm_a[:, None] - 2 * dots + norm_b[None, :], 0)

  if jnp.dtype(dtype) == jnp.float32:
    return distances(jnp.float32)
  d16 = distances(jnp.dtype(dtype))
  return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda: d16.astype(jnp.float32),
                      lambda: distances(jnp.float32))


@functools.partial(jax.jit, static_argnames=("k", "dtype"))
def _kth_neighbour_block(rows, features, *, k, dtype):
  d = pairwise_sq_distances(rows, features, dtype)
  # The (k+1)-th smallest distance of each row: its own distance (0) counts, as in ADM.
  return -jax.lax.top_k(-d, k + 1)[0][:, k]


@functools.partial(jax.jit, static_argnames=("dtype",))
def _coverage_block(ref_rows, ref_radii, valid, samples, sample_radii, sample_in, *, dtype):
  d = pairwise_sq_distances(ref_rows, samples, dtype)
  ref_in = jnp.any(d <= sample_radii[None, :], axis=1)
  sample_in = sample_in | jnp.any((d <= ref_radii[:, None]) & valid[:, None], axis=0)
  return ref_in, sample_in


def _row_blocks(x: np.ndarray, block: int):
  """Yields (start, rows [block, D] zero-padded, number of valid rows)."""
  for start in range(0, len(x), block):
    rows = x[start:start + block]
    n = len(rows)
    if n < block:
      rows = np.concatenate([rows, np.zeros((block - n,) + rows.shape[1:], rows.dtype)])
    yield start, rows, n


def _placement(mesh: Mesh | None):
  """(row sharding, replicated sharding) on `mesh`, or default-device placement."""
  if mesh is None:
    dev = jax.local_devices()[0]
    single = jax.sharding.SingleDeviceSharding(dev)
    return single, single, 1
  axes = tuple(a for a in mesh.axis_names if mesh.shape[a] > 1) or tuple(mesh.axis_names[:1])
  n = int(np.prod([mesh.shape[a] for a in axes]))
  return NamedSharding(mesh, P(axes, None)), NamedSharding(mesh, P()), n


def _block_size(n: int, row_batch_size: int, multiple: int) -> int:
  block = min(row_batch_size, n)
  return -(-block // multiple) * multiple


def _check_features(name: str, x: np.ndarray, k: int) -> np.ndarray:
  x = np.asarray(x, np.float32)
  if x.ndim != 2:
    raise ShapeError(f"precision/recall: {name} features must be [N, D], got {list(x.shape)}")
  if len(x) <= k:
    raise ShapeError(f"precision/recall: {name} needs more than k={k} feature vectors, got {len(x)}")
  return check_finite(x, f"precision/recall: {name} features")


def manifold_radii(features: np.ndarray, *, k: int = 3, row_batch_size: int = 1024,
                   dtype=jnp.float16, clamp_to_percentile: float | None = None,
                   mesh: Mesh | None = None) -> np.ndarray:
  """Squared distance of each feature vector to its k-th nearest neighbour in the same set.

  ADM's `ManifoldEstimator.manifold_radii` (nhood_sizes=(3,)): the (k+1)-th smallest entry of each
  row of the pairwise squared-distance matrix, the point itself included. `row_batch_size` rows are
  done at a time against all N, so memory is [row_batch_size, N], never [N, N]; it changes the
  result only by float rounding. `clamp_to_percentile` (ADM's option, off by default there too)
  sets radii above that percentile to 0.

  Args:
    features: [N, D].
    k: neighbourhood size.
    row_batch_size: rows per block (rounded up to a multiple of the mesh's devices).
    dtype: distance precision (see `pairwise_sq_distances`).
    clamp_to_percentile: a percentile in [0, 100], or None.
    mesh: when given, each block's rows are sharded over the mesh's devices.

  Returns:
    radii [N] float32 (squared distances).
  """
  features = _check_features("the", features, k)
  row_sharding, replicated, multiple = _placement(mesh)
  block = _block_size(len(features), row_batch_size, multiple)
  all_features = jax.device_put(features, replicated)
  radii = np.empty((len(features),), np.float32)
  for start, rows, n in _row_blocks(features, block):
    out = _kth_neighbour_block(jax.device_put(rows, row_sharding), all_features, k=k,
                               dtype=jnp.dtype(dtype))
    radii[start:start + n] = np.asarray(out)[:n]
  if clamp_to_percentile is not None:
    radii[radii > np.percentile(radii, clamp_to_percentile)] = 0
  return radii


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray, *, k: int = 3,
                     row_batch_size: int = 1024, dtype=jnp.float16,
                     clamp_to_percentile: float | None = None,
                     mesh: Mesh | None = None) -> tuple[float, float]:
  """Improved precision and recall (arXiv 1904.06991, sec. 2, eqs. 1-3), as ADM computes them.

  Each set's manifold is the union of balls around its points with radius the distance to the k-th
  nearest neighbour in that set (`manifold_radii`). Precision is the fraction of samples inside the
  reference manifold (within the radius of at least one reference point); recall the fraction of
  reference points inside the sample manifold. A point is inside when its squared distance is <= the
  squared radius (ADM's `DistanceBlock.less_thans`). ADM uses the `pool_3` features, k = 3, and
  float16 distances (`dtype`).

  Args:
    ref_features: [N1, D] reference (real) features.
    sample_features: [N2, D] sample features.
    k, row_batch_size, dtype, clamp_to_percentile, mesh: see `manifold_radii`.

  Returns:
    (precision, recall), Python floats in [0, 1].
  """
  ref = _check_features("the reference", ref_features, k)
  samples = _check_features("the samples", sample_features, k)
  if ref.shape[1] != samples.shape[1]:
    raise ShapeError(f"precision/recall: reference features are {ref.shape[1]}-d, samples "
                     f"{samples.shape[1]}-d")
  dtype = jnp.dtype(dtype)
  opts = dict(k=k, row_batch_size=row_batch_size, dtype=dtype,
              clamp_to_percentile=clamp_to_percentile, mesh=mesh)
  ref_radii = manifold_radii(ref, **opts)
  sample_radii = manifold_radii(samples, **opts)

  row_sharding, replicated, multiple = _placement(mesh)
  vec_sharding = NamedSharding(mesh, P(*row_sharding.spec[:1])) if mesh is not None else row_sharding
  block = _block_size(len(ref), row_batch_size, multiple)
  samples_dev = jax.device_put(samples, replicated)
  sample_radii_dev = jax.device_put(sample_radii, replicated)
  sample_in = jax.device_put(np.zeros((len(samples),), bool), replicated)
  ref_in = np.zeros((len(ref),), bool)
  radii_padded = np.concatenate([ref_radii, np.zeros((block,), np.float32)])
  for start, rows, n in _row_blocks(ref, block):
    valid = np.arange(block) < n
    block_in, sample_in = _coverage_block(
        jax.device_put(rows, row_sharding), jax.device_put(radii_padded[start:start + block], vec_sharding),
        jax.device_put(valid, vec_sharding), samples_dev, sample_radii_dev, sample_in, dtype=dtype)
    ref_in[start:start + n] = np.asarray(block_in)[:n]
  return float(np.mean(np.asarray(sample_in))), float(np.mean(ref_in))
