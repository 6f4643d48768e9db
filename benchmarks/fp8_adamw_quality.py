"""Does COAT's FP8 AdamW train like fp32 AdamW? A side-by-side run of the SiD2 digits demo.

Trains `configs/sid2_digits.py` twice through the real trainer, identical except for
`optim.name` ("adamw" vs "coat.optim.fp8_adamw": m and v as E4M3 groups of 128 with dynamic range
expansion), with the same seed, initial weights and data order, and compares the final training loss
(mean of the last quarter of the logged per-step losses, to average out the diffusion loss's noise).

  python benchmarks/fp8_adamw_quality.py --steps 400
"""

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from common import trainer  # noqa: E402
from configs import sid2_digits  # noqa: E402


OPTIMIZERS = {"adamw": "adamw", "fp8_adamw": "coat.optim.fp8_adamw"}  # row label -> optim.name


def run(optimizer: str, steps: int, workdir: str) -> np.ndarray:
  c = sid2_digits.get_config()
  c.optim.name = optimizer
  c.train.steps = steps
  c.train.log_every = 1
  c.train.sample_every = 0
  c.train.checkpoint_every = steps
  c.train.num_grid_samples = 10
  c.sample.num_steps = 4
  c.train.tensorboard = False
  trainer.train(c, workdir)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return np.array([json.loads(line)["loss"] for line in f])


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=400)
  a = ap.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    res = {o: run(name, a.steps, os.path.join(tmp, o)) for o, name in OPTIMIZERS.items()}
  q = a.steps // 4
  final = {o: float(v[-q:].mean()) for o, v in res.items()}
  first = {o: float(v[:q].mean()) for o, v in res.items()}
  print(f"SiD2 digits, {a.steps} steps, batch 64; final = mean loss of the last {q} steps")
  print("| optimizer | first-quarter loss | final loss | final vs adamw |")
  print("|---|---|---|---|")
  for o in res:
    print(f"| {o} | {first[o]:.4f} | {final[o]:.4f} | {100 * (final[o] / final['adamw'] - 1):+.2f}% |")


if __name__ == "__main__":
  main()
