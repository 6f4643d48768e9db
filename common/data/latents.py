"""Precomputed latent text-to-image datasets: the on-disk format, its writer and its grain pipeline.

A dataset directory (written by `launch/precompute.py`, read by `data.name = "latents"`) holds

  shard-00000-of-00015.array_record ...   array_record files (`group_size:1,uncompressed`: random
                                          access; zstd saved only 7% on float16 embeddings and
                                          doubled the read time), one serialized example per
                                          record, in source order;
  meta.json                               written last, when every shard is complete;
  precompute.json                         the run's settings, checked when a run resumes.

Each record is a msgpack map (`msgpack.packb`, format version 2; version 1, the same map always
with text and without "logvar", still reads):

  "x":       array, latents [h, w, c] (float16 or float32; already scaled by the autoencoder);
             with `latent="moments"` the scaled posterior mean
  "logvar":  array, only with `latent="moments"`: the log-variance [h, w, c] of the scaled
             posterior, log(scale^2 var); the pipeline draws x + exp(logvar / 2) * N(0, 1) per
             sample, which is Large-DiT's `vae.encode(x).latent_dist.sample() * 0.18215` of every
             training step (Alpha-VLLM/LLaMA2-Accessory, Large-DiT-ImageNet/train.py)
  "tokens":  array, caption token embeddings [K, L, D] (same dtype as "x"); L = T, or with
             `trim_padding` the last real token's position + 1 over the K captions (the pipeline
             pads them back to T with zeros)
  "mask":    array, uint8 [K, T], 1 = real token
  "pooled":  array, pooled caption embeddings [K, D] (same dtype as "x")
  "label":   int, class label or -1
  "captions": list of K str
  "index":   int, the example's index in its source

"tokens", "mask", "pooled" and "captions" are absent from datasets written without a text encoder
(labelled sources such as ImageNet: class-conditional training needs only "label").

where an array is a map {"dtype": numpy dtype name, "shape": list[int], "data": little-endian raw
bytes}, and K >= 1 is the number of captions of the image (1 for Fashion-MNIST, 5-7 for COCO). As in
micro_diffusion's precompute scripts (SonyResearch/micro_diffusion,
micro_diffusion/datasets/prepare/coco/precompute.py) the latents and all T token embeddings are
stored (`trim_padding` drops the padding positions to save space: 3x less for Fashion-MNIST captions
in MiniLM's 32 tokens, but the padding positions then read back as zeros rather than the
encoder's outputs there); unlike them, every caption of an image is kept and the pipeline draws one
per sample.

The training pipeline (`latents_train_iterator`) yields the text-conditional batches of the trainer
contract: `{"x": float32 [B, h, w, c], "cond": {"tokens": float32 [B, T, D], "mask": int32 [B, T],
"pooled": float32 [B, D], "label": int32 [B]}}`; the label is -1 where the source has none. A
dataset without text yields `{"x", "cond": {"label"}}`, the class-conditional batch. The network
takes the conditions it declares (`Experiment.model_batch`): captions for a text-conditional
one, the label for a class-conditional one (e.g. TerDiT on ImageNet latents).

Config keys (`config.data`) for `name = "latents"`: `path` (the dataset directory) or `mixture`
(several, with weights: `common.data.mixture`), and grain's `worker_count`,
`worker_buffer_size`, `read_threads` (default 8), `read_buffer_size` (default 4 local batches), as
for the other pipelines.

Sources whose `__getitem__` raises `captions.SkipExample` (a truncated ImageNet JPEG; in webdataset
shards and parquet tables a damaged image, one below `--min_side`, a missing caption) lose that
example, never stop the run: each shard's counts go
to `shard-*.stats.json` beside it, and meta.json holds `num_examples` (records written),
`source_examples` (examples read) and `skipped` ({reason: count}).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from absl import flags
import grain
import jax
import msgpack
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from common import autoencoders
from common import text
from common.data import captions as _captions
from common.data import imagenet as _imagenet
from common.data import loader as _loader
from common.data import mixture as _mix
from common.data import parquet_source as _parquet
from common.data import sources as _sources
from common.data import webdataset_source as _wds
from common.errors import ConfigError, DataNotFoundError, ShapeError
from common.training.metrics import format_duration
from common.paths import as_path, is_remote

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
META_FILE = "meta.json"
PLAN_FILE = "precompute.json"
LATENTS_KEYS = frozenset({"name", "path", "mixture", "worker_count", "worker_buffer_size",
                          "read_threads", "read_buffer_size"})
DTYPES = ("float16", "float32")
LATENT_MODES = ("mean", "sample", "moments")
_WRITER_OPTIONS = "group_size:1,uncompressed"
_HOW_TO = ("write it with `python launch/precompute.py --source=fashion_mnist|image_folder|coco|"
           "webdataset|parquet|imagenet --autoencoder=SPEC [--text_encoder=SPEC] --output=DIR` "
           "and set data.path=DIR")
# Sources whose examples carry a class label and no caption: --text_encoder is optional for them.
LABELLED_SOURCES = ("imagenet", "imagenet_tfds")


class Autoencoder(Protocol):
  """What the writer needs of `common.autoencoders.load_autoencoder(spec)`."""

  def encode(self, images: np.ndarray, key=None) -> Any: ...
  def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]: ...


class MomentsAutoencoder(Autoencoder, Protocol):
  """What `latent="moments"` needs besides: the unscaled posterior and the latent normalisation
  (common.autoencoders.Autoencoder: model latents are (z - shift) * scale)."""

  shift: np.ndarray
  scale: np.ndarray

  def moments(self, images: np.ndarray) -> tuple[Any, Any]: ...


class TextEncoder(Protocol):
  """What the writer needs of `common.text.load_text_encoder(spec)`."""

  max_length: int
  width: int

  def encode(self, prompts: Sequence[str]) -> dict[str, np.ndarray]: ...


# ----------------------------------------------------------------------------------------------
# Serialization


def _pack_array(array: np.ndarray) -> dict:
  array = np.ascontiguousarray(array)
  return {"dtype": array.dtype.name, "shape": list(array.shape),
          "data": array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()}


def _unpack_array(packed: dict) -> np.ndarray:
  dtype = np.dtype(packed["dtype"]).newbyteorder("<")
  return np.frombuffer(packed["data"], dtype=dtype).reshape(packed["shape"])


def serialize_example(x: np.ndarray, tokens: np.ndarray | None, mask: np.ndarray | None,
                      pooled: np.ndarray | None, label: int, captions: Sequence[str], index: int,
                      logvar: np.ndarray | None = None) -> bytes:
  """One record's bytes (see the module docstring); arrays are stored in their own dtype.

  Args:
    x: latents [h, w, c] (the scaled posterior mean when logvar is given).
    tokens: [K, L, D] token embeddings of the K captions (L <= T); None: a record without text
      (mask, pooled and captions are then not stored).
    mask: [K, T], 1 = real token (stored as uint8).
    pooled: [K, D].
    label: class label or -1.
    captions: the K captions.
    index: the example's index in its source.
    logvar: [h, w, c] log-variance of the scaled posterior, or None.
  """
  record = {"x": _pack_array(x), "label": int(label), "index": int(index)}
  if tokens is not None:
    record.update(tokens=_pack_array(tokens), mask=_pack_array(np.asarray(mask, np.uint8)),
                  pooled=_pack_array(pooled), captions=list(captions))
  if logvar is not None:
    record["logvar"] = _pack_array(logvar)
  return msgpack.packb(record, use_bin_type=True)


def deserialize_example(data: bytes) -> dict:
  """Inverse of `serialize_example`: a dict of numpy arrays (read-only views) and the scalars."""
  record = msgpack.unpackb(data, raw=False)
  for key in ("x", "tokens", "mask", "pooled", "logvar"):
    if key in record:
      record[key] = _unpack_array(record[key])
  return record


# ----------------------------------------------------------------------------------------------
# Writing


def shard_name(index: int, count: int) -> str:
  return f"shard-{index:05d}-of-{count:05d}.array_record"


def _write_json(path: str | os.PathLike, value: dict) -> None:
  path = as_path(path)
  tmp = path.parent / (path.name + ".tmp")
  with tmp.open("w", encoding="utf-8") as f:
    json.dump(value, f, indent=2, sort_keys=True)
    f.write("\n")
  tmp.replace(path)


def _read_json(path: str | os.PathLike) -> dict:
  with as_path(path).open(encoding="utf-8") as f:
    return json.load(f)


class _Progress:
  """`precompute: N/T examples (P%) | X examples/s | ETA ...` lines, at most every `every_s`."""

  def __init__(self, total: int, done: int, stream, every_s: float):
    self.total, self.stream, self.every_s = total, stream, every_s
    self.start_done, self.t0, self.last, self.printed = done, time.perf_counter(), -math.inf, -1

  def update(self, done: int, force: bool = False) -> None:
    now = time.perf_counter()
    if done == self.printed or (not force and now - self.last < self.every_s):
      return
    self.last, self.printed = now, done
    rate = (done - self.start_done) / (now - self.t0) if now > self.t0 else 0.0
    eta = format_duration((self.total - done) / rate) if rate > 0 else "?"
    pct = 100.0 * done / max(self.total, 1)
    print(f"precompute: {done}/{self.total} examples ({pct:.1f}%) | {rate:.1f} examples/s | "
          f"ETA {eta}", file=self.stream, flush=True)


def _encode_captions(text_encoder: TextEncoder, captions: list[str], batch_size: int,
                     dtype: np.dtype) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
  """{caption: (tokens [T, D] dtype, mask uint8 [T], pooled [D] dtype)} in chunks of batch_size."""
  length, width = int(text_encoder.max_length), int(text_encoder.width)
  out = {}
  for lo in range(0, len(captions), batch_size):
    chunk = captions[lo:lo + batch_size]
    enc = text_encoder.encode(chunk)
    tokens, mask, pooled = (np.asarray(enc[k]) for k in ("tokens", "mask", "pooled"))
    n = len(chunk)
    if (tokens.shape != (n, length, width) or mask.shape != (n, length)
        or pooled.shape != (n, width)):
      raise ShapeError(
          f"text encoder returned tokens {tokens.shape}, mask {mask.shape}, pooled "
          f"{pooled.shape} for {n} prompts; expected [{n}, {length}, {width}], [{n}, {length}], "
          f"[{n}, {width}] (its max_length and width)")
    tokens, pooled = tokens.astype(dtype), pooled.astype(dtype)
    if not (np.isfinite(tokens).all() and np.isfinite(pooled).all()):
      raise ShapeError(f"text encoder gave non-finite embeddings (in {dtype.name}) for one of "
                       f"{chunk[:3]}...")
    for i, caption in enumerate(chunk):
      out[caption] = (tokens[i], mask[i].astype(np.uint8), pooled[i])
  return out


def _scaled_moments(autoencoder: MomentsAutoencoder,
                    images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mean, logvar) [B, h, w, c] of the scaled posterior: (z - shift) * scale with z ~ N(m, e^lv)
  has mean (m - shift) * scale and log-variance lv + log(scale^2)."""
  if not all(hasattr(autoencoder, a) for a in ("moments", "shift", "scale")):
    raise ConfigError("latent='moments' needs an autoencoder with moments(), shift and scale "
                      "(common.autoencoders.load_autoencoder gives one)")
  mean, logvar = (np.asarray(a, np.float32) for a in autoencoder.moments(images))
  shift, scale = (np.asarray(a, np.float32) for a in (autoencoder.shift, autoencoder.scale))
  return (mean - shift) * scale, logvar + np.log(np.square(scale))


