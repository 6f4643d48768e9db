"""Per-example image transforms and the grain operations built from them.

Every source yields examples `{"image": uint8 [H, W, C], "label": int}`; the operations here turn
them into model inputs: ADM center crop + resize (for sources of arbitrary size), a shape check,
random horizontal flips (deterministic per record: grain hands each record its own rng) and the
scaling of uint8 [0, 255] to float32 [-1, 1].
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np
from PIL import Image

from common.errors import ShapeError

Example = dict[str, Any]


def to_hwc(image: np.ndarray) -> np.ndarray:
  """Returns `image` as [H, W, C]; a 2-D grayscale [H, W] image gets C = 1."""
  image = np.asarray(image)
  if image.ndim == 2:
    return image[:, :, None]
  if image.ndim != 3:
    raise ShapeError(f"expected an image [H, W] or [H, W, C], got shape {image.shape}")
  return image


def center_crop_arr(image: np.ndarray, image_size: int) -> np.ndarray:
  """ADM's center crop (guided-diffusion `image_datasets.center_crop_arr`) on an array.

  Halves the image with a BOX filter while its short side is >= 2 * image_size, resizes it with
  BICUBIC so that the short side equals image_size, then takes the central square.

  Args:
    image: uint8 [H, W, C] (C in {1, 3, 4}) or [H, W].
    image_size: side of the output square, in pixels.

  Returns:
    uint8 [image_size, image_size, C] (C = 1 for a 2-D input).
  """
  image = to_hwc(image)
  channels = image.shape[-1]
  if image.dtype != np.uint8:
    raise ShapeError(f"center_crop_arr expects a uint8 image, got {image.dtype}")
  if channels not in (1, 3, 4):
    raise ShapeError(f"center_crop_arr expects 1, 3 or 4 channels, got shape {image.shape}")
  if image.shape[0] == image.shape[1] == image_size:
    return image
  pil = Image.fromarray(image[:, :, 0] if channels == 1 else image)
  while min(*pil.size) >= 2 * image_size:
    pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
  scale = image_size / min(*pil.size)
  pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
  arr = to_hwc(np.asarray(pil))
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def check_image(image: np.ndarray, image_size: int, channels: int, where: str) -> np.ndarray:
  """Returns `image` as uint8 [image_size, image_size, channels] or raises ShapeError.

  Args:
    image: the image as read, [H, W] or [H, W, C].
    image_size: configured side in pixels.
    channels: configured number of channels.
    where: names the dataset in the error message.
  """
  image = to_hwc(image)
  expected = (image_size, image_size, channels)
  if image.shape != expected:
    raise ShapeError(
        f"{where}: image has shape {image.shape}, but the config expects {expected} "
        "(data.image_size, data.channels)")
  if image.dtype != np.uint8:
    raise ShapeError(f"{where}: image has dtype {image.dtype}, expected uint8")
  return image


class CenterCropResize(grain.transforms.Map):
  """Crops and resizes `example["image"]` to [size, size, C] with `center_crop_arr`."""

  def __init__(self, image_size: int):
    self.image_size = image_size

  def map(self, example: Example) -> Example:
    return {**example, "image": center_crop_arr(example["image"], self.image_size)}


class CheckShape(grain.transforms.Map):
  """Checks that `example["image"]` is uint8 [size, size, channels]; casts the label to int32.
  Caption embeddings ("text", SYNTHETIC captions) pass through."""

  def __init__(self, image_size: int, channels: int, where: str):
    self.image_size = image_size
    self.channels = channels
    self.where = where

  def map(self, example: Example) -> Example:
    image = check_image(example["image"], self.image_size, self.channels, self.where)
    out = {"image": image, "label": np.int32(example["label"])}
    if "text" in example:
      out["text"] = example["text"]
    return out


class RandomFlip(grain.transforms.RandomMap):
  """Flips `example["image"]` [H, W, C] left-right with probability 1/2.

  The rng is the per-record generator grain derives from the sampler seed and the record's global
  index, so the flips are a deterministic function of (seed, position in the stream).
  """

  def random_map(self, example: Example, rng: np.random.Generator) -> Example:
    if rng.random() < 0.5:
      return {**example, "image": np.ascontiguousarray(example["image"][:, ::-1])}
    return example


class ToModelInput(grain.transforms.Map):
  """An example as the trainer's batch contract wants it (docs/DESIGN.md):
  {"x": float32 [H, W, C] in [-1, 1] (uint8 / 127.5 - 1), "cond": {"label": int32 []}}, and
  with caption embeddings ("text") also cond "tokens" [T, D], "mask" [T], "pooled" [D]."""

  def map(self, example: Example) -> Example:
    image = example["image"].astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return {"x": image, "cond": {**example.get("text", {}), "label": example["label"]}}
