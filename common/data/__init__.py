"""Grain input pipelines: digits (embedded), fashion_mnist, tfds (array_record), image_folder, and
SYNTHETIC random images (optionally with SYNTHETIC caption embeddings).

Public API (see docs/DESIGN.md, "Data contract"):

- `make_train_iterator(cfg, *, global_batch_size, seed, process_index=None, process_count=None)`:
  an endless, shuffled, checkpointable grain iterator (`get_state()` -> bytes, `set_state(bytes)`)
  of `{"x": float32 [B_local, H, W, C] in [-1, 1], "cond": {"label": int32 [B_local]}}` with
  B_local = global_batch_size // process_count. Each process reads a disjoint shard.
- `dataset_info(cfg)` -> `DatasetInfo(image_size, channels, num_classes, num_examples)` without
  reading images.
- `load_arrays(cfg, split="train", limit=None)` -> (uint8 [N, H, W, C], int32 [N]), the images
  exactly as the training pipeline sees them before flips and scaling (for evaluation code).

`cfg` is the `config.data` ConfigDict:

  name          "digits" | "fashion_mnist" | "tfds" | "image_folder" | "synthetic"
  image_size    output side in pixels. digits (8) and fashion_mnist (28) are served at their native
                size only: another value raises ConfigError (no resizing of low-res sets).
                tfds and image_folder images go through ADM's center crop + resize to it; for tfds
                it may be omitted when the dataset's images are square with a fixed size.
  channels      optional; 1 for digits/fashion_mnist, 3 by default for image_folder, the dataset's
                own for tfds. Images that do not match raise ShapeError.
  random_flip   random horizontal flips (default False), deterministic per (seed, stream position).
  path          fashion_mnist idx directory (default /usr/share/datasets/fashion-mnist) or the
                image_folder root.
  tfds_name, data_dir, image_key ("image"), label_key ("label"; None: unlabeled, all labels 0)
                for tfds.
  split         "train" by default.
  num_classes, num_examples, seed   synthetic only: SYNTHETIC random images (not a dataset, for
                smoke and throughput runs of real-size configs) of data.image_size (required) and
                data.channels (default 3); labels uniform in [0, num_classes) (default 1000);
                num_examples default 10000; example i depends only on (seed, i) (default seed 0;
                the shuffle order follows config.seed as for every source). Marked SYNTHETIC in
                `dataset_info` and in a line printed when the training iterator is made.
  mixture       latents only: ((path, weight), ...) instead of path (`common.data.mixture`).
  text_len, text_width  synthetic only, both or neither: SYNTHETIC caption embeddings beside the
                images, a stand-in for precomputed latents (`data.name="latents"`) in smoke runs
                of text-to-image configs at their real shapes: batches then also carry cond
                "tokens" float32 [B, text_len, text_width], "mask" int32 [B, text_len] and
                "pooled" float32 [B, text_width] (`sources.SyntheticSource`). Latent-shaped x
                comes from image_size = the latent side and channels = the latent channels.
  worker_count  grain worker processes (default 0: in the calling process). The stream depends on
                it (each worker batches its own records), and a saved state restores only into
                an iterator with the same worker_count (grain checks).
  worker_buffer_size  batches each worker prepares ahead (default 1).
  read_threads, read_buffer_size  grain ReadOptions of each process: threads reading and decoding
                examples and their prefetch buffer (defaults 0, 0 for digits/fashion_mnist, which
                sit in memory; 8 threads and 4 local batches for tfds/image_folder).

Unknown names or keys raise ConfigError. tensorflow_datasets is imported only when a tfds dataset is
used.
"""

from __future__ import annotations

import zlib

import grain
import numpy as np

from common.data import image_folder as _image_folder
from common.data import latents as _latents
from common.data import loader as _loader
from common.data import sources as _sources
from common.data import tfds_source as _tfds
from common.data import transforms as _transforms
from common.data.sources import DatasetInfo
from common.data.transforms import center_crop_arr
from common.errors import ConfigError, ShapeError

