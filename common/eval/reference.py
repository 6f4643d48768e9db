"""Reference batches in the ADM evaluator's npz format: read them as published, write our own.

ADM's reference batches (openai/guided-diffusion, `evaluations/README.md`; e.g.
`VIRTUAL_imagenet256_labeled.npz`) are `np.savez` archives with

  arr_0     uint8 [N, H, W, 3]  reference images (ADM computes precision/recall against their features)
  mu        [2048]              mean of the Inception `pool_3` features  (FID)
  sigma     [2048, 2048]        their covariance
  mu_s      [2023]              mean of the spatial features, `mixed_6/conv` channels 0..6 (sFID)
  sigma_s   [2023, 2023]        their covariance

Either part may be missing: a file with only `arr_0` is evaluated from its images; a file with only
statistics gives FID and sFID but no precision/recall. As in ADM, stored statistics take precedence
over the images. Our references add (a documented extension that ADM's evaluator ignores)

  pool      float32 [N, 2048]   the `pool_3` features of arr_0, so precision/recall need no images
  arr_1     int32 [N]           labels, when known

`images` is accepted instead of `arr_0` (our sampler writes `images`). Images are read from the
archive in batches, never all at once, as ADM's `StreamingNpzArrayReader` does.
"""

from collections.abc import Callable, Iterator
import contextlib
import json
import zipfile

import numpy as np

from common.errors import DataNotFoundError, ShapeError, UserError
from common.eval import metrics
from common.paths import as_path

IMAGE_KEYS = ("arr_0", "images")
# ADM's published reference batches by file name (openai/guided-diffusion, evaluations/README.md):
# the FID/sFID/IS/precision/recall references of DiT, Large-DiT and TerDiT's ImageNet tables.
_ADM_BATCHES = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
ADM_REFERENCE_URLS = {
    "VIRTUAL_imagenet256_labeled.npz": _ADM_BATCHES + "imagenet/256/VIRTUAL_imagenet256_labeled.npz",
    "VIRTUAL_imagenet512.npz": _ADM_BATCHES + "imagenet/512/VIRTUAL_imagenet512.npz",
}
SETTINGS_KEY = "cache_settings"  # what made a cache file (common.eval.cache); ADM's evaluator ignores it
STAT_PAIRS = (("mu", "sigma"), ("mu_s", "sigma_s"))


class NpzImages:
  """uint8 images [N, H, W, C] stored in a `.npz` member (or a `.npy` file), read batch by batch.

  Iterating yields uint8 [<= batch_size, H, W, C] batches; `num_images` and `shape` come from the
  array header without reading the data. The file is streamed through epath (local or gs://).
  """

  def __init__(self, path: str, key: str | None, *, batch_size: int = 1000,
               limit: int | None = None):
    self.path, self.key, self.batch_size = path, key, batch_size
    with self._open() as f:
      shape, dtype, self._fallback = _read_npy_header(f)
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)
    where = f"{path}" + (f" ['{key}']" if key else "")
    if self.dtype != np.uint8 or len(self.shape) != 4 or self.shape[-1] not in (1, 3):
      raise ShapeError(f"{where}: images must be uint8 [N, H, W, 3 or 1], got {self.dtype} "
                       f"{list(self.shape)}")
    if self.shape[0] == 0:
      raise ShapeError(f"{where}: holds no images")
    if limit is not None:  # read only the first `limit` images
      self.shape = (min(self.shape[0], max(int(limit), 0)),) + self.shape[1:]

  @property
  def num_images(self) -> int:
    return self.shape[0]

  def __len__(self) -> int:
    return self.shape[0]

  def _open(self):
    if self.key is None:  # a .npy file
      return as_path(self.path).open("rb")
    return _zip_member(self.path, f"{self.key}.npy")

  def __iter__(self) -> Iterator[np.ndarray]:
    if self._fallback:  # a layout that cannot be streamed (Fortran order): load it whole
      with as_path(self.path).open("rb") as f:
        loaded = np.load(f)
        arr = np.asarray(loaded if self.key is None else loaded[self.key])[:self.num_images]
      for i in range(0, self.num_images, self.batch_size):
        yield arr[i:i + self.batch_size]
      return
    per_image = int(np.prod(self.shape[1:]))
    with self._open() as f:
      _read_npy_header(f)
      for i in range(0, self.num_images, self.batch_size):
        n = min(self.batch_size, self.num_images - i)
        data = _read_exactly(f, n * per_image, self.path)
        yield np.frombuffer(data, np.uint8).reshape((n,) + self.shape[1:])

  def read_all(self) -> np.ndarray:
    """All images, uint8 [N, H, W, C]."""
    return np.concatenate(list(self))


