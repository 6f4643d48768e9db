"""The text-to-image demos' judge (benchmarks/judge_fashion.py): its two classifiers and the real
images' FID results are made once and reused from the user cache (made again when the data or a
setting changes), the cached MLP predicts as scikit-learn's, and the demo ends with its summary."""

import gzip
import os
import struct
import sys

import numpy as np
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

import demo_report  # noqa: E402
import judge_fashion  # noqa: E402
from common.data import captions  # noqa: E402
from common.eval import features  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore", category=ConvergenceWarning)


def _images(labels: np.ndarray, seed: int) -> np.ndarray:
  """uint8 [N, 28, 28]: noise with a bright 6x6 square whose place says the class."""
  rng = np.random.default_rng(seed)
  x = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
  for i, c in enumerate(labels):
    r, col = 2 + 8 * (c // 3), 2 + 8 * (c % 3)
    x[i, r:r + 6, col:col + 6] = 230
  return x


def _write_fmnist(directory, n_train: int = 400, n_test: int = 200, seed: int = 0) -> str:
  """A Fashion-MNIST folder (gzipped idx files) of easy synthetic images."""
  os.makedirs(directory, exist_ok=True)
  for prefix, n, s in (("train", n_train, seed), ("t10k", n_test, seed + 1)):
    labels = (np.arange(n) * 7 % 10).astype(np.uint8)
    for kind, array, magic in (("images-idx3", _images(labels, s), 0x0803),
                               ("labels-idx1", labels, 0x0801)):
      with gzip.open(os.path.join(directory, f"{prefix}-{kind}-ubyte.gz"), "wb") as f:
        f.write(struct.pack(f">{1 + array.ndim}i", magic, *array.shape) + array.tobytes())
  return str(directory)


@pytest.fixture
def small_judges(monkeypatch):
  """Judges trained for seconds (the real settings train for minutes); counts their trainings."""
  monkeypatch.setattr(judge_fashion, "CNN_TRAINING", {"epochs": 3, "batch": 50, "seed": 0})
  monkeypatch.setattr(judge_fashion, "MLP_TRAINING",
                      {"hidden": 32, "max_iter": 40, "n": 400, "random_state": 0})
  trained = []
  cnn_train, mlp_fit = judge_fashion.train, MLPClassifier.fit
  monkeypatch.setattr(judge_fashion, "train",
                      lambda *a, **kw: trained.append("cnn") or cnn_train(*a, **kw))
  monkeypatch.setattr(MLPClassifier, "fit",
                      lambda self, *a: trained.append("mlp") or mlp_fit(self, *a))
  return trained


def test_judges_and_real_statistics_are_made_once(tmp_path, small_judges, inception_calls):
  fm, cache_dir = _write_fmnist(tmp_path / "fm"), str(tmp_path / "cache")
  data = judge_fashion.load_data(fm)
  # The real test images as "samples", asked for their true class: the accuracies must be the
  # judges' own on real test images.
  images, labels = data["test_x"], data["test_y"]
  first = judge_fashion.score_samples(images, labels, fid_n=100, cache_dir=cache_dir, fmnist_dir=fm)
  assert small_judges == ["cnn", "mlp"]
  assert inception_calls == [(100, 100)] * 3  # test reference, training floor, samples
  assert sorted(os.listdir(cache_dir)) == [
      "fashion_cnn_judge.npz", "fashion_mlp_judge.npz", "fashion_test_reference_n100.npz",
      "fashion_train_floor_n100.npz"]
  assert first["accuracy"] == pytest.approx(first["judge_real_accuracy"]) and first["accuracy"] > 0.9
  assert first["mlp_accuracy"] == pytest.approx(first["mlp_real_accuracy"])
  assert first["confusion"].sum() == len(images) and np.trace(first["confusion"]) > 180
  # The samples are the reference images themselves: FID ~ 0, and the floor is a real FID.
  assert abs(first["fid"]) < 1e-3 and first["fid_floor"] > 0.0 and first["fid_n"] == 100
  want = features.evaluate_images(
      data["train_x"][:100], os.path.join(cache_dir, "fashion_test_reference_n100.npz"))["fid"]
  assert first["fid_floor"] == pytest.approx(want, rel=1e-9)

  small_judges.clear()
  inception_calls.clear()
  features._REFERENCES.clear()  # a new process: nothing in memory  pylint: disable=protected-access
  again = judge_fashion.score_samples(images[:150], labels[:150], fid_n=100, cache_dir=cache_dir,
                                      fmnist_dir=fm)
  assert small_judges == [] and inception_calls == [(100, 100)]  # the samples only
  assert again["judge_real_accuracy"] == first["judge_real_accuracy"]
  assert again["mlp_real_accuracy"] == first["mlp_real_accuracy"]
  assert again["fid_floor"] == pytest.approx(first["fid_floor"], rel=1e-12)


def test_other_data_or_settings_make_them_again(tmp_path, small_judges, inception_calls, capsys,
                                                monkeypatch):
  cache_dir = str(tmp_path / "cache")
  fm = _write_fmnist(tmp_path / "fm")
  x, y = judge_fashion.load_data(fm)["test_x"][:60], judge_fashion.load_data(fm)["test_y"][:60]
  judge_fashion.score_samples(x, y, fid_n=50, cache_dir=cache_dir, fmnist_dir=fm)
  small_judges.clear()
  inception_calls.clear()
  other = _write_fmnist(tmp_path / "other", seed=5)  # another copy of the data
  judge_fashion.score_samples(x, y, fid_n=50, cache_dir=cache_dir, fmnist_dir=other)
  assert small_judges == ["cnn", "mlp"] and inception_calls == [(50, 50)] * 3
  assert "made with other settings" in capsys.readouterr().err
  small_judges.clear()
  monkeypatch.setattr(judge_fashion, "CNN_TRAINING", {"epochs": 2, "batch": 50, "seed": 0})
  judge_fashion.score_samples(x, y, fid_n=0, cache_dir=cache_dir, fmnist_dir=other)
  assert small_judges == ["cnn"]


def test_cached_mlp_predicts_as_scikit_learn(tmp_path):
  data = judge_fashion.load_data(_write_fmnist(tmp_path / "fm"))
  clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=3, random_state=0)
  clf.fit(data["train_x"].reshape(400, -1) / 255.0, data["train_y"])
  w = {"w0": clf.coefs_[0], "b0": clf.intercepts_[0], "w1": clf.coefs_[1], "b1": clf.intercepts_[1]}
  want = clf.predict(data["test_x"].reshape(200, -1).astype(np.float32) / 255.0)
  np.testing.assert_array_equal(judge_fashion.mlp_predict(w, data["test_x"]), want)


