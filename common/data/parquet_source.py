"""Captioned images from parquet caption tables and a folder of images.

Each table (one file, a glob, or a comma-separated list) holds a column of image paths relative to
`image_dir` and a column of captions, named by flags (`--image_column`, `--caption_column`).
DiffusionDB ships this way (`metadata-large.parquet`: `image_name` + `prompt`, read by
micro_diffusion's `datasets/prepare/diffdb/convert.py`). Only the two columns are read (pyarrow);
rows keep the tables' order. A row with a null or empty caption, a path outside `image_dir` or a
missing file, a damaged image or one smaller than `min_side` is skipped when it is read
(`captions.SkipExample`, counted by the precompute writer).
"""

from __future__ import annotations

import os
import posixpath

import pyarrow as pa
import pyarrow.parquet as pq

from common.data import captions as _captions
from common.data import webdataset_source as _wds
from common.errors import ConfigError, DataNotFoundError, ShapeError
from common.paths import as_path, is_remote


class ParquetCaptions:
  """Random access to the (image, caption) rows of parquet tables (see the module docstring).

  Args:
    tables: the parquet files (`webdataset_source.expand_pattern`: braces, globs, commas).
    image_dir: the folder the image column's paths are relative to.
    image_column, caption_column: the column names.
    image_size: output side; images are center-cropped and resized to it (ADM).
    channels: 3 (RGB) or 1 (grayscale).
    min_side: images whose shorter side is below this many pixels are skipped (0: none).
  """

  def __init__(self, tables: str, image_dir: str, image_size: int, channels: int = 3, *,
               image_column: str, caption_column: str, min_side: int = 0):
    _captions.check_size(image_size, channels)
    if not image_column or not caption_column:
      raise ConfigError("--source=parquet needs --image_column and --caption_column (the column "
                        "names of the relative image paths and of the captions)")
    if not image_dir or not as_path(image_dir).is_dir():
      raise DataNotFoundError(f"--image_dir={image_dir!r} is not a directory; give the folder the "
                              f"{image_column!r} column's paths are relative to")
    self.tables, self.image_dir = tables, image_dir
    self.image_size, self.channels, self.min_side = image_size, channels, int(min_side)
    self.image_column, self.caption_column = image_column, caption_column
    self.files = _wds.expand_pattern(tables)
    images, texts = [], []  # pyarrow arrays: compact, O(1) access by row
    for path in self.files:
      try:
        with as_path(path).open("rb") as f:
          schema = pq.read_schema(f)
      except (pa.ArrowException, OSError) as e:
        raise DataNotFoundError(f"cannot read the parquet table {path}: {e}") from e
      missing = [c for c in (image_column, caption_column) if c not in schema.names]
      if missing:
        raise ConfigError(f"{path} has no column(s) {missing}; its columns: {schema.names}; set "
                          "--image_column and --caption_column")
      for name in (image_column, caption_column):
        kind = schema.field(name).type
        if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
          raise ShapeError(f"{path}: column {name!r} holds {kind}, not strings")
      try:
        with as_path(path).open("rb") as f:
          table = pq.read_table(f, columns=[image_column, caption_column])
      except (pa.ArrowException, OSError) as e:
        raise DataNotFoundError(f"cannot read the parquet table {path}: {e}") from e
      images += table.column(image_column).cast(pa.large_string()).chunks
      texts += table.column(caption_column).cast(pa.large_string()).chunks
    self._images = pa.concat_arrays(images) if images else pa.array([], pa.large_string())
    self._captions = pa.concat_arrays(texts) if texts else pa.array([], pa.large_string())
    if not len(self._images):
      raise DataNotFoundError(f"the parquet table(s) {tables!r} hold no rows")
    self._root = as_path(image_dir)
    self._real_root = None if is_remote(self._root) else self._root.resolve()

  def __len__(self) -> int:
    return len(self._images)

  def __getitem__(self, index: int) -> _captions.CaptionedExample:
    name, caption = self._images[index].as_py(), self._captions[index].as_py()
    caption = caption.strip() if caption else ""
    if not caption:
      raise _captions.SkipExample("no_caption", f"row {index} ({name!r}) has no caption")
    if not name:
      raise _captions.SkipExample("no_image", f"row {index} has no image path")
    # Lexically inside image_dir: no absolute path, no "..", before anything is opened.
    rel = posixpath.normpath(name.replace("\\", "/"))
    if posixpath.isabs(rel) or rel == ".." or rel.startswith("../"):
      raise _captions.SkipExample("path_outside_image_dir",
                                  f"row {index}: {name!r} lies outside {self.image_dir}")
    path = self._root / rel
    if self._real_root is not None and not path.resolve().is_relative_to(self._real_root):
      raise _captions.SkipExample("path_outside_image_dir",  # a symbolic link out of image_dir
                                  f"row {index}: {name!r} resolves outside {self.image_dir}")
    if not path.is_file():
      raise _captions.SkipExample("no_image", f"row {index}: {path} does not exist")
    if path.stat().length > _wds.MAX_IMAGE_BYTES:
      raise _captions.SkipExample("image_too_large", f"{path} is over "
                                  f"{_wds.MAX_IMAGE_BYTES >> 20} MiB")
    with path.open("rb") as f:
      image = _captions.decode_or_skip(f, path, image_size=self.image_size,
                                       channels=self.channels, min_side=self.min_side)
    return _captions.CaptionedExample(image, (caption,), -1)

  def describe(self) -> dict:
    """What identifies this source's content (stored in precompute.json / meta.json)."""
    return {"source": "parquet", "tables": list(self.files),
            "image_dir": os.fspath(self.image_dir), "image_column": self.image_column,
            "caption_column": self.caption_column, "min_side": self.min_side}
