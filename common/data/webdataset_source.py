"""Captioned images from webdataset tar shards, read in place (no extraction).

A webdataset shard is a plain tar whose members are grouped by key: `<key>.<ext>` files, the key
being the member name up to the first "." of its last path component (webdataset's convention).
A sample here is a key with one image (`.jpg`, `.jpeg`, `.png` or `.webp`) and one caption:
`<key>.txt` (the whole file, stripped) or `<key>.json` (its `caption_key` field, a string). CC12M
ships this way (`pixparse/cc12m-wds`, read by micro_diffusion's
`datasets/prepare/cc12m/convert.py`), as do most img2dataset downloads.

`WebDatasetCaptions` walks every shard's member headers once with `tarfile` (seeking over the
data, nothing extracted or written to disk) to index where each image and caption lies, then
serves example i by seeking to its bytes. Shards are uncompressed tars (a compressed one cannot be read at
an offset: an error says so). A key without an image or a caption is counted in `index_skipped`
and left out; a damaged or too small image is skipped when it is read (`captions.SkipExample`,
counted by the precompute writer). Shard names are given as a brace pattern
(`shards/{00000..00099}.tar`, webdataset's notation), a glob, or a comma-separated list of either.
"""

from __future__ import annotations

import glob
import io
import json
import os
import posixpath
import re
import tarfile

import numpy as np

from common.data import captions as _captions
from common.errors import ConfigError, DataNotFoundError
from common.paths import as_path

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt", "json")
# Largest member read: an image file of 64 MiB (a 8192 x 8192 PNG is far smaller) and a caption
# file of 1 MiB; larger members are skipped and counted before anything is allocated.
MAX_IMAGE_BYTES = 64 << 20
MAX_CAPTION_BYTES = 1 << 20

_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_pattern(pattern: str) -> list[str]:
  """Shard paths of `pattern`: comma-separated parts, each with `{a..b}` integer ranges (zero-padded
  to the width of `a`, as webdataset/braceexpand write them) and then glob characters.

  Returns the existing files in the order written (each glob sorted); DataNotFoundError when a part
  names no file.
  """
  if not pattern:
    raise ConfigError("--path is required: the tar shards, e.g. 'shards/{00000..00099}.tar'")
  paths: list[str] = []
  for part in (p.strip() for p in pattern.split(",") if p.strip()):
    names = [part]
    while any(_BRACE.search(n) for n in names):
      expanded = []
      for n in names:
        m = _BRACE.search(n)
        if m is None:
          expanded.append(n)
          continue
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        if hi < lo:
          raise ConfigError(f"--path={pattern!r}: empty range {m.group(0)}")
        expanded.extend(n[:m.start()] + str(i).zfill(width) + n[m.end():]
                        for i in range(lo, hi + 1))
      names = expanded
    for n in names:
      found = _glob(n) if glob.has_magic(n) else ([n] if as_path(n).is_file() else [])
      if not found:
        raise DataNotFoundError(f"--path={pattern!r}: no file matches {n!r}")
      paths.extend(found)
  return paths


def _glob(pattern: str) -> list[str]:
  """The files matching `pattern`, sorted; wildcards in the file name only (local or gs://)."""
  directory, name = posixpath.split(pattern)
  if glob.has_magic(directory):
    raise ConfigError(f"--path={pattern!r}: only the file name may hold wildcards")
  folder = as_path(directory or ".")
  if not folder.is_dir():
    return []
  return sorted(posixpath.join(directory, p.name) for p in folder.glob(name) if p.is_file())


def _split_key(member_name: str) -> tuple[str, str]:
  """webdataset's key and extension of a member name: "a/b/x.seg.jpg" -> ("a/b/x", "seg.jpg")."""
  directory, base = posixpath.split(member_name)
  stem, _, ext = base.partition(".")
  return posixpath.join(directory, stem), ext.lower()