def _write_shard(path: str, source, lo: int, hi: int, *, autoencoder: Autoencoder,
                 text_encoder: TextEncoder | None, image_shape: tuple[int, int, int],
                 latent_shape: tuple[int, int, int], batch_size: int, latent: str, seed: int,
                 dtype: np.dtype, trim_padding: bool, progress: _Progress,
                 done: int) -> tuple[int, dict]:
  """Encodes examples [lo, hi) of `source` into the array_record file `path`.

  Batches start at `lo` and never cross the shard's end, and caption embeddings are cached per
  shard, so a shard's bytes depend only on its own examples: a resumed run rewrites an unfinished
  shard exactly as an uninterrupted run writes it. An example whose `source[i]` raises
  `captions.SkipExample` is left out and counted.

  Returns:
    (done, {"written": records written, "skipped": {reason: count}, "first_skipped": {reason:
    detail}}).
  """
  cache: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
  stats = {"written": 0, "skipped": {}, "first_skipped": {}}
  writer = ArrayRecordWriter(path, _WRITER_OPTIONS)
  try:
    for start in range(lo, hi, batch_size):
      batch_end = min(start + batch_size, hi)
      indices, examples = [], []
      for i in range(start, batch_end):
        try:
          examples.append(source[i])
          indices.append(i)
        except _captions.SkipExample as e:
          stats["skipped"][e.reason] = stats["skipped"].get(e.reason, 0) + 1
          stats["first_skipped"].setdefault(e.reason, e.detail)
      if not examples:
        done += batch_end - start
        progress.update(done)
        continue
      for i, ex in zip(indices, examples):
        if tuple(ex.image.shape) != image_shape or ex.image.dtype != np.uint8:
          raise ShapeError(f"source example {i} has an image {ex.image.dtype} {ex.image.shape}; "
                           f"expected uint8 {image_shape}")
      images = np.stack([ex.image for ex in examples]).astype(np.float32)
      images = images / np.float32(127.5) - np.float32(1.0)
      key = None
      if latent == "sample":
        key = jax.random.fold_in(jax.random.key(seed), start)
      if latent == "moments":
        latents, logvars = _scaled_moments(autoencoder, images)
      else:
        latents, logvars = np.asarray(autoencoder.encode(images, key)), None
      for what, arr in (("latents", latents), ("log-variances", logvars)):
        if arr is None:
          continue
        if arr.shape != (len(examples), *latent_shape):
          raise ShapeError(f"autoencoder returned {what} {arr.shape} for images "
                           f"{images.shape}; expected {(len(examples), *latent_shape)}")
        if not np.isfinite(arr.astype(dtype)).all():
          raise ShapeError(f"autoencoder gave non-finite {what} (in {dtype.name}) for examples "
                           f"{start}..{indices[-1]}")
      latents = latents.astype(dtype)
      logvars = [None] * len(examples) if logvars is None else logvars.astype(dtype)
      if text_encoder is None:
        for i, ex, z, lv in zip(indices, examples, latents, logvars):
          writer.write(serialize_example(z, None, None, None, ex.label, (), i, logvar=lv))
      else:
        for i, ex in zip(indices, examples):
          if not ex.captions:
            raise ShapeError(f"source example {i} has no caption; a dataset with text needs one "
                             "per image (or precompute a labelled source without --text_encoder)")
        new = list(dict.fromkeys(c for ex in examples for c in ex.captions if c not in cache))
        cache.update(_encode_captions(text_encoder, new, batch_size, dtype))
        for i, ex, z, lv in zip(indices, examples, latents, logvars):
          embs = [cache[c] for c in ex.captions]
          tokens, mask = np.stack([e[0] for e in embs]), np.stack([e[1] for e in embs])
          if trim_padding:
            real = np.flatnonzero(mask.any(axis=0))
            tokens = tokens[:, :(real[-1] + 1 if real.size else 1)]
          writer.write(serialize_example(z, tokens, mask, np.stack([e[2] for e in embs]),
                                         ex.label, ex.captions, i, logvar=lv))
      stats["written"] += len(examples)
      done += batch_end - start
      progress.update(done)
  finally:
    writer.close()
  return done, stats


