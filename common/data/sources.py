"""In-memory datasets: scikit-learn's digits (embedded default) and Fashion-MNIST from idx files.

Both are small enough to hold as uint8 arrays; `ArraySource` serves them to grain by index.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct

import numpy as np

from common.errors import ConfigError, DataNotFoundError, ShapeError

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
  """
  image_size: int
  channels: int
  num_classes: int
  num_examples: int


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
  from sklearn.datasets import load_digits as sk_load_digits  # pylint: disable=g-import-not-at-top
  bunch = sk_load_digits()
  images = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[..., None]
  return images, bunch.target.astype(np.int32)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST (idx files)


def _find_idx_file(directory: str, stem: str) -> str:
  """Returns the path of `stem` or `stem.gz` in `directory`, or raises DataNotFoundError."""
  for candidate in (stem, stem + ".gz"):
    path = os.path.join(directory, candidate)
    if os.path.isfile(path):
      return path
  present = sorted(os.listdir(directory)) if os.path.isdir(directory) else None
  raise DataNotFoundError(
      f"Fashion-MNIST file {stem}(.gz) not found in {directory} "
      f"({'directory does not exist' if present is None else f'it holds {present}'}). "
      "Install the Debian package `dataset-fashion-mnist` (files under "
      f"{FASHION_MNIST_DEFAULT_DIR}) or put the four idx files from "
      "https://github.com/zalandoresearch/fashion-mnist there and set data.path.")


def _open(path: str):
  return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")


def _read_idx(path: str, magic: int, ndim: int, header_only: bool = False):
  """Reads an idx file: big-endian int32 magic, `ndim` int32 sizes, then uint8 data.

  Returns:
    the sizes tuple if header_only, else the uint8 array of that shape.
  """
  with _open(path) as f:
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


def _fmnist_paths(directory: str, split: str) -> tuple[str, str]:
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
