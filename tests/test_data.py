"""Tests of common.data: digits, fashion_mnist (idx), image_folder, tfds (array_record)."""

import gzip
import io
import os
import struct
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

import common.data as data
from common.data import transforms
from common.errors import ConfigError, DataNotFoundError, ShapeError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(**kwargs) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(kwargs)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["x"], y["x"])
    np.testing.assert_array_equal(x["cond"]["label"], y["cond"]["label"])


# ----------------------------------------------------------------------------------------------
# Synthetic Fashion-MNIST idx files: every image is unique and left-right asymmetric; its id is
# encoded in pixels (0, 0) = id % 251 and (0, 1) = id // 251, and pixel (27, 27) = 255 marks the
# right side.


def _idx_images(n: int, size: int = 28) -> np.ndarray:
  images = np.zeros((n, size, size), np.uint8)
  ids = np.arange(n)
  images[:, 0, 0] = ids % 251
  images[:, 0, 1] = ids // 251
  images[:, size - 1, size - 1] = 255
  images[:, 5:9, 3:20] = (ids * 7 % 200)[:, None, None]
  return images


def _image_id(image: np.ndarray) -> int:
  """Id of an unflipped uint8 [28, 28, 1] synthetic image."""
  return int(image[0, 0, 0]) + 251 * int(image[0, 1, 0])


def _write_idx(path: str, array: np.ndarray, gz: bool):
  magic = 0x00000800 | array.ndim
  payload = struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + array.tobytes()
  with (gzip.open(path + ".gz", "wb") if gz else open(path, "wb")) as f:
    f.write(payload)


def _write_fmnist(directory, n_train: int, n_test: int = 6, gz: bool = True, size: int = 28):
  os.makedirs(directory, exist_ok=True)
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    _write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte"), _idx_images(n, size), gz)
    _write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte"),
               (np.arange(n) % 10).astype(np.uint8), gz)
  return str(directory)


@pytest.fixture
def fmnist_dir(tmp_path):
  return _write_fmnist(tmp_path / "fmnist", n_train=50)


# ----------------------------------------------------------------------------------------------
# Config and import hygiene


