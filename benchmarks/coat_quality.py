"""Does COAT's FP8 mode train as well as the default precision? One config, both ways.

Trains a config twice at the same seed and number of steps, with `config.precision = "bf16"` (the
config's own dtypes, AdamW) and `"coat"` (FP8 GEMMs in attention and MLP branches, FP8-saved
activations, FP8 AdamW; coat/precision.py), samples each run's EMA weights and reports:

  * the final training loss: the mean of the last `--tail` logged one-batch losses;
  * the fixed-batch loss: the loss of each run's final weights (in its own precision) on the same
    `--loss_batches` data batches with the same diffusion noise and times, so that the two runs
    are compared on identical draws instead of on noisy one-batch figures;
  * sample quality: for the digits demo (configs/sid2_digits.py) the conditioning-class accuracy
    and FID against real digits (benchmarks/digits_sample_quality.py); for Fashion-MNIST configs
    (configs/sid2_t2i_fashion.py) the prompt-class accuracy of the CNN judge and FID against real
    test images (benchmarks/fashion_classifier.py).

COAT's paper reports OLMo-1B train loss 2.568 (COAT) vs 2.551 (BF16), 0.7% apart (arXiv 2410.19313,
Table 3); the goal here is final losses within 2%.

Usage: python benchmarks/coat_quality.py [--config configs/sid2_digits.py[:arg]] [--set key=value]
         [--workdir workdirs/coat_quality] [--steps 0] [--fid_n 300] [--tail 5] [--loss_batches 16]
e.g.   python benchmarks/coat_quality.py --config configs/sid2_t2i_fashion.py \
         --set autoencoder=AE/export --set data.path=LATENTS --workdir workdirs/coat_quality_t2i
Prints a markdown table (and writes it to WORKDIR/coat_quality.json).
"""

import argparse
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402

from common import sharding, trainer  # noqa: E402
from common.data import make_train_iterator  # noqa: E402
from common.experiment import Experiment  # noqa: E402
from configs.base import override  # noqa: E402
import coat_memory  # noqa: E402  (benchmarks/coat_memory.py: load_config)
import digits_sample_quality  # noqa: E402
import fashion_classifier  # noqa: E402
from t2i_fashion_quality import prompt_labels  # noqa: E402


def final_loss(workdir: str, tail: int) -> float:
  """Mean of the last `tail` losses logged in WORKDIR/metrics.jsonl."""
  losses = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rec = json.loads(line)
      if "loss" in rec:
        losses[rec["step"]] = rec["loss"]
  steps = sorted(losses)[-tail:]
  return float(np.mean([losses[s] for s in steps]))


def fixed_batch_loss(config, workdir: str, num_batches: int) -> float:
  """Mean loss of the run's newest weights on `num_batches` batches drawn with a fixed seed (not
  the training seed) and fixed diffusion keys: the same draws for every precision."""
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


def sample_quality(config, samples_path: str, eval_dir: str, fid_n: int) -> dict:
  """The judge of the config's data: digits or Fashion-MNIST (prompts or class labels)."""
  data = np.load(samples_path)
  if config.data.name == "digits":
    r = digits_sample_quality.evaluate(samples_path, fid_n)
    return {"accuracy": r["accuracy"], "fid": r.get("fid_samples"), "fid_floor": r.get("fid_heldout_real")}
  if config.eval.get("reference_data", {}).get("name") == "fashion_mnist":
    labels = prompt_labels(data["prompts"]) if "prompts" in data else data["labels"]
    r = fashion_classifier.score_samples(data["images"], labels, eval_dir, fid_n=fid_n)
    return {"accuracy": r["accuracy"], "fid": r.get("fid"), "fid_floor": r.get("fid_floor")}
  raise SystemExit(f"no judge for data {config.data.name!r}: digits and Fashion-MNIST configs only")


def run(precision: str, args) -> dict:
  c = override(coat_memory.load_config(args.config), args.set)
  c.precision = precision
  if args.steps:
    c.train.steps = args.steps
  c.train.tensorboard = False
  workdir = os.path.join(args.workdir, precision)
  t0 = time.perf_counter()
  trainer.train(c, workdir)
  train_s = time.perf_counter() - t0
  path = trainer.sample(c, workdir)
  quality = sample_quality(c, path, os.path.join(args.workdir, "eval"), args.fid_n)
  return {"precision": precision, "steps": int(c.train.steps), "train_s": train_s,
          "final_loss": final_loss(workdir, args.tail),
          "fixed_batch_loss": fixed_batch_loss(c, workdir, args.loss_batches), **quality}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--config", default="configs/sid2_digits.py", help="file[:arg]")
  ap.add_argument("--set", action="append", default=[], help="config override key=value")
  ap.add_argument("--workdir", default="workdirs/coat_quality")
  ap.add_argument("--steps", type=int, default=0, help="0: the config's own")
  ap.add_argument("--fid_n", type=int, default=300, help="images per FID set (0: no FID)")
  ap.add_argument("--tail", type=int, default=5, help="logged losses averaged for the final loss")
  ap.add_argument("--loss_batches", type=int, default=16, help="batches of the fixed-batch loss")
  args = ap.parse_args()
  rows = [run(p, args) for p in ("bf16", "coat")]
  base, coat = rows
  gap = (coat["final_loss"] - base["final_loss"]) / base["final_loss"]
  fixed_gap = (coat["fixed_batch_loss"] - base["fixed_batch_loss"]) / base["fixed_batch_loss"]
  print(f"config: {args.config} {' '.join(args.set)}")
  print("| precision | steps | final loss (last logged) | fixed-batch loss | class accuracy | "
        "FID (samples / real floor) | train wall |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    fid = f"{r['fid']:.2f} / {r['fid_floor']:.2f}" if r.get("fid") is not None else "-"
    print(f"| {r['precision']} | {r['steps']} | {r['final_loss']:.4f} | {r['fixed_batch_loss']:.4f} | "
          f"{100 * r['accuracy']:.1f}% | {fid} | {r['train_s'] / 60:.1f} min |")
  print(f"COAT vs bf16: final loss {100 * gap:+.2f}%, fixed-batch loss {100 * fixed_gap:+.2f}% "
        "(goal: within 2%)")
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "coat_quality.json"), "w") as f:
    json.dump({"rows": rows, "final_loss_gap": gap, "fixed_batch_loss_gap": fixed_gap}, f, indent=1)


if __name__ == "__main__":
  main()
