"""`make demo`'s judge and report: the real digits' FID statistics are computed once and reused from
the user cache (recomputed when a setting changes), every FID set runs through the Inception
unpadded, sampling compiles once per call, and the closing summary says what happened."""

import json
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

import demo_report  # noqa: E402
import judge_digits  # noqa: E402
from common import paths  # noqa: E402
from common.eval import features  # noqa: E402
from common.training import sharding, trainer  # noqa: E402
from common.training.experiment import Experiment  # noqa: E402
from configs import sid2_digits  # noqa: E402


def _samples(tmp_path, n=120):
  """A workdir whose samples are real digits (uint8 [n, 8, 8, 1]) labelled with their class."""
  x, y = judge_digits.real_digits()
  path = tmp_path / "wd" / "samples" / "samples.npz"
  path.parent.mkdir(parents=True)
  np.savez(path, images=judge_digits.as_uint8(x[-n:]), labels=y[-n:].astype(np.int32))
  return str(path)


def test_real_digit_statistics_are_cached_and_keyed(tmp_path, inception_calls):
  samples, cache_dir = _samples(tmp_path), str(tmp_path / "cache")
  first = judge_digits.evaluate(samples, 100, cache_dir=cache_dir)
  # training reference, held-out floor, samples: 100 images each, in one unpadded batch
  assert inception_calls == [(100, 100)] * 3
  assert sorted(os.listdir(cache_dir)) == ["digits_heldout_floor_n100.npz",
                                           "digits_train_reference_n100.npz"]
  assert first["fid_heldout_real"] > 0 and np.isfinite(first["fid_samples"])
  # The same FIDs as the project's evaluation gives for these images and reference.
  ref = os.path.join(cache_dir, "digits_train_reference_n100.npz")
  x, y = judge_digits.real_digits()
  _, x_te = judge_digits.train_test_split(x, test_size=judge_digits.TEST_SIZE,
                                          random_state=judge_digits.SPLIT_SEED, stratify=y)
  want = features.evaluate_images(np.load(samples)["images"][:100], ref)["fid"]
  assert first["fid_samples"] == pytest.approx(want, rel=1e-9)
  want = features.evaluate_images(judge_digits.as_uint8(x_te[:100]), ref)["fid"]
  assert first["fid_heldout_real"] == pytest.approx(want, rel=1e-9)

  inception_calls.clear()
  features._REFERENCES.clear()  # a new process: nothing in memory  pylint: disable=protected-access
  again = judge_digits.evaluate(samples, 100, cache_dir=cache_dir)
  assert inception_calls == [(100, 100)]  # the samples only
  assert again["fid_heldout_real"] == pytest.approx(first["fid_heldout_real"], rel=1e-12)
  assert again["fid_samples"] == pytest.approx(first["fid_samples"], rel=1e-6)

  # Another size makes other files; other Inception weights recompute the same files.
  inception_calls.clear()
  judge_digits.evaluate(samples, 80, cache_dir=cache_dir)
  assert inception_calls == [(80, 80)] * 3
  inception_calls.clear()
  judge_digits.evaluate(samples, 100, cache_dir=cache_dir, inception_path=str(tmp_path / "w.pt"))
  assert inception_calls == [(100, 100)] * 3


def test_a_changed_split_recomputes(tmp_path, inception_calls, monkeypatch, capsys):
  samples, cache_dir = _samples(tmp_path), str(tmp_path / "cache")
  judge_digits.evaluate(samples, 60, cache_dir=cache_dir)
  inception_calls.clear()
  monkeypatch.setattr(judge_digits, "SPLIT_SEED", 1)
  judge_digits.evaluate(samples, 60, cache_dir=cache_dir)
  assert inception_calls == [(60, 60)] * 3
  assert "made with other settings" in capsys.readouterr().err


def test_an_unwritable_cache_is_one_clear_error(tmp_path, inception_calls, monkeypatch, capsys):
  samples = _samples(tmp_path)
  blocker = tmp_path / "not_a_dir"
  blocker.write_text("")
  monkeypatch.setattr(sys, "argv", ["judge_digits.py", f"--workdir={tmp_path / 'wd'}",
                                    "--fid_n=50", f"--cache_dir={blocker / 'cache'}"])
  with pytest.raises(SystemExit) as e:
    judge_digits.main()
  assert "cannot write in" in str(e.value) and "--cache_dir" in str(e.value)
  assert inception_calls == [] and os.path.exists(samples)


def test_even_batch_size():
  assert features.even_batch_size(300, 256) == 150
  assert features.even_batch_size(1000, 500) == 500
  assert features.even_batch_size(1100, 500) == 367
  assert features.even_batch_size(20, 500) == 20


