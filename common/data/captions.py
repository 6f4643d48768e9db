"""Captioned-image sources for latent text-to-image datasets (read by `launch/precompute.py`).

Every source is a random-access sequence of `CaptionedExample`s: a uint8 image [H, W, C] already at
the dataset's size, one or more captions, and an integer class label (-1 where none exists).

- `CaptionedFashionMNIST`: Fashion-MNIST (28x28x1) with captions made from its ten class names and
  phrasing templates. `fashion_caption_templates("train")` phrasings caption the training images
  (one template per image, drawn deterministically from (seed, index)); the `"eval"` phrasings are
  never used in training and give held-out prompts (`fashion_eval_prompts`).
- `CaptionedImageFolder`: any folder tree of images, each with a `.txt` file of the same stem beside
  it (`img001.jpg` + `img001.txt`); every non-empty line of the text file is one caption.
- `CocoCaptions`: COCO-style caption JSON (`captions_train2014.json`: `images[{id, file_name}]`,
  `annotations[{image_id, caption}]`) plus its image directory. One example per image that has at
  least one caption, holding all its captions in annotation order; the training pipeline draws one
  of them per sample (`common.data.latents`), so an epoch sees every image once.

Folder and COCO images go through ADM's center crop + resize (`common.data.transforms
.center_crop_arr`), as the `image_folder` training pipeline does.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np

from common.data import image_folder as _image_folder
from common.data import sources as _sources
from common.data import transforms as _transforms
from common.errors import ConfigError, DataNotFoundError, ShapeError
from common.paths import as_path

FASHION_CLASS_NAMES = ("t-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt",
                       "sneaker", "bag", "ankle boot")

# `{a}` is the indefinite article that fits the class name, `{name}` the class name. The two lists
# share no phrasing: eval prompts test generalisation to captions never seen in training.
_FASHION_TEMPLATES = {
    "train": (
        "{a} {name}",
        "a photo of {a} {name}",
        "a black and white picture of {a} {name}",
        "a grayscale photo of {a} {name}",
        "a small image of {a} {name}",
        "a product photo of {a} {name}",
        "a low resolution photo of {a} {name}",
        "an image showing {a} {name}",
        "a close-up photo of {a} {name}",
        "{a} {name} on a dark background",
    ),
    "eval": (
        "a picture of {a} {name}",
        "a centered photo of a single {name}",
        "a catalogue image of {a} {name}",
        "a monochrome snapshot of {a} {name}",
    ),
}


@dataclasses.dataclass(frozen=True)
class CaptionedExample:
  """One image with its captions.

  Attributes:
    image: uint8 [H, W, C], already cropped/resized to the source's size.
    captions: one or more captions (str); empty for a labelled source without text (ImageNet).
    label: integer class label, or -1 where the source has none.
  """
  image: np.ndarray
  captions: tuple[str, ...]
  label: int = -1


class SkipExample(Exception):
  """Raised by a source's `__getitem__` for an example the writer leaves out and counts (webdataset
  and parquet sources: a bad or too small image is skipped, never a crash).

  Attributes:
    reason: the count's key in meta.json's "skipped" (e.g. "min_side", "unreadable_image").
    detail: one line naming the file, for the first example skipped for each reason.
  """

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason, self.detail = reason, detail


def decode_or_skip(f, name: str, *, image_size: int, channels: int, min_side: int) -> np.ndarray:
  """An image file -> uint8 [image_size, image_size, channels] (ADM center crop + resize), or
  SkipExample: "unreadable_image" (damaged, oversized, not an image: `image_folder.decode_image`'s
  checks) or "min_side" (the shorter side is below `min_side` pixels, as micro_diffusion's
  download scripts skip images under 256 px).

  Args:
    f: an open seekable binary file.
    name: how messages name it (e.g. "shard.tar:key.jpg").
  """
  try:
    image = _image_folder.decode_image(f, name, channels)
  except DataNotFoundError as e:
    raise SkipExample("unreadable_image", str(e)) from e
  if min(image.shape[:2]) < min_side:
    raise SkipExample("min_side", f"{name} is {image.shape[1]}x{image.shape[0]}, its shorter "
                      f"side below --min_side={min_side}")
  return _transforms.center_crop_arr(image, image_size)


def fashion_caption_templates(split: str = "train") -> tuple[str, ...]:
  """The caption phrasings of Fashion-MNIST, with `{a}` (article) and `{name}` (class) fields.

  Args:
    split: "train" (used to caption training images) or "eval" (held out for evaluation only).
  """
  if split not in _FASHION_TEMPLATES:
    raise ConfigError(f"caption template split must be 'train' or 'eval', got {split!r}")
  return _FASHION_TEMPLATES[split]


def fashion_caption(label: int, template: str) -> str:
  """The caption of class `label` in phrasing `template` (from `fashion_caption_templates`)."""
  if not 0 <= label < len(FASHION_CLASS_NAMES):
    raise ShapeError(f"Fashion-MNIST label {label} outside [0, {len(FASHION_CLASS_NAMES)})")
  name = FASHION_CLASS_NAMES[label]
  return template.format(a="an" if name[0] in "aeiou" else "a", name=name)


def fashion_train_caption(label: int, index: int, seed: int = 0) -> str:
  """The training caption of example `index`: a train template drawn from (seed, index)."""
  templates = _FASHION_TEMPLATES["train"]
  choice = np.random.default_rng([int(seed) % 2**32, int(index)]).integers(len(templates))
  return fashion_caption(label, templates[choice])


def fashion_eval_prompts(n_per_class: int) -> tuple[list[str], np.ndarray]:
  """Held-out prompts (eval phrasings only) with their class labels, for sampling/evaluation.

  Class-major order: the first `n_per_class` prompts are of class 0, cycling through the eval
  phrasings, then class 1, and so on.

  Args:
    n_per_class: prompts per class (>= 1).

  Returns:
    (prompts list[str] of length 10 * n_per_class, labels int32 [10 * n_per_class]).
  """
  if n_per_class < 1:
    raise ConfigError(f"n_per_class must be >= 1, got {n_per_class}")
  templates = _FASHION_TEMPLATES["eval"]
  prompts, labels = [], []
  for label in range(len(FASHION_CLASS_NAMES)):
    for j in range(n_per_class):
      prompts.append(fashion_caption(label, templates[j % len(templates)]))
      labels.append(label)
  return prompts, np.asarray(labels, np.int32)


class CaptionedFashionMNIST:
  """Fashion-MNIST images [28, 28, 1] with one training-template caption each.

  Args:
    directory: the idx files' directory (Debian `dataset-fashion-mnist`:
      /usr/share/datasets/fashion-mnist).
    split: "train" (60000) or "test" (10000).
    seed: selects each image's caption template (deterministic per (seed, index)).
  """

  image_size = _sources.FASHION_MNIST_SIZE
  channels = 1

  def __init__(self, directory: str = _sources.FASHION_MNIST_DEFAULT_DIR, split: str = "train",
               seed: int = 0):
    self.directory, self.split, self.seed = directory, split, int(seed)
    self.images, self.labels = _sources.load_fashion_mnist(directory, split)

  def __len__(self) -> int:
    return self.images.shape[0]

  def __getitem__(self, index: int) -> CaptionedExample:
    label = int(self.labels[index])
    return CaptionedExample(self.images[index],
                            (fashion_train_caption(label, index, self.seed),), label)

  def describe(self) -> dict:
    """What identifies this source's content (stored in meta.json)."""
    return {"source": "fashion_mnist", "path": os.fspath(as_path(self.directory)),
            "split": self.split, "caption_seed": self.seed,
            "caption_templates": list(_FASHION_TEMPLATES["train"]),
            "class_names": list(FASHION_CLASS_NAMES)}


