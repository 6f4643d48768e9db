"""launch/encode.py: the `images` and `text` subcommands, and their one-line errors."""

import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))

import encode  # noqa: E402  pylint: disable=wrong-import-position

from common.errors import DataNotFoundError, ShapeError  # noqa: E402

VAE = os.path.join(ROOT, "tests", "fixtures", "vae", "sd")


def _cli(*args, cwd=ROOT):
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "encode.py"), *args],
                        capture_output=True, text=True, cwd=cwd, timeout=600)


def _images(n=3):
  return np.random.default_rng(0).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def test_images_in_process(tmp_path):
  from common.autoencoders import load_autoencoder
  from common.images import to_uint8
  images = _images()
  np.savez(tmp_path / "x.npz", images=images)
  r = encode.encode_images(VAE, str(tmp_path / "x.npz"), str(tmp_path / "y.npz"), batch_size=2)
  assert r["num"] == 3 and r["latent_shape"] == (8, 8, 4)
  out = np.load(tmp_path / "y.npz")
  assert out["latents"].shape == (3, 8, 8, 4) and out["latents"].dtype == np.float32
  assert out["reconstructions"].shape == images.shape and out["reconstructions"].dtype == np.uint8
  ae = load_autoencoder(VAE)
  z = np.asarray(ae.encode(images.astype(np.float32) / 127.5 - 1.0))
  np.testing.assert_allclose(out["latents"], z, atol=1e-4)
  recon = to_uint8(ae.decode(z))
  assert np.abs(out["reconstructions"].astype(int) - recon.astype(int)).max() <= 1
  assert r["psnr_db"] == pytest.approx(encode.psnr_uint8(images, out["reconstructions"]))
  # Bad inputs.
  np.savez(tmp_path / "bad.npz", images=images.astype(np.float32))
  with pytest.raises(ShapeError, match="uint8"):
    encode.encode_images(VAE, str(tmp_path / "bad.npz"), str(tmp_path / "y.npz"))
  np.savez(tmp_path / "nokey.npz", pixels=images)
  with pytest.raises(ShapeError, match="no `images`"):
    encode.encode_images(VAE, str(tmp_path / "nokey.npz"), str(tmp_path / "y.npz"))
  with pytest.raises(DataNotFoundError):
    encode.encode_images(VAE, str(tmp_path / "missing.npz"), str(tmp_path / "y.npz"))


def test_images_cli_and_errors(tmp_path):
  np.savez(tmp_path / "x.npz", images=_images(2))
  p = _cli("images", f"--autoencoder={VAE}", f"--input={tmp_path / 'x.npz'}",
           f"--output={tmp_path / 'y.npz'}")
  assert p.returncode == 0, p.stderr
  assert "PSNR" in p.stdout and "8x8x4" in p.stdout
  assert np.load(tmp_path / "y.npz")["reconstructions"].shape == (2, 16, 16, 3)
  p = _cli("images", f"--autoencoder={tmp_path / 'sdxl-vae'}", f"--input={tmp_path / 'x.npz'}",
           f"--output={tmp_path / 'z.npz'}")
  assert p.returncode == 1
  assert p.stderr.startswith("error:") and "download" in p.stderr
  assert len(p.stderr.strip().splitlines()) == 1, p.stderr


