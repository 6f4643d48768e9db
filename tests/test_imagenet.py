"""ImageNet for TerDiT: a tiny synthetic ILSVRC-layout folder (with ImageNet's four kinds of bad
file) -> `launch/precompute.py --source=imagenet` -> `launch/main.py --config=configs/terdit.py:
runlocal_latents` -> evaluation against an ADM-format reference batch. The commands are those of
docs/REPRODUCE_TERDIT.md at toy size; the autoencoder is our small KL autoencoder with random
weights, exported as a user's would be."""

import io
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from common.autoencoders import load_autoencoder, save_autoencoder
from autoencoder.small_kl import SmallKLAutoencoder
from common.data import captions as cap
from common.data import imagenet
from common.data import latents as lat
from common.data.transforms import center_crop_arr
from common.errors import ConfigError, DataNotFoundError
from configs import terdit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SYNSETS = ("n01440764", "n01443537", "n02085620")    # label = position in sorted order
PER_CLASS = 4                                         # good RGB JPEGs per synset
SIZE = 16                                             # image side -> latents 8x8x4
AE_MODEL = dict(name="autoencoder.small_kl.SmallKLAutoencoder", image_size=SIZE,
                in_channels=3, channels=(8, 8), blocks_per_level=1, mid_blocks=1,
                latent_channels=4, norm_groups=4)
AE_SHIFT, AE_SCALE = 0.1, 0.5


def _jpeg(image: Image.Image) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def make_ilsvrc(root) -> dict:
  """Writes root/<synset>/<synset>_<k>.JPEG; returns {kind: path} of the four bad files.

  Good images are random RGB of varied sizes (all need ADM's resize, some its BOX halving). The
  bad ones are ImageNet's: a CMYK JPEG, a grayscale JPEG, a PNG named .JPEG (all read as RGB) and
  a truncated JPEG (skipped)."""
  rng = np.random.default_rng(0)
  sizes = ((40, 30), (23, 50), (64, 64), (17, 33))
  for label, synset in enumerate(SYNSETS):
    os.makedirs(os.path.join(root, synset))
    for k in range(PER_CLASS):
      w, h = sizes[(k + label) % len(sizes)]
      pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(os.path.join(root, synset, f"{synset}_{k}.JPEG"), quality=95)
  pixels = rng.integers(0, 256, (36, 28, 3), dtype=np.uint8)
  bad = {"cmyk": os.path.join(root, SYNSETS[0], f"{SYNSETS[0]}_90.JPEG"),
         "gray": os.path.join(root, SYNSETS[1], f"{SYNSETS[1]}_91.JPEG"),
         "png": os.path.join(root, SYNSETS[2], f"{SYNSETS[2]}_92.JPEG"),
         "truncated": os.path.join(root, SYNSETS[2], f"{SYNSETS[2]}_93.JPEG")}
  with open(bad["cmyk"], "wb") as f:
    f.write(_jpeg(Image.fromarray(pixels).convert("CMYK")))
  with open(bad["gray"], "wb") as f:
    f.write(_jpeg(Image.fromarray(pixels[:, :, 0])))
  Image.fromarray(pixels).save(bad["png"], format="PNG")
  with open(bad["truncated"], "wb") as f:
    f.write(_jpeg(Image.fromarray(pixels))[:400])
  return bad


@pytest.fixture(scope="module")
def ilsvrc(tmp_path_factory):
  root = tmp_path_factory.mktemp("ilsvrc") / "train"
  return str(root), make_ilsvrc(str(root))


@pytest.fixture(scope="module")
def ae_export(tmp_path_factory):
  folder = tmp_path_factory.mktemp("ae") / "vae"
  kwargs = {k: v for k, v in AE_MODEL.items() if k != "name"}
  net = SmallKLAutoencoder(**kwargs, rngs=nnx.Rngs(params=jax.random.key(3)))
  save_autoencoder(str(folder), AE_MODEL, nnx.to_pure_dict(nnx.state(net, nnx.Param)),
                   shift=AE_SHIFT, scale=AE_SCALE, image_shape=(SIZE, SIZE, 3))
  return str(folder)


def _env():
  return {**os.environ, "JAX_PLATFORMS": "cpu"}