def test_import_does_not_pull_tfds_or_tensorflow():
  code = ("import sys, common.data; "
          "bad = [m for m in ('tensorflow_datasets', 'tensorflow') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_config_errors():
  with pytest.raises(ConfigError, match="data.name must be one of"):
    data.dataset_info(_cfg(name="cifar"))
  with pytest.raises(ConfigError, match="random_flips"):
    data.dataset_info(_cfg(name="digits", random_flips=True))
  with pytest.raises(ConfigError, match="native size"):
    data.dataset_info(_cfg(name="digits", image_size=32))
  with pytest.raises(ConfigError, match="multiple of the process count"):
    data.make_train_iterator(_cfg(name="digits"), global_batch_size=9, seed=0, process_index=0,
                             process_count=2)
  with pytest.raises(ConfigError, match="image_size"):
    data.dataset_info(_cfg(name="image_folder", path="/nonexistent"))


# ----------------------------------------------------------------------------------------------
# digits


def test_digits_info_and_arrays():
  cfg = _cfg(name="digits", image_size=8, random_flip=False)
  assert data.dataset_info(cfg) == data.DatasetInfo(8, 1, 10, 1797)
  images, labels = data.load_arrays(cfg)
  assert images.shape == (1797, 8, 8, 1) and images.dtype == np.uint8
  assert labels.shape == (1797,) and set(np.unique(labels)) == set(range(10))
  assert images.min() == 0 and images.max() == 255
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  np.testing.assert_array_equal(images[..., 0], np.rint(load_digits().images * 255 / 16))


def test_digits_batches():
  cfg = _cfg(name="digits", image_size=8, random_flip=False)
  images, _ = data.load_arrays(cfg)
  known = {im.tobytes() for im in images}
  it = data.make_train_iterator(cfg, global_batch_size=64, seed=3, process_index=0,
                                process_count=1)
  for batch in _take(it, 3):
    assert set(batch) == {"x", "cond"} and set(batch["cond"]) == {"label"}
    assert batch["x"].shape == (64, 8, 8, 1) and batch["x"].dtype == np.float32
    assert batch["cond"]["label"].shape == (64,) and batch["cond"]["label"].dtype == np.int32
    assert batch["x"].min() >= -1.0 and batch["x"].max() <= 1.0
    assert batch["x"].min() == -1.0 and batch["x"].max() == 1.0
    uint8 = np.rint((batch["x"] + 1) * 127.5).astype(np.uint8)
    assert all(im.tobytes() in known for im in uint8)


def test_default_process_index_and_count_come_from_jax():
  it = data.make_train_iterator(_cfg(name="digits"), global_batch_size=8, seed=0)
  assert next(it)["x"].shape == (8, 8, 8, 1)  # one CPU process: B_local = B


def test_same_seed_same_stream_other_seed_other_stream():
  cfg = _cfg(name="digits", image_size=8, random_flip=True)
  kw = dict(global_batch_size=32, process_index=0, process_count=1)
  a = _take(data.make_train_iterator(cfg, seed=7, **kw), 4)
  b = _take(data.make_train_iterator(cfg, seed=7, **kw), 4)
  c = _take(data.make_train_iterator(cfg, seed=8, **kw), 4)
  _assert_batches_equal(a, b)
  assert not np.array_equal(a[0]["x"], c[0]["x"])


def test_resume_from_state_is_bit_identical():
  # Batches of 500 cross the 1797-example epoch boundary within the checked window.
  cfg = _cfg(name="digits", image_size=8, random_flip=True)
  kw = dict(global_batch_size=500, seed=11, process_index=0, process_count=1)
  it = data.make_train_iterator(cfg, **kw)
  _take(it, 3)
  state = it.get_state()
  assert isinstance(state, bytes)
  expected = _take(it, 4)
  fresh = data.make_train_iterator(cfg, **kw)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 4), expected)
  # and the same iterator rewound to its own state
  it.set_state(state)
  _assert_batches_equal(_take(it, 4), expected)


# ----------------------------------------------------------------------------------------------
# Sharding, flips (on synthetic Fashion-MNIST with identifiable images)


@pytest.mark.parametrize("n_train", [50, 51])
def test_shards_are_disjoint_and_cover_the_data(tmp_path, n_train):
  directory = _write_fmnist(tmp_path / "fm", n_train=n_train)
  cfg = _cfg(name="fashion_mnist", path=directory, random_flip=False)
  shards = []
  for process_index in range(2):
    it = data.make_train_iterator(cfg, global_batch_size=10, seed=5,
                                  process_index=process_index, process_count=2)
    batches = _take(it, 10)  # two epochs of a 25-example shard, 5 per local batch
    assert all(b["x"].shape == (5, 28, 28, 1) for b in batches)
    ids = [_image_id(np.rint((im + 1) * 127.5).astype(np.uint8))
           for b in batches for im in b["x"]]
    first, second = ids[:25], ids[25:]
    assert len(set(first)) == 25 and set(second) == set(first)  # each epoch = the whole shard
    assert first != second  # reshuffled per epoch
    shards.append(set(first))
  assert not shards[0] & shards[1]
  assert shards[0] | shards[1] <= set(range(n_train))
  assert len(shards[0] | shards[1]) == 50  # drop_remainder: at most process_count - 1 unused