def test_user_cache_dir(monkeypatch, tmp_path):
  monkeypatch.delenv(paths.CACHE_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert paths.user_cache_dir() == paths.as_path(tmp_path / "xdg" / "frugal-diffusion")
  monkeypatch.setenv(paths.CACHE_ENV, str(tmp_path / "mine"))
  assert paths.user_cache_dir() == paths.as_path(tmp_path / "mine")
  assert paths.user_cache_dir(str(tmp_path / "flag")) == paths.as_path(tmp_path / "flag")
  monkeypatch.delenv(paths.CACHE_ENV)
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert paths.user_cache_dir() == paths.as_path(tmp_path / "home" / ".cache" / "frugal-diffusion")


def test_sampling_compiles_once_per_call():
  c = sid2_digits.get_config("runlocal")
  c.sample.num_steps = 2
  exp = Experiment(c, sharding.make_mesh(c.mesh))
  params = exp.init_state(0)["ema"]
  compiles = []

  def listen(event, duration, **_):
    del duration
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    images, meaning = trainer.generate(exp, params, 7, seed=0, batch_size=3)  # 3 + 3 + 1 (padded)
    assert images.shape == (7, 8, 8, 1) and images.dtype == np.uint8
    assert list(meaning["labels"]) == [0, 1, 2, 3, 4, 5, 6]
    compiles.clear()
    images5, _ = trainer.generate(exp, params, 5, seed=1, batch_size=3)  # 3 + 2 (padded)
    again, _ = trainer.generate(exp, params, 7, seed=0, batch_size=3)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert images5.shape == (5, 8, 8, 1)
  assert compiles == []  # every batch of every call had the first call's shape
  np.testing.assert_array_equal(again, images)  # same seed, same images


def _figures(**kw):
  f = {"n": 1000, "accuracy": 0.995, "classifier_heldout_accuracy": 0.991, "copy_fraction": 0.0,
       "nn_dist_samples_median": 1.03, "nn_dist_real_median": 1.04, "per_class": {},
       "fid_n": 300, "fid_samples": 23.7, "fid_heldout_real": 20.6}
  return {**f, **kw}


def test_report_says_what_was_trained_how_good_and_where(tmp_path):
  wd = tmp_path / "wd"
  wd.mkdir()
  cfg = sid2_digits.get_config()
  (wd / "config.json").write_text(cfg.to_json_best_effort())
  with open(wd / "metrics.jsonl", "w") as f:
    for step, wall in ((100, 20.0), (2500, 337.4)):
      f.write(json.dumps({"step": step, "loss": 0.05, "wall_s": wall}) + "\n")
  screen = demo_report.report(str(wd), _figures())
  assert max(len(line) for line in screen.splitlines()) <= demo_report.WIDTH
  assert len(screen.splitlines()) <= 24  # one screen
  text = " ".join(screen.split())  # unwrapped
  assert "2500 of 2500 steps at batch 64 in 5m37s" in text
  assert "99.5% of the samples" in text and "FID 23.70" in text and "score 20.60" in text
  assert "Verdict: GOOD" in text and "FID close to real digits" in text
  assert f"{wd}/samples/samples.png" in text


def test_verdicts():
  assert demo_report.verdict(_figures(accuracy=0.5)).startswith("POOR: only 50%")
  assert demo_report.verdict(_figures(copy_fraction=0.2)).startswith("POOR: 20.0%")
  assert "clearly above" in demo_report.verdict(_figures(fid_samples=40.0))
  assert "FID" not in demo_report.verdict({k: v for k, v in _figures().items()
                                           if not k.startswith("fid")})


def test_profile_counts_the_network_calls_of_each_sampler():
  """bench_demo_profile's FLOPs of sampling rest on its count of network calls per sample."""
  import bench_demo_profile  # pylint: disable=import-outside-toplevel
  from configs import microdit  # pylint: disable=import-outside-toplevel

  def calls(c):
    return bench_demo_profile.network_evaluations(Experiment(c, sharding.make_mesh(c.mesh)))

  # VP DDPM, 64 steps, CFG only inside logSNR [-10, 2]: 15 of the 64 steps are guided.
  assert calls(sid2_digits.get_config()) == 79
  # EDM Heun, 30 steps: 30 + 29 evaluations (no correction on the last step); CFG everywhere.
  c = microdit.get_config("fashion")
  assert (c.sample.sampler, c.sample.num_steps) == ("heun", 30)
  assert calls(c) == 2 * 59
  c.sample.guidance_scale = 1.0
  assert calls(c) == 59
  c.sample.guidance_scale, c.sample.guidance_interval = 5.0, (-1.0, 1.0)  # logSNR of sigma_data
  assert 59 < calls(c) < 2 * 59