def test_demo_ends_with_its_summary(tmp_path, small_judges, inception_calls, monkeypatch, capsys):
  fm, wd = _write_fmnist(tmp_path / "fm"), tmp_path / "wd"
  data = judge_fashion.load_data(fm)
  prompts, prompt_labels = captions.fashion_eval_prompts(1)
  labels = np.asarray(prompt_labels)[np.arange(100) % len(prompts)]
  images = _images(labels, seed=9)[..., None]
  (wd / "samples").mkdir(parents=True)
  np.savez(wd / "samples" / "samples.npz", images=images,
           prompts=np.asarray(prompts)[np.arange(100) % len(prompts)])
  (wd / "config.json").write_text(
      '{"model": {"name": "sid2.model.ResidualUViT"}, "train": {"steps": 1500, "batch_size": 32,'
      ' "log_every": 100}, "sample": {"num_steps": 64, "sampler": "ddpm", "guidance_scale": 5.0,'
      f' "prompts": {list(prompts)!r}}}}}'.replace("'", '"'))
  (wd / "metrics.jsonl").write_text('{"step": 1500, "loss": 0.2, "wall_s": 776.0}\n')
  monkeypatch.setattr(sys, "argv", [
      "judge_fashion.py", f"--workdir={wd}", f"--fmnist={fm}", "--fid_n=50",
      f"--cache_dir={tmp_path / 'cache'}", "--report=make t2i-demo: summary"])
  judge_fashion.main()
  out = capsys.readouterr().out
  screen = out[out.index("=" * demo_report.WIDTH):]
  assert len(screen.splitlines()) <= 24 and max(map(len, screen.splitlines())) <= demo_report.WIDTH
  text = " ".join(screen.split())
  assert "make t2i-demo: summary" in text and "1500 of 1500 steps at batch 32 in 12m56s" in text
  assert "100 images from 10 prompts in caption phrasings never seen in training" in text
  assert "Verdict: GOOD" in text and f"{wd}/samples/samples.png" in text
  assert "FID" in text and data["test_x"].shape == (200, 28, 28, 1)


def test_fashion_verdict_names_the_weakest_classes():
  per_class = [1.0, 1.0, 0.9, 0.95, 0.77, 0.8, 0.11, 0.94, 1.0, 0.97]
  good = demo_report.fashion_verdict({"accuracy": 0.848, "per_class": per_class})
  assert good.startswith("GOOD: 85%") and "weakest: shirt 11%, coat 77%" in good
  poor = demo_report.fashion_verdict({"accuracy": 0.6, "per_class": per_class[:6] + [float("nan")] * 4})
  assert poor.startswith("POOR: only 60%") and "coat 77%" in poor and "train longer" in poor


def test_an_unwritable_cache_is_one_clear_error(tmp_path, monkeypatch, inception_calls):
  fm, wd = _write_fmnist(tmp_path / "fm"), tmp_path / "wd"
  (wd / "samples").mkdir(parents=True)
  prompts, _ = captions.fashion_eval_prompts(1)
  np.savez(wd / "samples" / "samples.npz", images=np.zeros((10, 28, 28, 1), np.uint8),
           prompts=np.asarray(prompts))
  blocker = tmp_path / "not_a_dir"
  blocker.write_text("")
  monkeypatch.setattr(sys, "argv", ["judge_fashion.py", f"--workdir={wd}", f"--fmnist={fm}",
                                    f"--cache_dir={blocker / 'cache'}"])
  with pytest.raises(SystemExit) as e:
    judge_fashion.main()
  assert "cannot write in" in str(e.value) and "--cache_dir" in str(e.value)
  assert inception_calls == []