def _stats_name(shard: str) -> str:
  return shard.removesuffix(".array_record") + ".stats.json"


def _read_shard_stats(out_dir, shard: str, lo: int, hi: int) -> dict:
  """A complete shard's counts (its `.stats.json`); shards of runs from before the counts were
  written hold every example of their range."""
  path = out_dir / _stats_name(shard)
  if path.is_file():
    return _read_json(path)
  return {"written": hi - lo, "skipped": {}}


def _check_local(output: str) -> None:
  if is_remote(output):
    raise ConfigError(f"--output={output}: array_record shards are written to a local directory "
                      "only; precompute locally, then copy the directory (gsutil -m cp -r)")


def write_dataset(source, output: str, *, autoencoder: Autoencoder,
                  text_encoder: TextEncoder | None, autoencoder_spec: str,
                  text_encoder_spec: str | None, shard_size: int = 4096,
                  batch_size: int = 64, limit: int | None = None, latent: str = "mean",
                  seed: int = 0, dtype: str = "float16", trim_padding: bool = False,
                  process_index: int = 0,
                  process_count: int = 1, progress_every_s: float = 10.0, stream=None,
                  on_shard_done: Callable[[int], None] | None = None) -> dict | None:
  """Encodes a captioned source into array_record shards + meta.json under `output` (resumable).

  Shard k holds examples [k * shard_size, (k + 1) * shard_size). A shard is written to
  `<name>.tmp` and renamed when complete; shards already complete are skipped, so running the same
  command again after an interruption continues from the last complete shard and produces the same
  bytes as an uninterrupted run. Settings that change the content (`precompute.json`) must match on
  a resume. With process_count > 1, process i writes shards k with k % process_count == i (run one
  process per worker on a shared directory); whichever finds every shard complete writes meta.json.

  Args:
    source: a captioned source (`common.data.captions`): `len`, `[i] -> CaptionedExample`,
      `image_size`, `channels`, `describe()`.
    output: dataset directory (created; local: array_record writes local files only).
    autoencoder: `encode(images float32 [B, H, W, C] in [-1, 1], key) -> latents [B, h, w, c]`
      (scaled) and `latent_shape((H, W, C))`.
    text_encoder: `encode(prompts) -> {"tokens" [N, T, D], "mask" [N, T], "pooled" [N, D]}`,
      `max_length` (T) and `width` (D); None: records without text (a labelled source).
    autoencoder_spec, text_encoder_spec: how they were loaded (stored in meta.json; the trainer
      checks them against the config).
    shard_size: examples per shard.
    batch_size: images per autoencoder call and captions per text-encoder call.
    limit: encode only the first `limit` examples.
    latent: "mean" (posterior mean, key None: deterministic), "sample" (one posterior sample per
      image with key fold_in(key(seed), first index of its batch), as micro_diffusion stores) or
      "moments" (the scaled posterior's mean and log-variance; a new sample per training step,
      as Large-DiT; needs `autoencoder.moments`, `.shift`, `.scale`).
    seed: for latent == "sample".
    dtype: "float16" (as micro_diffusion saves) or "float32" for latents and embeddings.
    trim_padding: store token embeddings only up to the last real token (see the module
      docstring).
    process_index, process_count: this writer among several.
    progress_every_s: seconds between progress lines.
    stream: where progress goes (default stdout).
    on_shard_done: called with the shard index after each shard is renamed into place.

  Returns:
    the meta.json dict, or None when other processes still have shards to write.
  """
  stream = stream or sys.stdout
  _check_local(output)
  if latent not in LATENT_MODES:
    raise ConfigError(f"latent must be one of {LATENT_MODES}, got {latent!r}")
  if dtype not in DTYPES:
    raise ConfigError(f"dtype must be one of {DTYPES}, got {dtype!r}")
  for name, value in (("shard_size", shard_size), ("batch_size", batch_size)):
    if not isinstance(value, int) or value <= 0:
      raise ConfigError(f"{name} must be a positive integer, got {value!r}")
  if not 0 <= process_index < process_count:
    raise ConfigError(f"process_index={process_index} not in [0, process_count={process_count})")
  n = len(source) if limit is None else min(int(limit), len(source))
  if n <= 0:
    raise ConfigError(f"nothing to encode: the source has {len(source)} examples, limit={limit}")
  image_shape = (int(source.image_size), int(source.image_size), int(source.channels))
  latent_shape = tuple(int(d) for d in autoencoder.latent_shape(image_shape))
  num_shards = math.ceil(n / shard_size)
  shards = [shard_name(k, num_shards) for k in range(num_shards)]
  plan = {
      "format_version": FORMAT_VERSION, "source": source.describe(), "num_examples": n,
      "shard_size": shard_size, "batch_size": batch_size, "latent": latent, "seed": int(seed),
      "dtype": dtype, "trim_padding": bool(trim_padding), "autoencoder": autoencoder_spec,
      "text_encoder": text_encoder_spec if text_encoder is not None else None,
      "image_shape": list(image_shape), "latent_shape": list(latent_shape),
      "text_max_length": int(text_encoder.max_length) if text_encoder is not None else 0,
      "text_width": int(text_encoder.width) if text_encoder is not None else 0}
  out_dir = as_path(output)
  out_dir.mkdir(parents=True, exist_ok=True)
  plan_path = out_dir / PLAN_FILE
  if plan_path.exists():
    old = _read_json(plan_path)
    diff = sorted(k for k in set(plan) | set(old) if plan.get(k) != old.get(k))
    if diff:
      raise ConfigError(
          f"{output} holds a precompute run with other settings ({', '.join(diff)} differ: "
          f"{ {k: old.get(k) for k in diff} }); rerun with the same flags to resume it, or use "
          "a new --output directory")
  else:
    _write_json(plan_path, plan)

  def complete(k: int) -> bool:
    return (out_dir / shards[k]).is_file()

  mine = [k for k in range(num_shards) if k % process_count == process_index]
  todo = [k for k in mine if not complete(k)]
  bounds = [(k * shard_size, min((k + 1) * shard_size, n)) for k in range(num_shards)]
  total = sum(hi - lo for lo, hi in (bounds[k] for k in mine))
  done = total - sum(hi - lo for lo, hi in (bounds[k] for k in todo))
  progress = _Progress(total, done, stream, progress_every_s)
  if done:
    print(f"precompute: resuming, {len(mine) - len(todo)} of {len(mine)} shard(s) complete",
          file=stream, flush=True)
  for k in todo:
    final = out_dir / shards[k]
    tmp = os.fspath(final) + ".tmp"
    lo, hi = bounds[k]
    done, stats = _write_shard(
        tmp, source, lo, hi, autoencoder=autoencoder, text_encoder=text_encoder,
        image_shape=image_shape, latent_shape=latent_shape, batch_size=batch_size, latent=latent,
        seed=seed, dtype=np.dtype(dtype), trim_padding=trim_padding, progress=progress, done=done)
    _write_json(out_dir / _stats_name(shards[k]), stats)  # before the shard: a complete shard
    as_path(tmp).replace(final)                            # always has its counts
    if on_shard_done is not None:
      on_shard_done(k)
  progress.update(done, force=True)
  missing = [k for k in range(num_shards) if not complete(k)]
  if missing:
    print(f"precompute: {len(missing)} shard(s) of other processes still missing; the last "
          "process to finish writes meta.json", file=stream, flush=True)
    return None
  stats = [_read_shard_stats(out_dir, shards[k], *bounds[k]) for k in range(num_shards)]
  skipped: dict[str, int] = {}
  for st in stats:
    for reason, count in st["skipped"].items():
      skipped[reason] = skipped.get(reason, 0) + count
  written = sum(st["written"] for st in stats)
  if skipped:
    firsts = {}
    for st in stats:
      for reason, detail in st.get("first_skipped", {}).items():
        firsts.setdefault(reason, detail)
    print(f"precompute: skipped {sum(skipped.values())} of {n} examples ("
          + ", ".join(f"{r}: {c}" for r, c in sorted(skipped.items())) + "); first of each: "
          + "; ".join(f"{firsts[r]}" for r in sorted(firsts)), file=stream, flush=True)
  if written == 0:
    raise DataNotFoundError(f"every one of the {n} examples was skipped ({skipped}); nothing to "
                            f"train on in {output}")
  meta = {**plan, "num_examples": written, "source_examples": n, "skipped": skipped,
          "shards": shards, "num_shards": num_shards,
          "shard_examples": [st["written"] for st in stats],
          "scaling": "latents are autoencoder.encode outputs: (z - shift_factor) * scaling_factor",
          "record_format": "msgpack; see common/data/latents.py"}
  _write_json(out_dir / META_FILE, meta)
  return meta


