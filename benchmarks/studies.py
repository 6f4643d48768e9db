"""What the study_*.py scripts share: train an arm of a study, sample it, judge it, read its losses.

A study (benchmarks/study_coat_quality.py, study_microdit_masking.py, study_terdit.py) trains
several variants of one config ("arms") at the same seed and number of steps, each in WORKDIR/<arm>,
through the project's trainer, and compares them (study_autoencoder_fashion.py trains one config the
same way). Training resumes a run that the workdir already holds, and sampling is skipped when the
samples are newer than the run, so an interrupted study picks up where it stopped.
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common.training import sharding
from common.training import trainer
from common.data import make_train_iterator  # noqa: E402
from common.training.experiment import Experiment  # noqa: E402
import judge_digits  # noqa: E402  (benchmarks/judge_digits.py)
import judge_fashion  # noqa: E402  (benchmarks/judge_fashion.py)


def train(config, workdir: str) -> float:
  """Trains `config` in `workdir` with the project's trainer (resuming a run the workdir holds);
  returns the seconds of the call. A run stopped before its last step ends the study."""
  t0 = time.perf_counter()
  result = trainer.train(config, workdir)
  if result["stopped_by"] is not None:
    raise SystemExit(f"{workdir}: training stopped at step {result['step']} "
                     f"({result['stopped_by']})")
  return time.perf_counter() - t0


def train_and_sample(config, workdir: str) -> dict:
  """Trains `config` in `workdir` (`train`), then samples its EMA weights unless WORKDIR/samples/
  samples.npz is newer than the run. Returns {"samples": path, "train_call_s": seconds}."""
  train_s = train(config, workdir)
  path = os.path.join(workdir, "samples", "samples.npz")
  if not os.path.exists(path) or os.path.getmtime(path) < os.path.getmtime(
      os.path.join(workdir, "metrics.jsonl")):
    path = trainer.sample(config, workdir)
  return {"samples": path, "train_call_s": train_s}


def logged(workdir: str, key: str) -> dict[int, float]:
  """{step: value} of `key` in WORKDIR/metrics.jsonl (the trainer's log; a resumed run's later
  lines win)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if key in rec:
        out[int(rec["step"])] = float(rec[key])
  return out


def final_loss(workdir: str, tail: int) -> float:
  """Mean of the last `tail` one-batch training losses logged in WORKDIR/metrics.jsonl."""
  losses = logged(workdir, "loss")
  return float(np.mean([losses[s] for s in sorted(losses)[-tail:]]))


def loss_curve(workdir: str, window: int) -> list[tuple[int, float]]:
  """[(last step of the window, mean logged loss)] over consecutive windows of `window` steps."""
  losses = logged(workdir, "loss")
  bins: dict[int, list[float]] = {}
  for step, value in losses.items():
    bins.setdefault((step - 1) // window, []).append(value)
  return [((b + 1) * window, float(np.mean(v))) for b, v in sorted(bins.items())]


def training_rate(workdir: str) -> float:
  """Steps/s of the run's last log line (the trainer's rate since its first step: no compile)."""
  rates = logged(workdir, "steps_per_s")
  return rates[max(rates)] if rates else float("nan")


def fixed_batch_loss(config, workdir: str, num_batches: int) -> float:
  """Mean loss of the run's newest weights on `num_batches` batches drawn with a fixed seed (not
  the training seed) and fixed diffusion keys: the same draws for every arm of a study."""
  exp = Experiment(config, sharding.make_mesh(config.mesh))
  _, state = trainer.restore_newest(exp, workdir)
  data = make_train_iterator(config.data, global_batch_size=int(config.train.batch_size),
                             seed=12345, process_index=jax.process_index(),
                             process_count=jax.process_count())
  losses = []
  for i in range(num_batches):
    batch = sharding.global_batch(exp.model_batch(next(data)), exp.mesh, exp.rules)
    losses.append(float(exp.eval_loss(state["params"], batch, jax.random.key(1000 + i))))
  return float(np.mean(losses))


def sample_quality(config, samples_path: str, fid_n: int) -> dict:
  """The judge of the config's data: scikit-learn digits (RBF-SVM, FID vs training digits) or
  Fashion-MNIST (CNN judge on the class of each prompt or label, FID vs test images), with what
  never changes (the judges, the real images' statistics) in the user cache. Returns
  {"accuracy", "fid", "fid_floor", "per_class"} (FIDs None when fid_n is 0)."""
  data = np.load(samples_path)
  if config.data.name == "digits":
    r = judge_digits.evaluate(samples_path, fid_n)
    return {"accuracy": r["accuracy"], "fid": r.get("fid_samples"),
            "fid_floor": r.get("fid_heldout_real"), "per_class": list(r["per_class"].values())}
  if config.eval.get("reference_data", {}).get("name") == "fashion_mnist":
    labels = judge_fashion.prompt_labels(data["prompts"]) if "prompts" in data else data["labels"]
    r = judge_fashion.score_samples(data["images"], labels, fid_n=fid_n)
    return {"accuracy": r["accuracy"], "fid": r.get("fid"), "fid_floor": r.get("fid_floor"),
            "per_class": list(r["per_class"]),
            "confusion": np.asarray(r["confusion"]).tolist()}
  raise SystemExit(f"no judge for data {config.data.name!r}: digits and Fashion-MNIST configs only")
