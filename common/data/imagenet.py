"""ImageNet (ILSVRC-2012) as a labelled source for `launch/precompute.py --source=imagenet`.

Two readers of the same data, both yielding `common.data.captions.CaptionedExample`s (no caption,
the class label) in the order ADM and Large-DiT train on:

- `ImageNetFolder`: the ILSVRC train folder as extracted from ILSVRC2012_img_train.tar,
  `root/n01440764/n01440764_10026.JPEG`. Label i is the i-th synset folder in sorted order, which
  is the order of torchvision's `ImageFolder` (Large-DiT's loader) and of tfds' `imagenet2012`
  labels. Every folder must be named like a WordNet synset id (`n` + 8 digits), and there must be
  exactly `num_classes` of them (1000 for ILSVRC-2012; a smaller number selects a subset folder).
- `ImageNetTfds`: tfds `imagenet2012` prepared in array_record format (`common.data.tfds_source`).

Images go through ADM's center crop (`common.data.transforms.center_crop_arr`: BOX halvings,
BICUBIC, central square; guided-diffusion `image_datasets.py`, as Large-DiT's `center_crop_arr`).

Random horizontal flips (Large-DiT's `transforms.RandomHorizontalFlip()`) are taken care of by
storing both: with `flips=True` example 2i is image i and example 2i+1 its mirror image, so a
uniform draw over the records sees each image flipped with probability 1/2, as the pixel loader
does. (A flip of the latent grid is not the latent of the flipped image for a convolutional VAE;
we store the true latents of both rather than assume it.)

Damaged files (ImageNet's train set has CMYK JPEGs, grayscale JPEGs and a PNG named .JPEG, all
converted to RGB by PIL here; a truncated or unreadable file cannot be) come back as
`captions.SkipExample("unreadable_image", ...)`: the writer leaves them out and counts them.
"""

from __future__ import annotations

import os
import re

import ml_collections
import numpy as np

from common.data import captions as _captions
from common.data import image_folder as _image_folder
from common.data import tfds_source as _tfds
from common.data import transforms as _transforms
from common.errors import ConfigError, DataNotFoundError, ShapeError
from common.paths import as_path

IMAGENET1K_CLASSES = 1000
SYNSET_RE = re.compile(r"^n\d{8}$")
TFDS_NAME = "imagenet2012"


def _check_options(image_size, num_classes) -> None:
  if not isinstance(image_size, int) or image_size <= 0:
    raise ConfigError(f"--source=imagenet needs a positive --image_size, got {image_size!r}")
  if not isinstance(num_classes, int) or num_classes <= 0:
    raise ConfigError(f"--num_classes must be a positive integer (1000 for ILSVRC-2012), got "
                      f"{num_classes!r}")


def list_synsets(root: str, num_classes: int = IMAGENET1K_CLASSES
                 ) -> tuple[list[str], list[str], list[int]]:
  """The synsets, image paths and labels of an ILSVRC-layout folder.

  Args:
    root: the train folder holding one synset folder (`n01440764`, ...) per class (local or gs://).
    num_classes: how many synset folders there must be.

  Returns:
    (synsets sorted, image paths sorted by synset then file name, labels [N]: index of the synset).

  Raises:
    DataNotFoundError: the folder is missing, a folder is not a synset id, the count differs from
      num_classes, or a synset holds no image.
  """
  if not root or not as_path(root).is_dir():
    raise DataNotFoundError(f"ImageNet folder {root!r} does not exist; give --path=the ILSVRC "
                            "train folder (extracted ILSVRC2012_img_train.tar: "
                            "n01440764/*.JPEG ...)")
  top = as_path(root)
  folders = sorted(d.name for d in top.iterdir() if not d.name.startswith(".") and d.is_dir())
  bad = [d for d in folders if not SYNSET_RE.match(d)]
  if bad:
    raise DataNotFoundError(f"ImageNet folder {root} has {len(bad)} folder(s) not named like a "
                            f"synset (n + 8 digits), e.g. {bad[0]!r}; --path must be the folder of "
                            "synset folders (ILSVRC train layout), with nothing else in it")
  if len(folders) != num_classes:
    raise DataNotFoundError(f"ImageNet folder {root} has {len(folders)} synset folder(s), "
                            f"--num_classes={num_classes} expected (ILSVRC-2012 train has "
                            f"{IMAGENET1K_CLASSES}); finish extracting the per-class tars or pass "
                            "--num_classes for a subset")
  paths, labels = [], []
  for label, synset in enumerate(folders):
    files = sorted(f.name for f in (top / synset).iterdir()
                   if not f.name.startswith(".") and f.name.lower().endswith(
                       _image_folder.IMAGE_EXTENSIONS))
    if not files:
      raise DataNotFoundError(f"ImageNet synset folder {top / synset} holds no image; extract "
                              f"{synset}.tar into it")
    paths.extend(os.fspath(top / synset / f) for f in files)
    labels.extend([label] * len(files))
  return folders, paths, labels


