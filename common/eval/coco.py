"""Zero-shot COCO FID (MicroDiT's FID-30K, arXiv 2407.15811): captions and reference images.

The protocol (the one text-to-image papers since GLIDE / Imagen report as "zero-shot FID-30K on
COCO 2014", e.g. GigaGAN, PixArt-alpha, MicroDiT): `num` distinct images of the 2014 validation
split are drawn with a fixed seed, one of each image's captions is drawn as its prompt; the model
samples one image per prompt, and FID compares those samples with the drawn real images. Real
images get ADM's center crop + resize (`common.data.transforms.center_crop_arr`) to
`image_size` (256), as do samples of another size; the FID Inception then resizes to 299.
micro_diffusion ships no FID code (its COCO latents serve a validation loss:
`datasets/prepare/coco/convert.py`), so this follows the common protocol.

Config (`config.eval.coco`, set by `configs/microdit.py:...,coco_fid30k`):

  captions     captions_val2014.json (from annotations_trainval2014.zip)
  images       the val2014/ folder of its images
  seed         the draw of images and captions (0)
  image_size   side real images and samples are compared at (256)

`config.eval.num_samples` is the number of prompts (30000).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np

from common.data import captions as _captions
from common.data import image_folder as _image_folder
from common.data import transforms as _transforms
from common.errors import ConfigError, DataNotFoundError, ShapeError
from common.paths import as_path

COCO_HOW_TO = ("download http://images.cocodataset.org/annotations/annotations_trainval2014.zip "
               "and http://images.cocodataset.org/zips/val2014.zip, unzip both, and set "
               "config.eval.coco.captions=annotations/captions_val2014.json and "
               "config.eval.coco.images=val2014 (docs/MICRODIT_DATA.md)")


@dataclasses.dataclass(frozen=True)
class CocoEval:
  """The drawn evaluation set.

  Attributes:
    paths: the N real images, in draw order.
    prompts: the N captions (prompt i belongs to image i).
    image_size: side of the compared images.
    digest: SHA-256 of the (file name, caption) pairs: what the cached samples and reference
      statistics record.
  """
  paths: tuple[str, ...]
  prompts: tuple[str, ...]
  image_size: int
  digest: str


def _settings(cfg) -> tuple[str, str, int, int]:
  for key in ("captions", "images"):
    if not cfg.get(key):
      raise ConfigError(f"config.eval.coco.{key} is empty; {COCO_HOW_TO}")
  size = int(cfg.get("image_size", 256) or 256)
  if size <= 0:
    raise ConfigError(f"config.eval.coco.image_size must be positive, got {size}")
  return str(cfg.captions), str(cfg.images), int(cfg.get("seed", 0) or 0), size


def draw(cfg, num: int) -> CocoEval:
  """`num` (image, caption) pairs of the COCO caption file `cfg.captions` (see the module).

  Images are the JSON's images with at least one non-blank caption, sorted by id; the draw is a
  permutation with numpy's default_rng(seed), then one caption per image with the same generator.
  DataNotFoundError when the files are absent or the split has fewer than `num` captioned images.
  """
  captions_path, image_dir, seed, size = _settings(cfg)
  path = as_path(captions_path)
  if not path.is_file():
    raise DataNotFoundError(f"COCO caption file {captions_path} not found; {COCO_HOW_TO}")
  if not as_path(image_dir).is_dir():
    raise DataNotFoundError(f"COCO image folder {image_dir} not found; {COCO_HOW_TO}")
  images, by_image = _captions.read_coco_captions(captions_path)
  names = dict(images)
  ids = sorted(i for i in by_image if i in names)
  if num <= 0 or num > len(ids):
    raise DataNotFoundError(f"{captions_path} has {len(ids)} captioned images; the evaluation asks "
                            f"for {num} (config.eval.num_samples)")
  rng = np.random.default_rng(seed)
  chosen = [ids[i] for i in rng.permutation(len(ids))[:num]]
  prompts = tuple(by_image[i][int(rng.integers(len(by_image[i])))] for i in chosen)
  for i in chosen:
    if os.sep in names[i] or names[i].startswith("."):
      raise ShapeError(f"{captions_path}: image file name {names[i]!r} is not a plain file name")
  paths = tuple(os.fspath(as_path(image_dir) / names[i]) for i in chosen)
  digest = hashlib.sha256(json.dumps([[names[i] for i in chosen], list(prompts)]).encode())
  return CocoEval(paths, prompts, size, digest.hexdigest())


class RealImages:
  """The drawn real images as uint8 batches [B, S, S, 3] (an iterable for `make_reference`)."""

  def __init__(self, coco: CocoEval, batch_size: int = 256):
    self.coco, self.batch_size = coco, int(batch_size)
    self.num_images = len(coco.paths)

  def __iter__(self):
    for lo in range(0, self.num_images, self.batch_size):
      batch = []
      for path in self.coco.paths[lo:lo + self.batch_size]:
        if not as_path(path).is_file():
          raise DataNotFoundError(f"COCO image {path} not found; {COCO_HOW_TO}")
        batch.append(_transforms.center_crop_arr(_image_folder.read_image(path, 3),
                                                 self.coco.image_size))
      yield np.stack(batch)


def resize_samples(images: np.ndarray, image_size: int) -> np.ndarray:
  """Samples uint8 [N, H, W, C] at the compared side (ADM's crop + resize when H, W differ)."""
  if images.shape[1:3] == (image_size, image_size):
    return images
  return np.stack([_transforms.center_crop_arr(im, image_size) for im in images])


def settings(coco: CocoEval) -> dict:
  """What a reference or sample cache of this evaluation set records (`common.eval.cache`)."""
  return {"coco_fid": {"num": len(coco.prompts), "image_size": coco.image_size,
                       "pairs_sha256": coco.digest}}