def build_source(source: str, *, path: str | None, image_dir: str | None, split: str,
                 image_size: int | None, channels: int, seed: int, min_side: int = 0,
                 image_column: str | None = None, caption_column: str | None = None,
                 caption_key: str = "caption", num_classes: int = 1000, flips: bool = True):
  """The captioned source of `launch/precompute.py`'s flags (common.data.captions)."""
  if source in LABELLED_SOURCES:
    return _imagenet.build(source, path=path, split=split, image_size=image_size,
                           channels=channels, num_classes=num_classes, flips=flips)
  if source == "fashion_mnist":
    if image_size not in (None, _sources.FASHION_MNIST_SIZE):
      raise ConfigError(f"--image_size={image_size}: Fashion-MNIST is encoded at its native "
                        f"{_sources.FASHION_MNIST_SIZE}x{_sources.FASHION_MNIST_SIZE} only")
    return _captions.CaptionedFashionMNIST(path or _sources.FASHION_MNIST_DEFAULT_DIR, split, seed)
  if image_size is None:
    raise ConfigError(f"--source={source} needs --image_size (the side images are cropped to)")
  if not path:
    raise ConfigError(f"--source={source} needs --path ("
                      f"{'the image folder' if source == 'image_folder' else 'the caption JSON'})")
  if min_side and source not in ("webdataset", "parquet"):
    raise ConfigError(f"--min_side applies to --source=webdataset|parquet, not {source}")
  if source == "webdataset":
    return _wds.WebDatasetCaptions(path, image_size, channels, min_side, caption_key)
  if source == "parquet":
    return _parquet.ParquetCaptions(path, image_dir, image_size, channels, min_side=min_side,
                                    image_column=image_column, caption_column=caption_column)
  if source == "image_folder":
    return _captions.CaptionedImageFolder(path, image_size, channels)
  if split != "train":
    raise ConfigError(f"--split applies to fashion_mnist only; for {source} point --path at the "
                      "split you want")
  return _captions.CocoCaptions(path, image_dir, image_size, channels)


