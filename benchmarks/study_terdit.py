"""TerDiT at small scale: does the adaLN RMSNorm help ternary training, and how close is ternary to
full precision?

TerDiT (arXiv 2405.14854, Sec. 3.2 and Fig. 7) puts an RMSNorm after each block's ternary adaLN
linear: without it the ternary adaLN outputs are large and training converges slower and to a higher
loss. Three arms of `configs/terdit.py:digits` (a small TerDiT on the embedded scikit-learn digits,
class-conditional, the DiT/ADM recipe), trained at equal steps and seed:

  ternary         digits                 TerDiT: ternary layers with the adaLN RMSNorm
  no_adaln_norm   digits,no_adaln_norm   ternary layers, the RMSNorm removed (TerDiT Fig. 7's ablation)
  fp              digits_fp              the same network in full precision (the Large-DiT baseline)

For each arm: the training-loss curve (mean logged loss per `--window` steps), the final weights'
loss on fixed batches and draws (the same for every arm), and the samples' quality: conditioning-
class accuracy and FID against real digits (benchmarks/judge_digits.py).

Usage: python benchmarks/study_terdit.py [--workdir workdirs/terdit_study] [--steps 0] [--fid_n 300]
         [--arms ternary,no_adaln_norm,fp] [--set key=value ...] [--window 250]
Prints markdown tables; writes WORKDIR/terdit_study.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from configs import terdit  # noqa: E402
from configs.base import override  # noqa: E402
import studies  # noqa: E402  (benchmarks/studies.py)

ARMS = {"ternary": "digits", "no_adaln_norm": "digits,no_adaln_norm", "fp": "digits_fp"}


def arm_config(arm: str, args):
  c = override(terdit.get_config(ARMS[arm]), args.set)
  if args.steps:
    c.train.steps = args.steps
  c.train.tensorboard = False
  return c


def run_arm(arm: str, args) -> dict:
  c = arm_config(arm, args)
  wd = os.path.join(args.workdir, arm)
  run = studies.train_and_sample(c, wd)
  quality = studies.sample_quality(c, run["samples"], args.fid_n)
  return {"arm": arm, "config": f"configs/terdit.py:{ARMS[arm]}", "steps": int(c.train.steps),
          "ternary": bool(c.numerics.rules), "adaln_norm": bool(c.model.adaln_norm),
          "train_call_s": run["train_call_s"], "train_steps_per_s": studies.training_rate(wd),
          "loss_curve": studies.loss_curve(wd, args.window),
          "final_loss": studies.final_loss(wd, args.tail),
          "fixed_batch_loss": studies.fixed_batch_loss(c, wd, args.loss_batches), **quality}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="workdirs/terdit_study")
  ap.add_argument("--steps", type=int, default=0, help="0: the config's own")
  ap.add_argument("--fid_n", type=int, default=300, help="images per FID set (0: no FID)")
  ap.add_argument("--arms", default=",".join(ARMS))
  ap.add_argument("--set", action="append", default=[], help="config override key=value")
  ap.add_argument("--window", type=int, default=250, help="steps per point of the loss curve")
  ap.add_argument("--tail", type=int, default=5, help="logged losses averaged for the final loss")
  ap.add_argument("--loss_batches", type=int, default=16, help="batches of the fixed-batch loss")
  args = ap.parse_args()
  arms = [a for a in args.arms.split(",") if a]
  unknown = set(arms) - set(ARMS)
  if unknown:
    raise SystemExit(f"--arms: unknown {sorted(unknown)}; choose from {list(ARMS)}")
  rows = [run_arm(a, args) for a in arms]

  print("training loss, mean per window (TerDiT Fig. 7):")
  print("| step | " + " | ".join(r["arm"] for r in rows) + " |")
  print("|---" * (len(rows) + 1) + "|")
  for i, (step, _) in enumerate(rows[0]["loss_curve"]):
    print(f"| {step} | " + " | ".join(f"{r['loss_curve'][i][1]:.4f}" if i < len(r["loss_curve"])
                                      else "-" for r in rows) + " |")
  print("\n| arm | steps | final loss (last logged) | fixed-batch loss | class accuracy | "
        "FID (samples / real floor) | steps/s |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    fid = f"{r['fid']:.2f} / {r['fid_floor']:.2f}" if r.get("fid") is not None else "-"
    print(f"| {r['arm']} | {r['steps']} | {r['final_loss']:.4f} | {r['fixed_batch_loss']:.4f} | "
          f"{100 * r['accuracy']:.1f}% | {fid} | {r['train_steps_per_s']:.2f} |")
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "terdit_study.json"), "w") as f:
    json.dump({"rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