def read_text_lines(path: str, what: str) -> list[str]:
  """The non-blank lines of a UTF-8 text file (prompts, captions), each stripped of whitespace.

  Lines end at "\n" only ("\r\n" works, the "\r" is stripped): U+2028, U+0085 and the other
  characters `str.splitlines` also breaks at stay inside a line, so every reader of prompt and
  caption files (`launch/encode.py text`, `launch/main.py --prompts`, caption folders) sees the same
  prompts. A leading byte-order mark is dropped.

  Args:
    path: the file (local or gs://).
    what: how messages name it, e.g. "--prompts=p.txt".

  Raises:
    DataNotFoundError: there is no such file.
    ShapeError: it is not UTF-8 (the message gives the byte offset and line of the first bad byte).
  """
  if not as_path(path).is_file():
    raise DataNotFoundError(f"{what}: no such file (a UTF-8 text file, one entry a line)")
  data = as_path(path).read_bytes()
  start = 3 if data.startswith(b"\xef\xbb\xbf") else 0
  try:
    text = data[start:].decode("utf-8")
  except UnicodeDecodeError as e:
    at = start + e.start
    line = data.count(b"\n", 0, at) + 1
    raise ShapeError(f"{what} is not UTF-8 text: byte 0x{data[at]:02x} at offset {at} (line "
                     f"{line}): {e.reason}; save it as UTF-8") from e
  return [line.strip() for line in text.split("\n") if line.strip()]


