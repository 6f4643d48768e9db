"""The bad-input corpus (tests/bad_inputs/): every hostile or damaged file, run through the public
entry points in a child process, is refused with one clear line or handled, never runs code,
never crashes, hangs or grows past its memory bound (docs/SECURITY.md)."""

import dataclasses
import pathlib

import pytest

from tests.bad_inputs import corpus
from tests.bad_inputs import harness

CASES = corpus.all_cases()


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> harness.Pristine:
  return harness.Pristine(tmp_path_factory.mktemp("pristine"))


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case: harness.Case, pristine: harness.Pristine, tmp_path: pathlib.Path):
  d = tmp_path / "case"
  r = harness.run(case, d, pristine)
  bad = harness.failures(case, r, d)
  assert not bad, (f"{case.name}: python {' '.join(r.argv)}\n  " + "\n  ".join(bad) +
                   f"\n--- stderr (end) ---\n{r.stderr[-2000:]}")


def _python(code: str):
  return lambda d, pristine: ["-c", code.replace("DIR", repr(str(d)))]


@pytest.mark.parametrize("code,outcome,words", [
    ("import sys; print('error: refused: bad', file=sys.stderr); sys.exit(1)", "clear", []),
    ("import ctypes; ctypes.string_at(0)", "crash", ["SIGSEGV"]),
    (f"import pathlib, sys; pathlib.Path(DIR, {harness.MARKER!r}).touch(); sys.exit(1)", "code-ran",
     ["CODE RAN"]),
    ("import time; time.sleep(60)", "hang", ["HANG"]),
    ("raise ValueError('boom')", "traceback", ["traceback", "not one 'error: ...' line"]),
    ("import sys; b = bytearray(400 * 2**20); print('error: refused: bad', file=sys.stderr); "
     "sys.exit(1)", "wrong", ["peak RSS"]),
    ("import sys; print('error: something else', file=sys.stderr); sys.exit(1)", "wrong",
     ["does not match"]),
    ("import sys; sys.exit(0)", "wrong", ["exit status 0, expected 1"]),
])
def test_the_harness_sees_each_kind_of_failure(code, outcome, words, pristine, tmp_path):
  case = harness.Case(name="self/" + outcome, build=_python(code), message=r"refused: bad",
                      max_rss_mib=300, timeout_s=3)
  r = harness.run(case, tmp_path, pristine)
  assert harness.outcome(case, r, tmp_path) == outcome
  bad = " ".join(harness.failures(case, r, tmp_path))
  assert all(w in bad for w in words), bad


def test_a_handled_case_must_say_what_it_did(pristine, tmp_path):
  case = harness.Case(name="self/handled", build=_python(
      "import sys; print('warning: step 20 is damaged; resuming from step 10', file=sys.stderr)"),
      message=r"resuming from step 10", exit_code=0, kind="handled")
  assert harness.outcome(case, harness.run(case, tmp_path / "a", pristine), tmp_path / "a") == "handled"
  silent = dataclasses.replace(case, build=_python("pass"))
  assert harness.outcome(silent, harness.run(silent, tmp_path / "b", pristine), tmp_path / "b") == "wrong"
