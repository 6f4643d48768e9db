"""End-to-end training: loss falls, exact resume, NaN handling, sampling output, CLI errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from common.training import trainer
from common.errors import CheckpointError, ConfigError, NonFiniteLossError, ShapeError
from configs import sid2_digits
from configs.base import override

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_losses(workdir):
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      out[rec["step"]] = rec["loss"]
  return out


def tiny_config(**train):
  c = sid2_digits.get_config("runlocal")
  c.train.log_every = 1
  c.train.checkpoint_every = 5
  c.train.tensorboard = False
  for k, v in train.items():
    setattr(c.train, k, v)
  return c


def test_short_training_run_loss_falls(tmp_path):
  c = tiny_config(steps=60, batch_size=32)
  c.optim.learning_rate = 2e-3
  c.train.log_every = 1
  res = trainer.train(c, str(tmp_path))
  assert res["step"] == 60
  losses = read_losses(str(tmp_path))
  first, last = np.mean([losses[s] for s in range(1, 11)]), np.mean([losses[s] for s in range(51, 61)])
  assert last < 0.8 * first, (first, last)
  assert os.path.exists(tmp_path / "samples" / "step_0000060.png")
  with open(tmp_path / "metrics.jsonl") as f:
    recs = [json.loads(line) for line in f]
  assert {"step", "loss", "grad_norm", "lr", "steps_per_s", "wall_s"} <= set(recs[0])
  walls = [r["wall_s"] for r in recs]  # the call's wall time so far: compile and grids included
  assert walls[0] > 0 and walls == sorted(walls)


def test_exact_resume_matches_uninterrupted_run(tmp_path):
  c = tiny_config(steps=20)
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  trainer.train(c, full)
  r = trainer.train(c, split, stop_after=10)
  assert r["step"] == 10 and r["stopped_by"] == "stop_after"
  r = trainer.train(c, split)
  assert r["step"] == 20
  a, b = read_losses(full), read_losses(split)
  assert sorted(a) == sorted(b) == list(range(1, 21))
  for s in range(1, 21):
    assert a[s] == b[s], (s, a[s], b[s])  # bit-identical


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  c = tiny_config(steps=12, checkpoint_every=5)
  trainer.train(c, str(tmp_path), stop_after=5)
  c.optim.learning_rate = 1e30  # blows up the parameters, then the loss
  with pytest.raises(NonFiniteLossError, match="last good checkpoint"):
    trainer.train(c, str(tmp_path))
  ckpts = sorted(os.listdir(tmp_path / "checkpoints"))
  assert "5" in ckpts and not any(int(s) > 5 for s in ckpts if s.isdigit())


def test_resume_with_an_incompatible_config_is_a_clear_error(tmp_path):
  c = tiny_config(steps=4)
  trainer.train(c, str(tmp_path), stop_after=2)
  c.optim.clip_norm = 0.0  # changes the optimizer state's structure
  with pytest.raises(CheckpointError, match="left untouched"):
    trainer.train(c, str(tmp_path))
  assert "2" in os.listdir(tmp_path / "checkpoints")


def test_sample_writes_npz_and_grid(tmp_path):
  c = tiny_config(steps=5)
  trainer.train(c, str(tmp_path))
  path = trainer.sample(c, str(tmp_path), num_samples=12)
  data = np.load(path)
  assert data["images"].dtype == np.uint8 and data["images"].shape == (12, 8, 8, 1)
  np.testing.assert_array_equal(data["labels"], np.arange(12) % 10)
  assert os.path.exists(tmp_path / "samples" / "samples.png")


def test_bad_model_key_and_bad_data_shape_are_clear(tmp_path):
  c = tiny_config(steps=2)
  with c.unlocked():
    c.model.not_a_key = 3
  with pytest.raises(ConfigError, match="not_a_key"):
    trainer.train(c, str(tmp_path / "a"))
  c = tiny_config(steps=2)
  c.model.image_size = 16
  with pytest.raises(ShapeError):
    trainer.train(c, str(tmp_path / "b"))


def run_cli(*args, env=None):
  return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "main.py"), *args],
                        capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def test_cli_missing_imagenet_is_one_clear_line(tmp_path):
  r = run_cli("--config=configs/sid2_in512.py", f"--workdir={tmp_path}",
              f"--config.data.data_dir={tmp_path / 'no_tfds'}")
  assert r.returncode != 0
  assert "Traceback" not in r.stderr, r.stderr[-2000:]
  assert "imagenet2012" in r.stderr


def test_cli_unknown_config_key_fails_clearly(tmp_path):
  r = run_cli("--config=configs/sid2_digits.py:runlocal", f"--workdir={tmp_path}",
              "--config.train.not_a_key=1")
  assert r.returncode != 0
  assert "not_a_key" in r.stderr
  assert "Traceback" not in r.stderr, r.stderr[-2000:]


def test_cli_sigterm_saves_and_exits_zero(tmp_path):
  import signal
  import time
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, "launch", "main.py"), "--config=configs/sid2_digits.py:runlocal",
       f"--workdir={tmp_path}", "--config.train.steps=100000", "--config.train.log_every=1",
       "--config.train.tensorboard=False"],
      cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = tmp_path / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-2000:]
  steps = [int(s) for s in os.listdir(tmp_path / "checkpoints") if s.isdigit()]
  assert steps and max(steps) >= 3
  assert "SIGTERM" in out


@pytest.mark.parametrize("setting", ["optim.name=coat.optim.fp8_adamw", "precision=coat"])
def test_fp8_training_checkpoints_and_resumes_exactly(tmp_path, setting):
  """FP8 AdamW alone, and the whole COAT mode (FP8 linears, FP8-saved activations, FP8 AdamW)."""
  c = override(tiny_config(steps=4), [setting])
  full, split = str(tmp_path / "full"), str(tmp_path / "split")
  trainer.train(c, full)
  trainer.train(c, split, stop_after=2)
  trainer.train(c, split)
  a, b = read_losses(full), read_losses(split)
  assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]


def test_cli_summary_reports_params_and_gflops():
  r = run_cli("--config=configs/sid2_digits.py", "--mode=summary")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "total" in r.stdout and "GFLOP" in r.stdout and "1,566,529" in r.stdout


def test_eval_mode_and_periodic_eval(tmp_path, monkeypatch):
  """config.eval.every logs eval/* by step; --mode=eval scores the newest EMA weights, writes
  eval/step_N.json and reuses the samples it already drew for that step. The FID Inception is
  replaced by a small random network with its interface (the real one is tested in test_inception)."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from common.eval import features  # pylint: disable=import-outside-toplevel
  from tests.test_evaluate_cli import TinyFeatureNet  # pylint: disable=import-outside-toplevel
  net = TinyFeatureNet(rngs=nnx.Rngs(0))
  monkeypatch.setattr(features, "load_network", lambda path=None: net)
  monkeypatch.setattr(features, "_NETWORKS", {})
  monkeypatch.setattr(features, "_REFERENCES", {})
  c = tiny_config(steps=6)
  c.eval.every = 3
  c.eval.train_num_samples = 10
  c.eval.num_samples = 12
  c.eval.batch_size = 8
  c.eval.reference_limit = 40
  trainer.train(c, str(tmp_path))
  evals = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  evals = [r for r in evals if "eval/fid" in r]
  assert [r["step"] for r in evals] == [3, 6]
  assert all(np.isfinite(r["eval/fid"]) and 0 <= r["eval/precision"] <= 1 for r in evals)
  assert (tmp_path / "eval" / "reference.npz").exists()
  scores = trainer.evaluate(c, str(tmp_path))
  assert np.isfinite(scores["eval/fid"]) and scores["eval/num_samples"] == 12
  rec = json.loads((tmp_path / "eval" / "step_0000006.json").read_text())
  assert rec["num_samples"] == 12 and rec["step"] == 6
  samples = tmp_path / "eval" / "samples_step_0000006_n12.npz"
  mtime = samples.stat().st_mtime
  again = trainer.evaluate(c, str(tmp_path))
  assert samples.stat().st_mtime == mtime and again["eval/fid"] == scores["eval/fid"]


def test_eval_caches_are_keyed_on_their_settings(tmp_path, monkeypatch, capsys):
  """--mode=eval reused eval/samples_step_N_nM.npz whatever the sampler settings and
  eval/reference.npz whatever its limit, and reported the old FID. Each cache now records what
  made it: other settings recompute it (saying why on stderr), so do a truncated file and a file
  an older version wrote without settings."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from common.eval import features  # pylint: disable=import-outside-toplevel
  from tests.test_evaluate_cli import TinyFeatureNet  # pylint: disable=import-outside-toplevel
  net = TinyFeatureNet(rngs=nnx.Rngs(0))
  monkeypatch.setattr(features, "load_network", lambda path=None: net)
  monkeypatch.setattr(features, "_NETWORKS", {})
  monkeypatch.setattr(features, "_REFERENCES", {})
  c = tiny_config(steps=2)
  c.sample.num_steps = 4
  c.eval.num_samples = 8
  c.eval.batch_size = 8
  c.eval.reference_limit = 24
  trainer.train(c, str(tmp_path))
  samples = tmp_path / "eval" / "samples_step_0000002_n8.npz"
  step_json = tmp_path / "eval" / "step_0000002.json"

  def evaluate(config):
    capsys.readouterr()
    scores = trainer.evaluate(config, str(tmp_path))
    assert json.loads(step_json.read_text())["fid"] == scores["eval/fid"]
    return scores, capsys.readouterr().err

  first, err = evaluate(c)
  assert "warning" not in err and samples.exists()
  with np.load(samples) as z:
    first_images = z["images"]
  again, err = evaluate(c)  # same settings: reused
  assert again["eval/fid"] == first["eval/fid"] and "warning" not in err
  c.sample.num_steps = 2
  other, err = evaluate(c)
  assert ("were made with other settings (sample.num_steps: 4 -> 2); recomputing them" in err
          and str(samples) in err)
  assert other["eval/fid"] != first["eval/fid"]
  with np.load(samples) as z:
    assert not np.array_equal(z["images"], first_images)
  # A truncated cache (a run killed while writing, before writes were atomic): recomputed.
  samples.write_bytes(samples.read_bytes()[:1000])
  _, err = evaluate(c)
  assert f"the cached evaluation samples {samples} cannot be read" in err
  np.savez(samples, images=first_images)  # no settings recorded (an older version's file)
  _, err = evaluate(c)
  assert "record no settings" in err
  # The reference: another limit recomputes it, and the new statistics are used.
  reference = tmp_path / "eval" / "reference.npz"
  with np.load(reference) as z:
    assert len(z["pool"]) == 24
  c.eval.reference_limit = 16
  _, err = evaluate(c)
  assert "the cached reference statistics" in err and "limit: 24 -> 16" in err
  with np.load(reference) as z:
    assert len(z["pool"]) == 16


def test_gradient_accumulation_averages_interleaved_micro_batches():
  """grad_accum_steps = k: the step's gradient is the mean of the k micro-batch gradients, micro-batch
  i being rows i, i + k, ... with key fold_in(key, i)."""
  import jax  # pylint: disable=import-outside-toplevel
  from common.training import sharding
  from common.training.experiment import Experiment  # pylint: disable=import-outside-toplevel
  c = tiny_config(steps=2, batch_size=8, grad_accum_steps=2)
  exp = Experiment(c, sharding.make_mesh(c.mesh))
  params = exp.init_state(0)["params"]
  rng = np.random.default_rng(0)
  batch = {"x": rng.uniform(-1, 1, (8, 8, 8, 1)).astype(np.float32),
           "cond": {"label": rng.integers(0, 10, (8,)).astype(np.int32)}}
  key = jax.random.key(3)
  loss, _, grads = jax.jit(exp._grads)(params, batch, key)  # pylint: disable=protected-access
  parts = [jax.value_and_grad(exp._loss, has_aux=True)(  # pylint: disable=protected-access
      params, jax.tree.map(lambda x: x[i::2], batch), jax.random.fold_in(key, i)) for i in range(2)]
  np.testing.assert_allclose(loss, (parts[0][0][0] + parts[1][0][0]) / 2, rtol=1e-5)
  jax.tree.map(lambda g, a, b: np.testing.assert_allclose(g, (a + b) / 2, rtol=1e-4, atol=1e-7),
               grads, parts[0][1], parts[1][1])
  with pytest.raises(ConfigError, match="grad_accum_steps"):
    Experiment(tiny_config(batch_size=8, grad_accum_steps=3), exp.mesh)