__all__ = ["DatasetInfo", "center_crop_arr", "dataset_info", "load_arrays", "make_train_iterator"]

NAMES = ("digits", "fashion_mnist", "tfds", "image_folder", "synthetic", "latents")
KNOWN_KEYS = frozenset({
    "name", "image_size", "channels", "random_flip", "path", "tfds_name", "data_dir", "split",
    "worker_count", "worker_buffer_size", "read_threads", "read_buffer_size", "image_key",
    "label_key", "num_classes", "num_examples", "seed", "mixture", "text_len", "text_width"})
_SYNTHETIC_ONLY = frozenset({"num_classes", "num_examples", "seed", "text_len", "text_width"})


def _get(cfg, key, default=None):
  """`cfg.get(key, default)`, also treating an explicit None as absent."""
  value = cfg.get(key, default)
  return default if value is None else value


def _check_config(cfg) -> str:
  """Validates the name and keys of `cfg`; returns the name."""
  name = cfg.get("name", None)
  if name not in NAMES:
    raise ConfigError(f"data.name must be one of {NAMES}, got {name!r}")
  unknown = sorted(set(cfg.keys()) - KNOWN_KEYS)
  if unknown:
    raise ConfigError(f"unknown data config key(s) {unknown}; known keys: {sorted(KNOWN_KEYS)}")
  misplaced = sorted(k for k in _SYNTHETIC_ONLY & set(cfg.keys()) if cfg[k] is not None)
  if misplaced and name != "synthetic":
    raise ConfigError(f"data key(s) {misplaced} apply to data.name='synthetic' only, not {name!r}")
  if cfg.get("mixture", None) and name != "latents":
    raise ConfigError(f"data.mixture applies to data.name='latents' only, not {name!r}")
  return name


def _native_size(cfg, name: str, native: int) -> int:
  """image_size for a fixed-size dataset: absent or equal to `native`, else ConfigError."""
  size = _get(cfg, "image_size", native)
  if size != native:
    raise ConfigError(
        f"data.image_size={size} but {name} images are {native}x{native}; this pipeline serves "
        f"{name} at its native size only (set data.image_size={native})")
  channels = _get(cfg, "channels", 1)
  if channels != 1:
    raise ConfigError(f"data.channels={channels} but {name} images have 1 channel")
  return size


def _fmnist_dir(cfg) -> str:
  return _get(cfg, "path", _sources.FASHION_MNIST_DEFAULT_DIR)


def _positive_size(size, name: str) -> int:
  if not isinstance(size, int) or size <= 0:
    raise ConfigError(f"data.name={name!r} needs a positive integer data.image_size, got {size!r}")
  return size


def _tfds_info(cfg) -> DatasetInfo:
  summary = _tfds.features_summary(cfg)
  shape = summary["image_shape"]
  native_channels = shape[-1] if len(shape) == 3 else (1 if len(shape) == 2 else None)
  channels = _get(cfg, "channels", native_channels or 3)
  if native_channels is not None and channels != native_channels:
    raise ShapeError(
        f"tfds dataset {cfg.tfds_name!r} has images of shape {shape} ({native_channels} "
        f"channel(s)) but data.channels={channels}")
  size = cfg.get("image_size", None)
  if size is None:
    if len(shape) >= 2 and shape[0] is not None and shape[0] == shape[1]:
      size = shape[0]
    else:
      raise ConfigError(f"tfds dataset {cfg.tfds_name!r} has images of shape {shape}: set "
                        "data.image_size to crop and resize them to")
  return DatasetInfo(image_size=_positive_size(size, "tfds"), channels=channels,
                     num_classes=summary["num_classes"], num_examples=summary["num_examples"])