def test_random_flip(fmnist_dir):
  originals = {_image_id(im): im for im in data.load_arrays(_cfg(name="fashion_mnist",
                                                                 path=fmnist_dir))[0]}

  def kinds(random_flip):
    cfg = _cfg(name="fashion_mnist", path=fmnist_dir, random_flip=random_flip)
    batch = next(data.make_train_iterator(cfg, global_batch_size=50, seed=0, process_index=0,
                                          process_count=1))
    out = []
    for im in np.rint((batch["x"] + 1) * 127.5).astype(np.uint8):
      flipped = im[:, ::-1]
      if im[27, 27, 0] == 255:
        np.testing.assert_array_equal(im, originals[_image_id(im)])
        out.append("plain")
      else:
        np.testing.assert_array_equal(flipped, originals[_image_id(flipped)])
        out.append("flipped")
    return out

  assert set(kinds(False)) == {"plain"}
  flips = kinds(True)
  assert 10 < flips.count("flipped") < 40


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST from idx files


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx(tmp_path, gz):
  directory = _write_fmnist(tmp_path / "fm", n_train=30, n_test=12, gz=gz)
  cfg = _cfg(name="fashion_mnist", path=directory, image_size=28)
  assert data.dataset_info(cfg) == data.DatasetInfo(28, 1, 10, 30)
  images, labels = data.load_arrays(cfg)
  np.testing.assert_array_equal(images[..., 0], _idx_images(30))
  np.testing.assert_array_equal(labels, np.arange(30) % 10)
  test_images, test_labels = data.load_arrays(cfg, split="test")
  assert test_images.shape == (12, 28, 28, 1) and test_labels.shape == (12,)
  batch = next(data.make_train_iterator(cfg, global_batch_size=8, seed=0, process_index=0,
                                        process_count=1))
  assert batch["x"].shape == (8, 28, 28, 1) and batch["cond"]["label"].dtype == np.int32


def test_fashion_mnist_errors(tmp_path):
  with pytest.raises(DataNotFoundError, match="train-images-idx3-ubyte.*dataset-fashion-mnist"):
    data.load_arrays(_cfg(name="fashion_mnist", path=str(tmp_path / "none")))
  wrong = _write_fmnist(tmp_path / "wrong", n_train=4, size=32)
  with pytest.raises(ShapeError, match="32x32"):
    data.load_arrays(_cfg(name="fashion_mnist", path=wrong))
  with pytest.raises(ConfigError, match="native size"):
    data.make_train_iterator(_cfg(name="fashion_mnist", path=wrong, image_size=32),
                             global_batch_size=2, seed=0, process_index=0, process_count=1)


def test_fashion_mnist_default_dir_if_installed():
  if not os.path.isdir("/usr/share/datasets/fashion-mnist"):
    pytest.skip("Debian package dataset-fashion-mnist not installed")
  assert data.dataset_info(_cfg(name="fashion_mnist")) == data.DatasetInfo(28, 1, 10, 60000)


# ----------------------------------------------------------------------------------------------
# Image folder


def _write_image_folder(root) -> str:
  rng = np.random.default_rng(0)
  shapes = {"cat": [(20, 30, 3), (33, 17, 3)], "ant": [(16, 16, 3)], "bee": [(40, 24, 4)]}
  for name, sizes in shapes.items():
    os.makedirs(root / name)
    for i, shape in enumerate(sizes):
      Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / name / f"{i}.png")
  Image.fromarray(rng.integers(0, 256, (12, 18), dtype=np.uint8)).save(root / "ant" / "gray.png")
  (root / "bee" / "notes.txt").write_text("not an image")
  return str(root)


def test_image_folder(tmp_path):
  root = _write_image_folder(tmp_path / "folder")
  cfg = _cfg(name="image_folder", path=root, image_size=16, random_flip=True)
  assert data.dataset_info(cfg) == data.DatasetInfo(16, 3, 3, 5)
  images, labels = data.load_arrays(cfg)
  assert images.shape == (5, 16, 16, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [0, 0, 1, 2, 2])  # ant, bee, cat (sorted)
  original = np.asarray(Image.open(os.path.join(root, "ant", "0.png")))
  np.testing.assert_array_equal(images[0], original)  # 16x16 already: untouched
  it = data.make_train_iterator(cfg, global_batch_size=4, seed=1, process_index=0,
                                process_count=1)
  batch = next(it)
  assert batch["x"].shape == (4, 16, 16, 3) and batch["x"].dtype == np.float32
  gray = data.load_arrays(_cfg(name="image_folder", path=root, image_size=8, channels=1))[0]
  assert gray.shape == (5, 8, 8, 1)


