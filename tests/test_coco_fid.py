"""Zero-shot COCO FID (configs/microdit.py:...,coco_fid30k; common/eval/coco.py) on a tiny synthetic
COCO: a few JPEGs and a captions JSON made here. The FID Inception is replaced by a small random
network with its interface (the real one is tested in test_inception)."""

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
from PIL import Image

from common.errors import ConfigError, DataNotFoundError
from common.eval import coco as coco_eval
from common.eval import features
from common.eval import reference
from common.training import trainer
from configs import microdit
from tests.test_evaluate_cli import tiny_net  # noqa: F401  (a fixture: the stand-in Inception)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_coco(root, n_images=8):
  """val2014/COCO_val2014_<id>.jpg (sizes vary, 48..80 px) and annotations/captions_val2014.json
  with 2-3 captions per image, plus one image without captions. Returns {file_name: captions}."""
  os.makedirs(os.path.join(root, "val2014"), exist_ok=True)
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  rng = np.random.default_rng(0)
  images, anns, truth = [], [], {}
  for k in range(n_images + 1):
    image_id = 1000 + 7 * k
    name = f"COCO_val2014_{image_id:012d}.jpg"
    w, h = 48 + 4 * k, 80 - 3 * k
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
        os.path.join(root, "val2014", name), quality=95)
    images.append({"id": image_id, "file_name": name, "width": w, "height": h})
    if k == n_images:
      continue  # no caption: never drawn
    truth[name] = [f"image {k} caption {j}" for j in range(2 + k % 2)]
    anns += [{"id": 10 * k + j, "image_id": image_id, "caption": c + "\n"}
             for j, c in enumerate(truth[name])]
  with open(os.path.join(root, "annotations", "captions_val2014.json"), "w") as f:
    json.dump({"images": images, "annotations": anns}, f)
  return truth


def _cfg(root, **kw):
  c = microdit.coco_fid30k(str(root))
  c.update(kw)
  return c


def test_draw_is_seeded_distinct_and_a_prefix(tmp_path):
  truth = write_coco(str(tmp_path))
  a = coco_eval.draw(_cfg(tmp_path, image_size=32), 6)
  assert a == coco_eval.draw(_cfg(tmp_path, image_size=32), 6)
  names = [os.path.basename(p) for p in a.paths]
  assert len(set(names)) == 6 and all(n in truth for n in names)
  assert all(p in truth[n] for n, p in zip(names, a.prompts))
  shorter = coco_eval.draw(_cfg(tmp_path, image_size=32), 3)
  assert shorter.paths == a.paths[:3] and shorter.prompts == a.prompts[:3]
  other = coco_eval.draw(_cfg(tmp_path, image_size=32, seed=1), 6)
  assert other.paths != a.paths and other.digest != a.digest
  batches = list(coco_eval.RealImages(a, batch_size=4))
  assert [b.shape for b in batches] == [(4, 32, 32, 3), (2, 32, 32, 3)]
  with pytest.raises(DataNotFoundError, match="8 captioned images"):
    coco_eval.draw(_cfg(tmp_path), 9)


def test_missing_coco_files_are_clear_errors(tmp_path):
  with pytest.raises(DataNotFoundError, match="captions_val2014.json not found.*val2014.zip"):
    coco_eval.draw(_cfg(tmp_path / "none"), 4)
  with pytest.raises(ConfigError, match="eval.coco.captions is empty"):
    coco_eval.draw(_cfg(tmp_path, captions=""), 4)
  write_coco(str(tmp_path))
  os.remove(tmp_path / "val2014" / "COCO_val2014_000000001000.jpg")
  coco = coco_eval.draw(_cfg(tmp_path, image_size=32), 8)
  with pytest.raises(DataNotFoundError, match="COCO_val2014_000000001000.jpg not found"):
    list(coco_eval.RealImages(coco))


def test_eval_samples_the_coco_prompts_against_their_images(tmp_path, monkeypatch,
                                                            tiny_net):
  write_coco(str(tmp_path / "coco"))
  config = microdit.get_config("runlocal,coco_fid30k")
  config.eval.coco.captions = str(tmp_path / "coco" / "annotations" / "captions_val2014.json")
  config.eval.coco.images = str(tmp_path / "coco" / "val2014")
  config.eval.coco.image_size = 32
  config.eval.num_samples, config.eval.batch_size = 6, 4
  coco = coco_eval.draw(config.eval.coco, 6)
  real = np.concatenate(list(coco_eval.RealImages(coco)))
  seen = {}

  def fake_generate(exp, params, n, *, prompts=None, **kw):
    """The model: for prompt i, the real image i at 64 px (resized back to 32 by the eval)."""
    seen["prompts"], seen["n"] = prompts, n
    up = real.repeat(2, axis=1).repeat(2, axis=2) if params == "perfect" else (
        np.random.default_rng(0).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8))
    return up, {"prompts": np.asarray(prompts)}

  monkeypatch.setattr(trainer, "generate", fake_generate)
  exp = types.SimpleNamespace(config=config)
  wd = tmp_path / "wd"
  good = trainer.evaluate_params(exp, "perfect", 5, wd)
  assert seen["prompts"] == list(coco.prompts) and seen["n"] == 6
  ref = reference.load_reference(str(wd / "eval" / "reference_coco_n6.npz"))
  stats = features.make_reference(str(tmp_path / "direct.npz"), real, store_images=False,
                                  progress=False, batch_size=4)
  np.testing.assert_allclose(ref["mu"], stats["mu"], rtol=1e-5, atol=1e-5)
  recorded = json.loads(reference.recorded_settings(str(wd / "eval" / "reference_coco_n6.npz")))
  assert recorded["coco_fid"]["pairs_sha256"] == coco.digest
  bad = trainer.evaluate_params(exp, "noise", 6, wd)
  assert good["eval/fid"] < 1e-3 < bad["eval/fid"]
  # the samples of a step are cached with the drawn pairs: another seed draws again
  config.eval.coco.seed = 3
  trainer.evaluate_params(exp, "perfect", 5, wd)
  assert seen["prompts"] == list(coco_eval.draw(config.eval.coco, 6).prompts) != list(coco.prompts)


def test_cli_eval_without_coco_files_is_one_line(tmp_path):
  r = subprocess.run(
      [sys.executable, os.path.join(REPO, "launch", "main.py"),
       "--config=configs/microdit.py:runlocal,coco_fid30k", f"--workdir={tmp_path / 'wd'}",
       "--mode=eval", f"--config.eval.coco.captions={tmp_path / 'captions_val2014.json'}"],
      capture_output=True, text=True, cwd=REPO, timeout=600,
      env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert r.returncode == 1, r.stderr[-2000:]
  lines = r.stderr.strip().splitlines()
  assert "Traceback" not in r.stderr and lines[-1].startswith("error: COCO caption file"), r.stderr
