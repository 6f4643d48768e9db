"""In-memory datasets: scikit-learn's digits (embedded default), Fashion-MNIST from idx files, and
SYNTHETIC random images.

Digits and Fashion-MNIST are small enough to hold as uint8 arrays; `ArraySource` serves them to
grain by index. `SyntheticSource` computes random images of any shape (and, when asked, caption
embeddings) from their index (smoke tests and throughput runs of full-size configs without a dataset; a model
learns nothing from it).
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct

from etils import epath
import numpy as np

from common.errors import ConfigError, DataNotFoundError, ShapeError
from common.paths import as_path

FASHION_MNIST_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_SIZE = 28
FASHION_MNIST_CLASSES = 10
DIGITS_SIZE = 8
DIGITS_CLASSES = 10
DIGITS_EXAMPLES = 1797

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions [N, rows, cols]
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension [N]
_FMNIST_PREFIX = {"train": "train", "test": "t10k"}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What a model needs to know about a dataset, computed without reading the images.

  Attributes:
    image_size: side of the square images the pipeline yields, in pixels.
    channels: number of image channels C.
    num_classes: number of classes (labels lie in [0, num_classes)); 0 for unlabeled data.
    num_examples: number of examples in the configured split.
    synthetic: True for random images (data.name="synthetic"), not a dataset; shown in the repr.
  """
  image_size: int
  channels: int
  num_classes: int
  num_examples: int
  synthetic: bool = False

  def __repr__(self) -> str:
    kind = "SYNTHETIC random images, not a dataset; " if self.synthetic else ""
    return (f"DatasetInfo({kind}image_size={self.image_size}, channels={self.channels}, "
            f"num_classes={self.num_classes}, num_examples={self.num_examples})")


class ArraySource:
  """A grain random-access source over uint8 images [N, H, W, C] and int labels [N].

  `repr` is deterministic (name, split, size) because grain stores it in the iterator state and
  checks it on restore.
  """

  def __init__(self, images: np.ndarray, labels: np.ndarray, name: str, split: str):
    if images.ndim != 4 or images.shape[0] != labels.shape[0]:
      raise ShapeError(
          f"{name}: expected images [N, H, W, C] and labels [N], got {images.shape} and "
          f"{labels.shape}")
    self.images = images
    self.labels = labels
    self.name = name
    self.split = split

  def __len__(self) -> int:
    return self.images.shape[0]

  def __getitem__(self, index: int) -> dict:
    return {"image": self.images[index], "label": int(self.labels[index])}

  def __repr__(self) -> str:
    return (f"ArraySource(name={self.name!r}, split={self.split!r}, "
            f"shape={tuple(self.images.shape)})")


# ----------------------------------------------------------------------------------------------
# SYNTHETIC random images

SYNTHETIC_DEFAULT_EXAMPLES = 10_000
SYNTHETIC_DEFAULT_CLASSES = 1000