def dataset_info(cfg) -> DatasetInfo:
  """Image size, channels, number of classes and of examples (of cfg.split), without images.

  digits: (8, 1, 10, 1797); fashion_mnist: (28, 1, 10, 60000) for "train" (read from the labels
  file header); tfds: from the prepared dataset's metadata; image_folder: from a directory listing;
  synthetic: from the config, with `synthetic=True` (its repr says SYNTHETIC).
  """
  name = _check_config(cfg)
  split = _get(cfg, "split", "train")
  if name == "synthetic":
    size = _positive_size(cfg.get("image_size", None), name)
    num_classes = _get(cfg, "num_classes", _sources.SYNTHETIC_DEFAULT_CLASSES)
    return DatasetInfo(size, _get(cfg, "channels", 3), num_classes,
                       _get(cfg, "num_examples", _sources.SYNTHETIC_DEFAULT_EXAMPLES),
                       synthetic=True)
  if name == "digits":
    if split != "train":
      raise ConfigError(f"digits has only a 'train' split, got data.split={split!r}")
    return DatasetInfo(_native_size(cfg, name, _sources.DIGITS_SIZE), 1,
                       _sources.DIGITS_CLASSES, _sources.DIGITS_EXAMPLES)
  if name == "fashion_mnist":
    size = _native_size(cfg, name, _sources.FASHION_MNIST_SIZE)
    return DatasetInfo(size, 1, _sources.FASHION_MNIST_CLASSES,
                       _sources.fashion_mnist_num_examples(_fmnist_dir(cfg), split))
  if name == "tfds":
    return _tfds_info(cfg)
  if name == "latents":
    info = _latents.latents_info(cfg)
    h, _, c = info.latent_shape
    return DatasetInfo(h, c, 0, info.num_examples)
  size = _positive_size(cfg.get("image_size", None), name)
  channels = _get(cfg, "channels", 3)
  if channels not in (1, 3):
    raise ConfigError(
        f"image_folder: data.channels must be 1 (grayscale) or 3 (RGB), got {channels}")
  classes, paths, _ = _image_folder.list_images(cfg.get("path", None))
  return DatasetInfo(size, channels, len(classes), len(paths))


def _source_and_ops(cfg, split: str):
  """Returns (grain source, per-example uint8 ops ending in the shape check, DatasetInfo)."""
  name = _check_config(cfg)
  if name == "latents":
    raise ConfigError("data.name='latents' holds encoded latents, not images: point evaluation and "
                      "image tools at the image dataset the latents were made from.")
  info = dataset_info(cfg)
  ops = []
  if name == "digits":
    source = _sources.ArraySource(*_sources.load_digits(split), name=name, split=split)
  elif name == "fashion_mnist":
    source = _sources.ArraySource(*_sources.load_fashion_mnist(_fmnist_dir(cfg), split),
                                  name=name, split=split)
  elif name == "tfds":
    source = _tfds.TfdsSource(cfg, split)
    ops.append(_transforms.CenterCropResize(info.image_size))
  elif name == "synthetic":
    # A different split gets different images: the split name enters the seed.
    seed = int(_get(cfg, "seed", 0)) + (0 if split == "train" else zlib.crc32(split.encode()))
    source = _sources.SyntheticSource(info.image_size, info.channels, info.num_classes,
                                      info.num_examples, seed=seed,
                                      text_len=int(_get(cfg, "text_len", 0)),
                                      text_width=int(_get(cfg, "text_width", 0)))
  else:
    if split != _get(cfg, "split", "train"):
      raise ConfigError(f"image_folder has one split (data.path); point data.path at the "
                        f"{split!r} folder instead of asking for split={split!r}")
    source = _image_folder.ImageFolderSource(cfg.path, info.channels)
    ops.append(_transforms.CenterCropResize(info.image_size))
  where = f"data.name={name!r} split={split!r}"
  ops.append(_transforms.CheckShape(info.image_size, info.channels, where))
  return source, ops, info