def test_text_in_process(tmp_path, monkeypatch):
  """`text` with a stand-in text encoder (the contract's TextEncoder interface)."""

  class FakeEncoder:
    max_length, width = 6, 5

    def encode(self, prompts):
      n = len(prompts)
      lengths = np.array([min(len(p.split()), self.max_length) for p in prompts])
      mask = (np.arange(self.max_length)[None] < lengths[:, None]).astype(np.int32)
      chars = np.array([len(p) for p in prompts], np.float32)   # depends on the prompt only
      tokens = (chars[:, None, None] + np.arange(30, dtype=np.float32).reshape(1, 6, 5)) * mask[..., None]
      return {"tokens": tokens, "mask": mask, "pooled": tokens.sum(1) / lengths[:, None]}

  specs = []
  monkeypatch.setattr(encode, "load_text_encoder", lambda spec: specs.append(spec) or FakeEncoder())
  prompts = ["a photo of a sneaker", "", "  an ankle boot  ", "a bag"]
  (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
  r = encode.encode_text("minilm", str(tmp_path / "p.txt"), str(tmp_path / "t.npz"), batch_size=2)
  assert specs == ["minilm"] and r["num"] == 3 and r["tokens_shape"] == (3, 6, 5)
  out = np.load(tmp_path / "t.npz")
  want = FakeEncoder().encode(["a photo of a sneaker", "an ankle boot", "a bag"])
  np.testing.assert_array_equal(out["mask"], want["mask"])
  np.testing.assert_allclose(out["pooled"], want["pooled"])
  assert out["tokens"].dtype == np.float32 and out["mask"].dtype == np.int32
  assert list(out["prompts"]) == ["a photo of a sneaker", "an ankle boot", "a bag"]
  (tmp_path / "empty.txt").write_text("\n\n")
  with pytest.raises(ShapeError, match="no prompt"):
    encode.encode_text("minilm", str(tmp_path / "empty.txt"), str(tmp_path / "t.npz"))
  with pytest.raises(DataNotFoundError):
    encode.encode_text("minilm", str(tmp_path / "none.txt"), str(tmp_path / "t.npz"))


def test_usage_errors_are_one_line(tmp_path):
  for args in (("text", "--text_encoder=minilm", f"--output={tmp_path / 't.npz'}"),
               ("decode", f"--output={tmp_path / 't.npz'}")):
    p = _cli(*args)
    assert p.returncode == 1, (args, p.stderr)
    assert p.stderr.startswith("error:") and len(p.stderr.strip().splitlines()) == 1, p.stderr


# Prompt files: one reader for `encode.py text` and `main.py --prompts` (common.data.captions).
_ODD_PROMPTS = ("a cat\u2028on a mat\r\n\r\n  \n"  # U+2028 stays inside the line; CRLF; blank lines
                "a dog\u0085in a fog\n\u2028\n"     # U+0085 too; a line of only U+2028 is blank
                "last, no newline")
_ODD_WANT = ["a cat\u2028on a mat", "a dog\u0085in a fog", "last, no newline"]


def _fake_text_encoder(monkeypatch):
  class FakeEncoder:
    max_length, width = 4, 2

    def encode(self, prompts):
      n = len(prompts)
      return {"tokens": np.zeros((n, 4, 2), np.float32), "mask": np.ones((n, 4), np.int32),
              "pooled": np.zeros((n, 2), np.float32)}

  monkeypatch.setattr(encode, "load_text_encoder", lambda spec: FakeEncoder())


def test_both_entry_points_split_prompt_files_the_same_way(tmp_path, monkeypatch):
  """encode.py split on every str.splitlines boundary (3 prompts from a U+2028 line), main.py's
  sampler on "\\n" only: both now read through `captions.read_prompts`, lines end at "\\n"."""
  from common.training import trainer
  from configs import sid2_digits  # pylint: disable=import-outside-toplevel
  path = tmp_path / "p.txt"
  path.write_bytes(_ODD_PROMPTS.encode("utf-8"))
  _fake_text_encoder(monkeypatch)
  encode.encode_text("minilm", str(path), str(tmp_path / "t.npz"))
  assert list(np.load(tmp_path / "t.npz")["prompts"]) == _ODD_WANT

  seen = {}

  class Stop(Exception):
    pass

  def generate(exp, params, n, *, prompts=None, **kw):
    seen["prompts"] = prompts
    raise Stop

  monkeypatch.setattr(trainer, "restore_newest", lambda *a, **k: (1, {"ema": None}))
  monkeypatch.setattr(trainer, "Experiment", lambda *a, **k: None)
  monkeypatch.setattr(trainer, "generate", generate)
  with pytest.raises(Stop):
    trainer.sample(sid2_digits.get_config("runlocal"), str(tmp_path), prompts_file=str(path))
  assert seen["prompts"] == _ODD_WANT


def test_non_utf8_prompt_files_are_one_line_with_the_offset(tmp_path):
  from common.training import trainer
  from configs import sid2_digits  # pylint: disable=import-outside-toplevel
  path = tmp_path / "latin1.txt"
  path.write_bytes("a caf\u00e9\nune cr\u00e8me\n".encode("latin-1"))
  message = rf"--prompts={path} is not UTF-8 text: byte 0xe9 at offset 5 \(line 1\)"
  with pytest.raises(ShapeError, match=message):
    encode.encode_text("minilm", str(path), str(tmp_path / "t.npz"))
  # main.py --mode=sample reads the prompts before restoring any checkpoint (none exists here).
  with pytest.raises(ShapeError, match=message):
    trainer.sample(sid2_digits.get_config("runlocal"), str(tmp_path), prompts_file=str(path))
  p = _cli("text", "--text_encoder=minilm", f"--prompts={path}", f"--output={tmp_path / 't.npz'}")
  assert p.returncode == 1 and p.stderr.strip().splitlines() == [
      f"error: --prompts={path} is not UTF-8 text: byte 0xe9 at offset 5 (line 1): invalid "
      "continuation byte; save it as UTF-8"], p.stderr
