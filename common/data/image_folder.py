"""An image folder with one subfolder per class: `root/<class_name>/<image file>`.

Classes are the sorted subfolder names (label = position in that list); files are read with PIL
and converted to RGB (or L when data.channels == 1).
"""

from __future__ import annotations

import os
import struct
import zlib

import numpy as np
from PIL import Image

from common.errors import DataNotFoundError, ShapeError
from common.paths import as_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")

# Largest image decoded: 8192 x 8192 pixels (0.2 GB as RGB), checked from the header before any
# decoding. PIL's own decompression-bomb limit is set to the same value on purpose (it would
# otherwise warn only from 89M pixels and refuse from 179M, after a 0.5 GB allocation).
MAX_IMAGE_PIXELS = 8192 * 8192
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

# What PIL raises on damaged or hostile files: unidentified or truncated data (OSError), broken
# PNG chunks and bad checksums (SyntaxError), bad headers (ValueError, struct.error, EOFError,
# IndexError), bad deflate streams (zlib.error).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


def _too_large(path, size: str, max_pixels: int) -> str:
  return (f"image {path} is too large to decode ({size}); at most {max_pixels} pixels are decoded "
          "(a decompression bomb, or an image to downscale first)")


def list_images(root: str | os.PathLike) -> tuple[list[str], list[str], list[int]]:
  """Lists the images under `root` (a local or gs:// directory).

  Returns:
    (class names sorted, image paths sorted by class then file name, labels [N]).
  """
  if not root or not as_path(root).is_dir():
    raise DataNotFoundError(
        f"image folder {root!r} does not exist. Set data.path to a directory holding one "
        "subfolder per class (root/<class>/<image>.png|jpg|...).")
  root = as_path(root)
  classes = sorted(d.name for d in root.iterdir() if not d.name.startswith(".") and d.is_dir())
  if not classes:
    raise DataNotFoundError(
        f"image folder {root} has no class subfolders; expected root/<class>/<image> files.")
  paths, labels = [], []
  for label, name in enumerate(classes):
    for f in sorted(p.name for p in (root / name).iterdir()):
      if not f.startswith(".") and f.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(os.fspath(root / name / f))
        labels.append(label)
  if not paths:
    raise DataNotFoundError(
        f"image folder {root} has class subfolders {classes[:5]}... but no image files with "
        f"extensions {IMAGE_EXTENSIONS}.")
  return classes, paths, labels


def read_image(path: str | os.PathLike, channels: int, *,
               max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
  """Reads `path` (local or gs://) with PIL as uint8 [H, W, channels] (channels 1 -> L, 3 -> RGB).

  The file is checked before it is decoded: its header's size must be at most `max_pixels`
  (width x height), and `Image.verify` must pass (for PNG: every chunk's CRC, so a damaged file is
  refused rather than decoded into wrong pixels). A truncated, damaged, oversized or non-image
  file raises DataNotFoundError naming the file; nothing is skipped silently.
  """
  try:
    f = as_path(path).open("rb")
  except OSError as e:
    raise DataNotFoundError(f"cannot read image {path}: {type(e).__name__}: {e}") from e
  with f:
    return decode_image(f, path, channels, max_pixels=max_pixels)


def decode_image(f, name: str | os.PathLike, channels: int, *,
                 max_pixels: int = MAX_IMAGE_PIXELS) -> np.ndarray:
  """`read_image` of an open, seekable binary file `f` (e.g. `io.BytesIO` of a tar member) that
  messages call `name`: the same header size check, `Image.verify` and errors."""
  path = name
  if channels not in (1, 3):
    raise ShapeError(f"image folder: data.channels must be 1 or 3, got {channels}")
  try:
    with Image.open(f) as image:  # reads the header only
      width, height = image.size
      if width * height > max_pixels:
        raise DataNotFoundError(_too_large(path, f"{width}x{height} = {width * height} pixels",
                                           max_pixels))
      image.verify()
    f.seek(0)
    with Image.open(f) as image:
      arr = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
  except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:  # PIL's own check
    raise DataNotFoundError(_too_large(path, str(e), max_pixels)) from e
  except Image.UnidentifiedImageError as e:
    raise DataNotFoundError(f"cannot read image {path}: not an image file PIL can identify") from e
  except _DECODE_ERRORS as e:
    raise DataNotFoundError(f"cannot read image {path}: the file is damaged or not a valid image "
                            f"({type(e).__name__}: {e})") from e
  if arr.shape[:2] != (height, width):
    raise DataNotFoundError(f"cannot read image {path}: decoded {arr.shape[1]}x{arr.shape[0]}, its "
                            f"header says {width}x{height}")
  return arr[:, :, None] if channels == 1 else arr


class ImageFolderSource:
  """Grain source over an image folder, yielding {"image": uint8 [H, W, C], "label": int}."""

  def __init__(self, root: str, channels: int = 3):
    self.root = root
    self.channels = channels
    self.classes, self.paths, self.labels = list_images(root)

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> dict:
    return {"image": read_image(self.paths[index], self.channels), "label": self.labels[index]}

  def __repr__(self) -> str:
    return (f"ImageFolderSource(root={self.root!r}, classes={len(self.classes)}, "
            f"n={len(self.paths)}, channels={self.channels})")
