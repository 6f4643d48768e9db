"""Writes the bad-input corpus to disk and, with --run, runs it and prints the outcome table.

    python -m tests.bad_inputs.make_corpus OUT [--run] [--only REGEX]

OUT/pristine holds the intact artefacts the cases damage copies of (a tiny trained run and its
export); OUT/<case name> each case's inputs, and after --run its stdout/stderr under `_logs/`. The
table (docs/SECURITY.md) counts cases by outcome: clear (refused with a one-line error), handled (the
run did its job and said what it did about the input), and the failures: code-ran, crash, hang,
traceback, wrong.
"""

import argparse
import collections
import pathlib
import re
import shlex
import shutil
import sys

from tests.bad_inputs import corpus
from tests.bad_inputs import harness

OUTCOMES = ("clear", "handled", "code-ran", "crash", "hang", "traceback", "wrong")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out", type=pathlib.Path)
  parser.add_argument("--run", action="store_true", help="run every case and print the table")
  parser.add_argument("--only", default="", help="regex: only the cases whose name matches")
  args = parser.parse_args()
  cases = [c for c in corpus.all_cases() if re.search(args.only, c.name)]
  pristine = harness.Pristine(args.out / "pristine")
  counts = collections.Counter()
  by_area = collections.defaultdict(collections.Counter)
  for case in cases:
    d = args.out / case.name.replace("/", "__")
    if d.exists():
      shutil.rmtree(d)
    if not args.run:
      d.mkdir(parents=True)
      argv = case.build(d, pristine)
      print(f"{case.name}: python {shlex.join(str(a) for a in argv)}")
      continue
    r = harness.run(case, d, pristine)
    what = harness.outcome(case, r, d)
    counts[what] += 1
    by_area[case.name.split("/")[0]][what] += 1
    detail = "; ".join(harness.failures(case, r, d)) or r.last_line[:120]
    print(f"{what:9s} {case.name:45s} exit {r.returncode} {r.max_rss_mib:6.0f} MiB {r.wall_s:5.1f} s  "
          f"{detail}", flush=True)
  if args.run:
    print("\n| area | cases | " + " | ".join(OUTCOMES) + " |")
    print("|---|---|" + "---|" * len(OUTCOMES))
    for area in sorted(by_area) + ["all"]:
      c = counts if area == "all" else by_area[area]
      print(f"| {area} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in OUTCOMES) + " |")
    sys.exit(0 if counts["clear"] + counts["handled"] == len(cases) else 1)


if __name__ == "__main__":
  main()