def test_image_folder_missing(tmp_path):
  with pytest.raises(DataNotFoundError, match="does not exist"):
    data.dataset_info(_cfg(name="image_folder", path=str(tmp_path / "x"), image_size=8))
  with pytest.raises(DataNotFoundError, match="no class subfolders"):
    data.dataset_info(_cfg(name="image_folder", path=str(tmp_path), image_size=8))


# ----------------------------------------------------------------------------------------------
# Center crop


def _guided_diffusion_center_crop_arr(pil_image, image_size):
  """guided-diffusion/image_datasets.py, verbatim apart from formatting (the reference)."""
  while min(*pil_image.size) >= 2 * image_size:
    pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
  scale = image_size / min(*pil_image.size)
  pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size),
                               resample=Image.BICUBIC)
  arr = np.array(pil_image)
  crop_y = (arr.shape[0] - image_size) // 2
  crop_x = (arr.shape[1] - image_size) // 2
  return arr[crop_y:crop_y + image_size, crop_x:crop_x + image_size]


def test_center_crop_non_square_keeps_the_center():
  # Wide [20, 60]: thirds red / green / blue. One BOX halving (20 >= 2 * 10) gives [10, 30];
  # the central 10 columns are the green third.
  wide = np.zeros((20, 60, 3), np.uint8)
  wide[:, :20, 0] = wide[:, 20:40, 1] = wide[:, 40:, 2] = 255
  out = transforms.center_crop_arr(wide, 10)
  assert out.shape == (10, 10, 3)
  np.testing.assert_array_equal(out, np.broadcast_to([0, 255, 0], (10, 10, 3)))
  # Tall [45, 30] -> bicubic to [30, 20], crop rows 5..25: the middle band of three.
  tall = np.zeros((45, 30, 1), np.uint8)
  tall[15:30] = 200
  out = transforms.center_crop_arr(tall, 20)
  assert out.shape == (20, 20, 1)
  assert abs(int(out[10, 10, 0]) - 200) <= 2 and out[0, 10, 0] < 100 and out[-1, 10, 0] < 100


@pytest.mark.parametrize("shape,size", [((300, 500, 3), 64), ((97, 61, 3), 32), ((50, 70), 16),
                                        ((600, 129, 3), 64)])
def test_center_crop_matches_guided_diffusion(shape, size):
  image = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
  ours = transforms.center_crop_arr(image, size)
  ref = _guided_diffusion_center_crop_arr(Image.fromarray(image), size)
  np.testing.assert_array_equal(ours, ref.reshape(ours.shape))
  assert ours.shape == (size, size, shape[2] if len(shape) == 3 else 1)


def test_pipeline_raises_shape_error_for_wrong_images(monkeypatch):
  from common.data import sources  # pylint: disable=g-import-not-at-top
  images, labels = sources.load_digits()
  monkeypatch.setattr(sources, "load_digits",
                      lambda split="train": (np.concatenate([images, images], -1), labels))
  it = data.make_train_iterator(_cfg(name="digits"), global_batch_size=4, seed=0,
                                process_index=0, process_count=1)
  with pytest.raises(ShapeError, match=r"\(8, 8, 2\).*\(8, 8, 1\)"):
    next(it)


def test_check_image_shape_error():
  with pytest.raises(ShapeError, match=r"\(8, 8, 3\)"):
    transforms.check_image(np.zeros((8, 8, 1), np.uint8), 8, 3, "test")


# ----------------------------------------------------------------------------------------------
# tfds (array_record)


