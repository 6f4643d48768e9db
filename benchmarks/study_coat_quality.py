"""Does COAT's FP8 mode train as well as the default precision? One config, both ways.

Trains a config twice at the same seed and number of steps, with `config.precision = "bf16"` (the
config's own dtypes, AdamW) and `"coat"` (FP8 GEMMs in attention and MLP branches, FP8-saved
activations, FP8 AdamW; coat/precision.py), samples each run's EMA weights and reports:

  * the final training loss: the mean of the last `--tail` logged one-batch losses;
  * the fixed-batch loss: the loss of each run's final weights (in its own precision) on the same
    `--loss_batches` data batches with the same diffusion noise and times, so that the two runs
    are compared on identical draws instead of on noisy one-batch figures;
  * sample quality: for the digits demo (configs/sid2_digits.py) the conditioning-class accuracy
    and FID against real digits (benchmarks/judge_digits.py); for Fashion-MNIST configs
    (configs/sid2_t2i_fashion.py) the prompt-class accuracy of the CNN judge and FID against real
    test images (benchmarks/judge_fashion.py).

COAT's paper reports OLMo-1B train loss 2.568 (COAT) vs 2.551 (BF16), 0.7% apart (arXiv 2410.19313,
Table 3); the goal here is final losses within 2%.

Usage: python benchmarks/study_coat_quality.py [--config configs/sid2_digits.py[:arg]]
         [--set key=value] [--workdir workdirs/coat_quality] [--steps 0] [--fid_n 300] [--tail 5]
         [--loss_batches 16]
e.g.   python benchmarks/study_coat_quality.py --config configs/sid2_t2i_fashion.py \
         --set autoencoder=AE/export --set data.path=LATENTS --workdir workdirs/coat_quality_t2i
Prints a markdown table (and writes it to WORKDIR/coat_quality.json).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from configs.base import load_config, override  # noqa: E402
import studies  # noqa: E402  (benchmarks/studies.py)


def run(precision: str, args) -> dict:
  c = override(load_config(args.config), args.set)
  c.precision = precision
  if args.steps:
    c.train.steps = args.steps
  c.train.tensorboard = False
  workdir = os.path.join(args.workdir, precision)
  run_ = studies.train_and_sample(c, workdir)
  quality = studies.sample_quality(c, run_["samples"], args.fid_n)
  return {"precision": precision, "steps": int(c.train.steps), "train_s": run_["train_call_s"],
          "final_loss": studies.final_loss(workdir, args.tail),
          "fixed_batch_loss": studies.fixed_batch_loss(c, workdir, args.loss_batches), **quality}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
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