def _precompute_cmd(root, ae, out, *extra):
  return [sys.executable, os.path.join(REPO, "launch", "precompute.py"), "--source=imagenet",
          f"--path={root}", f"--image_size={SIZE}", f"--num_classes={len(SYNSETS)}",
          f"--autoencoder={ae}", "--latent=moments", f"--output={out}", "--shard_size=8",
          "--batch_size=4", *extra]


@pytest.fixture(scope="module")
def imagenet_latents(ilsvrc, ae_export, tmp_path_factory):
  """The dataset written by the command line (and its stdout)."""
  out = str(tmp_path_factory.mktemp("latents") / "imagenet16")
  r = subprocess.run(_precompute_cmd(ilsvrc[0], ae_export, out), capture_output=True, text=True,
                     env=_env(), timeout=300, cwd=REPO)
  assert r.returncode == 0, r.stderr[-3000:]
  return out, r.stdout


# ---- the reader --------------------------------------------------------------------------------


def test_synset_folders_labels_flips_and_bad_files(ilsvrc):
  root, bad = ilsvrc
  src = imagenet.ImageNetFolder(root, SIZE, num_classes=len(SYNSETS))
  assert src.synsets == list(SYNSETS)
  n = len(SYNSETS) * PER_CLASS + len(bad)
  assert len(src.paths) == n and len(src) == 2 * n
  for i, path in enumerate(src.paths):
    assert src.labels[i] == SYNSETS.index(os.path.basename(os.path.dirname(path)))
  for kind in ("cmyk", "gray", "png"):  # converted to RGB, center-cropped as ADM does
    i = src.paths.index(bad[kind])
    ex, mirror = src[2 * i], src[2 * i + 1]
    expected = center_crop_arr(np.asarray(Image.open(bad[kind]).convert("RGB")), SIZE)
    assert ex.image.shape == (SIZE, SIZE, 3) and ex.image.dtype == np.uint8
    np.testing.assert_array_equal(ex.image, expected)
    np.testing.assert_array_equal(mirror.image, expected[:, ::-1])
    assert ex.label == mirror.label == src.labels[i] and ex.captions == ()
  i = src.paths.index(bad["truncated"])
  for j in (2 * i, 2 * i + 1):
    with pytest.raises(cap.SkipExample) as skipped:
      src[j]
    assert skipped.value.reason == "unreadable_image" and bad["truncated"] in skipped.value.detail
    assert "damaged" in skipped.value.detail or "truncated" in skipped.value.detail
  unflipped = imagenet.ImageNetFolder(root, SIZE, num_classes=len(SYNSETS), flips=False)
  assert len(unflipped) == n
  np.testing.assert_array_equal(unflipped[1].image, src[2].image)


def test_folder_layout_errors(ilsvrc, tmp_path):
  root, _ = ilsvrc
  with pytest.raises(DataNotFoundError, match="has 3 synset folder.*--num_classes=1000"):
    imagenet.ImageNetFolder(root, SIZE)
  other = tmp_path / "train"
  shutil.copytree(root, other)
  (other / "val_images").mkdir()
  with pytest.raises(DataNotFoundError, match="not named like a synset.*'val_images'"):
    imagenet.ImageNetFolder(str(other), SIZE, num_classes=4)
  (other / "val_images").rmdir()
  (other / "n09999999").mkdir()
  with pytest.raises(DataNotFoundError, match="n09999999 holds no image"):
    imagenet.ImageNetFolder(str(other), SIZE, num_classes=4)
  with pytest.raises(DataNotFoundError, match="does not exist"):
    imagenet.ImageNetFolder(str(tmp_path / "missing"), SIZE)
  with pytest.raises(ConfigError, match="--image_size"):
    lat.build_source("imagenet", path=root, image_dir=None, split="train", image_size=None,
                     channels=3, seed=0)
  with pytest.raises(ConfigError, match="--split applies to --source=imagenet_tfds"):
    lat.build_source("imagenet", path=root, image_dir=None, split="validation", image_size=SIZE,
                     channels=3, seed=0, num_classes=3)


