"""Image grids: uint8 conversion and PNG writing (local or gs:// paths, through epath)."""

import io
import os

import numpy as np
from PIL import Image

from common.paths import as_path


def to_uint8(x) -> np.ndarray:
  """Maps float images in [-1, 1] ([N, H, W, C]) to uint8 in [0, 255]."""
  x = np.asarray(x, dtype=np.float32)
  return np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def make_grid(images: np.ndarray, ncols: int, pad: int = 1, min_tile: int = 32) -> np.ndarray:
  """Tiles uint8 images [N, H, W, C] into one [rows*(H'+pad)+pad, cols*(W'+pad)+pad, C] image.

  Tiles smaller than `min_tile` pixels are enlarged by an integer factor (nearest neighbour) so small
  images such as 8x8 digits are visible.
  """
  images = np.asarray(images)
  if images.ndim != 4:
    raise ValueError(f"expected images [N, H, W, C], got shape {images.shape}")
  n, h, w, c = images.shape
  factor = max(1, -(-min_tile // max(h, w)))
  if factor > 1:
    images = images.repeat(factor, axis=1).repeat(factor, axis=2)
    h, w = h * factor, w * factor
  ncols = max(1, min(ncols, n))
  nrows = -(-n // ncols)
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, ncols)
    grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = images[i]
  return grid


def save_grid(images: np.ndarray, path: str | os.PathLike, ncols: int) -> str:
  """Writes a PNG grid of uint8 images [N, H, W, C] to `path` (local or gs://); returns the path."""
  grid = make_grid(images, ncols)
  target = as_path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  buffer = io.BytesIO()
  Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(buffer, format="PNG")
  target.write_bytes(buffer.getvalue())
  return os.fspath(target)