def precompute(*, source: str, output: str, autoencoder: str, text_encoder: str,
               path: str | None = None, image_dir: str | None = None, split: str = "train",
               image_size: int | None = None, channels: int = 3, shard_size: int = 4096,
               batch_size: int = 64, limit: int | None = None, latent: str = "mean",
               dtype: str = "float16", trim_padding: bool = False, seed: int = 0,
               min_side: int = 0, image_column: str | None = None,
               caption_column: str | None = None, caption_key: str = "caption",
               process_index: int = 0,
               process_count: int = 1, num_classes: int = 1000, flips: bool = True,
               load_autoencoder=None, load_text_encoder=None,
               stream=None) -> dict | None:
  """What `launch/precompute.py` does: opens the source, loads the encoders, `write_dataset`.

  `load_autoencoder(spec)` / `load_text_encoder(spec)` default to common.autoencoders' and
  common.text's loaders (tests pass stand-ins); the other arguments are the command's flags.

  The source is opened (and checked) before the encoders load. The text encoder is optional for
  the labelled sources (`LABELLED_SOURCES`: records then carry no text). Returns meta.json's dict,
  or None while other processes' shards are missing.
  """
  required = [("output", output), ("autoencoder", autoencoder)]
  if source not in LABELLED_SOURCES:
    required.append(("text_encoder", text_encoder))
  for name, value in required:
    if not value:
      raise ConfigError(f"--{name} is required")
  _check_local(output)
  captioned = build_source(source, path=path, image_dir=image_dir, split=split,
                           image_size=image_size, channels=channels, seed=seed, min_side=min_side,
                           image_column=image_column, caption_column=caption_column,
                           caption_key=caption_key, num_classes=num_classes, flips=flips)
  load_autoencoder = load_autoencoder or autoencoders.load_autoencoder
  load_text_encoder = load_text_encoder or text.load_text_encoder
  meta = write_dataset(
      captioned, output, autoencoder=load_autoencoder(autoencoder),
      text_encoder=load_text_encoder(text_encoder) if text_encoder else None,
      autoencoder_spec=autoencoder,
      text_encoder_spec=text_encoder, shard_size=shard_size, batch_size=batch_size, limit=limit,
      latent=latent, seed=seed, dtype=dtype, trim_padding=trim_padding,
      process_index=process_index,
      process_count=process_count, stream=stream)
  if meta is not None:
    text_part = (f"tokens [{meta['text_max_length']}, {meta['text_width']}]"
                 if meta["text_encoder"] else "no text")
    print(f"precompute: wrote {meta['num_examples']} examples in {meta['num_shards']} shard(s) to "
          f"{output} (latents {tuple(meta['latent_shape'])}, {text_part}, {meta['dtype']}"
          f"{', ' + str(sum(meta['skipped'].values())) + ' skipped' if meta['skipped'] else ''})",
          file=stream or sys.stdout, flush=True)
  return meta