def test_tfds_missing_data_explains(tmp_path):
  cfg = _cfg(name="tfds", tfds_name="imagenet2012", data_dir=str(tmp_path), image_size=64)
  with pytest.raises(DataNotFoundError) as err:
    data.make_train_iterator(cfg, global_batch_size=2, seed=0, process_index=0, process_count=1)
  msg = str(err.value)
  assert str(tmp_path / "imagenet2012") in msg
  assert "tfds build imagenet2012" in msg and "--file_format=array_record" in msg
  assert "--manual_dir" in msg
  # Prepared, but as TFRecord: say so.
  version_dir = tmp_path / "imagenet2012" / "5.1.0"
  version_dir.mkdir(parents=True)
  (version_dir / "dataset_info.json").write_text("{}")
  (version_dir / "imagenet2012-train.tfrecord-00000-of-00001").write_bytes(b"")
  with pytest.raises(DataNotFoundError, match="another format.*array_record"):
    data.dataset_info(cfg)


@pytest.fixture(scope="module")
def tiny_tfds(tmp_path_factory):
  """A 7-example tfds dataset 'frugal_tiny_images' (RGB, varying non-square sizes, 3 classes)
  prepared in array_record format, with registration skipped so that it loads from its files."""
  tfds = pytest.importorskip("tensorflow_datasets")
  data_dir = str(tmp_path_factory.mktemp("tfds"))

  with tfds.core.registered.skip_registration():

    class FrugalTinyImages(tfds.core.GeneratorBasedBuilder):
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(num_classes=3)}))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        rng = np.random.default_rng(0)
        for i in range(7):
          buf = io.BytesIO()  # PNG-encode with PIL: tfds' own encoder needs TensorFlow
          Image.fromarray(rng.integers(0, 256, (20 + 3 * i, 40 - 2 * i, 3), dtype=np.uint8)
                          ).save(buf, format="PNG")
          yield i, {"image": buf.getvalue(), "label": i % 3}

    FrugalTinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_array_record(tiny_tfds):
  cfg = _cfg(name="tfds", tfds_name="frugal_tiny_images", data_dir=tiny_tfds, image_size=16,
             random_flip=True)
  assert data.dataset_info(cfg) == data.DatasetInfo(16, 3, 3, 7)
  images, labels = data.load_arrays(cfg)
  assert images.shape == (7, 16, 16, 3) and images.dtype == np.uint8
  assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 2, 2]
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  raw = tfds.data_source("frugal_tiny_images", split="train", data_dir=tiny_tfds, download=False)
  np.testing.assert_array_equal(images[3], transforms.center_crop_arr(raw[3]["image"], 16))
  kw = dict(global_batch_size=4, seed=2, process_index=0, process_count=1)
  it = data.make_train_iterator(cfg, **kw)
  first = _take(it, 2)
  assert first[0]["x"].shape == (4, 16, 16, 3) and first[0]["cond"]["label"].dtype == np.int32
  state = it.get_state()
  expected = _take(it, 3)
  fresh = data.make_train_iterator(cfg, **kw)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 3), expected)
  with pytest.raises(ShapeError, match="channel"):
    data.dataset_info(_cfg(name="tfds", tfds_name="frugal_tiny_images", data_dir=tiny_tfds,
                           image_size=16, channels=1))
  unlabeled = _cfg(name="tfds", tfds_name="frugal_tiny_images", data_dir=tiny_tfds, image_size=8,
                   label_key=None)
  assert data.dataset_info(unlabeled).num_classes == 0
  assert not data.load_arrays(unlabeled, limit=3)[1].any()
  with pytest.raises(DataNotFoundError, match="validation"):
    data.load_arrays(cfg, split="validation")


# ----------------------------------------------------------------------------------------------
# SYNTHETIC random images


