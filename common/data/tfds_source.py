"""A tfds dataset prepared in array_record format, read with `tfds.data_source` (no TensorFlow).

tensorflow_datasets is imported lazily, inside the functions: `import common.data` must stay light.
We check for the prepared files before asking tfds, because an empty data_dir makes tfds raise a
misleading `NotImplementedError ... TFRECORD`.
"""

from __future__ import annotations

import os
import re

from etils import epath
import numpy as np

from common.errors import ConfigError, DataNotFoundError
from common.paths import as_path

_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")


def default_data_dir() -> str:
  """tfds' default data directory: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
  return os.fspath(as_path(os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets")))


def _split_name(name: str) -> tuple[str, list[str]]:
  """'imagenet2012/subset:5.1.0' -> ('imagenet2012', ['subset', '5.1.0'])."""
  name, _, version = name.partition(":")
  base, *config = [p for p in name.split("/") if p]
  if config and "=" in config[-1]:  # 'name/config/a=1,b=2': builder kwargs, not a directory
    config = config[:-1]
  return base, config + ([version] if version else [])


def _prepare_hint(base: str, data_dir: str) -> str:
  hint = (f"Prepare it where the source files are, e.g. `tfds build {base} --data_dir={data_dir} "
          "--file_format=array_record")
  if base.startswith("imagenet"):
    hint += (" --manual_dir=DIR` with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar "
             "downloaded by hand (https://image-net.org) into DIR")
  else:
    hint += "`"
  return hint + ", then copy the data_dir here (tfds cannot download on this machine)."


def _walk_files(directory: epath.Path):
  """Yields (folder, file name) for every file under `directory` (local or gs://)."""
  for entry in directory.iterdir():
    if entry.is_dir():
      yield from _walk_files(entry)
    else:
      yield entry.parent, entry.name


def check_prepared(name: str, data_dir: str, split: str) -> None:
  """Raises DataNotFoundError unless array_record files of `name`/`split` exist under data_dir.

  tfds lays a prepared dataset out as `data_dir/<name>/[<config>/]<version>/` holding
  `dataset_info.json`, `features.json` and `<name>-<split>.array_record-NNNNN-of-NNNNN`.

  Args:
    name: tfds name, optionally with config and version ('imagenet2012', 'foo/bar:1.0.0').
    data_dir: the tfds data directory.
    split: a split name, optionally sliced ('train', 'validation[:1000]').
  """
  base, parts = _split_name(name)
  split_base = split.split("[")[0].strip()
  look_in = as_path(data_dir).joinpath(base, *parts)
  pattern = f"{base}-{split_base}.array_record-*"
  hint = _prepare_hint(base, data_dir)
  if not look_in.is_dir():
    raise DataNotFoundError(
        f"tfds dataset {name!r} not found: directory {look_in} does not exist "
        f"(data.data_dir={data_dir!r}). {hint}")
  found, other_formats = [], []
  for folder, f in _walk_files(look_in):
    if f.startswith(f"{base}-{split_base}.array_record-"):
      found.append(folder / f)
    elif f.startswith(f"{base}-{split_base}.") and "record" in f:
      other_formats.append(f)
  if found:
    return
  detail = f"no files matching {pattern} under {look_in}"
  if other_formats:
    detail += (f"; it is prepared in another format ({sorted(other_formats)[0]} ...): rebuild it "
               "with --file_format=array_record")
  raise DataNotFoundError(
      f"tfds dataset {name!r} split {split_base!r} is not prepared in array_record format: "
      f"{detail}. {hint}")


def _tfds_names(cfg) -> tuple[str, str, str]:
  name = cfg.get("tfds_name", None)
  if not name:
    raise ConfigError("data.name='tfds' needs data.tfds_name (e.g. 'imagenet2012')")
  data_dir = os.fspath(as_path(cfg.get("data_dir", None) or default_data_dir()))
  return name, data_dir, cfg.get("split", "train")


def _builder(cfg):
  # The optional `tfds` extra (TensorFlow): `import common.data` stays light without it.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name, data_dir, split = _tfds_names(cfg)
  check_prepared(name, data_dir, split)
  try:
    return tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds errors are obscure; say what we tried. pylint: disable=broad-except
    raise DataNotFoundError(
        f"tfds could not open prepared dataset {name!r} in {data_dir}: {type(e).__name__}: {e}"
    ) from e


def features_summary(cfg) -> dict:
  """Reads the prepared dataset's metadata (dataset_info.json), not its records.

  Returns:
    {"image_shape": tuple (None for variable sides), "num_classes": int (0 if unlabeled),
     "num_examples": int} for cfg.split.
  """
  builder = _builder(cfg)
  features = builder.info.features
  image_key = cfg.get("image_key", "image")
  label_key = cfg.get("label_key", "label")
  if image_key not in features:
    raise ConfigError(f"tfds dataset {builder.name!r} has no feature {image_key!r} "
                      f"(data.image_key); it has {sorted(features.keys())}")
  num_classes = 0
  if label_key is not None:
    if label_key not in features:
      raise ConfigError(f"tfds dataset {builder.name!r} has no feature {label_key!r} "
                        f"(data.label_key; set it to None for unlabeled data); "
                        f"it has {sorted(features.keys())}")
    num_classes = int(getattr(features[label_key], "num_classes", 0) or 0)
  split = cfg.get("split", "train")
  return {"image_shape": tuple(features[image_key].shape), "num_classes": num_classes,
          "num_examples": int(builder.info.splits[split].num_examples)}


class TfdsSource:
  """Grain source over a tfds array_record data source, yielding {"image", "label"}.

  image: uint8 [H, W, C] as decoded (sides may vary); label: int (0 if cfg.label_key is None).
  """

  def __init__(self, cfg, split: str | None = None):
    # The optional `tfds` extra (TensorFlow): `import common.data` stays light without it.
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    name, data_dir, default_split = _tfds_names(cfg)
    split = split or default_split
    check_prepared(name, data_dir, split)
    try:
      self._source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # pylint: disable=broad-except
      raise DataNotFoundError(
          f"tfds could not open prepared dataset {name!r} split {split!r} in {data_dir}: "
          f"{type(e).__name__}: {e}") from e
    self.name = name
    self.split = split
    self.image_key = cfg.get("image_key", "image")
    self.label_key = cfg.get("label_key", "label")

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict:
    example = self._source[index]
    label = 0 if self.label_key is None else int(example[self.label_key])
    return {"image": np.asarray(example[self.image_key]), "label": label}

  def __repr__(self) -> str:
    return f"TfdsSource(name={self.name!r}, split={self.split!r}, n={len(self)})"