def test_tfds_imagenet_not_prepared_is_one_clear_error(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(DataNotFoundError, match="imagenet2012.*ILSVRC2012_img_train.tar"):
    lat.build_source("imagenet_tfds", path=str(tmp_path), image_dir=None, split="train",
                     image_size=SIZE, channels=3, seed=0)


def test_tfds_imagenet_reader_crops_flips_and_keeps_labels(monkeypatch, tmp_path):
  """ImageNetTfds over a stand-in for a prepared tfds source (what `tfds.data_source` yields)."""
  rng = np.random.default_rng(2)
  examples = [{"image": rng.integers(0, 256, (30, 44, 3), dtype=np.uint8), "label": 7},
              {"image": rng.integers(0, 256, (50, 20, 1), dtype=np.uint8), "label": 999}]
  seen = {}

  class FakeTfdsSource:
    def __init__(self, cfg, split):
      seen.update(name=cfg.tfds_name, data_dir=cfg.data_dir, split=split)

    def __len__(self):
      return len(examples)

    def __getitem__(self, i):
      return examples[i]

  # pylint: disable-next=protected-access
  monkeypatch.setattr(imagenet._tfds, "TfdsSource", FakeTfdsSource)
  src = lat.build_source("imagenet_tfds", path=str(tmp_path), image_dir=None,
                         split="train[:2]", image_size=SIZE, channels=3, seed=0)
  assert seen == {"name": "imagenet2012", "data_dir": str(tmp_path), "split": "train[:2]"}
  assert len(src) == 4 and src.describe()["source"] == "imagenet_tfds"
  for i, ex in enumerate(examples):
    rgb = np.repeat(ex["image"], 3, axis=-1) if ex["image"].shape[-1] == 1 else ex["image"]
    expected = center_crop_arr(rgb, SIZE)
    np.testing.assert_array_equal(src[2 * i].image, expected)
    np.testing.assert_array_equal(src[2 * i + 1].image, expected[:, ::-1])
    assert src[2 * i].label == src[2 * i + 1].label == ex["label"]
  with pytest.raises(ConfigError, match="imagenet_tfds has 1000 classes"):
    lat.build_source("imagenet_tfds", path=str(tmp_path), image_dir=None, split="train",
                     image_size=SIZE, channels=3, seed=0, num_classes=10)


# ---- precompute --------------------------------------------------------------------------------


def test_precompute_writes_labelled_moments_and_counts_skips(ilsvrc, ae_export, imagenet_latents):
  root, bad = ilsvrc
  out, stdout = imagenet_latents
  n = len(SYNSETS) * PER_CLASS + len(bad)
  assert f"skipped 2 of {2 * n} examples (unreadable_image: 2)" in stdout, stdout
  assert bad["truncated"] in stdout  # the first file skipped for each reason is named
  meta = lat.read_meta(out)
  assert meta["skipped"] == {"unreadable_image": 2}  # the truncated file and its mirror image
  assert meta["num_examples"] == 2 * n - 2 and meta["source_examples"] == 2 * n
  assert sum(meta["shard_examples"]) == meta["num_examples"] and meta["text_encoder"] is None
  assert meta["latent"] == "moments" and meta["latent_shape"] == [8, 8, 4]
  assert meta["format_version"] == lat.FORMAT_VERSION == 2

  src = imagenet.ImageNetFolder(root, SIZE, num_classes=len(SYNSETS))
  ae = load_autoencoder(ae_export)
  records = lat.LatentsSource(out)
  assert len(records) == 2 * n - 2
  picked = [0, 1, 9, len(records) - 1]
  for r in (records[j] for j in picked):
    assert "tokens" not in r and "captions" not in r
    i, mirror = divmod(r["index"], 2)
    # the label is the index of the file's synset in sorted order
    assert r["label"] == SYNSETS.index(os.path.basename(os.path.dirname(src.paths[i])))
    image = src[r["index"]].image
    assert mirror == 0 or np.array_equal(image, src[r["index"] - 1].image[:, ::-1])
    mean, logvar = ae.moments(image[None].astype(np.float32) / 127.5 - 1)
    np.testing.assert_allclose(r["x"], (np.asarray(mean[0]) - AE_SHIFT) * AE_SCALE,
                               atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(r["logvar"], np.asarray(logvar[0]) + 2 * np.log(AE_SCALE),
                               atol=2e-2, rtol=2e-3)
  assert records[0]["index"] == 0 and records[1]["index"] == 1
  assert not np.allclose(records[0]["x"], records[1]["x"])  # a mirror image's own latents


def test_resume_after_an_interrupt_keeps_skips_and_bytes(ilsvrc, ae_export, imagenet_latents,
                                                         tmp_path):
  root, _ = ilsvrc
  src = imagenet.ImageNetFolder(root, SIZE, num_classes=len(SYNSETS))
  ae = load_autoencoder(ae_export)
  out = str(tmp_path / "resumed")
  kwargs = dict(autoencoder=ae, text_encoder=None, autoencoder_spec=ae_export,
                text_encoder_spec=None, shard_size=8, batch_size=4, latent="moments",
                progress_every_s=0.0)

  def stop(k):  # after shard 2, and after shard 3 (which holds the truncated file's two examples)
    if k in (2, 3):
      raise KeyboardInterrupt

  for _ in range(2):
    with pytest.raises(KeyboardInterrupt):
      lat.write_dataset(src, out, on_shard_done=stop, **kwargs)
    assert not (lat.as_path(out) / lat.META_FILE).exists()
  # every shard is complete: the skips of shard 3 come back from its .stats.json
  meta = lat.write_dataset(src, out, **kwargs)
  reference = lat.read_meta(imagenet_latents[0])
  assert meta["skipped"] == reference["skipped"] == {"unreadable_image": 2}
  assert meta["shard_examples"] == reference["shard_examples"]
  for name in meta["shards"]:
    assert ((lat.as_path(out) / name).read_bytes()
            == (lat.as_path(imagenet_latents[0]) / name).read_bytes())


def test_moments_pipeline_samples_the_posterior_each_draw(imagenet_latents):
  record = lat.LatentsSource(imagenet_latents[0])[5]
  pick = lat.PickCaption()
  draws = np.stack([pick.random_map(record, np.random.default_rng(s))["x"] for s in range(2000)])
  out = pick.random_map(record, np.random.default_rng(0))
  assert set(out["cond"]) == {"label"} and out["cond"]["label"] == record["label"]
  mean = record["x"].astype(np.float32)
  std = np.exp(0.5 * record["logvar"].astype(np.float32))
  np.testing.assert_allclose(draws.mean(0), mean, atol=4 * std.max() / np.sqrt(2000) + 1e-3)
  np.testing.assert_allclose(draws.std(0), std, rtol=0.1)
  cfg = ml_collections.ConfigDict({"name": "latents", "path": imagenet_latents[0]})
  a = next(lat.latents_train_iterator(cfg, global_batch_size=4, seed=1, process_index=0,
                                      process_count=1))
  b = next(lat.latents_train_iterator(cfg, global_batch_size=4, seed=1, process_index=0,
                                      process_count=1))
  assert a["x"].shape == (4, 8, 8, 4) and set(a["cond"]) == {"label"}
  np.testing.assert_array_equal(a["x"], b["x"])  # the draws are part of the seeded stream


def test_version_1_datasets_still_read(tmp_path):
  from tests.test_precompute import _write, _write_fmnist  # pylint: disable=import-outside-toplevel
  source = cap.CaptionedFashionMNIST(_write_fmnist(str(tmp_path / "fm"), 40), "train")
  out = tmp_path / "v1"
  _write(out, source, shard_size=20)
  meta = json.loads((out / lat.META_FILE).read_text())
  meta["format_version"] = 1  # version 1 records are version 2 records with text, no logvar
  (out / lat.META_FILE).write_text(json.dumps(meta))
  cfg = ml_collections.ConfigDict({"name": "latents", "path": str(out)})
  batch = next(lat.latents_train_iterator(cfg, global_batch_size=4, seed=0, process_index=0,
                                          process_count=1))
  assert set(batch["cond"]) == {"tokens", "mask", "pooled", "label"}
  meta["format_version"] = 3
  (out / lat.META_FILE).write_text(json.dumps(meta))
  with pytest.raises(DataNotFoundError, match="format version 3"):
    lat.read_meta(str(out))


# ---- training and evaluation -------------------------------------------------------------------


def _fake_adm_reference(path, rng):
  """An ADM-format reference batch (arr_0 images, mu/sigma, mu_s/sigma_s) for the tiny feature
  network of tests/test_evaluate_cli.py (16 pool features, 48 spatial)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  arrays = {"arr_0": rng.integers(0, 256, (24, SIZE, SIZE, 3), dtype=np.uint8)}
  for key, d in (("", 16), ("_s", 48)):
    a = rng.normal(size=(d, d))
    arrays["mu" + key] = rng.normal(size=d)
    arrays["sigma" + key] = a @ a.T / d + np.eye(d)
  np.savez(path, **arrays)


@pytest.fixture(scope="module")
def trained(imagenet_latents, ae_export, tmp_path_factory):
  """A workdir of the training command of docs/REPRODUCE_TERDIT.md, at toy size."""
  workdir = str(tmp_path_factory.mktemp("runs") / "terdit")
  cmd = [sys.executable, os.path.join(REPO, "launch", "main.py"),
         "--config=configs/terdit.py:runlocal_latents", f"--workdir={workdir}",
         f"--config.data.path={imagenet_latents[0]}", f"--config.autoencoder={ae_export}",
         "--config.train.tensorboard=False"]
  r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600, cwd=REPO)
  assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
  return workdir


def _tiny_config(imagenet_latents, ae_export) -> ml_collections.ConfigDict:
  c = terdit.get_config("runlocal_latents")
  c.data.path, c.autoencoder = imagenet_latents[0], ae_export
  c.train.tensorboard = False
  return c


def test_train_cli_on_imagenet_latents(trained, imagenet_latents, ae_export):
  from common.training import sharding  # pylint: disable=import-outside-toplevel
  from common.training.experiment import Experiment  # pylint: disable=import-outside-toplevel
  steps = [json.loads(line)["step"] for line in open(os.path.join(trained, "metrics.jsonl"))]
  assert max(steps) == 4
  assert os.path.isdir(os.path.join(trained, "checkpoints"))
  # Labels beyond the network's classes are refused, not clipped by the embedding lookup.
  c = _tiny_config(imagenet_latents, ae_export)
  c.model.num_classes = 2
  exp = Experiment(c, sharding.make_mesh(c.mesh))
  batch = {"x": np.zeros((2, 8, 8, 4), np.float32), "cond": {"label": np.array([0, 2])}}
  with pytest.raises(ConfigError, match="class label 2 but config.model.num_classes=2"):
    exp.model_batch(batch)


def test_fid_of_a_trained_run_against_an_adm_reference(trained, imagenet_latents, ae_export,
                                                       tmp_path, monkeypatch):
  from common.eval import features  # pylint: disable=import-outside-toplevel
  from common.training import trainer  # pylint: disable=import-outside-toplevel
  from tests.test_evaluate_cli import TinyFeatureNet  # pylint: disable=import-outside-toplevel
  # The Inception is a small random stand-in with its interface (test_inception tests the real one).
  net = TinyFeatureNet(rngs=nnx.Rngs(0))
  monkeypatch.setattr(features, "load_network", lambda path=None: net)
  monkeypatch.setattr(features, "_NETWORKS", {})
  monkeypatch.setattr(features, "_REFERENCES", {})
  c = _tiny_config(imagenet_latents, ae_export)
  c.eval.reference = str(tmp_path / "data" / "adm" / "VIRTUAL_imagenet256_labeled.npz")
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  with pytest.raises(DataNotFoundError, match="does not exist; download ADM's reference batch "
                     "https://openaipublic.*/256/VIRTUAL_imagenet256_labeled.npz"):
    trainer.evaluate(c, workdir)
  assert not os.path.exists(os.path.join(workdir, "eval", "samples_step_0000004_n8.npz"))
  _fake_adm_reference(c.eval.reference, np.random.default_rng(1))
  scores = trainer.evaluate(c, workdir)
  for key in ("fid", "sfid", "inception_score", "precision", "recall"):
    assert np.isfinite(scores[f"eval/{key}"]), (key, scores)
  assert scores["eval/num_samples"] == 8
  assert os.path.exists(os.path.join(workdir, "eval", "samples_step_0000004_n8.npz"))


def test_imagenet_configs_evaluate_as_the_paper_reports():
  for res, name in ((256, "VIRTUAL_imagenet256_labeled.npz"), (512, "VIRTUAL_imagenet512.npz")):
    c = terdit.get_config(f"600M_{res}")
    assert c.eval.reference == f"data/adm/{name}"
    assert c.eval.num_samples == 50_000 and c.sample.num_steps == 250
    assert c.sample.sampler == "ddpm" and c.sample.guidance_scale == 1.5
    assert c.data.name == "latents" and c.model.num_classes == imagenet.IMAGENET1K_CLASSES
  c = terdit.get_config("4.2B_256")
  assert (c.train.steps, c.train.batch_size) == terdit.SCHEDULES["4.2B_256"][:2]
