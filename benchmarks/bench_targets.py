"""docs/TARGETS.md: every paper config compiled for the hardware it declares (`config.target`).

Each row runs the user-facing command in its own process,

    python launch/main.py --config=CONFIG --mode=compile [--config.precision=coat]

and reads its last line (the JSON report of common/training/compile_report.py). On 2 CPU cores the large
configs take minutes each (SiD2 IN512 UViT/2 the longest) and several GB of host memory.

    python benchmarks/bench_targets.py                    # every row, writes docs/TARGETS.md
    python benchmarks/bench_targets.py --only 'microdit'  # a subset (regex on the config argument)
    python benchmarks/bench_targets.py --out /tmp/t.md    # elsewhere

A run replaces the rows it compiles and keeps the other rows of the existing table (so `--only`
runs add up; `--fresh` drops them). Rows that fail to compile are kept with the error, never dropped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (config argument, precision): every paper config in bf16 first, then in COAT's FP8 mode
# (TerDiT's ternary configs train their QAT layers instead; their _fp baselines get a COAT row).
CONFIGS = ([f"configs/sid2_in{r}.py:{p}" for r, ps in ((128, ("p1", "p2")), (256, ("p1", "p2")),
                                                      (512, ("p2", "p4"))) for p in ps]
           + [f"configs/microdit.py:{p}" for p in ("p1_256_masked", "p2_256_unmasked",
                                                   "p3_512_masked", "p4_512")]
           + [f"configs/terdit.py:{v}" for v in ("600M_256", "600M_512", "4.2B_256", "4.2B_512")])
ROWS = [(c, "bf16") for c in CONFIGS]
ROWS += [(c, "coat") for c in CONFIGS if "terdit" not in c]
ROWS += [(f"configs/terdit.py:{v}_fp", "coat") for v in ("600M_256", "4.2B_256")]

# Costs the papers report for their whole recipe, next to our estimate; PAPER_DAYS: the reported
# days of the whole recipe (all rows of that config file in bf16), for the MFU they imply.
PAPER_DAYS = {"configs/microdit.py": 2.6}
PAPER = {"configs/microdit.py": "all four phases: 2.6 days on 8xH100, $1,890 (arXiv 2407.15811)",
         "configs/terdit.py": "600M: 1750K iterations at batch 256 on 8 A100-80G; 4.2B: 1180K at "
                              "batch 512 on 16 A100-80G; no time or cost (arXiv 2405.14854)"}

# What the configs needed to fit, stated once here so that every regeneration keeps it.
CHANGES = """Two recipes needed changes to fit, neither shrinking the global batch: TerDiT-4.2B shards its
parameters, EMA and AdamW state over the 8 GPUs (`mesh.fsdp=-1`; replicated they are 67 GB) and
accumulates 2 (256 px) or 8 (512 px) micro-batches (without accumulation 4.2B_256 needed 85.6 GiB
per H100, 158 GiB without fsdp); MicroDiT's phases take the official per-GPU micro-batches (256, 64,
32, 16) as gradient accumulation."""

ROW = re.compile(r"^\| `(?P<config>[^`]+)` \| (?P<prec>\w+) \|")


def compile_row(config: str, precision: str, timeout: int) -> dict:
  """The JSON report of one `--mode=compile` run, or {"error": ...}."""
  cmd = [sys.executable, "launch/main.py", f"--config={config}", "--mode=compile"]
  if precision != "bf16":
    cmd.append(f"--config.precision={precision}")
  t0 = time.time()
  try:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
  except subprocess.TimeoutExpired:
    return {"error": f"no result in {timeout} s"}
  lines = proc.stdout.strip().splitlines()
  try:
    report = json.loads(lines[-1])
  except (IndexError, ValueError):
    err = [l for l in proc.stderr.splitlines() if l.strip()]
    return {"error": (err[-1] if err else f"exit {proc.returncode}")[:300]}
  report["compile_s"] = round(time.time() - t0)
  return report


def table(rows: list[tuple[str, str, dict]]) -> str:
  head = ("| config | precision | target | devices | per-device GiB | capacity GiB | headroom | "
          "TFLOP/step | step s @40% / @60% MFU | run days @40% / @60% | cost $ @40% / @60% | "
          "f8 dots | compile s |\n|" + "---|" * 13)
  out = [head]
  for config, prec, r in rows:
    if "error" in r:
      out.append(f"| `{config}` | {prec} | | | | | | | | | | | error: {r['error']} |")
      continue
    e4, e6 = r["estimates"]["mfu_0.4"], r["estimates"]["mfu_0.6"]
    fits = "" if r["fits"] else " (does NOT fit)"
    out.append(
        f"| `{config}` | {prec} | {r['target']} | {r['devices']} | {r['per_device_gib']:.2f}{fits} | "
        f"{r['capacity_gib']:.2f} | {r['headroom']:.0%} | {r['flops_per_step'] / 1e12:.1f} | "
        f"{e4['step_s']:.3g} / {e6['step_s']:.3g} | {e4['run_days']:.3g} / {e6['run_days']:.3g} | "
        f"{e4['cost_usd']:,} / {e6['cost_usd']:,} | {r['f8_dots']} | {r.get('compile_s', '')} |")
  return "\n".join(out)


def read_rows(path: str) -> dict[tuple[str, str], str]:
  """The table lines of an existing TARGETS.md by (config, precision); {} when there is none."""
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    return {(m["config"], m["prec"]): line.rstrip("\n") for line in f if (m := ROW.match(line))}


def summary(lines: list[str]) -> str:
  """One sentence on how many rows fit, from the table lines themselves."""
  failed = [l for l in lines if "error:" in l]
  too_big = [l for l in lines if "does NOT fit" in l]
  fit = len(lines) - len(failed) - len(too_big)
  head = [ROW.match(l) for l in too_big + failed]
  names = ", ".join(f"`{m['config']}` ({m['prec']})" for m in head)
  return (f"{fit} of {len(lines)} compiled rows fit their target with at least 10% of the device "
          "memory free" + (f"; not fitting or failing: {names}." if names else "."))


def recipe_total(config_file: str, lines: list[str]) -> str:
  """Our whole-recipe days and cost of a config file's bf16 rows, against the paper's days."""
  cells = [[c.strip() for c in l.split("|")] for l in lines
           if l.startswith(f"| `{config_file}:") and "| bf16 |" in l and "error:" not in l]
  if not cells or config_file not in PAPER_DAYS:
    return ""
  days = [sum(float(c[10].split("/")[i]) for c in cells) for i in (0, 1)]
  cost = [sum(float(c[11].split("/")[i].replace(",", "")) for c in cells) for i in (0, 1)]
  implied = 0.4 * days[0] / PAPER_DAYS[config_file]
  return (f" Our {len(cells)} rows add up to {days[0]:.3g} days (${cost[0]:,.0f}) at 40% MFU and "
          f"{days[1]:.3g} days (${cost[1]:,.0f}) at 60% (XLA's FLOP count of each train step): "
          f"the paper's {PAPER_DAYS[config_file]} days correspond to about {implied:.0%} MFU by "
          "this count.")


def write(out: str, rows: list[tuple[str, str, dict]], kept: dict[tuple[str, str], str]) -> None:
  """Writes docs/TARGETS.md: the rows measured in this run, and `kept` rows of an earlier run."""
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True).stdout.strip()
  fresh = {(c, p): line for (c, p, _), line in zip(rows, table(rows).splitlines()[2:])}
  lines = [fresh.get(key) or kept[key] for key in ROWS if key in fresh or key in kept]
  lines += [l for key, l in kept.items() if key not in ROWS and key not in fresh]
  missing = [f"`{c}` ({p})" for c, p in ROWS if (c, p) not in fresh and (c, p) not in kept]
  todo = ("\n\nNot compiled yet (`python benchmarks/bench_targets.py --only REGEX` compiles them): "
          + ", ".join(missing) + ".") if missing else ""
  header = "\n".join(table([]).splitlines()[:2])
  notes = "\n".join(f"- `{k}`: {v}.{recipe_total(k, lines)}" for k, v in PAPER.items())
  text = f"""# Paper configs on their declared hardware