# ----------------------------------------------------------------------------------------------
# Reading


@dataclasses.dataclass(frozen=True)
class LatentsInfo:
  """What a model needs to know about a precomputed dataset, from meta.json alone.

  Attributes:
    path: the dataset directory.
    latent_shape: (h, w, c) of "x".
    image_shape: (H, W, C) of the encoded images.
    num_examples: number of records (images).
    text_max_length: T, tokens per caption.
    text_width: D, embedding width.
    autoencoder: the autoencoder spec that encoded the images.
    text_encoder: the text encoder spec that encoded the captions.
    dtype: storage dtype of latents and embeddings.
    meta: the whole meta.json.
  """
  path: str
  latent_shape: tuple[int, int, int]
  image_shape: tuple[int, int, int]
  num_examples: int
  text_max_length: int
  text_width: int
  autoencoder: str
  text_encoder: str
  dtype: str
  meta: dict


def _path(cfg) -> str:
  name = cfg.get("name", None)
  if name != "latents":
    raise ConfigError(f"common.data.latents serves data.name='latents', got {name!r}")
  unknown = sorted(set(cfg.keys()) - LATENTS_KEYS)
  if unknown:
    raise ConfigError(f"data.name='latents' does not take data config key(s) {unknown}; its keys: "
                      f"{sorted(LATENTS_KEYS)}")
  path = cfg.get("path", None)
  if path and cfg.get("mixture", None):
    raise ConfigError("data.path and data.mixture are both set; give one dataset (path) or a "
                      "mixture of them, not both")
  if not path and not cfg.get("mixture", None):
    raise ConfigError(f"data.name='latents' needs data.path, a precomputed dataset directory (or "
                      f"data.mixture, several with weights); {_HOW_TO}")
  return path


