"""launch/evaluate.py end to end: metrics JSON, saved features, reference batches, one-line errors.

The CLI runs in this process (absl flags re-parsed per call) with a small random-weight feature
network in place of the FID Inception, so each case costs no new process; one case runs the real
script in a subprocess to check the exit status and that no traceback is printed. When
`common.eval.inception` exists, the last test runs the real FIDInceptionV3 architecture (random
weights) through the CLI (slow-marked).
"""

import json
import os
import subprocess
import sys

from absl import flags
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.data import load_arrays
from common.eval import features
from common.eval import reference
from configs import sid2_digits
from launch import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TinyFeatureNet(nnx.Module):
  """A stand-in for FIDInceptionV3 with its interface: uint8 [B, H, W, 3 or 1] -> pool/spatial/logits."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.conv = nnx.Conv(3, 16, (3, 3), strides=2, rngs=rngs)
    self.spatial = nnx.Linear(16, 3, rngs=rngs)
    self.fc = nnx.Linear(16, 10, rngs=rngs)

  def __call__(self, images: jax.Array) -> dict:
    x = images.astype(jnp.float32) / 127.5 - 1.0
    x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
    x = jax.image.resize(x, (x.shape[0], 16, 16, 3), "bilinear")
    h = nnx.relu(self.conv(x))  # [B, 8, 8, 16]
    pool = h.mean((1, 2))
    return {"pool": pool, "spatial": self.spatial(h)[:, :4, :4].reshape(len(h), -1),
            "logits": pool @ self.fc.kernel[...]}


@pytest.fixture
def tiny_net(monkeypatch):
  net = TinyFeatureNet(rngs=nnx.Rngs(0))
  monkeypatch.setattr(features, "load_network", lambda path=None: net)
  monkeypatch.setattr(features, "_NETWORKS", {})
  monkeypatch.setattr(features, "_REFERENCES", {})
  return net


def run_cli(capsys, *args):
  """Runs the CLI; returns (exit status, stdout, stderr)."""
  flags.FLAGS.unparse_flags()
  with pytest.raises(SystemExit) as exc:
    evaluate.main(["evaluate.py", *args])
  out = capsys.readouterr()
  return exc.value.code or 0, out.out, out.err


def _images(seed, n, size=8, channels=3):
  return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)


def test_evaluate_samples_against_an_adm_style_reference(tmp_path, capsys, tiny_net):
  samples, ref_images = _images(0, 40), _images(1, 50) // 2 + 60
  np.savez_compressed(tmp_path / "samples.npz", images=samples, labels=np.arange(40))
  np.savez(tmp_path / "ref.npz", arr_0=ref_images)  # images only, as ADM's reference batches
  out, feats_path = tmp_path / "m" / "metrics.json", tmp_path / "feats.npz"
  code, stdout, stderr = run_cli(capsys, f"--samples={tmp_path / 'samples.npz'}",
                                 f"--reference={tmp_path / 'ref.npz'}", f"--out={out}",
                                 f"--save_features={feats_path}", "--batch_size=16")
  assert code == 0, stderr
  result = json.loads(stdout)
  assert result == json.loads(out.read_text())
  assert set(result) == {"fid", "sfid", "inception_score", "precision", "recall", "num_samples", "notes"}
  assert result["num_samples"] == 40 and result["notes"] == []
  assert "samples 40/40 images" in stderr and "reference 50/50 images" in stderr
  with np.load(feats_path) as z:
    assert {k: z[k].shape for k in z.files} == {"pool": (40, 16), "spatial": (40, 48), "logits": (40, 10)}
    np.testing.assert_allclose(z["pool"], np.asarray(tiny_net(jnp.asarray(samples))["pool"]),
                               rtol=1e-5, atol=1e-6)
  # The same numbers as the library computes them.
  def extract(x):
    return features.extract_features(tiny_net, x, batch_size=16, progress=False)
  want = features.compute_metrics(extract(samples), reference.reference_statistics(
      {"images": ref_images}, extract))
  for key in ("fid", "sfid", "inception_score", "precision", "recall"):
    assert result[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
  assert result["fid"] > 1e-3  # different image distributions


def test_make_reference_from_a_config_and_from_images(tmp_path, capsys, tiny_net):
  ref_path = tmp_path / "digits_ref.npz"
  code, stdout, stderr = run_cli(capsys, f"--make_reference={ref_path}",
                                 "--config=configs/sid2_digits.py", "--limit=60", "--noprogress")
  assert code == 0, stderr
  assert json.loads(stdout)["num_images"] == 60
  digits, labels = load_arrays(sid2_digits.get_config().data, "train", 60)
  with np.load(ref_path) as z:
    assert sorted(z.files) == ["arr_0", "arr_1", "mu", "mu_s", "pool", "sigma", "sigma_s"]
    np.testing.assert_array_equal(z["arr_0"], digits)
    np.testing.assert_array_equal(z["arr_1"], labels)
    assert z["mu"].shape == (16,) and z["sigma_s"].shape == (48, 48) and z["pool"].shape == (60, 16)
  # The same images as samples: FID 0, precision = recall = 1.
  np.savez(tmp_path / "same.npz", images=digits)
  code, stdout, stderr = run_cli(capsys, f"--samples={tmp_path / 'same.npz'}",
                                 f"--reference={ref_path}", "--noprogress")
  assert code == 0, stderr
  result = json.loads(stdout)
  assert abs(result["fid"]) < 1e-6 and abs(result["sfid"]) < 1e-6
  assert result["precision"] == result["recall"] == 1.0
  # From an images file, statistics and pool only.
  stats_path = tmp_path / "stats_ref.npz"
  code, _, stderr = run_cli(capsys, f"--make_reference={stats_path}",
                            f"--images={tmp_path / 'same.npz'}", "--limit=30", "--nostore_images",
                            "--noprogress")
  assert code == 0, stderr
  with np.load(stats_path) as z:
    assert sorted(z.files) == ["mu", "mu_s", "pool", "sigma", "sigma_s"] and len(z["pool"]) == 30
    np.savez(tmp_path / "fid_only.npz", mu=z["mu"], sigma=z["sigma"])  # e.g. pytorch-fid stats
  code, stdout, stderr = run_cli(capsys, f"--samples={tmp_path / 'same.npz'}",
                                 f"--reference={tmp_path / 'fid_only.npz'}", "--noprogress")
  assert code == 0, stderr
  result = json.loads(stdout)
  assert result["fid"] > 0 and result["precision"] is None and result["recall"] is None
  assert result["sfid"] is None and len(result["notes"]) == 2


@pytest.mark.parametrize("case, args, message", [
    ("missing", ["--samples={d}/nope.npz", "--reference={d}/ref.npz"], "does not exist"),
    ("text", ["--samples={d}/samples.npz", "--reference={d}/text.npz"], "not an .npz archive"),
    ("float", ["--samples={d}/float.npz", "--reference={d}/ref.npz"], "must be uint8"),
    ("keys", ["--samples={d}/samples.npz", "--reference={d}/keys.npz"], "neither images"),
    ("half", ["--samples={d}/samples.npz"], "needs both"),
    ("none", [], "give either"),
    ("both", ["--make_reference={d}/o.npz", "--images={d}/samples.npz",
              "--config=configs/sid2_digits.py"], "exactly one of"),
    ("config", ["--make_reference={d}/o.npz", "--config={d}/no_config.py"], "no_config.py"),
    ("split", ["--make_reference={d}/o.npz", "--config=configs/sid2_digits.py", "--split=test"],
     "only a 'train' split"),
    ("flag", ["--samples={d}/samples.npz", "--bogus=1"], "cannot parse"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, tiny_net, case, args, message):
  np.savez(tmp_path / "samples.npz", images=_images(0, 4))
  np.savez(tmp_path / "ref.npz", arr_0=_images(1, 4))
  np.savez(tmp_path / "float.npz", images=np.zeros((4, 8, 8, 3), np.float32))
  np.savez(tmp_path / "keys.npz", something=np.zeros(3))
  (tmp_path / "text.npz").write_text("not an npz")
  code, stdout, stderr = run_cli(capsys, *[a.format(d=tmp_path) for a in args])
  assert code == 1, (case, stdout, stderr)
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (case, stderr)
  assert not (tmp_path / "o.npz").exists()


def test_cli_error_in_a_process_exits_1_without_traceback(tmp_path):
  np.savez(tmp_path / "samples.npz", images=np.zeros((4, 8, 8, 2), np.uint8))
  proc = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "evaluate.py"),
                         f"--samples={tmp_path / 'samples.npz'}", f"--reference={tmp_path / 'r.npz'}"],
                        capture_output=True, text=True, cwd=ROOT, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f"error: {tmp_path / 'samples.npz'} ['images']: images must be uint8 [N, H, W, 3 or 1], got uint8 "
      "[4, 8, 8, 2]"]


@pytest.mark.slow
def test_cli_with_the_fid_inception_architecture(tmp_path, capsys, monkeypatch):
  """About 2 CPU minutes: the 299 x 299 network on CPU plus four 2048-d sqrtm (6 samples make
  singular covariances, so each Frechet distance takes the eps retry)."""
  inception = pytest.importorskip("common.eval.inception")
  net = inception.FIDInceptionV3(rngs=nnx.Rngs(0))  # random weights: checks shapes and plumbing
  monkeypatch.setattr(features, "load_network", lambda path=None: net)
  monkeypatch.setattr(features, "_NETWORKS", {})
  monkeypatch.setattr(features, "_REFERENCES", {})
  np.savez(tmp_path / "samples.npz", images=_images(2, 6, size=32))
  np.savez(tmp_path / "ref.npz", arr_0=_images(3, 6, size=32))
  code, stdout, stderr = run_cli(capsys, f"--samples={tmp_path / 'samples.npz'}",
                                 f"--reference={tmp_path / 'ref.npz'}", "--batch_size=6",
                                 f"--save_features={tmp_path / 'f.npz'}", "--noprogress")
  assert code == 0, stderr
  result = json.loads(stdout)
  assert np.isfinite(result["fid"]) and np.isfinite(result["sfid"]) and result["num_samples"] == 6
  with np.load(tmp_path / "f.npz") as z:
    assert {k: z[k].shape for k in z.files} == {"pool": (6, 2048), "spatial": (6, 2023),
                                                 "logits": (6, 1008)}