Generated by `python benchmarks/bench_targets.py`, last run on {datetime.date.today()} (commit {commit}), on a
CPU-only machine (2 cores; the compile s column is that machine's wall time): each row is `python launch/main.py --config=CONFIG --mode=compile`, which
compiles the config's real train step (its global batch, mesh rules and gradient accumulation)
for the target in `config.target` (common/training/compile_report.py). Per-device memory is XLA's compiled
memory analysis (TPU: exact for that compiler; GPU: not autotuned, so close rather than exact);
a config fits when it leaves at least 10% of the device memory free. FLOPs per optimizer step come
from the TPU compiler, or for GPU targets from XLA's cost analysis of the same step on the CPU
(Pallas kernels count zero). Step time = FLOPs / (devices x dense bf16 peak x MFU); cost at the
on-demand prices in common/training/targets.py (assumptions: H100 $3.79/GPU-hour, MicroDiT's own figure;
v5p $4.20/chip-hour).

{header}
{chr(10).join(lines)}{todo}

{summary(lines)} {CHANGES}

Reported by the papers:
{notes}
"""
  with open(out, "w", encoding="utf-8") as f:
    f.write(text)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default="", help="regex on the config argument")
  parser.add_argument("--out", default=os.path.join(ROOT, "docs", "TARGETS.md"))
  parser.add_argument("--timeout", type=int, default=3600, help="seconds per row")
  parser.add_argument("--precision", default="", help="regex on the precision (bf16, coat)")
  parser.add_argument("--fresh", action="store_true", help="drop the rows of the existing table")
  args = parser.parse_args()
  kept = {} if args.fresh else read_rows(args.out)
  rows = []
  for config, prec in ROWS:
    if not (re.search(args.only, config) and re.search(args.precision, prec)):
      continue
    r = compile_row(config, prec, args.timeout)
    rows.append((config, prec, r))
    print(f"{config} {prec}: " + (r["error"] if "error" in r else
                                   f"{r['per_device_gib']:.2f} / {r['capacity_gib']:.2f} GiB on "
                                   f"{r['target']}, fits {r['fits']}"), flush=True)
    write(args.out, rows, kept)  # after every row: a long run keeps what it has measured
  write(args.out, rows, kept)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