def _mixture(cfg) -> tuple[list[tuple[str, Any]], list[LatentsInfo]] | None:
  """(entries, infos) of `cfg.mixture` (common.data.mixture), checked compatible; None without."""
  if _path(cfg):
    return None
  entries = _mix.parse(cfg.mixture)
  infos = [_info(p) for p, _ in entries]
  _mix.check_compatible(infos)
  return entries, infos


def read_meta(path: str) -> dict:
  """meta.json of the dataset at `path`, or DataNotFoundError saying how to make it."""
  meta_path = as_path(path) / META_FILE
  if not meta_path.is_file():
    state = ("an unfinished precompute run (rerun the same command to finish it)"
             if (as_path(path) / PLAN_FILE).is_file() else
             "no dataset" if as_path(path).is_dir() else "a missing directory")
    raise DataNotFoundError(f"no precomputed latent dataset at {path} ({state}); {_HOW_TO}")
  meta = _read_json(meta_path)
  if meta.get("format_version") not in READABLE_VERSIONS:
    raise DataNotFoundError(f"{meta_path} has format version {meta.get('format_version')}; this "
                            f"code reads versions {READABLE_VERSIONS}: precompute it again")
  return meta


def _info(path: str) -> LatentsInfo:
  meta = read_meta(path)
  return LatentsInfo(path=path, latent_shape=tuple(meta["latent_shape"]),
                     image_shape=tuple(meta["image_shape"]), num_examples=meta["num_examples"],
                     text_max_length=meta["text_max_length"], text_width=meta["text_width"],
                     autoencoder=meta["autoencoder"], text_encoder=meta["text_encoder"],
                     dtype=meta["dtype"], meta=meta)


def latents_info(cfg) -> LatentsInfo:
  """Shapes, counts and encoder specs of the dataset at `cfg.path`, from meta.json only.

  For a mixture (`cfg.mixture`): the shapes and encoders its sources share, the sum of their
  examples, `path` naming them and `meta = {"mixture": [(path, normalised weight, count)]}`.
  """
  mixed = _mixture(cfg)
  if mixed is None:
    return _info(_path(cfg))
  entries, infos = mixed
  counts = [i.num_examples for i in infos]
  ws = _mix.weights(entries, counts)
  return dataclasses.replace(
      infos[0], path="mixture(" + ", ".join(p for p, _ in entries) + ")",
      num_examples=sum(counts),
      meta={"mixture": [(p, w, n) for (p, _), w, n in zip(entries, ws, counts)]})


def _same_spec(a: str, b: str) -> bool:
  if a == b:
    return True
  if not a or not b or is_remote(a) or is_remote(b):
    return False
  return as_path(a).resolve() == as_path(b).resolve()


def check_encoders(info: LatentsInfo, *, autoencoder: str | None, text_encoder: str | None) -> None:
  """ConfigError unless the config's encoder specs are those the dataset was made with.

  Specs match as equal strings or as paths to the same place. A None spec is not checked.
  """
  for what, configured, stored in (("autoencoder", autoencoder, info.autoencoder),
                                    ("text_encoder", text_encoder, info.text_encoder)):
    if configured is not None and not _same_spec(configured, stored):
      raise ConfigError(f"config.{what}={configured!r} but the latents at {info.path} were made "
                        f"with {what} {stored!r}; set config.{what}={stored!r} or precompute the "
                        "data again")


def check_padding_kept(cfg, *, reader: str) -> None:
  """ConfigError when the latents at `cfg.path` (or any dataset of `cfg.mixture`) were precomputed
  with `trim_padding`, for a network that attends to every caption position without a mask
  (`reader` names it; see `common.training.contracts.ReadsCaptionPadding`): trimmed padding reads
  back as zeros, not as the text encoder's outputs there, so that network would see other inputs
  than at sampling time."""
  path = _path(cfg)
  for path in [path] if path else [p for p, _ in _mix.parse(cfg.mixture)]:
    if read_meta(path).get("trim_padding"):
      raise ConfigError(f"the latents at {path} were precomputed with --trim_padding, but {reader} "
                        "attends to every caption position, padding included: precompute them "
                        "again without --trim_padding.")


