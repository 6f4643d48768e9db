"""MicroDiT's central claim at small scale: deferred masking keeps quality at 75% masking.

arXiv 2407.15811 (Sec. 3 and Fig. 3): masking 75% of the patch tokens cuts the cost of a training
step, and hiding them only after a small patch-mixer has seen all tokens ("deferred masking") keeps
the quality of unmasked training, where masking at the input ("naive masking") loses it. Three
arms of `configs/microdit.py:fashion` (a tiny MicroDiT on captioned Fashion-MNIST latents), trained
at equal steps and seed:

  unmasked   fashion,unmasked   mask ratio 0, patch-mixer kept
  deferred   fashion            75% of tokens dropped after the patch-mixer (the paper's method)
  naive      fashion,naive      75% dropped at the input, no patch-mixer

For each arm: train (`common.training.trainer.train`, resumed if the workdir holds a run), sample the EMA
weights from held-out caption phrasings (`common.training.trainer.sample`; skipped if samples exist), and
score the decoded samples: FID against real Fashion-MNIST test images and the prompt-class accuracy
of the CNN judge (benchmarks/judge_fashion.py). Step cost, side by side in this process: XLA
flops of the compiled train step (deterministic) and its wall time, the arms timed in turns
(`--rounds` rounds of `--iters` steps each, median per arm) so that the machine's load hits them alike.

Usage: python benchmarks/study_microdit_masking.py [--workdir workdirs/microdit_masking] [--steps 0]
         [--fid_n 1000] [--arms unmasked,deferred,naive] [--set key=value ...]
e.g.   --set autoencoder=/tmp/ae/export --set data.path=/tmp/latents
Prints markdown tables; writes WORKDIR/microdit_masking.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from common.training import sharding
from common.training.experiment import Experiment  # noqa: E402
from common.training.memory import abstract_batch  # noqa: E402
from common.training.random_batch import random_batch  # noqa: E402
from configs import microdit  # noqa: E402
from configs.base import override  # noqa: E402
import studies  # noqa: E402  (benchmarks/studies.py)

ARMS = {"unmasked": "fashion,unmasked", "deferred": "fashion", "naive": "fashion,naive"}


def arm_config(arm: str, args):
  c = override(microdit.get_config(ARMS[arm]), args.set)
  if args.steps:
    c.train.steps = args.steps
  c.train.tensorboard = False
  return c


def train_and_score(arm: str, args) -> dict:
  c = arm_config(arm, args)
  wd = os.path.join(args.workdir, arm)
  run = studies.train_and_sample(c, wd)
  score = studies.sample_quality(c, run["samples"], args.fid_n)
  return {"arm": arm, "config": f"configs/microdit.py:{ARMS[arm]}", "steps": int(c.train.steps),
          "mask_ratio": float(c.model.mask_ratio), "patch_mixer": bool(c.model.use_patch_mixer),
          "train_steps_per_s": studies.training_rate(wd), "train_call_s": run["train_call_s"],
          **score}


def step_costs(arms: list[str], args) -> dict[str, dict]:
  """XLA flops and timed wall clock of one train step per arm, timed in turns."""
  runs = {}
  for arm in arms:
    c = arm_config(arm, args)
    exp = Experiment(c, sharding.make_mesh(c.mesh))
    b = int(c.train.batch_size)
    compiled = exp.train_step.lower(exp.abstract_state, abstract_batch(exp, b),
                                    jax.random.key(0)).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    state, batch = exp.init_state(0), random_batch(exp, b)
    for i in range(2):  # compile and warm up
      state, _ = exp.train_step(state, batch, exp.step_key(i))
    jax.block_until_ready(state)
    runs[arm] = {"exp": exp, "state": state, "batch": batch, "flops": float(cost["flops"]),
                 "times": [], "batch_size": b}
  for r in range(args.rounds):
    for arm in arms:
      run = runs[arm]
      exp, state = run["exp"], run["state"]
      t0 = time.perf_counter()
      for i in range(args.iters):
        state, _ = exp.train_step(state, run["batch"], exp.step_key(100 + r * args.iters + i))
      jax.block_until_ready(state)
      run["times"].append((time.perf_counter() - t0) / args.iters)
      run["state"] = state
  return {arm: {"gflop_per_step": run["flops"] / 1e9, "ms_per_step": 1e3 * float(np.median(run["times"])),
                "ms_min": 1e3 * min(run["times"]), "ms_max": 1e3 * max(run["times"]),
                "batch_size": run["batch_size"]}
          for arm, run in runs.items()}


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="workdirs/microdit_masking")
  ap.add_argument("--steps", type=int, default=0, help="0: the config's own")
  ap.add_argument("--fid_n", type=int, default=1000, help="images per FID set")
  ap.add_argument("--arms", default=",".join(ARMS))
  ap.add_argument("--set", action="append", default=[], help="config override key=value")
  ap.add_argument("--rounds", type=int, default=5, help="timing rounds (arms in turn)")
  ap.add_argument("--iters", type=int, default=20, help="steps per arm per timing round")
  ap.add_argument("--skip_training", action="store_true", help="step costs only")
  args = ap.parse_args()
  arms = [a for a in args.arms.split(",") if a]
  unknown = set(arms) - set(ARMS)
  if unknown:
    raise SystemExit(f"--arms: unknown {sorted(unknown)}; choose from {list(ARMS)}")
  rows = [] if args.skip_training else [train_and_score(a, args) for a in arms]
  costs = step_costs(arms, args)
  ref = costs.get("unmasked", costs[arms[0]])
  print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}")
  print("| arm | mask | patch-mixer | GFLOP / train step (XLA) | ms / step (median of "
        f"{args.rounds}; min-max) | vs unmasked |")
  print("|---|---|---|---|---|---|")
  for arm in arms:
    c, k = costs[arm], arm_config(arm, args)
    print(f"| {arm} | {k.model.mask_ratio:.0%} | {'yes' if k.model.use_patch_mixer else 'no'} | "
          f"{c['gflop_per_step']:.2f} | {c['ms_per_step']:.1f} ({c['ms_min']:.1f}-{c['ms_max']:.1f}) | "
          f"{c['ms_per_step'] / ref['ms_per_step']:.2f}x time, "
          f"{c['gflop_per_step'] / ref['gflop_per_step']:.2f}x flops |")
  if rows:
    print("\n| arm | steps | FID vs real test (floor) | judge accuracy | training steps/s |")
    print("|---|---|---|---|---|")
    for r in rows:
      print(f"| {r['arm']} | {r['steps']} | {r['fid']:.2f} ({r['fid_floor']:.2f}, n={r['fid_n']}) | "
            f"{100 * r['accuracy']:.1f}% | {r['train_steps_per_s']:.2f} |")
  os.makedirs(args.workdir, exist_ok=True)
  with open(os.path.join(args.workdir, "microdit_masking.json"), "w") as f:
    json.dump({"rows": rows, "step_costs": costs}, f, indent=1)


if __name__ == "__main__":
  main()
