"""Train-step memory per device of one config under several precision / optimizer modes.

Each mode is a set of config overrides; the train step is compiled (not run) for the config's batch
and mesh on the available devices, and XLA's memory analysis gives the bytes per device
(`common.training.memory.train_step_memory`). Deterministic on CPU.

Default: a reduced DiT-class network (an isotropic transformer on 32x32x4 latents with patch 2,
SiD2's ResidualUViT with one transformer level, adaLN-style conditioning) under AdamW vs COAT's
FP8 AdamW (`coat.optim.fp8_adamw`), bf16 compute:

  python benchmarks/bench_coat_memory.py                       # the default table
  python benchmarks/bench_coat_memory.py --width=1152 --depth=28 --batch=32   # DiT-XL/2-sized
  python benchmarks/bench_coat_memory.py --config=configs/microdit.py:XL_2 \
      --mode="bf16:precision=bf16" --mode="coat:precision=coat"        # any config, any modes

A mode is "label:key=value;key=value" (values are Python literals, else strings); the first mode is
the reference of the ratio column. `--no-dit` keeps the config's own network.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402

from common.training import sharding
from common.training.experiment import Experiment  # noqa: E402
from common.training.memory import KEYS, train_step_memory  # noqa: E402
from configs.base import load_config, override  # noqa: E402

DEFAULT_MODES = ("adamw:optim.name=adamw",
                 "fp8_adamw:optim.name=coat.optim.fp8_adamw")


def parse_mode(text: str) -> tuple[str, list[str]]:
  """"label:key=value;key=value" -> (label, ["key=value", ...])."""
  label, _, rest = text.partition(":")
  return label, [item.strip() for item in rest.split(";") if item.strip()]


def dit_class(config, width: int, depth: int, heads: int, image_size: int, channels: int,
              patch: int, num_classes: int, dtype: str) -> None:
  """Replaces the config's network by an isotropic DiT-class transformer (ResidualUViT with one
  transformer level: patch embedding, `depth` blocks of width `width`, unpatchify)."""
  m = config.model
  m.name = "sid2.model.ResidualUViT"
  m.image_size, m.in_channels, m.patch_size = image_size, channels, patch
  m.channels, m.level_types, m.blocks_per_level = (width,), ("transformer",), ()
  m.mid_blocks, m.num_heads, m.mlp_ratio, m.dropout = depth, heads, 4.0, (0.0,)
  m.num_classes, m.cond_dim, m.dtype = num_classes, width, dtype
  for k in ("text_dim", "text_len"):
    if k in m:
      del m[k]
  config.mesh.replicated = ("out_proj/.*",)


def commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)), check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"


def main(argv=None) -> list[dict]:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--config", default="configs/sid2_in256.py:p2")
  ap.add_argument("--mode", action="append", help="label:key=value;key=value (repeatable)")
  ap.add_argument("--set", action="append", default=[], help="key=value applied to every mode")
  ap.add_argument("--no-dit", action="store_true", help="keep the config's own network")
  ap.add_argument("--width", type=int, default=384)
  ap.add_argument("--depth", type=int, default=4)
  ap.add_argument("--heads", type=int, default=6)
  ap.add_argument("--image_size", type=int, default=32)
  ap.add_argument("--channels", type=int, default=4)
  ap.add_argument("--patch", type=int, default=2)
  ap.add_argument("--num_classes", type=int, default=1000)
  ap.add_argument("--dtype", default="bfloat16")
  ap.add_argument("--batch", type=int, default=32, help="global batch (default 32)")
  ap.add_argument("--json", default="", help="also write the rows to this file")
  args = ap.parse_args(argv)

  modes = [parse_mode(m) for m in (args.mode or DEFAULT_MODES)]
  rows = []
  for label, overrides in modes:
    config = load_config(args.config)
    if not args.no_dit:
      dit_class(config, args.width, args.depth, args.heads, args.image_size, args.channels,
                args.patch, args.num_classes, args.dtype)
    override(config, args.set + overrides)
    config.train.batch_size = args.batch
    exp = Experiment(config, sharding.make_mesh(config.mesh))
    t0 = time.perf_counter()
    mem = train_step_memory(exp)
    rows.append({"mode": label, "overrides": overrides, "params_count": int(exp.num_params),
                 "compile_s": round(time.perf_counter() - t0, 1), **mem})
    print(f"{label}: {json.dumps(rows[-1])}", flush=True)

  ref = rows[0]
  mib = 2 ** 20
  print(f"\n{datetime.date.today()} | {jax.devices()[0].device_kind} x {jax.device_count()} | "
        f"commit {commit()} | {args.config}"
        f"{'' if args.no_dit else f' as DiT-class w{args.width} d{args.depth} p{args.patch}'} | "
        f"{ref['params_count'] / 1e6:.2f}M params | global batch {args.batch}")
  print("| mode | " + " | ".join(f"{k} MiB" for k in KEYS) + f" | total vs {ref['mode']} |")
  print("|---" * (len(KEYS) + 2) + "|")
  for r in rows:
    cells = " | ".join(f"{r[k] / mib:.2f}" for k in KEYS)
    print(f"| {r['mode']} | {cells} | {ref['total'] / r['total']:.2f}x less |")
  if args.json:
    with open(args.json, "w", encoding="utf-8") as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