def make_train_iterator(cfg, *, global_batch_size: int, seed: int,
                        process_index: int | None = None,
                        process_count: int | None = None) -> grain.DataLoaderIterator:
  """An endless, shuffled, sharded, checkpointable training iterator.

  Each epoch is a fresh permutation of this process's shard (grain IndexSampler with
  shuffle=True, num_epochs=None and ShardOptions(process_index, process_count,
  drop_remainder=True): shards are disjoint, equal-sized, and together cover the data but for
  fewer than process_count examples).

  Args:
    cfg: the data ConfigDict (see the module docstring).
    global_batch_size: examples per step over all processes; divisible by process_count.
    seed: shuffle and flip seed; taken modulo 2**32. Same seed -> identical stream.
    process_index: this process's shard; default jax.process_index().
    process_count: number of shards; default jax.process_count().

  Returns:
    a grain DataLoaderIterator of {"x": float32 [B_local, H, W, C] in [-1, 1],
    "cond": {"label": int32 [B_local]}}, B_local = global_batch_size // process_count, with
    `get_state() -> bytes` and `set_state(bytes)` that resume bit-identically.
  """
  if cfg.get("name", None) == "latents":
    return _latents.latents_train_iterator(
        cfg, global_batch_size=global_batch_size, seed=seed, process_index=process_index,
        process_count=process_count)
  process_index, process_count, local_batch_size = _loader.local_batch(
      global_batch_size, process_index, process_count)
  split = _get(cfg, "split", "train")
  source, ops, info = _source_and_ops(cfg, split)
  if info.synthetic and process_index == 0:
    text = (f", captions {source.text_len}x{source.text_width}"
            if isinstance(source, _sources.SyntheticSource) and source.text_len else "")
    what = "images and caption embeddings" if text else "images"
    print(f"data: SYNTHETIC random {what}, not a dataset (data.name='synthetic'): {info}{text}",
          flush=True)
  # Threads only help sources that decode files; an in-memory array is read fastest inline (and
  # grain's prefetch bookkeeping costs O(buffer) per element).
  in_memory = isinstance(source, _sources.ArraySource)
  read_threads = int(_get(cfg, "read_threads", 0 if in_memory else 8))
  read_buffer_size = int(_get(cfg, "read_buffer_size", 0 if in_memory else 4 * local_batch_size))
  if _get(cfg, "random_flip", False):
    ops.append(_transforms.RandomFlip())
  ops.append(_transforms.ToModelInput())
  return _loader.make_loader(source, ops, cfg, local_batch_size=local_batch_size, seed=seed,
                             process_index=process_index, process_count=process_count,
                             read_threads=read_threads, read_buffer_size=read_buffer_size)


def load_arrays(cfg, split: str = "train",
                limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The images and labels of a split, in source order, as the pipeline sees them.

  Images are cropped/resized like in training but neither flipped nor scaled.

  Args:
    cfg: the data ConfigDict.
    split: "train" or another split of the dataset ("test" for fashion_mnist).
    limit: return only the first `limit` examples (tfds and image folders are read one by one).

  Returns:
    images uint8 [N, H, W, C], labels int32 [N].
  """
  name = _check_config(cfg)
  if name == "digits":
    images, labels = _sources.load_digits(split)
    _native_size(cfg, name, _sources.DIGITS_SIZE)
  elif name == "fashion_mnist":
    _native_size(cfg, name, _sources.FASHION_MNIST_SIZE)
    images, labels = _sources.load_fashion_mnist(_fmnist_dir(cfg), split)
  else:
    source, ops, info = _source_and_ops(cfg, split)
    n = len(source) if limit is None else min(limit, len(source))
    images = np.empty((n, info.image_size, info.image_size, info.channels), np.uint8)
    labels = np.empty((n,), np.int32)
    for i in range(n):
      example = source[i]
      for op in ops:
        example = op.map(example)
      images[i], labels[i] = example["image"], example["label"]
    return images, labels
  if limit is not None:
    images, labels = images[:limit], labels[:limit]
  return images, labels