class SyntheticSource:
  """A grain source of SYNTHETIC random images: example i is a function of (seed, i) only.

  Each image is a random low-frequency pattern (a 4x4 uint8 grid upsampled to the full size with
  nearest neighbours) plus uniform pixel noise, so it compresses and resizes like a picture rather
  than white noise; its label is uniform in [0, num_classes). Nothing is held in memory, any
  `image_size` works, and the same (seed, index) always gives the same example (so iterator
  checkpoints resume exactly).

  With `text_len` and `text_width` (a stand-in for precomputed latents with caption embeddings,
  `common.data.latents`) each example also carries SYNTHETIC caption embeddings: "text" =
  {"tokens": float32 [text_len, text_width] standard normal at every position (a real encoder's
  padding positions are not zero either), "mask": int32 [text_len] with the first n in
  [1, text_len] positions real, "pooled": float32 [text_width] standard normal}.
  """

  def __init__(self, image_size: int, channels: int, num_classes: int, num_examples: int,
               seed: int = 0, text_len: int = 0, text_width: int = 0):
    if image_size <= 0 or channels <= 0 or num_classes < 0 or num_examples <= 0:
      raise ConfigError(
          f"synthetic data needs positive image_size, channels and num_examples and "
          f"num_classes >= 0; got {image_size}, {channels}, {num_examples}, {num_classes}")
    if (text_len > 0) != (text_width > 0) or text_len < 0 or text_width < 0:
      raise ConfigError(f"synthetic captions need both data.text_len and data.text_width > 0 (or "
                        f"neither); got {text_len} and {text_width}")
    self.image_size, self.channels = int(image_size), int(channels)
    self.num_classes, self.num_examples, self.seed = int(num_classes), int(num_examples), int(seed)
    self.text_len, self.text_width = int(text_len), int(text_width)

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int) -> dict:
    rng = np.random.default_rng([self.seed, int(index)])
    n = self.image_size
    coarse = rng.integers(0, 256, (4, 4, self.channels), dtype=np.int16)
    reps = -(-n // 4)
    base = coarse.repeat(reps, axis=0).repeat(reps, axis=1)[:n, :n]
    noise = rng.integers(-32, 33, (n, n, self.channels), dtype=np.int16)
    image = np.clip(base + noise, 0, 255).astype(np.uint8)
    label = int(rng.integers(0, self.num_classes)) if self.num_classes else 0
    example = {"image": image, "label": label}
    if self.text_len:
      real = int(rng.integers(1, self.text_len + 1))
      example["text"] = {
          "tokens": rng.standard_normal((self.text_len, self.text_width), dtype=np.float32),
          "mask": (np.arange(self.text_len) < real).astype(np.int32),
          "pooled": rng.standard_normal((self.text_width,), dtype=np.float32)}
    return example

  def __repr__(self) -> str:
    text = (f", text={self.text_len}x{self.text_width}" if self.text_len else "")
    return (f"SyntheticSource(SYNTHETIC, image_size={self.image_size}, channels={self.channels}, "
            f"num_classes={self.num_classes}, n={self.num_examples}, seed={self.seed}{text})")


# ----------------------------------------------------------------------------------------------
# scikit-learn digits


def load_digits(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """scikit-learn's digits (bundled with the wheel, no download).

  Args:
    split: only "train" (all 1797 images) exists.

  Returns:
    images uint8 [1797, 8, 8, 1] in [0, 255] (the 0..16 intensities scaled by 255 / 16, rounded),
    labels int32 [1797] in [0, 10).
  """
  if split != "train":
    raise ConfigError(f"digits has only a 'train' split (all 1797 images), got split={split!r}")
  # Heavy (scikit-learn takes ~2 s to import) and needed by this source only.
  from sklearn.datasets import load_digits as sk_load_digits  # pylint: disable=g-import-not-at-top
  bunch = sk_load_digits()
  images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
  return images, bunch.target.astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST (idx files)


def _find_idx_file(directory: str | os.PathLike, stem: str) -> epath.Path:
  """Returns the path of `stem` or `stem.gz` in `directory` (local or gs://), or raises
  DataNotFoundError."""
  directory = as_path(directory)
  for candidate in (stem, stem + ".gz"):
    path = directory / candidate
    if path.is_file():
      return path
  present = sorted(p.name for p in directory.iterdir()) if directory.is_dir() else None
  raise DataNotFoundError(
      f"Fashion-MNIST file {stem}(.gz) not found in {directory} "
      f"({'directory does not exist' if present is None else f'it holds {present}'}). "
      "Install the Debian package `dataset-fashion-mnist` (files under "
      f"{FASHION_MNIST_DEFAULT_DIR}) or put the four idx files from "
      "https://github.com/zalandoresearch/fashion-mnist there and set data.path.")


def _read_idx(path: epath.Path, magic: int, ndim: int, header_only: bool = False):
  """Reads an idx file (gzipped if its name ends in .gz): big-endian int32 magic, `ndim` int32
  sizes, then uint8 data.

  Returns:
    the sizes tuple if header_only, else the uint8 array of that shape.
  """
  with path.open("rb") as raw, (gzip.GzipFile(fileobj=raw, mode="rb")
                                if path.name.endswith(".gz") else raw) as f:
    header = f.read(4 * (1 + ndim))
    if len(header) != 4 * (1 + ndim):
      raise ShapeError(f"{path}: truncated idx header")
    got_magic, *dims = struct.unpack(f">{1 + ndim}i", header)
    if got_magic != magic:
      raise ShapeError(
          f"{path}: idx magic number {got_magic:#010x}, expected {magic:#010x} "
          f"(uint8 data, {ndim} dimension(s))")
    if header_only:
      return tuple(dims)
    data = f.read()
  expected = int(np.prod(dims))
  if len(data) != expected:
    raise ShapeError(f"{path}: header says {dims} = {expected} bytes of data, found {len(data)}")
  return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _fmnist_paths(directory: str | os.PathLike, split: str) -> tuple[epath.Path, epath.Path]:
  if split not in _FMNIST_PREFIX:
    raise ConfigError(f"fashion_mnist splits are 'train' and 'test', got split={split!r}")
  prefix = _FMNIST_PREFIX[split]
  return (_find_idx_file(directory, f"{prefix}-images-idx3-ubyte"),
          _find_idx_file(directory, f"{prefix}-labels-idx1-ubyte"))


def fashion_mnist_num_examples(directory: str, split: str = "train") -> int:
  """Number of examples in a Fashion-MNIST split, read from the labels file header only."""
  _, labels_path = _fmnist_paths(directory, split)
  (n,) = _read_idx(labels_path, _IDX_LABELS_MAGIC, 1, header_only=True)
  return n


def load_fashion_mnist(directory: str, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """Fashion-MNIST from its idx files (gzipped or not).

  Args:
    directory: holds `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
      `t10k-images-idx3-ubyte[.gz]`, `t10k-labels-idx1-ubyte[.gz]`.
    split: "train" (60000) or "test" (10000).

  Returns:
    images uint8 [N, 28, 28, 1], labels int32 [N] in [0, 10).
  """
  images_path, labels_path = _fmnist_paths(directory, split)
  images = _read_idx(images_path, _IDX_IMAGES_MAGIC, 3)
  labels = _read_idx(labels_path, _IDX_LABELS_MAGIC, 1)
  if images.shape[1:] != (FASHION_MNIST_SIZE, FASHION_MNIST_SIZE):
    raise ShapeError(
        f"{images_path}: images are {images.shape[1]}x{images.shape[2]}, Fashion-MNIST is "
        f"{FASHION_MNIST_SIZE}x{FASHION_MNIST_SIZE}")
  if images.shape[0] != labels.shape[0]:
    raise ShapeError(
        f"{directory}: {images.shape[0]} images but {labels.shape[0]} labels in split {split!r}")
  if labels.size and labels.max() >= FASHION_MNIST_CLASSES:
    raise ShapeError(f"{labels_path}: label {labels.max()} outside [0, {FASHION_MNIST_CLASSES})")
  return images[..., None], labels.astype(np.int32)