def test_synthetic_is_deterministic_checkpointable_and_marked(capsys):
  cfg = _cfg(name="synthetic", image_size=12, num_classes=5, num_examples=40, random_flip=True)
  info = data.dataset_info(cfg)
  assert info == data.DatasetInfo(12, 3, 5, 40, synthetic=True)
  assert "SYNTHETIC" in repr(info) and "SYNTHETIC" not in repr(data.DatasetInfo(8, 1, 10, 1797))
  images, labels = data.load_arrays(cfg, limit=6)
  assert images.shape == (6, 12, 12, 3) and images.dtype == np.uint8 and images.std() > 20
  assert labels.min() >= 0 and labels.max() < 5 and len(set(labels.tolist())) > 1
  np.testing.assert_array_equal(data.load_arrays(cfg, limit=6)[0], images)   # same seed, same data
  other = data.load_arrays(_cfg(name="synthetic", image_size=12, num_classes=5, num_examples=40,
                                seed=1), limit=6)[0]
  assert not np.array_equal(other, images)
  assert not np.array_equal(data.load_arrays(cfg, split="test", limit=6)[0], images)
  kw = dict(global_batch_size=4, seed=3, process_index=0, process_count=1)
  it = data.make_train_iterator(cfg, **kw)
  assert "SYNTHETIC" in capsys.readouterr().out
  first = _take(it, 2)
  assert first[0]["x"].shape == (4, 12, 12, 3) and first[0]["x"].dtype == np.float32
  assert -1.0 <= first[0]["x"].min() and first[0]["x"].max() <= 1.0
  state = it.get_state()
  expected = _take(it, 3)
  fresh = data.make_train_iterator(cfg, **kw)
  _assert_batches_equal(_take(fresh, 2), first)
  fresh.set_state(state)
  _assert_batches_equal(_take(fresh, 3), expected)
  one_channel = data.load_arrays(_cfg(name="synthetic", image_size=5, channels=1, num_classes=0,
                                      num_examples=3))
  assert one_channel[0].shape == (3, 5, 5, 1) and not one_channel[1].any()


def test_synthetic_captions_latent_shaped_and_checkpointable(capsys):
  cfg = _cfg(name="synthetic", image_size=6, channels=4, num_classes=0, num_examples=20,
             text_len=5, text_width=3)
  kw = dict(global_batch_size=4, seed=1, process_index=0, process_count=1)
  it = data.make_train_iterator(cfg, **kw)
  assert "SYNTHETIC random images and caption embeddings" in capsys.readouterr().out
  first = _take(it, 2)
  cond = first[0]["cond"]
  assert first[0]["x"].shape == (4, 6, 6, 4)
  assert (cond["tokens"].shape, cond["mask"].shape, cond["pooled"].shape) == ((4, 5, 3), (4, 5),
                                                                              (4, 3))
  assert cond["tokens"].dtype == np.float32 and cond["mask"].dtype == np.int32
  assert 0.5 < cond["tokens"].std() < 1.5 and (cond["tokens"][cond["mask"] == 0] != 0).any()
  lengths = cond["mask"].sum(1)       # real tokens first, at least one
  assert lengths.min() >= 1 and all(cond["mask"][i, :n].all() for i, n in enumerate(lengths))
  state = it.get_state()
  expected = _take(it, 2)
  fresh = data.make_train_iterator(cfg, **kw)
  fresh.set_state(state)
  resumed = _take(fresh, 2)
  _assert_batches_equal(resumed, expected)
  for a, b in zip(resumed, expected):
    for k in ("tokens", "mask", "pooled"):
      np.testing.assert_array_equal(a["cond"][k], b["cond"][k])
  with pytest.raises(ConfigError, match="text_len and data.text_width"):
    data.make_train_iterator(_cfg(name="synthetic", image_size=6, text_len=5), **kw)
  with pytest.raises(ConfigError, match="synthetic"):
    data.dataset_info(_cfg(name="digits", text_len=5))


def test_synthetic_config_errors():
  with pytest.raises(ConfigError, match="image_size"):
    data.dataset_info(_cfg(name="synthetic"))
  with pytest.raises(ConfigError, match="synthetic"):
    data.dataset_info(_cfg(name="digits", num_classes=10))
  with pytest.raises(ConfigError, match="positive"):
    data.load_arrays(_cfg(name="synthetic", image_size=8, num_examples=0))