@contextlib.contextmanager
def _zip_member(path: str, member: str):
  """One member of a zip archive, opened as a stream."""
  with as_path(path).open("rb") as f, zipfile.ZipFile(f) as z, z.open(member) as stream:
    yield stream


def _read_npy_header(f) -> tuple[tuple, np.dtype, bool]:
  """(shape, dtype, whether to load whole instead of streaming) of a .npy stream at its start."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
  elif version == (2, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
  else:
    raise ShapeError(f"unsupported .npy format version {version}")
  return shape, dtype, fortran


def _read_exactly(f, size: int, path: str) -> bytes:
  chunks, have = [], 0
  while have < size:
    chunk = f.read(size - have)
    if not chunk:
      raise ShapeError(f"{path}: the image array is truncated (expected {size} more bytes)")
    chunks.append(chunk)
    have += len(chunk)
  return b"".join(chunks)


def _check_exists(path: str, what: str) -> None:
  if not as_path(path).is_file():
    raise DataNotFoundError(f"{what} {path!r} does not exist")


def check_reference_file(path: str, what: str = "config.eval.reference") -> None:
  """DataNotFoundError, naming the file and where to get it, unless the reference `path` exists.

  Nothing is downloaded at run time: ADM's batches (`ADM_REFERENCE_URLS`) are fetched by hand.
  """
  if as_path(path).is_file():
    return
  name = as_path(path).name
  if name in ADM_REFERENCE_URLS:
    how = (f"download ADM's reference batch {ADM_REFERENCE_URLS[name]} (openai/guided-diffusion "
           f"evaluations) to that path")
  else:
    how = ("write one with `python launch/evaluate.py --make_reference=OUT.npz --config=...` or "
           "leave it empty to use statistics of config.data")
  raise DataNotFoundError(f"{what} {path!r} does not exist; {how}")


def npz_keys(path: str, what: str) -> list[str]:
  """The array names in an .npz archive; DataNotFoundError / ShapeError when missing / not a zip."""
  _check_exists(path, what)
  try:
    with as_path(path).open("rb") as f, zipfile.ZipFile(f) as z:
      return [n[:-4] for n in z.namelist() if n.endswith(".npy")]
  except zipfile.BadZipFile as e:
    raise ShapeError(f"{what} {path!r} is not an .npz archive ({e})") from e


def _npz_images(path: str, key: str, batch_size: int, limit: int | None = None) -> NpzImages:
  try:
    return NpzImages(path, key, batch_size=batch_size, limit=limit)
  except (ValueError, zipfile.BadZipFile) as e:  # a member that is not a .npy array
    raise ShapeError(f"{path!r}: '{key}' is not a readable array ({e})") from e


def load_images(path: str, *, batch_size: int = 1000, limit: int | None = None) -> NpzImages:
  """The images of a samples file: an .npz with `images` or `arr_0` uint8 [N, H, W, 3 or 1], or an .npy.

  `limit` keeps only the first `limit` images. Nothing but the header is read here.

  Raises DataNotFoundError when the file is missing and ShapeError when it holds no such images.
  """
  if path.endswith(".npy"):
    _check_exists(path, "images file")
    try:
      return NpzImages(path, None, batch_size=batch_size, limit=limit)
    except ValueError as e:
      raise ShapeError(f"images file {path!r} is not a readable .npy array ({e})") from e
  keys = npz_keys(path, "images file")
  for key in IMAGE_KEYS:
    if key in keys:
      return _npz_images(path, key, batch_size, limit)
  raise ShapeError(f"images file {path!r} has no 'images' or 'arr_0' array (it has {keys})")


# DEFLATE cannot expand data by more than about 1032:1 (RFC 1951: a 258-byte match costs at least 2
# bits): a member declaring more is lying about its size.
MAX_DEFLATE_RATIO = 1032


def _check_member_size(info: zipfile.ZipInfo, path: str, what: str) -> None:
  """Refuses an npz member whose declared size its stored bytes cannot hold: a stored member must
  declare exactly its bytes, a deflated one at most DEFLATE's maximum expansion of them (a 1 MB
  file cannot make numpy allocate gigabytes before inflating finds the lie); other compression
  methods are refused."""
  if info.compress_type == zipfile.ZIP_STORED:
    ok = info.file_size == info.compress_size
  elif info.compress_type == zipfile.ZIP_DEFLATED:
    ok = info.file_size <= MAX_DEFLATE_RATIO * info.compress_size + 1024
  else:
    raise ShapeError(f"{what} {path!r}: '{info.filename}' uses zip compression method "
                     f"{info.compress_type}; only stored and deflated members are read")
  if not ok:
    raise ShapeError(f"{what} {path!r}: '{info.filename}' declares {info.file_size} bytes but its "
                     f"{info.compress_size} stored bytes cannot hold them; the file is corrupt")


def read_npz_arrays(path: str, keys: list[str], what: str) -> dict[str, np.ndarray]:
  """The members `keys` of an .npz archive, each checked against the bytes it holds before loading.

  A member's .npy header declares its shape; the array is read only when that shape's bytes equal
  the member's size after the header, so a small file cannot make numpy allocate terabytes (a
  MemoryError) and a truncated member is refused by name. Object arrays are refused (no pickle).

  Raises:
    ShapeError: a member is not a plain .npy array, its size disagrees with its header, or the
      archive is corrupt (a bad CRC, truncated).
  """
  out = {}
  try:
    with as_path(path).open("rb") as f, zipfile.ZipFile(f) as z:
      for key in keys:
        info = z.getinfo(f"{key}.npy")
        _check_member_size(info, path, what)
        with z.open(info) as member:
          shape, dtype, _ = _read_npy_header(member)
          declared = int(np.prod(shape, dtype=object)) * np.dtype(dtype).itemsize
          held = info.file_size - member.tell()
          if declared != held:
            raise ShapeError(f"{what} {path!r}: '{key}' declares {dtype} {list(shape)} "
                             f"({declared} bytes) but holds {held} bytes; the file is corrupt")
        with z.open(info) as member:
          out[key] = np.lib.format.read_array(member, allow_pickle=False)
  except (ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # object arrays, bad members
    raise ShapeError(f"{what} {path!r} cannot be read: {type(e).__name__}: {e}") from e
  return out


def _check_stats(path: str, stats: dict) -> None:
  """Shapes, dtypes and values of a reference's statistics (converted to float64 in place)."""
  for mu_key, sigma_key in STAT_PAIRS:
    if (mu_key in stats) != (sigma_key in stats):
      raise ShapeError(f"reference {path!r} has {mu_key if mu_key in stats else sigma_key} without "
                       f"{sigma_key if mu_key in stats else mu_key}")
    if mu_key not in stats:
      continue
    mu, sigma = stats[mu_key], stats[sigma_key]
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (
        np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
      raise ShapeError(f"reference {path!r}: {mu_key} must be float [D] and {sigma_key} float [D, D], "
                       f"got {mu.dtype} {list(mu.shape)} and {sigma.dtype} {list(sigma.shape)}")
    stats[mu_key], stats[sigma_key] = metrics.check_statistics(
        mu, sigma, f"reference {path!r} ({mu_key}, {sigma_key})")
  if "pool" in stats:
    pool = stats["pool"]
    d = len(stats["mu"]) if "mu" in stats else None
    if pool.ndim != 2 or (d is not None and pool.shape[1] != d) or not np.issubdtype(pool.dtype,
                                                                                   np.floating):
      raise ShapeError(f"reference {path!r}: pool must be float [N, {d or 'D'}], got {pool.dtype} "
                       f"{list(pool.shape)}")
    metrics.check_finite(pool, f"reference {path!r}: the pool features")


def load_reference(path: str, *, batch_size: int = 1000) -> dict:
  """Reads a reference batch (ADM's format, plus our `pool`; see the module docstring).

  Returns:
    A dict with what the file holds: `images` (an `NpzImages`, streamed), `mu`, `sigma`, `mu_s`,
    `sigma_s` (float64), `pool` (float32 [N, D]).

  Raises:
    DataNotFoundError: the file does not exist.
    ShapeError: it is not an npz, holds neither images nor statistics, or an array has the wrong
      shape or dtype.
  """
  check_reference_file(path, "reference")
  keys = npz_keys(path, "reference")
  out = read_npz_arrays(path, [k for k in ("mu", "sigma", "mu_s", "sigma_s", "pool") if k in keys],
                        "reference")
  _check_stats(path, out)
  for key in ("mu", "sigma", "mu_s", "sigma_s"):
    if key in out:
      out[key] = out[key].astype(np.float64)
  if "pool" in out:
    out["pool"] = out["pool"].astype(np.float32)
  for key in IMAGE_KEYS:
    if key in keys:
      out["images"] = _npz_images(path, key, batch_size)
      break
  if "images" not in out and "mu" not in out and "pool" not in out:
    raise ShapeError(f"reference {path!r} holds neither images ('arr_0') nor statistics ('mu', "
                     f"'sigma', 'mu_s', 'sigma_s'); it has {keys}")
  return out


def statistics_from_features(feats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{"mu", "sigma"} of `pool`, {"mu_s", "sigma_s"} of `spatial` (when given), and `pool` itself."""
  out = {}
  out["mu"], out["sigma"] = metrics.feature_statistics(feats["pool"])
  if "spatial" in feats:
    out["mu_s"], out["sigma_s"] = metrics.feature_statistics(feats["spatial"])
  out["pool"] = np.asarray(feats["pool"], np.float32)
  return out


def reference_statistics(ref: dict, extract: Callable[[object], dict]) -> dict:
  """What `compute_metrics` needs from a reference: stored statistics first, then its images.

  Args:
    ref: `load_reference`'s dict (or any dict with some of `images`, `mu`, `sigma`, `mu_s`, `sigma_s`,
      `pool`).
    extract: images -> {"pool", "spatial", ...} features (called at most once, only when the images
      are needed: for missing statistics or for precision/recall without stored `pool`).

  Returns:
    `mu`, `sigma`, and when available `mu_s`, `sigma_s`, `pool`.
  """
  missing = [k for k in ("mu", "mu_s", "pool") if ref.get(k) is None]
  derived = {}
  if missing and ref.get("images") is not None:
    derived = statistics_from_features(extract(ref["images"]))
  elif ref.get("mu") is None and ref.get("pool") is not None:
    derived = statistics_from_features({"pool": ref["pool"]})
  out = {}
  for key in ("mu", "sigma", "mu_s", "sigma_s", "pool"):
    value = ref.get(key) if ref.get(key) is not None else derived.get(key)
    if value is not None:
      out[key] = value
  if "mu" not in out:
    raise ShapeError(f"the reference holds neither images nor statistics (keys {sorted(ref)})")
  return out


def write_reference(path: str, stats: dict, *, images: np.ndarray | None = None,
                    labels: np.ndarray | None = None, settings: dict | None = None) -> str:
  """Writes a reference batch: ADM's `arr_0`, `mu`, `sigma`, `mu_s`, `sigma_s`, plus `pool`, `arr_1`.

  The file is written next to `path` and renamed into place, so a reader never sees half a file.
  `settings` (what made it) are recorded when the file is a cache (`common.eval.cache`).
  """
  arrays = {k: np.asarray(stats[k]) for k in ("mu", "sigma", "mu_s", "sigma_s", "pool") if k in stats}
  if images is not None:
    arrays["arr_0"] = np.asarray(images, np.uint8)
  if labels is not None:
    arrays["arr_1"] = np.asarray(labels, np.int32)
  return write_arrays(path, arrays, settings=settings)


def write_arrays(path: str, arrays: dict[str, np.ndarray], *, settings: dict | None = None) -> str:
  """`np.savez(path, **arrays)` (uncompressed, as ADM's files), written to a temporary file first.

  Args:
    path: the .npz to write; it appears complete or not at all (temporary file + rename).
    arrays: name -> array.
    settings: when given, also stored as `cache_settings` (their JSON, a 0-d str array): what made
      the file, compared by `common.eval.cache.load` before the file is reused.
  """
  if settings is not None:
    arrays = {**arrays, SETTINGS_KEY: np.asarray(settings_json(settings))}
  as_path(path).parent.mkdir(parents=True, exist_ok=True)
  tmp = as_path(f"{path}.tmp")
  with tmp.open("wb") as f:
    np.savez(f, **arrays)
  tmp.replace(as_path(path))
  return path


def recorded_settings(path: str) -> str | None:
  """The `cache_settings` JSON a cache file records (`write_arrays(..., settings=...)`), or None
  when it records none or is not a readable .npz."""
  try:
    if SETTINGS_KEY not in npz_keys(path, "cache"):
      return None
    return str(read_npz_arrays(path, [SETTINGS_KEY], "cache")[SETTINGS_KEY])
  except (UserError, OSError):
    return None


def settings_json(settings: dict) -> str:
  """The canonical JSON of a cache's settings (keys sorted, tuples as lists, others by repr)."""
  return json.dumps(settings, sort_keys=True, default=repr)
