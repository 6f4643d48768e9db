"""MicroDiT's training data (docs/MICRODIT_DATA.md): webdataset and parquet sources, the
minimum-side filter and skipped bad images, latent mixtures, and the doc's commands at a tiny size.

The encoders are test_precompute's stand-ins (a fixed random patch map, a hashing text encoder).
"""

import gzip
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile

import ml_collections
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from array_record.python import array_record_module
from PIL import Image

from common.data import captions as cap
from common.data import latents as lat
from common.data import dataset_info, make_train_iterator
from common.data import parquet_source, webdataset_source
from common.errors import ConfigError, DataNotFoundError
from common.eval import coco as coco_eval
from common.training import trainer
from configs import microdit
from configs.base import load_config, override
from tests.test_coco_fid import write_coco
from tests.test_precompute import HashingTextEncoder, PatchAutoencoder, _write
from tests.test_trainer import read_losses

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _image_bytes(size, seed, fmt="JPEG") -> bytes:
  w, h = size
  arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(arr).save(buf, format=fmt)
  return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_shards(directory, n_shards=2, per_shard=5):
  """Tar shards `{00000..}.tar`: per shard, `per_shard` good samples (jpg+txt, png+json, webp+txt
  in turn), one 40x300 image (below min side 64), one damaged jpg, one image without caption and
  one caption without image. Returns the captions of the good samples in order."""
  os.makedirs(directory, exist_ok=True)
  good = []
  for s in range(n_shards):
    with tarfile.open(os.path.join(directory, f"{s:05d}.tar"), "w") as tar:
      for i in range(per_shard):
        key, caption = f"s{s}/{i:04d}", f"shard {s} picture {i}"
        kind = i % 3
        if kind == 0:
          _add(tar, key + ".jpg", _image_bytes((96, 80), 10 * s + i))
          _add(tar, key + ".txt", (caption + "\n").encode())
        elif kind == 1:
          _add(tar, key + ".png", _image_bytes((80, 128), 10 * s + i, "PNG"))
          _add(tar, key + ".json", json.dumps({"caption": caption, "url": "x"}).encode())
        else:
          _add(tar, key + ".webp", _image_bytes((64, 64), 10 * s + i, "WEBP"))
          _add(tar, key + ".txt", caption.encode())
        good.append(caption)
      _add(tar, f"s{s}/small.jpg", _image_bytes((300, 40), 99))
      _add(tar, f"s{s}/small.txt", b"too small")
      broken = _image_bytes((96, 96), 98)
      _add(tar, f"s{s}/broken.jpg", broken[:len(broken) // 3])
      _add(tar, f"s{s}/broken.txt", b"a damaged file")
      _add(tar, f"s{s}/nocap.jpg", _image_bytes((96, 96), 97))
      _add(tar, f"s{s}/noimg.txt", b"caption only")
  return good


def write_table(directory, n=6):
  """A parquet table of `n` good rows (images/…png, 72x90) plus a small image, a missing file, a
  null caption and a path escaping the folder. Returns the good rows' captions."""
  images = os.path.join(directory, "images")
  os.makedirs(os.path.join(images, "sub"), exist_ok=True)
  names, texts = [], []
  for i in range(n):
    name = f"sub/{i:03d}.png"
    with open(os.path.join(images, name), "wb") as f:
      f.write(_image_bytes((72, 90), 200 + i, "PNG"))
    names.append(name)
    texts.append(f"a generated image number {i}")
  good = list(texts)
  with open(os.path.join(images, "small.png"), "wb") as f:
    f.write(_image_bytes((32, 200), 7, "PNG"))
  with open(os.path.join(directory, "secret.png"), "wb") as f:
    f.write(_image_bytes((72, 72), 8, "PNG"))
  names += ["small.png", "missing.png", "sub/000.png", "../secret.png"]
  texts += ["small one", "gone", None, "escape"]
  pq.write_table(pa.table({"image_name": names, "prompt": texts, "seed": list(range(len(names)))}),
                 os.path.join(directory, "metadata.parquet"))
  return good


# ----------------------------------------------------------------------------------------------
# Readers


def test_brace_and_glob_expansion(tmp_path):
  for name in ("00000.tar", "00001.tar", "00002.tar", "x.tar"):
    (tmp_path / name).write_bytes(b"")
  assert webdataset_source.expand_pattern(str(tmp_path / "{00000..00001}.tar")) == [
      str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
  assert len(webdataset_source.expand_pattern(str(tmp_path / "*.tar"))) == 4
  both = f"{tmp_path / '00002.tar'},{tmp_path / 'x.tar'}"
  assert len(webdataset_source.expand_pattern(both)) == 2
  with pytest.raises(DataNotFoundError, match="00003"):
    webdataset_source.expand_pattern(str(tmp_path / "{00002..00003}.tar"))


def test_webdataset_index_captions_and_skips(tmp_path):
  good = write_shards(tmp_path / "wds")
  src = webdataset_source.WebDatasetCaptions(str(tmp_path / "wds" / "{00000..00001}.tar"), 32,
                                             min_side=64)
  assert src.index_skipped == {"no_image": 2, "no_caption": 2}
  # per shard: 5 good, small, broken (no caption-less keys or image-less keys)
  assert len(src) == 2 * 7
  got, reasons = [], []
  for i in range(len(src)):
    try:
      ex = src[i]
    except cap.SkipExample as e:
      reasons.append(e.reason)
      continue
    assert ex.image.shape == (32, 32, 3) and ex.image.dtype == np.uint8 and ex.label == -1
    got.append(ex.captions[0])
  assert got == good
  assert sorted(reasons) == ["min_side"] * 2 + ["unreadable_image"] * 2


def test_gzipped_shard_is_refused(tmp_path):
  write_shards(tmp_path / "wds", n_shards=1)
  data = (tmp_path / "wds" / "00000.tar").read_bytes()
  (tmp_path / "a.tar.gz").write_bytes(gzip.compress(data))
  with pytest.raises(DataNotFoundError, match="gzip"):
    webdataset_source.WebDatasetCaptions(str(tmp_path / "a.tar.gz"), 32)


def test_parquet_rows_and_skips(tmp_path):
  good = write_table(str(tmp_path))
  src = parquet_source.ParquetCaptions(str(tmp_path / "metadata.parquet"),
                                       str(tmp_path / "images"), 32, image_column="image_name",
                                       caption_column="prompt", min_side=64)
  assert len(src) == len(good) + 4
  got, reasons = [], []
  for i in range(len(src)):
    try:
      got.append(src[i].captions[0])
    except cap.SkipExample as e:
      reasons.append(e.reason)
  assert got == good
  assert sorted(reasons) == ["min_side", "no_caption", "no_image", "path_outside_image_dir"]
  with pytest.raises(ConfigError, match="no column"):
    parquet_source.ParquetCaptions(str(tmp_path / "metadata.parquet"), str(tmp_path / "images"),
                                   32, image_column="file", caption_column="prompt")


def test_writer_counts_skipped_and_resumes_identically(tmp_path):
  good = write_shards(tmp_path / "wds")
  pattern = str(tmp_path / "wds" / "*.tar")
  src = webdataset_source.WebDatasetCaptions(pattern, 32, min_side=64)
  meta = _write(tmp_path / "out", src, shard_size=5, batch_size=3,
                autoencoder=PatchAutoencoder(channels=3))
  assert meta["num_examples"] == len(good) == 10
  assert meta["source_examples"] == 14
  assert meta["skipped"] == {"min_side": 2, "unreadable_image": 2}
  assert sum(meta["shard_examples"]) == 10
  records = [lat.deserialize_example(r) for r in _records(tmp_path / "out", meta)]
  assert [r["captions"][0] for r in records] == good
  # a resumed run (one shard deleted) writes the same bytes and counts
  first = open(tmp_path / "out" / meta["shards"][1], "rb").read()
  os.remove(tmp_path / "out" / meta["shards"][1])
  os.remove(tmp_path / "out" / "meta.json")
  meta2 = _write(tmp_path / "out", src, shard_size=5, batch_size=3,
                 autoencoder=PatchAutoencoder(channels=3))
  assert meta2 == meta
  assert open(tmp_path / "out" / meta["shards"][1], "rb").read() == first
  it = make_train_iterator(ml_collections.ConfigDict({"name": "latents",
                                                      "path": str(tmp_path / "out")}),
                           global_batch_size=4, seed=0, process_index=0, process_count=1)
  assert next(it)["x"].shape == (4, 8, 8, 4)


def _records(path, meta):
  out = []
  for shard in meta["shards"]:
    reader = array_record_module.ArrayRecordReader(str(path / shard))
    out += [reader.read() for _ in range(reader.num_records())]
    reader.close()
  return out


# ----------------------------------------------------------------------------------------------
# Mixtures


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
  """Latents of the tar shards (10 examples) and of the parquet table (6), both 32 px."""
  root = tmp_path_factory.mktemp("mix")
  write_shards(root / "wds")
  write_table(str(root / "pq"))
  a = webdataset_source.WebDatasetCaptions(str(root / "wds" / "*.tar"), 32, min_side=64)
  b = parquet_source.ParquetCaptions(str(root / "pq" / "metadata.parquet"),
                                     str(root / "pq" / "images"), 32, image_column="image_name",
                                     caption_column="prompt", min_side=64)
  ae = PatchAutoencoder(channels=3)
  _write(root / "a", a, autoencoder=ae, dtype="float32")
  _write(root / "b", b, autoencoder=ae, dtype="float32")
  small = parquet_source.ParquetCaptions(str(root / "pq" / "metadata.parquet"),
                                         str(root / "pq" / "images"), 16,
                                         image_column="image_name", caption_column="prompt")
  _write(root / "c16", small, autoencoder=ae, dtype="float32")
  return root


def _mix_cfg(root, weights, **kw):
  return ml_collections.ConfigDict({"name": "latents", "mixture": tuple(
      (str(root / name), w) for name, w in weights), "read_threads": 0, **kw})


def _origin(root, batch):
  """For each row of batch["x"], "a" or "b": which dataset holds that latent."""
  known = {}
  for name in ("a", "b"):
    for i in range(len(src := lat.LatentsSource(str(root / name)))):
      known[src[i]["x"].astype(np.float32).tobytes()] = name
  return [known[x.tobytes()] for x in batch["x"]]


def test_mixture_proportions_follow_weights(two_datasets):
  root = two_datasets
  for weights, expected in (((("a", "count"), ("b", "count")), 10 / 16),
                            ((("a", 0.25), ("b", 0.75)), 0.25)):
    it = make_train_iterator(_mix_cfg(root, weights), global_batch_size=16, seed=3,
                             process_index=0, process_count=1)
    origins = sum((_origin(root, next(it)) for _ in range(10)), [])
    frac = origins.count("a") / len(origins)
    assert abs(frac - expected) < 0.05, (weights, frac)
  info = dataset_info(_mix_cfg(root, (("a", "count"), ("b", 1.0))))
  assert info.num_examples == 16 and info.image_size == 8 and info.channels == 4


def test_mixture_is_deterministic_and_resumes(two_datasets):
  root = two_datasets
  cfg = _mix_cfg(root, (("a", 0.5), ("b", 0.5)))

  def make():
    return make_train_iterator(cfg, global_batch_size=4, seed=7, process_index=0,
                               process_count=1)

  it = make()
  first = [next(it) for _ in range(3)]
  state = it.get_state()
  json.dumps(state)  # what grain's orbax handler stores
  rest = [next(it) for _ in range(4)]
  again = make()
  for a, b in zip(first, [next(again) for _ in range(3)]):
    np.testing.assert_array_equal(a["x"], b["x"])
  resumed = make()
  resumed.set_state(state)
  for a, b in zip(rest, [next(resumed) for _ in range(4)]):
    np.testing.assert_array_equal(a["x"], b["x"])
    np.testing.assert_array_equal(a["cond"]["tokens"], b["cond"]["tokens"])
  batch = rest[0]
  assert batch["x"].dtype == np.float32 and batch["cond"]["tokens"].shape == (4, 8, 16)
  assert batch["cond"]["mask"].dtype == np.int32 and (batch["cond"]["label"] == -1).all()


def test_mixture_processes_read_disjoint_slices(two_datasets):
  root = two_datasets
  cfg = _mix_cfg(root, (("a", "count"), ("b", "count")))
  seen = []
  for p in range(2):
    it = make_train_iterator(cfg, global_batch_size=4, seed=1, process_index=p, process_count=2)
    seen.append({x.tobytes() for _ in range(6) for x in next(it)["x"]})
  assert seen[0] and seen[1] and not seen[0] & seen[1]


def test_mixture_errors(two_datasets):
  root = two_datasets
  with pytest.raises(ConfigError, match="latent_shape"):
    dataset_info(_mix_cfg(root, (("a", 1.0), ("c16", 1.0))))
  with pytest.raises(ConfigError, match="weight"):
    dataset_info(_mix_cfg(root, (("a", 1.0), ("b", 0))))
  with pytest.raises(ConfigError, match="both"):
    dataset_info(_mix_cfg(root, (("a", 1.0),), path=str(root / "a")))
  with pytest.raises(ConfigError, match="twice"):
    dataset_info(_mix_cfg(root, (("a", 1.0), ("a", 2.0))))
  with pytest.raises(DataNotFoundError, match="no precomputed latent dataset"):
    dataset_info(_mix_cfg(root, (("a", 1.0), ("nope", 1.0))))


# ----------------------------------------------------------------------------------------------
# docs/MICRODIT_DATA.md, run at a tiny size


def _doc_blocks(lang: str) -> list[str]:
  text = open(os.path.join(REPO, "docs", "MICRODIT_DATA.md"), encoding="utf-8").read()
  return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def _doc_commands(prefix: str) -> list[list[str]]:
  return [shlex.split(line) for block in _doc_blocks("sh") for line in block.splitlines()
          if line.startswith(prefix)]


def _flags(argv: list[str]) -> dict:
  out = {}
  for arg in argv:
    key, _, value = arg.removeprefix("--").partition("=")
    out[key] = int(value) if value.isdigit() else value
  return out


def _jpg(path, size, seed, fmt="JPEG"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "wb") as f:
    f.write(_image_bytes(size, seed, fmt))


def _raw_sources(root):
  """Tiny copies of each source's download layout under root/data/raw (see the doc). Sizes per
  source: two images >= 512 px, one 256..511 px, one below 256 px (skipped by --min_side=256)."""
  sizes = [(640, 520), (512, 600), (300, 280), (200, 300)]
  raw = os.path.join(root, "data", "raw")
  os.makedirs(os.path.join(raw, "cc12m"))
  for s in range(2):
    with tarfile.open(os.path.join(raw, "cc12m", f"cc12m-train-{s:04d}.tar"), "w") as tar:
      for i, size in enumerate(sizes):
        _add(tar, f"{s:04d}{i:04d}.jpg", _image_bytes(size, 10 * s + i))
        _add(tar, f"{s:04d}{i:04d}.txt", f"cc12m {s} {i}".encode())
  for i, size in enumerate(sizes):
    _jpg(os.path.join(raw, "sa1b", "images", f"sa_{i + 1}.jpg"), size, 20 + i)
  os.makedirs(os.path.join(raw, "sa1b", "captions"))
  for i in range(len(sizes) + 1):  # the last caption has no image
    with open(os.path.join(raw, "sa1b", "captions", f"sa_{i + 1}.txt"), "w") as f:
      f.write(f"a llava caption of picture {i}\n")
  entries = []
  for i, size in enumerate(sizes):
    _jpg(os.path.join(raw, "textcaps", "train_images", f"tc{i:03d}.jpg"), size, 30 + i)
    refs = [f"sign number {i} reads open", f"another caption {i}"]
    entries += [{"image_id": f"tc{i:03d}", "caption_str": r, "reference_strs": refs}
                for r in refs]
  with open(os.path.join(raw, "textcaps", "TextCaps_0.1_train.json"), "w") as f:
    json.dump({"dataset_name": "textcaps", "data": entries}, f)
  os.makedirs(os.path.join(raw, "jdb"))
  with open(os.path.join(raw, "jdb", "train_anno_realease_repath.jsonl"), "w") as f:
    for i, size in enumerate(sizes):
      _jpg(os.path.join(raw, "jdb", "imgs", "000", f"j{i}.jpg"), size, 40 + i)
      f.write(json.dumps({"img_path": f"./000/j{i}.jpg", "prompt": f"midjourney {i}",
                          "Task2": {"Caption": "x"}}) + "\n")
  names, parts = [], []
  for i, size in enumerate(sizes):
    _jpg(os.path.join(raw, "diffdb", "images", "part-000001", f"d{i}.webp"), size, 50 + i, "WEBP")
    names.append(f"d{i}.webp")
    parts.append(1)
  names.append("gone.webp")  # a part not downloaded
  parts.append(2)
  pq.write_table(pa.table({
      "image_name": names, "prompt": [f"diffusion prompt {i}" for i in range(len(names))],
      "part_id": parts, "image_nsfw": [0.1, 0.9, 0.0, 0.0, 0.0],
      "prompt_nsfw": [0.0, 0.0, 0.05, 0.1, 0.0]}),
                 os.path.join(raw, "diffdb", "metadata-large.parquet"))


def test_doc_commands_prepare_every_source_and_the_mixtures(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _raw_sources(str(tmp_path))
  tables = _doc_blocks("python")
  tables = {re.match(r"# table: (\w+)", t).group(1): t for t in tables if t.startswith("# table")}
  assert sorted(tables) == ["diffdb", "jdb", "sa1b", "textcaps"]
  for code in tables.values():
    exec(compile(code, "MICRODIT_DATA.md", "exec"), {})  # pylint: disable=exec-used
  commands = _doc_commands("python launch/precompute.py")
  assert len(commands) == 9
  metas = {}
  for argv in commands:
    flags = _flags(argv[2:])
    flags["path"] = re.sub(r"\{(\d+)\.\.\d+\}", lambda m: "{%s..%s}" % (
        m.group(1), str(int(m.group(1)) + 1).zfill(len(m.group(1)))), flags["path"])
    metas[flags["output"]] = lat.precompute(
        **flags, shard_size=3, batch_size=2, stream=io.StringIO(),
        load_autoencoder=lambda spec: PatchAutoencoder(channels=3, patch=8),
        load_text_encoder=lambda spec: HashingTextEncoder())
  got = {k: (m["num_examples"], m["skipped"]) for k, m in metas.items()}
  assert got == {
      "data/microdit/256/cc12m": (6, {"min_side": 2}),
      "data/microdit/512/cc12m_minres512": (4, {"min_side": 4}),
      "data/microdit/256/sa1b": (3, {"min_side": 1, "no_image": 1}),
      "data/microdit/512/sa1b": (3, {"min_side": 1, "no_image": 1}),
      "data/microdit/256/textcaps": (3, {"min_side": 1}),
      "data/microdit/512/textcaps": (3, {"min_side": 1}),
      "data/microdit/256/jdb": (3, {"min_side": 1}),
      "data/microdit/512/jdb": (3, {"min_side": 1}),
      # the NSFW row is dropped by the table; the part not downloaded is skipped
      "data/microdit/256/diffdb": (2, {"min_side": 1, "no_image": 1})}
  assert lat.LatentsSource("data/microdit/256/textcaps")[0]["captions"] == [
      "sign number 0 reads open"]
  for res, latent in ((256, 32), (512, 64)):
    config = microdit.get_config("p1_256_masked" if res == 256 else "p3_512_masked")
    assert [p for p, _ in config.data.mixture] == sorted(
        (k for k in metas if k.startswith(f"data/microdit/{res}/")),
        key=[p for p, _ in config.data.mixture].index)
    config.data.read_threads = 0
    info = dataset_info(config.data)
    assert info.image_size == latent and info.num_examples == sum(
        metas[p]["num_examples"] for p, _ in config.data.mixture)
    batch = next(make_train_iterator(config.data, global_batch_size=4, seed=0, process_index=0,
                                     process_count=1))
    assert batch["x"].shape == (4, latent, latent, 4)
  # the doc's override of the weights
  (argv,) = _doc_commands("python launch/main.py --config=configs/microdit.py:p1_256_masked")
  flags = _flags(argv[2:])
  config = load_config(flags["config"])
  override(config, [f"data.mixture={flags['config.data.mixture']}"])
  assert config.data.mixture == (("data/microdit/256/sa1b", 0.5), ("data/microdit/256/cc12m", 0.5))
  assert dataset_info(config.data).num_examples == 9


def test_doc_coco_eval_commands(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  write_coco(str(tmp_path / "data" / "coco2014"))
  evals = [_flags(argv[2:]) for argv in _doc_commands("python launch/main.py")
           if "--mode=eval" in argv]
  assert len(evals) == 2
  for flags in evals:
    config = load_config(flags["config"])
    override(config, [f"{k.removeprefix('config.')}={v}" for k, v in flags.items()
                      if k.startswith("config.")])
    assert config.eval.num_samples == 30_000 and config.eval.coco.image_size == 256
    if "config.eval.coco.captions" in flags:
      assert config.eval.coco.captions == "/data/coco/annotations/captions_val2014.json"
      continue
    coco = coco_eval.draw(config.eval.coco, 5)  # the download layout of the doc
    assert len(set(coco.paths)) == 5 and all(os.path.isfile(p) for p in coco.paths)


def test_hostile_and_damaged_shards(tmp_path, monkeypatch):
  # a 50 KB limit stands for 64 MiB: the oversized member is small
  monkeypatch.setattr(webdataset_source, "MAX_IMAGE_BYTES", 50_000)
  write_shards(tmp_path / "wds", n_shards=1)
  data = (tmp_path / "wds" / "00000.tar").read_bytes()
  (tmp_path / "cut.tar").write_bytes(data[:len(data) // 2 + 100])
  with pytest.raises(DataNotFoundError, match="cut.tar"):
    webdataset_source.WebDatasetCaptions(str(tmp_path / "cut.tar"), 32)
  # links, directories and path-like names are never followed or written: only grouped into keys
  with tarfile.open(tmp_path / "odd.tar", "w") as tar:
    _add(tar, "../../escape/a.jpg", _image_bytes((80, 80), 1))
    _add(tar, "../../escape/a.txt", b"escaped name, read in place")
    link = tarfile.TarInfo("b.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    tar.addfile(link)
    _add(tar, "b.txt", b"a link")
    big = tarfile.TarInfo("c.jpg")
    big.size = webdataset_source.MAX_IMAGE_BYTES + 1
    tar.addfile(big, io.BytesIO(b"\0" * big.size))
    _add(tar, "c.txt", b"too big")
  src = webdataset_source.WebDatasetCaptions(str(tmp_path / "odd.tar"), 32)
  assert len(src) == 1 and src[0].captions == ("escaped name, read in place",)
  assert src.index_skipped == {"no_image": 1, "image_too_large": 1}
  assert not (tmp_path.parent / "escape").exists()


def test_mixture_with_worker_processes_resumes(two_datasets):
  cfg = _mix_cfg(two_datasets, (("a", "count"), ("b", "count")), worker_count=2)

  def make():
    return make_train_iterator(cfg, global_batch_size=4, seed=5, process_index=0,
                               process_count=1)

  it = make()
  [next(it) for _ in range(3)]
  state = it.get_state()
  json.dumps(state)
  rest = [next(it)["x"] for _ in range(3)]
  resumed = make()
  resumed.set_state(state)
  for a in rest:
    np.testing.assert_array_equal(a, next(resumed)["x"])


@pytest.mark.slow
def test_trainer_resumes_a_mixture_exactly(two_datasets, tmp_path, monkeypatch):
  """A tiny MicroDiT trained 4 steps on the mixture equals 2 steps, a restart and 2 more: the
  mixed stream's position is checkpointed with the train state (orbax + grain). (The datasets'
  stand-in encoders cannot be loaded, so the start-of-run encoder check is switched off and
  stop_after ends both runs before the final sample grid; tests/test_microdit_phases.py covers
  the check and the grids.)"""
  monkeypatch.setattr(trainer.Experiment, "check_generation", lambda self, prompts=None: None)
  config = microdit.get_config("runlocal")
  config.data = _mix_cfg(two_datasets, (("a", "count"), ("b", 1.0)))
  config.model.update(dict(input_size=8, caption_channels=16, caption_len=8))
  config.train.update(dict(steps=4, batch_size=4, log_every=1, checkpoint_every=2,
                           tensorboard=False))
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  trainer.train(config, full, stop_after=4)
  trainer.train(config, split, stop_after=2)
  trainer.train(config, split, stop_after=2)
  a, b = read_losses(full), read_losses(split)
  assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]


def test_precompute_cli_new_sources_fail_on_one_line(tmp_path):
  write_table(str(tmp_path))
  base = [sys.executable, os.path.join(REPO, "launch", "precompute.py"), "--autoencoder=x",
          "--text_encoder=y", f"--output={tmp_path / 'out'}", "--image_size=32"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  for extra, message in (
      (["--source=webdataset", f"--path={tmp_path}/{{00000..00003}}.tar"], "no file matches"),
      (["--source=parquet", f"--path={tmp_path}/metadata.parquet",
        f"--image_dir={tmp_path}/images", "--image_column=file", "--caption_column=prompt"],
       "has no column")):
    r = subprocess.run(base + extra, capture_output=True, text=True, env=env, timeout=120)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 1 and message in lines[0], r.stderr
