"""Tests of captioned sources, launch/precompute.py and the precomputed-latents grain pipeline.

The encoders are small stand-ins with the interfaces of common.autoencoders / common.text: a fixed
random linear patch "autoencoder" and a hashing bag-of-words "text encoder", passed in as arguments.
"""

import gzip
import json
import os
import struct
import subprocess
import sys
import zlib

import ml_collections
import numpy as np
import pytest
from PIL import Image

from common.data import captions as cap
from common.data import latents as lat
from common.errors import ConfigError, DataNotFoundError, ShapeError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------------------------
# Stand-in encoders


class PatchAutoencoder:
  """Latents = fixed random linear map of each 4x4 patch: [B, H, W, C] -> [B, H/4, W/4, 4]."""

  def __init__(self, channels: int = 1, latent_channels: int = 4, patch: int = 4):
    self.patch, self.latent_channels = patch, latent_channels
    rng = np.random.default_rng(123)
    self.weight = rng.normal(size=(patch * patch * channels, latent_channels)).astype(np.float32)
    self.calls = 0

  def latent_shape(self, image_shape):
    h, w, _ = image_shape
    return (h // self.patch, w // self.patch, self.latent_channels)

  def encode(self, images, key=None):
    self.calls += 1
    b, h, w, c = images.shape
    p = self.patch
    patches = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    z = patches.reshape(b, h // p, w // p, p * p * c) @ self.weight / p
    if key is not None:
      import jax  # pylint: disable=import-outside-toplevel
      z = z + 0.1 * np.asarray(jax.random.normal(key, z.shape))
    return z.astype(np.float32)


class HashingTextEncoder:
  """Each word -> a fixed random vector (seeded by its crc32); pooled = mean of real tokens."""

  max_length = 8
  width = 16

  def __init__(self):
    self.prompts_encoded = []

  def _vector(self, word: str) -> np.ndarray:
    return np.random.default_rng(zlib.crc32(word.encode())).normal(size=self.width)

  def encode(self, prompts):
    self.prompts_encoded.extend(prompts)
    n, t, d = len(prompts), self.max_length, self.width
    tokens = np.zeros((n, t, d), np.float32)
    mask = np.zeros((n, t), np.int32)
    for i, prompt in enumerate(prompts):
      words = prompt.split()[:t]
      for j, word in enumerate(words):
        tokens[i, j] = self._vector(word)
      mask[i, :len(words)] = 1
    pooled = tokens.sum(1) / np.maximum(mask.sum(1, keepdims=True), 1)
    return {"tokens": tokens, "mask": mask, "pooled": pooled.astype(np.float32)}


# ----------------------------------------------------------------------------------------------
# Synthetic Fashion-MNIST idx files: image i has pixel (0, 0) = i % 251, (0, 1) = i // 251, so its
# latent is unique.


def _write_idx(path: str, array: np.ndarray):
  payload = struct.pack(f">{1 + array.ndim}i", 0x00000800 | array.ndim, *array.shape)
  with gzip.open(path + ".gz", "wb") as f:
    f.write(payload + array.tobytes())


def _write_fmnist(directory, n: int) -> str:
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  for prefix, count in (("train", n), ("t10k", 20)):
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(count) % 251
    images[:, 0, 1] = np.arange(count) // 251
    _write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte"), images)
    _write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte"),
               (np.arange(count) * 7 % 10).astype(np.uint8))
  return str(directory)


N_FASHION = 300


@pytest.fixture(scope="module")
def fmnist_dir(tmp_path_factory):
  return _write_fmnist(tmp_path_factory.mktemp("fmnist"), N_FASHION)


def _write(output, source, **kwargs):
  kwargs = {"shard_size": 128, "batch_size": 32, "progress_every_s": 0.0, **kwargs}
  ae = kwargs.pop("autoencoder", None) or PatchAutoencoder()
  te = kwargs.pop("text_encoder", None) or HashingTextEncoder()
  return lat.write_dataset(source, str(output), autoencoder=ae, text_encoder=te,
                           autoencoder_spec="patch-ae", text_encoder_spec="hashing", **kwargs)


@pytest.fixture(scope="module")
def fashion_latents(tmp_path_factory, fmnist_dir):
  """300 synthetic Fashion-MNIST images precomputed into 3 shards (128, 128, 44), float32."""
  output = tmp_path_factory.mktemp("fashion_latents")
  text_encoder = HashingTextEncoder()
  meta = _write(output, cap.CaptionedFashionMNIST(fmnist_dir, "train", seed=3),
                text_encoder=text_encoder, dtype="float32")
  return str(output), meta, text_encoder


def _cfg(path, **kwargs):
  return ml_collections.ConfigDict({"name": "latents", "path": path, **kwargs})


def _files(directory) -> dict[str, bytes]:
  return {f: open(os.path.join(directory, f), "rb").read() for f in sorted(os.listdir(directory))}


# ----------------------------------------------------------------------------------------------
# Captions


def test_fashion_templates_split_disjoint_and_eval_prompts():
  train, evals = cap.fashion_caption_templates("train"), cap.fashion_caption_templates("eval")
  assert len(train) >= 5 and len(evals) >= 3 and not set(train) & set(evals)
  train_captions = {cap.fashion_caption(c, t) for c in range(10) for t in train}
  assert len(train_captions) == 100
  prompts, labels = cap.fashion_eval_prompts(6)
  assert len(prompts) == 60 and labels.dtype == np.int32
  np.testing.assert_array_equal(labels, np.repeat(np.arange(10), 6))
  assert not set(prompts) & train_captions
  for prompt, label in zip(prompts, labels):
    assert cap.FASHION_CLASS_NAMES[label] in prompt
  assert cap.fashion_caption(8, train[1]) == "a photo of a bag"
  assert cap.fashion_caption(9, train[1]) == "a photo of an ankle boot"
  with pytest.raises(ConfigError):
    cap.fashion_caption_templates("test")


def test_fashion_captions_deterministic_per_seed_and_index(fmnist_dir):
  a = cap.CaptionedFashionMNIST(fmnist_dir, "train", seed=0)
  b = cap.CaptionedFashionMNIST(fmnist_dir, "train", seed=0)
  c = cap.CaptionedFashionMNIST(fmnist_dir, "train", seed=1)
  train = {cap.fashion_caption(k, t) for k in range(10)
           for t in cap.fashion_caption_templates("train")}
  first = [a[i].captions for i in range(50)]
  assert first == [b[i].captions for i in range(50)]
  assert first != [c[i].captions for i in range(50)]
  assert len({x for (x,) in first}) > 10  # several templates and classes in use
  for i in range(50):
    ex = a[i]
    assert ex.image.shape == (28, 28, 1) and ex.image.dtype == np.uint8
    assert ex.captions[0] in train and cap.FASHION_CLASS_NAMES[ex.label] in ex.captions[0]


# ----------------------------------------------------------------------------------------------
# Precompute


def test_precompute_fashion_shards_and_records(fashion_latents, fmnist_dir):
  output, meta, text_encoder = fashion_latents
  assert meta["num_shards"] == 3 and meta["shard_examples"] == [128, 128, 44]
  assert meta["latent_shape"] == [7, 7, 4] and meta["image_shape"] == [28, 28, 1]
  stats = [s.replace(".array_record", ".stats.json") for s in meta["shards"]]
  assert sorted(os.listdir(output)) == sorted(meta["shards"] + stats +
                                              ["meta.json", "precompute.json"])
  assert meta["skipped"] == {} and meta["source_examples"] == meta["num_examples"] == N_FASHION
  source = cap.CaptionedFashionMNIST(fmnist_dir, "train", seed=3)
  # Captions repeat: each shard encodes each of its distinct captions once.
  distinct = [len({source[i].captions[0] for i in range(lo, min(lo + 128, N_FASHION))})
              for lo in (0, 128, 256)]
  assert len(text_encoder.prompts_encoded) == sum(distinct) < 0.7 * N_FASHION
  records = lat.LatentsSource(output)
  assert len(records) == N_FASHION
  ae, te = PatchAutoencoder(), HashingTextEncoder()
  for i in (0, 127, 128, 299):
    rec, ex = records[i], source[i]
    assert rec["index"] == i and rec["label"] == ex.label and tuple(rec["captions"]) == ex.captions
    image = ex.image[None].astype(np.float32) / 127.5 - 1
    np.testing.assert_array_equal(rec["x"], ae.encode(image)[0])
    enc = te.encode(list(ex.captions))
    assert rec["tokens"].shape == (1, 8, 16) and rec["mask"].dtype == np.uint8
    np.testing.assert_array_equal(rec["tokens"], enc["tokens"])
    np.testing.assert_array_equal(rec["mask"], enc["mask"])
    np.testing.assert_array_equal(rec["pooled"], enc["pooled"])


def test_precompute_float16_and_posterior_sample(tmp_path, fmnist_dir):
  source = cap.CaptionedFashionMNIST(fmnist_dir, "train")
  _write(tmp_path / "mean", source, limit=40)
  _write(tmp_path / "s1", source, limit=40, latent="sample", seed=5)
  _write(tmp_path / "s2", source, limit=40, latent="sample", seed=5)
  mean, s1, s2 = (lat.LatentsSource(str(tmp_path / d)) for d in ("mean", "s1", "s2"))
  assert mean[0]["x"].dtype == np.float16 and mean[0]["tokens"].dtype == np.float16
  exact = PatchAutoencoder().encode(source[3].image[None].astype(np.float32) / 127.5 - 1)[0]
  np.testing.assert_allclose(mean[3]["x"], exact, rtol=1e-3, atol=1e-3)
  np.testing.assert_array_equal(s1[3]["x"], s2[3]["x"])
  assert 0.01 < np.abs(s1[3]["x"].astype(np.float32) - mean[3]["x"]).mean() < 0.3


def test_trim_padding_reads_back_the_same_examples(tmp_path, fmnist_dir):
  source = cap.CaptionedFashionMNIST(fmnist_dir, "train")
  _write(tmp_path / "full", source, limit=40)
  _write(tmp_path / "trim", source, limit=40, trim_padding=True)
  full, trim = lat.LatentsSource(str(tmp_path / "full")), lat.LatentsSource(str(tmp_path / "trim"))
  lengths = set()
  for i in range(40):
    a, b = full[i], trim[i]
    real = int(a["mask"][0].sum())  # the hashing encoder's tokens are zero at padding
    assert b["tokens"].shape == (1, real, 16) and a["tokens"].shape == (1, 8, 16)
    lengths.add(real)
    pa = lat.PickCaption().random_map(a, np.random.default_rng(i))
    pb = lat.PickCaption().random_map(b, np.random.default_rng(i))
    for k in ("tokens", "mask", "pooled"):
      np.testing.assert_array_equal(pa["cond"][k], pb["cond"][k])
  assert len(lengths) > 1 and min(lengths) < 8


def test_interrupt_and_resume_gives_identical_bytes(tmp_path, fmnist_dir):
  source = cap.CaptionedFashionMNIST(fmnist_dir, "train", seed=3)
  _write(tmp_path / "full", source)

  def stop_after_first(k):
    if k == 0:
      raise KeyboardInterrupt

  with pytest.raises(KeyboardInterrupt):
    _write(tmp_path / "resumed", source, on_shard_done=stop_after_first)
  names = sorted(os.listdir(tmp_path / "resumed"))
  assert names == ["precompute.json", lat.shard_name(0, 3),
                   lat.shard_name(0, 3).replace(".array_record", ".stats.json")]
  with pytest.raises(DataNotFoundError, match="unfinished"):
    lat.latents_info(_cfg(str(tmp_path / "resumed")))
  # A half-written shard left by the interruption is rewritten, not trusted.
  with open(tmp_path / "resumed" / (lat.shard_name(1, 3) + ".tmp"), "wb") as f:
    f.write(b"garbage")
  ae = PatchAutoencoder()
  _write(tmp_path / "resumed", source, autoencoder=ae)
  assert ae.calls == 6  # shards 1 and 2 only: 128 / 32 + ceil(44 / 32) batches
  assert _files(tmp_path / "resumed") == _files(tmp_path / "full")
  # A rerun of a finished dataset encodes nothing.
  ae = PatchAutoencoder()
  _write(tmp_path / "resumed", source, autoencoder=ae)
  assert ae.calls == 0


def test_resume_with_other_settings_is_refused(tmp_path, fmnist_dir):
  source = cap.CaptionedFashionMNIST(fmnist_dir, "train")
  _write(tmp_path / "d", source, limit=40)
  with pytest.raises(ConfigError, match="shard_size"):
    _write(tmp_path / "d", source, limit=40, shard_size=16)


def test_two_writer_processes_share_a_directory(tmp_path, fmnist_dir):
  source = cap.CaptionedFashionMNIST(fmnist_dir, "train", seed=3)
  _write(tmp_path / "one", source)
  assert _write(tmp_path / "two", source, process_index=1, process_count=2) is None
  assert not os.path.exists(tmp_path / "two" / "meta.json")
  assert _write(tmp_path / "two", source, process_index=0, process_count=2) is not None
  assert _files(tmp_path / "two") == _files(tmp_path / "one")


def test_encoder_shape_errors(tmp_path, fmnist_dir):
  source = cap.CaptionedFashionMNIST(fmnist_dir, "train")

  class WrongWidth(HashingTextEncoder):
    width = 12

    def encode(self, prompts):
      out = super().encode(prompts)
      return {**out, "tokens": np.zeros((len(prompts), 8, 16), np.float32)}

  with pytest.raises(ShapeError, match="text encoder returned"):
    _write(tmp_path / "a", source, limit=10, text_encoder=WrongWidth())


# ----------------------------------------------------------------------------------------------
# Grain pipeline


def test_iterator_batches_shapes_and_dtypes(fashion_latents):
  output, _, _ = fashion_latents
  info = lat.latents_info(_cfg(output))
  assert info.latent_shape == (7, 7, 4) and info.num_examples == N_FASHION
  assert (info.text_max_length, info.text_width) == (8, 16)
  assert (info.autoencoder, info.text_encoder, info.dtype) == ("patch-ae", "hashing", "float32")
  it = lat.latents_train_iterator(_cfg(output, read_threads=2), global_batch_size=16, seed=0,
                                  process_index=0, process_count=1)
  batches = [next(it) for _ in range(25)]  # more than an epoch (300 / 16 = 18 batches)
  for b in batches:
    assert set(b) == {"x", "cond"} and set(b["cond"]) == {"tokens", "mask", "pooled", "label"}
    assert b["cond"]["label"].shape == (16,) and b["cond"]["label"].dtype == np.int32
    assert b["cond"]["label"].min() >= 0 and b["cond"]["label"].max() < 10
    assert b["x"].shape == (16, 7, 7, 4) and b["x"].dtype == np.float32
    assert b["cond"]["tokens"].shape == (16, 8, 16) and b["cond"]["tokens"].dtype == np.float32
    assert b["cond"]["mask"].shape == (16, 8) and b["cond"]["mask"].dtype == np.int32
    assert b["cond"]["pooled"].shape == (16, 16) and b["cond"]["pooled"].dtype == np.float32
  # An epoch is a permutation: the first 18 batches hold 288 distinct examples.
  keys = {x.tobytes() for b in batches[:18] for x in b["x"]}
  assert len(keys) == 288


def _epoch_keys(path, process_index, process_count, batch=10):
  it = lat.latents_train_iterator(_cfg(path, read_threads=0, read_buffer_size=0),
                                  global_batch_size=batch * process_count, seed=1,
                                  process_index=process_index, process_count=process_count)
  return [x.tobytes() for _ in range(N_FASHION // process_count // batch) for x in next(it)["x"]]


def test_per_process_shards_are_disjoint(fashion_latents):
  output, _, _ = fashion_latents
  a, b = _epoch_keys(output, 0, 2), _epoch_keys(output, 1, 2)
  assert len(set(a)) == len(a) == 150 and len(set(b)) == 150
  assert not set(a) & set(b)
  all_keys = {r["x"].tobytes() for r in (lat.LatentsSource(output)[i] for i in range(N_FASHION))}
  assert set(a) | set(b) == all_keys


def test_checkpoint_restore_resumes_the_stream(fashion_latents):
  output, _, _ = fashion_latents
  cfg = _cfg(output, read_threads=2)
  it = lat.latents_train_iterator(cfg, global_batch_size=8, seed=4, process_index=0,
                                  process_count=1)
  for _ in range(5):
    next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(4)]
  restored = lat.latents_train_iterator(cfg, global_batch_size=8, seed=4, process_index=0,
                                        process_count=1)
  restored.set_state(state)
  for want, got in zip(expected, [next(restored) for _ in range(4)]):
    np.testing.assert_array_equal(want["x"], got["x"])
    for k in ("tokens", "mask", "pooled", "label"):
      np.testing.assert_array_equal(want["cond"][k], got["cond"][k])


def test_missing_and_bad_configs(tmp_path, fashion_latents):
  with pytest.raises(DataNotFoundError, match="launch/precompute.py"):
    lat.latents_info(_cfg(str(tmp_path / "nope")))
  with pytest.raises(DataNotFoundError, match="launch/precompute.py"):
    lat.latents_train_iterator(_cfg(str(tmp_path)), global_batch_size=4, seed=0,
                               process_index=0, process_count=1)
  with pytest.raises(ConfigError, match="image_size"):
    lat.latents_info(_cfg(fashion_latents[0], image_size=28))
  with pytest.raises(ConfigError, match="multiple"):
    lat.latents_train_iterator(_cfg(fashion_latents[0]), global_batch_size=3, seed=0,
                               process_index=0, process_count=2)
  info = lat.latents_info(_cfg(fashion_latents[0]))
  lat.check_encoders(info, autoencoder="patch-ae", text_encoder=None)
  with pytest.raises(ConfigError, match="text_encoder"):
    lat.check_encoders(info, autoencoder="patch-ae", text_encoder="minilm")


# ----------------------------------------------------------------------------------------------
# Image folder with .txt captions, COCO JSON, the command line


def _png(path, size, seed):
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(path)


def test_image_folder_with_txt_captions(tmp_path):
  root = tmp_path / "folder"
  (root / "sub").mkdir(parents=True)
  _png(root / "img001.png", (40, 60), 0)
  (root / "img001.txt").write_text("a red square\n")
  _png(root / "sub" / "b.jpg", (32, 32), 1)
  (root / "sub" / "b.txt").write_text("first caption\n\n  second caption  \n")
  source = cap.CaptionedImageFolder(str(root), image_size=16)
  assert len(source) == 2 and source[0].captions == ("a red square",)
  assert source[1].captions == ("first caption", "second caption") and source[1].label == -1
  assert source[0].image.shape == (16, 16, 3) and source[0].image.dtype == np.uint8
  meta = lat.precompute(
      source="image_folder", path=str(root), image_size=16, output=str(tmp_path / "out"),
      autoencoder="patch-ae", text_encoder="hashing", dtype="float32",
      load_autoencoder=lambda spec: PatchAutoencoder(channels=3),
      load_text_encoder=lambda spec: HashingTextEncoder())
  assert meta["num_examples"] == 2 and meta["latent_shape"] == [4, 4, 4]
  records = lat.LatentsSource(str(tmp_path / "out"))
  assert records[1]["tokens"].shape == (2, 8, 16) and records[1]["captions"] == [
      "first caption", "second caption"]
  _png(root / "no_caption.png", (20, 20), 2)
  with pytest.raises(DataNotFoundError, match="no_caption.txt"):
    cap.CaptionedImageFolder(str(root), image_size=16)


@pytest.mark.parametrize("case, message", [
    ("bomb", r"is too large to decode \(.*10000000000 pixels.*\); at most 67108864 pixels"),
    ("truncated", r"damaged or not a valid image \(OSError: Truncated File Read\)"),
    ("not-an-image", "not an image file PIL can identify"),
    ("bad-crc", r"damaged or not a valid image \(SyntaxError: broken PNG file \(bad header checksum"),
    ("truncated-jpeg", r"damaged or not a valid image \(OSError: image file is truncated"),
])
def test_bad_images_are_refused_before_decoding(tmp_path, case, message):
  from tests.bad_inputs.images import bad_images, truncated_jpeg  # pylint: disable=import-outside-toplevel
  root = tmp_path / "folder"
  root.mkdir()
  _png(root / "a.png", (20, 20), 0)
  name = "b.jpg" if case == "truncated-jpeg" else "b.png"
  (root / name).write_bytes(truncated_jpeg() if case == "truncated-jpeg" else bad_images()[case])
  for stem in ("a", "b"):
    (root / f"{stem}.txt").write_text("a caption\n")
  source = cap.CaptionedImageFolder(str(root), image_size=16)
  assert source[0].image.shape == (16, 16, 3)
  with pytest.raises(DataNotFoundError, match=f"image {root / name}.*" + message):
    source[1]  # pylint: disable=pointless-statement


def test_image_size_limit_is_checked_from_the_header(tmp_path):
  from common.data import image_folder  # pylint: disable=import-outside-toplevel
  _png(tmp_path / "a.png", (30, 40), 0)
  assert image_folder.read_image(tmp_path / "a.png", 3, max_pixels=1200).shape == (30, 40, 3)
  with pytest.raises(DataNotFoundError, match=r"\(40x30 = 1200 pixels\); at most 1199 pixels"):
    image_folder.read_image(tmp_path / "a.png", 3, max_pixels=1199)


def test_coco_captions_and_caption_draws(tmp_path):
  image_dir = tmp_path / "train2014"
  image_dir.mkdir()
  images = []
  for i, image_id in enumerate((42, 7, 99, 13)):
    name = f"COCO_train2014_{image_id:012d}.jpg"
    _png(image_dir / name, (24 + 4 * i, 20), i)
    images.append({"id": image_id, "file_name": name})
  annotations = [{"image_id": 42, "caption": f"caption {k} of 42\n", "id": k} for k in range(5)]
  annotations += [{"image_id": 7, "caption": "the only caption of 7", "id": 10},
                  {"image_id": 13, "caption": "a caption of 13", "id": 11},
                  {"image_id": 13, "caption": "another caption of 13", "id": 12}]
  json_path = tmp_path / "captions_train2014.json"
  json_path.write_text(json.dumps({"images": images, "annotations": annotations}))
  source = cap.CocoCaptions(str(json_path), str(image_dir), image_size=16)
  assert len(source) == 3  # image 99 has no caption
  assert source[0].captions == tuple(f"caption {k} of 42" for k in range(5))
  assert source[2].captions == ("a caption of 13", "another caption of 13")
  assert source[1].image.shape == (16, 16, 3)
  output = str(tmp_path / "coco_latents")
  lat.precompute(
      source="coco", path=str(json_path), image_dir=str(image_dir), image_size=16, output=output,
      autoencoder="patch-ae", text_encoder="hashing", shard_size=2, batch_size=2,
      load_autoencoder=lambda spec: PatchAutoencoder(channels=3),
      load_text_encoder=lambda spec: HashingTextEncoder())
  records = lat.LatentsSource(output)
  assert len(records) == 3 and records[0]["tokens"].shape == (5, 8, 16)
  # Each draw of image 42 takes one of its five captions; over many draws all of them appear.
  te = HashingTextEncoder()
  pooled = {te.encode([f"caption {i} of 42"])["pooled"][0].astype(np.float16).astype(
      np.float32).tobytes() for i in range(5)}
  draws = {lat.PickCaption().random_map(records[0], np.random.default_rng(s))["cond"][
      "pooled"].tobytes() for s in range(40)}
  assert draws == pooled
  it = lat.latents_train_iterator(_cfg(output, read_threads=0, read_buffer_size=0),
                                  global_batch_size=3, seed=0, process_index=0, process_count=1)
  for _ in range(2):
    b = next(it)
    assert b["cond"]["tokens"].shape == (3, 8, 16)
    assert {p.tobytes() for p in b["cond"]["pooled"]} - pooled  # other images' captions too
    assert (b["cond"]["label"] == -1).all()  # COCO captions carry no class label
  json_path.write_text('{"images": []}')
  with pytest.raises(ShapeError, match="not a COCO caption file"):
    cap.CocoCaptions(str(json_path), str(image_dir), image_size=16)


def test_command_line_errors_are_one_line(tmp_path):
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  cmd = [sys.executable, os.path.join(REPO, "launch", "precompute.py"), "--source=fashion_mnist",
         f"--path={tmp_path / 'missing'}", "--autoencoder=x", "--text_encoder=y",
         f"--output={tmp_path / 'out'}"]
  result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
  assert result.returncode == 1, result.stderr
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: Fashion-MNIST file"), result.stderr
  result = subprocess.run(cmd[:2] + ["--source=laion"], capture_output=True, text=True,
                          env=env, timeout=120)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == 1 and len(lines) == 1 and "laion" in lines[0], result.stderr


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_captions(tmp_path):
  source = cap.CaptionedFashionMNIST()
  assert len(source) == 60000
  meta = _write(tmp_path / "real", source, limit=200, shard_size=100, batch_size=50)
  assert meta["num_shards"] == 2
  rec = lat.LatentsSource(str(tmp_path / "real"))[150]
  assert cap.FASHION_CLASS_NAMES[rec["label"]] in rec["captions"][0]
  exact = PatchAutoencoder().encode(source[150].image[None].astype(np.float32) / 127.5 - 1)[0]
  np.testing.assert_allclose(rec["x"], exact, rtol=1e-3, atol=1e-3)
