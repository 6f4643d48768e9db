"""An image folder with one subfolder per class: `root/<class_name>/<image file>`.

Classes are the sorted subfolder names (label = position in that list); files are read with PIL
and converted to RGB (or L when data.channels == 1).
"""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from common.errors import DataNotFoundError, ShapeError
from common.paths import as_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


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


def read_image(path: str | os.PathLike, channels: int) -> np.ndarray:
  """Reads `path` (local or gs://) with PIL as uint8 [H, W, channels] (channels 1 -> L, 3 -> RGB)."""
  if channels not in (1, 3):
    raise ShapeError(f"image folder: data.channels must be 1 or 3, got {channels}")
  try:
    with as_path(path).open("rb") as f, Image.open(f) as image:
      image = image.convert("L" if channels == 1 else "RGB")
      arr = np.asarray(image, dtype=np.uint8)
  except OSError as e:
    raise DataNotFoundError(f"cannot read image {path}: {e}") from e
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
