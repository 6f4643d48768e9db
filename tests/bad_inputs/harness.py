"""Runs a bad-input case in a child process and checks what a user would see.

A case writes its bad input into an empty directory and names the command that reads it (argv after
the Python executable, run from the repository root). The child's exit status, stderr, peak resident
memory (`wait4` of the command, forked by the small `spawn.py`) and wall time are recorded;
`failures(case, result, d)` lists every way the run broke the rule "files from elsewhere never run
code, never crash the process, never give a wrong answer silently":

* no signal ended it (a segfault is a failure whatever the exit status says);
* it exited with the expected status, in time (a hang is killed and reported);
* a "clear" case ends with one `error: ...` line matching `message` and prints no traceback; a
  "handled" case does its job (exit 0) and says on stderr what it did about the input;
* the payload's marker file (`d / MARKER`) does not exist afterwards: no code from the file ran;
* peak RSS stayed under `max_rss_mib`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Callable

ROOT = pathlib.Path(__file__).resolve().parents[2]
SPAWN = pathlib.Path(__file__).resolve().parent / "spawn.py"
MARKER = "MARKER_CODE_RAN"
PRISTINE_CONFIG = "configs/sid2_digits.py:runlocal"
_LOGS = "_logs"


class Pristine:
  """Intact artefacts the cases damage copies of, made once on first use under `root`.

  Attributes (each built on first access):
    workdir: a tiny trained run of `config` (checkpoints at steps 10 and 20).
    export: that run's `--mode=export` folder.
    config: the config argument that made them.
  """

  def __init__(self, root: pathlib.Path, config: str = PRISTINE_CONFIG):
    self.root = pathlib.Path(root)
    self.config = config

  def _main(self, *args: str) -> None:
    proc = subprocess.run([sys.executable, "launch/main.py", f"--config={self.config}", *args],
                          cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=900)
    if proc.returncode:
      raise RuntimeError(f"making the pristine artefacts failed: launch/main.py {' '.join(args)}:\n"
                         f"{proc.stderr[-3000:]}")

  @property
  def workdir(self) -> pathlib.Path:
    wd = self.root / "workdir"
    if not (wd / "checkpoints" / "20").is_dir():
      self._main(f"--workdir={wd}", "--mode=train")
    return wd

  @property
  def export(self) -> pathlib.Path:
    out = self.workdir / "export"
    if not (out / "config.json").is_file():
      self._main(f"--workdir={self.workdir}", "--mode=export")
    return out


@dataclasses.dataclass(frozen=True)
class Case:
  """One bad input and what must happen when a user runs it.

  Attributes:
    name: unique, "<area>/<what>".
    build: build(d, pristine) writes the bad input into the empty directory d and returns the argv
      to run after the Python executable, from the repository root.
    message: regex searched in stderr's last non-empty line ("clear") or in any stderr line
      ("handled").
    exit_code: the expected exit status.
    kind: "clear" (refused with a one-line error) or "handled" (the run does its job, exit 0, and
      says what it did about the input).
    needs: pristine artefacts the case uses ("workdir", "export"); informational.
    max_rss_mib: bound on the child's peak resident memory.
    timeout_s: longer than this is a hang.
    preexec: run in the child before exec (e.g. resource limits).
    check: check(d) makes extra assertions after the run.
  """
  name: str
  build: Callable[[pathlib.Path, Pristine], list[str]]
  message: str
  exit_code: int = 1
  kind: str = "clear"
  needs: tuple[str, ...] = ()
  max_rss_mib: int = 1500
  timeout_s: float = 180.0
  preexec: Callable[[], None] | None = None
  check: Callable[[pathlib.Path], None] | None = None

  def __post_init__(self):
    if self.kind not in ("clear", "handled"):
      raise ValueError(f"{self.name}: kind must be 'clear' or 'handled', got {self.kind!r}")
    if (self.kind == "handled") != (self.exit_code == 0):
      raise ValueError(f"{self.name}: a 'handled' case exits 0 and a 'clear' one does not")


@dataclasses.dataclass
class Result:
  """What one run of a case did."""
  argv: list[str]
  returncode: int | None  # None: killed after timeout_s
  term_signal: int | None  # the signal that ended the process, if one did
  stderr: str
  stdout: str
  max_rss_mib: float
  wall_s: float
  marker: bool  # the payload's marker file exists

  @property
  def last_line(self) -> str:
    lines = [l for l in self.stderr.splitlines() if l.strip()]
    return lines[-1] if lines else ""


def child_env() -> dict[str, str]:
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(
      os.pathsep) if p])
  env.pop("PYTHONWARNINGS", None)
  return env


def run(case: Case, d: pathlib.Path, pristine: Pristine) -> Result:
  """Builds `case` in the empty directory `d` and runs it."""
  d.mkdir(parents=True, exist_ok=True)
  argv = [str(a) for a in case.build(d, pristine)]
  logs = d / _LOGS
  logs.mkdir(exist_ok=True)
  result = logs / "result.json"
  t0 = time.monotonic()
  with open(logs / "stdout", "wb") as out, open(logs / "stderr", "wb") as err:
    # Through spawn.py: a child forked from this (large) process would report its high-water mark.
    proc = subprocess.Popen([sys.executable, str(SPAWN), str(result), sys.executable, *argv],
                            cwd=ROOT, env=child_env(), stdin=subprocess.DEVNULL, stdout=out,
                            stderr=err, preexec_fn=case.preexec, start_new_session=True)
    try:
      proc.wait(timeout=case.timeout_s)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
  wall = time.monotonic() - t0
  status, maxrss_kib = None, 0
  if result.is_file():
    measured = json.loads(result.read_text())
    status, maxrss_kib = measured["status"], measured["maxrss_kib"]
  term_signal = os.WTERMSIG(status) if status is not None and os.WIFSIGNALED(status) else None
  returncode = None if status is None else (os.WEXITSTATUS(status) if os.WIFEXITED(status) else
                                            -term_signal)
  return Result(argv=argv, returncode=returncode, term_signal=term_signal,
                stderr=(logs / "stderr").read_text(errors="replace"),
                stdout=(logs / "stdout").read_text(errors="replace"),
                max_rss_mib=maxrss_kib / 1024, wall_s=wall, marker=(d / MARKER).exists())


def failures(case: Case, r: Result, d: pathlib.Path) -> list[str]:
  """Every way the run `r` of `case` in directory `d` broke the case's rule (empty: it behaved)."""
  bad = []
  if r.marker:
    bad.append(f"CODE RAN: the payload created {MARKER}")
  if r.returncode is None:
    bad.append(f"HANG: still running after {case.timeout_s:.0f} s, killed")
  elif r.term_signal is not None:
    bad.append(f"CRASH: killed by signal {signal.Signals(r.term_signal).name}")
  elif r.returncode != case.exit_code:
    bad.append(f"exit status {r.returncode}, expected {case.exit_code}")
  if case.kind == "clear":
    if "Traceback (most recent call last)" in r.stderr:
      bad.append("a traceback on stderr")
    if not r.last_line.startswith("error: "):
      bad.append(f"the last stderr line is not one 'error: ...' line: {r.last_line[:300]!r}")
    elif not re.search(case.message, r.last_line):
      bad.append(f"the message {r.last_line[:300]!r} does not match {case.message!r}")
  elif not any(re.search(case.message, l) for l in r.stderr.splitlines()):
    bad.append(f"no stderr line matches {case.message!r}")
  if r.max_rss_mib > case.max_rss_mib:
    bad.append(f"peak RSS {r.max_rss_mib:.0f} MiB > {case.max_rss_mib} MiB")
  if not bad and case.check is not None:
    try:
      case.check(d)
    except AssertionError as e:
      bad.append(f"check failed: {e}")
  return bad


def outcome(case: Case, r: Result, d: pathlib.Path) -> str:
  """One word for the table of docs/SECURITY.md: clear, handled, code-ran, crash, hang, traceback,
  or wrong (any other failure)."""
  if r.marker:
    return "code-ran"
  if r.returncode is None:
    return "hang"
  if r.term_signal is not None:
    return "crash"
  bad = failures(case, r, d)
  if not bad:
    return case.kind
  if any(b == "a traceback on stderr" for b in bad):
    return "traceback"
  return "wrong"


def copy(src: pathlib.Path, dst: pathlib.Path) -> pathlib.Path:
  """A copy of a pristine file or folder to damage (returns dst)."""
  if src.is_dir():
    shutil.copytree(src, dst)
  else:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)
  return dst
