"""The benchmark studies run end to end on tiny settings: each arm trains, samples and is judged,
and an interrupted study resumes instead of starting again (benchmarks/studies.py)."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))

import studies  # noqa: E402
import study_terdit  # noqa: E402

TINY = ["model.dim=32", "model.depth=1", "model.num_heads=2", "model.multiple_of=32",
        "train.batch_size=8", "train.log_every=2", "train.checkpoint_every=6",
        "train.sample_every=0", "train.num_grid_samples=10", "sample.num_samples=20",
        "sample.batch_size=20", "sample.num_steps=4"]


@pytest.mark.slow  # about 2 minutes on 2 cores: three arms trained, sampled and judged, twice
def test_terdit_study_three_arms(tmp_path, monkeypatch, capsys):
  argv = ["study_terdit.py", f"--workdir={tmp_path}", "--steps=6", "--fid_n=0", "--window=2",
          "--loss_batches=1"] + [f"--set={s}" for s in TINY]
  monkeypatch.setattr(sys, "argv", argv)
  study_terdit.main()
  rows = json.load(open(tmp_path / "terdit_study.json"))["rows"]
  assert [r["arm"] for r in rows] == ["ternary", "no_adaln_norm", "fp"]
  assert [(r["ternary"], r["adaln_norm"]) for r in rows] == [(True, True), (True, False), (False, True)]
  for r in rows:
    assert [s for s, _ in r["loss_curve"]] == [2, 4, 6]
    assert 0.0 <= r["accuracy"] <= 1.0 and r["fid"] is None
  # The ablation really changes the network: different losses from the same seed and data.
  assert len({r["fixed_batch_loss"] for r in rows}) == 3
  assert "TerDiT Fig. 7" in capsys.readouterr().out
  # A second run finds every arm trained and sampled: nothing is redone.
  before = os.path.getmtime(tmp_path / "fp" / "samples" / "samples.npz")
  study_terdit.main()
  assert os.path.getmtime(tmp_path / "fp" / "samples" / "samples.npz") == before


def test_loss_curve_windows(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step, loss in [(1, 4.0), (2, 2.0), (3, 1.0), (4, 3.0), (5, 0.5), (4, 1.0)]:
      f.write(json.dumps({"step": step, "loss": loss}) + "\n")
    f.write(json.dumps({"step": 5, "steps_per_s": 2.5}) + "\n")
  # step 4 logged twice (a resumed run): the later value wins
  assert studies.loss_curve(str(tmp_path), 2) == [(2, 3.0), (4, 1.0), (6, 0.5)]
  assert studies.final_loss(str(tmp_path), 2) == pytest.approx(0.75)
  assert studies.training_rate(str(tmp_path)) == 2.5