class WebDatasetCaptions:
  """Random access to the captioned images of webdataset tar shards (see the module docstring).

  Args:
    pattern: the shards (`expand_pattern`).
    image_size: output side; images are center-cropped and resized to it (ADM).
    channels: 3 (RGB) or 1 (grayscale).
    min_side: images whose shorter side is below this many pixels are skipped (0: none).
    caption_key: the caption field of `<key>.json` files.

  Attributes:
    index_skipped: {reason: count} of keys left out while indexing ("no_image", "no_caption",
      "image_too_large", "caption_too_large").
  """

  def __init__(self, pattern: str, image_size: int, channels: int = 3, min_side: int = 0,
               caption_key: str = "caption"):
    _captions.check_size(image_size, channels)
    self.pattern, self.image_size, self.channels = pattern, image_size, channels
    self.min_side, self.caption_key = int(min_side), caption_key
    self.shards = expand_pattern(pattern)
    self.index_skipped: dict[str, int] = {}
    # [N, 6] int64: shard, image offset, image size, caption offset, caption size, caption is json
    self._rows = np.concatenate([np.zeros((0, 6), np.int64)] + [
        self._index_shard(k, shard) for k, shard in enumerate(self.shards)])
    if not len(self._rows):
      raise DataNotFoundError(
          f"the shards of --path={pattern!r} hold no sample with an image "
          f"({', '.join(IMAGE_EXTENSIONS)}) and a caption (.txt or .json) under the same key")

  def _skip(self, reason: str) -> None:
    self.index_skipped[reason] = self.index_skipped.get(reason, 0) + 1

  def _index_shard(self, shard_index: int, shard: str) -> np.ndarray:
    """One pass over a tar's headers: int64 [n, 6] rows (shard, offsets, sizes) of its complete
    samples in member order (a key's files are adjacent in a webdataset shard, but any order
    works)."""
    samples: dict[str, dict[str, tuple[int, int]]] = {}
    try:
      with as_path(shard).open("rb") as raw:
        if raw.read(2) == b"\x1f\x8b":
          raise DataNotFoundError(
              f"{shard} is gzip-compressed; webdataset shards are read at offsets and must be "
              "plain tars (gunzip them first)")
        raw.seek(0)
        with tarfile.TarFile(fileobj=raw) as tar:  # a plain tar; next() seeks over member data
          for member in tar:
            if not member.isfile():
              continue
            key, ext = _split_key(member.name)
            if ext in IMAGE_EXTENSIONS or ext in CAPTION_EXTENSIONS:
              samples.setdefault(key, {})[ext] = (member.offset_data, member.size)
    except (tarfile.TarError, OSError, EOFError) as e:
      raise DataNotFoundError(f"cannot read the tar shard {shard}: {type(e).__name__}: {e}; "
                              "download it again or leave it out of --path") from e
    rows = []
    for files in samples.values():
      image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
      caption = next(((files[e], e == "json") for e in CAPTION_EXTENSIONS if e in files), None)
      if image is None:
        self._skip("no_image")
      elif caption is None:
        self._skip("no_caption")
      elif image[1] > MAX_IMAGE_BYTES:
        self._skip("image_too_large")
      elif caption[0][1] > MAX_CAPTION_BYTES:
        self._skip("caption_too_large")
      else:
        rows.append((shard_index, *image, *caption[0], int(caption[1])))
    return np.asarray(rows, np.int64).reshape(-1, 6)

  def __len__(self) -> int:
    return len(self._rows)

  def _read(self, shard: int, offset: int, size: int) -> bytes:
    with as_path(self.shards[shard]).open("rb") as f:
      f.seek(offset)
      data = f.read(size)
    if len(data) != size:
      raise _captions.SkipExample("unreadable_image",
                                  f"{self.shards[shard]} is truncated at offset {offset}")
    return data

  def _caption(self, data: bytes, is_json: bool, where: str) -> str:
    try:
      text = data.decode("utf-8")
      if is_json:
        value = json.loads(text)
        text = value.get(self.caption_key) if isinstance(value, dict) else None
        if not isinstance(text, str):
          raise _captions.SkipExample("no_caption", f"{where} has no string field "
                                      f"{self.caption_key!r}")
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise _captions.SkipExample("bad_caption", f"{where}: {e}") from e
    text = text.strip()
    if not text:
      raise _captions.SkipExample("no_caption", f"{where} is empty")
    return text

  def __getitem__(self, index: int) -> _captions.CaptionedExample:
    shard, img_off, img_size, cap_off, cap_size, is_json = (int(v) for v in self._rows[index])
    where = f"{self.shards[shard]}@{img_off}"
    caption = self._caption(self._read(shard, cap_off, cap_size), bool(is_json), where)
    image = _captions.decode_or_skip(
        io.BytesIO(self._read(shard, img_off, img_size)), where, image_size=self.image_size,
        channels=self.channels, min_side=self.min_side)
    return _captions.CaptionedExample(image, (caption,), -1)

  def describe(self) -> dict:
    """What identifies this source's content (stored in precompute.json / meta.json)."""
    return {"source": "webdataset", "pattern": self.pattern,
            "shards": [os.fspath(s) for s in self.shards], "min_side": self.min_side,
            "caption_key": self.caption_key, "index_skipped": dict(sorted(
                self.index_skipped.items()))}