class _Flipped:
  """`flips` doubling shared by both readers: example j is image j // 2, mirrored when j is odd."""

  flips: bool
  image_size: int
  channels = 3

  def _count(self, n: int) -> int:
    return 2 * n if self.flips else n

  def _split(self, index: int) -> tuple[int, bool]:
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    return (index // 2, bool(index % 2)) if self.flips else (index, False)

  def _example(self, image: np.ndarray, label: int, mirror: bool) -> _captions.CaptionedExample:
    """image: uint8 [size, size, 3], already center-cropped."""
    if mirror:
      image = np.ascontiguousarray(image[:, ::-1])
    return _captions.CaptionedExample(image, (), int(label))


class ImageNetFolder(_Flipped):
  """The ILSVRC train folder as `CaptionedExample`s (RGB, no caption, label = synset index).

  Args:
    root: the folder of synset folders.
    image_size: side of ADM's center crop, in pixels.
    num_classes: the number of synset folders required (1000: ILSVRC-2012).
    flips: also store every image's mirror image (2N examples; see the module docstring).

  Meant for the writer's one reading thread: the last decoded file is kept for its mirror image.
  """

  def __init__(self, root: str, image_size: int, *, num_classes: int = IMAGENET1K_CLASSES,
               flips: bool = True):
    _check_options(image_size, num_classes)
    self.root, self.image_size, self.num_classes, self.flips = root, image_size, num_classes, flips
    self.synsets, self.paths, self.labels = list_synsets(root, num_classes)
    self._last: tuple[int, np.ndarray | str] | None = None

  def __len__(self) -> int:
    return self._count(len(self.paths))

  def _read(self, i: int) -> np.ndarray | str:
    """File i decoded as RGB and center-cropped, or why it cannot be; the last one is kept, so a
    mirror image costs no second decode."""
    if self._last is None or self._last[0] != i:
      try:
        image = _transforms.center_crop_arr(_image_folder.read_image(self.paths[i], 3),
                                            self.image_size)
      except DataNotFoundError as e:  # truncated, damaged or oversized: the writer counts it
        image = str(e)
      self._last = (i, image)
    return self._last[1]

  def __getitem__(self, index: int) -> _captions.CaptionedExample:
    """Example `index`; raises captions.SkipExample for a file that cannot be read."""
    i, mirror = self._split(index)
    image = self._read(i)
    if isinstance(image, str):
      raise _captions.SkipExample("unreadable_image", image)
    return self._example(image, self.labels[i], mirror)

  def describe(self) -> dict:
    return {"source": "imagenet", "path": os.fspath(as_path(self.root)),
            "num_classes": self.num_classes, "num_images": len(self.paths),
            "flips": self.flips, "image_size": self.image_size, "synsets_first": self.synsets[0],
            "synsets_last": self.synsets[-1]}


class ImageNetTfds(_Flipped):
  """tfds `imagenet2012` prepared in array_record format, as `CaptionedExample`s.

  tfds' labels are the sorted synsets (its `imagenet2012_labels.txt`), the same as ImageNetFolder's.
  tfds' builder already re-encodes ImageNet's CMYK and PNG files as RGB JPEGs.

  Args:
    data_dir: the tfds data directory holding `imagenet2012/<version>/`.
    split: "train", "validation", or a slice of them.
    image_size: side of ADM's center crop, in pixels.
    flips: also store every image's mirror image.
  """

  def __init__(self, data_dir: str, split: str, image_size: int, *, flips: bool = True):
    _check_options(image_size, IMAGENET1K_CLASSES)
    cfg = ml_collections.ConfigDict({"tfds_name": TFDS_NAME, "data_dir": data_dir, "split": split})
    self.data_dir, self.split, self.image_size, self.flips = data_dir, split, image_size, flips
    self._source = _tfds.TfdsSource(cfg, split)
    self.num_classes = IMAGENET1K_CLASSES

  def __len__(self) -> int:
    return self._count(len(self._source))

  def __getitem__(self, index: int) -> _captions.CaptionedExample:
    i, mirror = self._split(index)
    example = self._source[i]
    image = _transforms.to_hwc(example["image"])
    if image.shape[-1] == 1:
      image = np.repeat(image, 3, axis=-1)
    if image.shape[-1] != 3:
      raise ShapeError(f"tfds {TFDS_NAME} example {i} has an image of shape {image.shape}")
    return self._example(_transforms.center_crop_arr(image, self.image_size), example["label"],
                         mirror)

  def describe(self) -> dict:
    return {"source": "imagenet_tfds", "data_dir": os.fspath(as_path(self.data_dir)),
            "split": self.split, "num_classes": self.num_classes, "flips": self.flips,
            "image_size": self.image_size}


def build(source: str, *, path: str | None, split: str, image_size: int | None, channels: int,
          num_classes: int, flips: bool) -> ImageNetFolder | ImageNetTfds:
  """The reader of `launch/precompute.py --source=imagenet|imagenet_tfds` from its flags.

  Args:
    source: "imagenet" (the ILSVRC train folder at `path`) or "imagenet_tfds" (tfds
      `imagenet2012` prepared under the data directory `path`, default $TFDS_DATA_DIR or
      ~/tensorflow_datasets).
    path: see `source`.
    split: "train" for the folder (point --path at another folder instead); any tfds split.
    image_size: side of the center crop (required).
    channels: 3 (ImageNet is stored RGB).
    num_classes: the number of synset folders required (folder only; tfds has 1000).
    flips: store every image and its mirror image.
  """
  if image_size is None:
    raise ConfigError(f"--source={source} needs --image_size (256 or 512 for TerDiT)")
  if channels != 3:
    raise ConfigError(f"--source={source} is stored as RGB: --channels=3, got {channels}")
  if source == "imagenet_tfds":
    if num_classes != IMAGENET1K_CLASSES:
      raise ConfigError(f"--source=imagenet_tfds has {IMAGENET1K_CLASSES} classes; "
                        f"--num_classes={num_classes} applies to an ILSVRC folder subset only")
    return ImageNetTfds(path or _tfds.default_data_dir(), split, image_size, flips=flips)
  if not path:
    raise ConfigError("--source=imagenet needs --path=the ILSVRC train folder (n01440764/... "
                      "synset folders); for tfds imagenet2012 use --source=imagenet_tfds")
  if split != "train":
    raise ConfigError("--split applies to --source=imagenet_tfds; for an ILSVRC folder point "
                      "--path at the folder you want")
  return ImageNetFolder(path, image_size, num_classes=num_classes, flips=flips)