class LatentsSource:
  """Grain random-access source over a dataset's shards, yielding `deserialize_example` dicts.

  Its repr (stored by grain in the iterator state and checked on restore) names the dataset by
  the hash of its meta.json, so a restore finds the same data even after the directory moved.
  """

  def __init__(self, path: str):
    self.meta = read_meta(path)
    paths = [os.fspath(as_path(path) / s) for s in self.meta["shards"]]
    missing = [p for p in paths if not as_path(p).is_file()]
    if missing:
      raise DataNotFoundError(f"{len(missing)} shard(s) listed in {path}/{META_FILE} are missing, "
                              f"e.g. {missing[0]}; copy the whole directory or precompute again")
    self._source = grain.sources.ArrayRecordDataSource(paths)
    if len(self._source) != self.meta["num_examples"]:
      raise DataNotFoundError(f"the shards in {path} hold {len(self._source)} records, meta.json "
                              f"says {self.meta['num_examples']}: precompute the data again")
    blob = json.dumps(self.meta, sort_keys=True).encode()
    self._fingerprint = hashlib.sha1(blob).hexdigest()[:16]

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    return deserialize_example(self._source[index])

  def __repr__(self) -> str:
    return f"LatentsSource(meta_sha1={self._fingerprint}, n={len(self)})"


class PickCaption(grain.transforms.RandomMap):
  """A record -> the trainer's example: latents and one of its K captions, all float32/int32.

  The caption is drawn with the per-record generator grain derives from (seed, stream position),
  so the choice is part of the checkpointed stream. Trimmed token embeddings [L, D] are padded
  with zeros to the mask's length T. Output: {"x": float32 [h, w, c], "cond":
  {"tokens": float32 [T, D], "mask": int32 [T], "pooled": float32 [D], "label": int32 []}}
  (label -1: the source has none); {"x", "cond": {"label"}} for a record without text. A record
  with "logvar" (latent="moments") gives x = mean + exp(logvar / 2) * eps, eps ~ N(0, 1) drawn
  from the same generator (before the caption).
  """

  def random_map(self, record: dict, rng: np.random.Generator) -> dict:
    x = record["x"].astype(np.float32)
    if "logvar" in record:  # latent="moments": a fresh posterior sample (Large-DiT, per step)
      std = np.exp(0.5 * record["logvar"].astype(np.float32))
      x = x + std * rng.standard_normal(x.shape, dtype=np.float32)
    if "tokens" not in record:  # a labelled dataset without text: the class-conditional batch
      return {"x": x, "cond": {"label": np.int32(record["label"])}}
    mask = record["mask"]
    k = int(rng.integers(mask.shape[0]))
    stored = record["tokens"][k]
    tokens = np.zeros((mask.shape[1], stored.shape[-1]), np.float32)
    tokens[:stored.shape[0]] = stored
    return {"x": x,
            "cond": {"tokens": tokens,
                     "mask": record["mask"][k].astype(np.int32),
                     "pooled": record["pooled"][k].astype(np.float32),
                     "label": np.int32(record["label"])}}


def _get(cfg, key, default):
  value = cfg.get(key, default)
  return default if value is None else value


def latents_train_iterator(cfg, *, global_batch_size: int, seed: int,
                           process_index: int | None = None,
                           process_count: int | None = None) -> grain.DataLoaderIterator:
  """An endless, shuffled, per-process sharded, checkpointable iterator over precomputed latents.

  Args:
    cfg: the data ConfigDict (name "latents", path; see the module docstring).
    global_batch_size: examples per step over all processes; divisible by process_count.
    seed: shuffle and caption-choice seed; same seed -> identical stream.
    process_index: this process's shard; default jax.process_index().
    process_count: number of shards; default jax.process_count().

  Returns:
    a grain DataLoaderIterator of {"x": float32 [B_local, h, w, c], "cond": {"tokens": float32
    [B_local, T, D], "mask": int32 [B_local, T], "pooled": float32 [B_local, D], "label": int32
    [B_local] (-1 where the source has no label)}},
    B_local = global_batch_size // process_count, with `get_state()`/`set_state()` that resume
    the stream exactly.
  """
  path = _path(cfg)
  process_index, process_count, local_batch_size = _loader.local_batch(
      global_batch_size, process_index, process_count)
  mixed = _mixture(cfg)
  if mixed is not None:
    entries, infos = mixed
    worker_count = int(_get(cfg, "worker_count", 0))
    if worker_count > 0 and not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()  # grain's workers read absl flags (as in loader.make_loader)
    return iter(_mix.mixed_dataset(
        [LatentsSource(p) for p, _ in entries],
        _mix.weights(entries, [i.num_examples for i in infos]), [PickCaption()], seed=seed,
        process_index=process_index, process_count=process_count,
        local_batch_size=local_batch_size, worker_count=worker_count,
        worker_buffer_size=int(_get(cfg, "worker_buffer_size", 1)),
        read_options=grain.ReadOptions(
            num_threads=int(_get(cfg, "read_threads", 8)),
            prefetch_buffer_size=int(_get(cfg, "read_buffer_size", 4 * local_batch_size)))))
  source = LatentsSource(path)
  if len(source) // process_count < local_batch_size:
    raise ConfigError(f"the latents at {path} hold {len(source)} examples, fewer than one batch "
                      f"of {local_batch_size} per process ({process_count} processes)")
  return _loader.make_loader(
      source, [PickCaption()], cfg, local_batch_size=local_batch_size, seed=seed,
      process_index=process_index, process_count=process_count,
      read_threads=int(_get(cfg, "read_threads", 8)),
      read_buffer_size=int(_get(cfg, "read_buffer_size", 4 * local_batch_size)))
