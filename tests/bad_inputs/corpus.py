"""Every case of the bad-input corpus: the `CASES` of each `tests/bad_inputs/cases_*.py` module."""

import importlib
import pathlib
import pkgutil

from tests.bad_inputs.harness import Case


def all_cases() -> list[Case]:
  """The cases of every cases_* module, in module then list order; names are unique."""
  here = pathlib.Path(__file__).parent
  cases = []
  for info in sorted(pkgutil.iter_modules([str(here)]), key=lambda m: m.name):
    if info.name.startswith("cases_"):
      cases += importlib.import_module(f"tests.bad_inputs.{info.name}").CASES
  names = [c.name for c in cases]
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise ValueError(f"bad-input case names must be unique: {dup}")
  return cases