def read_prompts(path: str, what: str) -> list[str]:
  """The prompts of a prompt file, one a line (`read_text_lines`); ShapeError when it has none."""
  prompts = read_text_lines(path, what)
  if not prompts:
    raise ShapeError(f"{what} holds no prompt (one prompt a line)")
  return prompts


def _read_captions(path: str) -> tuple[str, ...]:
  captions = tuple(read_text_lines(path, f"caption file {path}"))
  if not captions:
    raise DataNotFoundError(f"caption file {path} is empty; write one caption per line")
  return captions


def check_size(image_size, channels) -> None:
  if not isinstance(image_size, int) or image_size <= 0:
    raise ConfigError(f"a positive integer image_size is needed, got {image_size!r}")
  if channels not in (1, 3):
    raise ConfigError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels!r}")


class CaptionedImageFolder:
  """Images anywhere under `root`, each with a caption file `<stem>.txt` beside it.

  Files are visited in sorted path order (hidden entries skipped); every non-empty line of a caption
  file is one caption. An image without its `.txt` is an error (listing how many lack
  one), not silently skipped.

  Args:
    root: the folder.
    image_size: output side; images are center-cropped and resized to it (ADM).
    channels: 3 (RGB) or 1 (grayscale).
  """

  def __init__(self, root: str, image_size: int, channels: int = 3):
    check_size(image_size, channels)
    if not root or not as_path(root).is_dir():
      raise DataNotFoundError(
          f"caption image folder {root!r} does not exist; give a directory of images with a "
          ".txt caption beside each (img001.jpg + img001.txt)")
    self.root, self.image_size, self.channels = root, image_size, channels
    self.paths, self.caption_paths, missing = [], [], []
    for dirpath, dirnames, filenames in as_path(root).walk():
      dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
      for f in sorted(filenames):
        if f.startswith(".") or not f.lower().endswith(_image_folder.IMAGE_EXTENSIONS):
          continue
        path = dirpath / f
        txt = path.with_suffix(".txt")
        if txt.is_file():
          self.paths.append(os.fspath(path))
          self.caption_paths.append(os.fspath(txt))
        else:
          missing.append(path)
    if missing:
      raise DataNotFoundError(
          f"{len(missing)} image(s) under {root} have no caption file beside them, e.g. "
          f"{missing[0]} needs {missing[0].with_suffix('.txt')}")
    if not self.paths:
      raise DataNotFoundError(
          f"caption image folder {root} holds no images with extensions "
          f"{_image_folder.IMAGE_EXTENSIONS}")

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, index: int) -> CaptionedExample:
    image = _image_folder.read_image(self.paths[index], self.channels)
    return CaptionedExample(_transforms.center_crop_arr(image, self.image_size),
                            _read_captions(self.caption_paths[index]), -1)

  def describe(self) -> dict:
    return {"source": "image_folder", "path": os.fspath(as_path(self.root))}


# A COCO caption file is tens of MB (captions_train2014.json: 66 MB); larger is not one.
MAX_COCO_CAPTIONS_BYTES = 512 << 20


def read_coco_captions(path: str) -> tuple[list[tuple[int, str]], dict[int, list[str]]]:
  """A COCO caption JSON (`images[{id, file_name}]`, `annotations[{image_id, caption}]`) ->
  ([(image id, file name)] in the JSON's order, {image id: [non-blank captions, stripped]}).

  ShapeError for a file over MAX_COCO_CAPTIONS_BYTES (checked before reading) or of another shape.
  """
  p = as_path(path)
  if p.stat().length > MAX_COCO_CAPTIONS_BYTES:
    raise ShapeError(f"{path} is over {MAX_COCO_CAPTIONS_BYTES >> 20} MB; not a COCO caption file")
  try:
    data = json.loads(p.read_text(encoding="utf-8"))
    images = [(int(im["id"]), str(im["file_name"])) for im in data["images"]]
    captions: dict[int, list[str]] = {}
    for ann in data["annotations"]:
      text = str(ann["caption"]).strip()
      if text:
        captions.setdefault(int(ann["image_id"]), []).append(text)
  except (ValueError, KeyError, TypeError, AttributeError) as e:
    raise ShapeError(f"{path} is not a COCO caption file (needs images[{{id, file_name}}] and "
                     f"annotations[{{image_id, caption}}]): {type(e).__name__}: {e}") from e
  return images, captions


class CocoCaptions:
  """COCO-style captions: one example per image with all of its captions.

  Args:
    annotations: the caption JSON (`images[{id, file_name}]`, `annotations[{image_id, caption}]`).
    image_dir: directory holding the `file_name`s.
    image_size: output side; images are center-cropped and resized to it (ADM).
    channels: 3 (RGB) or 1 (grayscale).

  Images keep the order of the JSON's `images` list; images without a caption are left out.
  Captions are stripped of surrounding whitespace (COCO has some with trailing newlines).
  """

  def __init__(self, annotations: str, image_dir: str, image_size: int, channels: int = 3):
    check_size(image_size, channels)
    if not annotations or not as_path(annotations).is_file():
      raise DataNotFoundError(
          f"COCO caption file {annotations!r} not found; give e.g. "
          "annotations/captions_train2014.json from annotations_trainval2014.zip")
    if not image_dir:
      raise ConfigError("COCO captions need the directory of their images (--image_dir)")
    if not as_path(image_dir).is_dir():
      raise DataNotFoundError(
          f"COCO image directory {image_dir!r} not found; give the folder holding the images "
          "the caption file names (e.g. train2014/)")
    images, captions = read_coco_captions(annotations)
    self.annotations, self.image_dir = annotations, image_dir
    self.image_size, self.channels = image_size, channels
    self.entries = [(os.fspath(as_path(image_dir) / name), tuple(captions[i]))
                    for i, name in images if i in captions]
    if not self.entries:
      raise DataNotFoundError(f"{annotations} has no image with a caption")

  def __len__(self) -> int:
    return len(self.entries)

  def __getitem__(self, index: int) -> CaptionedExample:
    path, captions = self.entries[index]
    if not as_path(path).is_file():
      raise DataNotFoundError(f"COCO image {path} (named in {self.annotations}) not found")
    image = _image_folder.read_image(path, self.channels)
    return CaptionedExample(_transforms.center_crop_arr(image, self.image_size), captions, -1)

  def describe(self) -> dict:
    return {"source": "coco", "path": os.fspath(as_path(self.annotations)),
            "image_dir": os.fspath(as_path(self.image_dir))}

