"""Files the evaluation computes once and reuses, each keyed on the settings that made it.

`WORKDIR/eval/samples_step_N_nM.npz` (the samples of a checkpoint) and `WORKDIR/eval/reference.npz`
(the statistics of the real images) are caches: a later run reuses them instead of sampling or
extracting features again. A cache file is an `.npz` that also holds `cache_settings`, the JSON of
every setting that shapes its content (for samples: the checkpoint step, sampler settings, seed,
count and the model's config; for a reference: the data config, split, limit and the Inception
weights). `load` returns a cache's arrays only when the file is intact and was made with the same
settings; otherwise it says in one line why it is recomputed (other settings, no settings recorded,
a truncated or damaged file) and returns None. Caches are written by
`reference.write_arrays(path, arrays, settings=...)` (or
`features.make_reference(..., settings=...)`): a temporary file renamed into place, so a killed run
never leaves half a file behind.
"""

from collections.abc import Callable
import hashlib
import json
import sys

import jax
import numpy as np

from common.errors import ShapeError, UserError
from common.eval import reference
from common.paths import as_path

SETTINGS_KEY = reference.SETTINGS_KEY


def fingerprint(value) -> str:
  """A short digest (16 hex digits of SHA-256) of a JSON-able value or ConfigDict, e.g. config.model."""
  if hasattr(value, "to_dict"):
    value = value.to_dict()
  return hashlib.sha256(reference.settings_json(value).encode("utf-8")).hexdigest()[:16]


def _canonical(settings: dict) -> dict:
  """`settings` as it reads back from a cache file (tuples become lists)."""
  return json.loads(reference.settings_json(settings))


def _flat(tree, prefix: str = "") -> dict:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
  return out


def differences(old: dict, new: dict, limit: int = 4) -> str:
  """`key: old -> new` for the settings that differ (at most `limit`, then a count)."""
  a, b = _flat(old), _flat(new)
  keys = sorted(k for k in set(a) | set(b) if a.get(k, "(absent)") != b.get(k, "(absent)"))
  parts = [f"{k}: {a.get(k, '(absent)')} -> {b.get(k, '(absent)')}" for k in keys[:limit]]
  if len(keys) > limit:
    parts.append(f"{len(keys) - limit} more")
  return ", ".join(parts)


def warn(msg: str) -> None:
  """`warning: msg` on stderr (process 0 only): the default `log` of `load`."""
  if jax.process_index() == 0:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def load(path: str, settings: dict, keys: list[str], *, what: str,
         log: Callable[[str], None] = warn) -> dict[str, np.ndarray] | None:
  """The arrays `keys` of the cache at `path` when it was made with `settings`, else None.

  Args:
    path: the cache file.
    settings: every setting that shapes its content (JSON-able).
    keys: the arrays to read.
    what: how the message names it, e.g. "evaluation samples".
    log: where the one line saying why it is recomputed goes (default: stderr).

  Returns:
    {key: array}, or None when there is no file or it cannot be reused (said through `log`).
  """
  if not as_path(path).exists():
    return None
  try:
    members = reference.npz_keys(path, "cache")
    missing = [k for k in keys if k not in members]
    if missing:
      raise ShapeError(f"it lacks {missing}")
    if SETTINGS_KEY not in members:
      log(f"the cached {what} {path} record no settings (an older version wrote them); "
          "recomputing them")
      return None
    arrays = reference.read_npz_arrays(path, [*keys, SETTINGS_KEY], "cache")
  except UserError as e:
    log(f"the cached {what} {path} cannot be read ({e}); recomputing them")
    return None
  stored = arrays.pop(SETTINGS_KEY)
  try:
    old = json.loads(str(stored))
  except ValueError:
    old = None
  new = _canonical(settings)
  if not isinstance(old, dict):
    log(f"the cached {what} {path} hold unreadable settings; recomputing them")
    return None
  if old != new:
    log(f"the cached {what} {path} were made with other settings ({differences(old, new)}); "
        "recomputing them")
    return None
  return arrays


def load_or_make(path: str, settings: dict, keys: list[str], make: Callable[[], dict], *,
                 what: str, log: Callable[[str], None] = warn) -> dict[str, np.ndarray]:
  """The arrays `keys` of the cache at `path` when it was made with `settings` (`load`), else
  `make()`'s arrays (a dict holding at least `keys`), written there with `settings` first.

  For a single process: with several, process 0 alone should write (as the trainer does).
  """
  arrays = load(path, settings, keys, what=what, log=log)
  if arrays is None:
    arrays = {k: np.asarray(v) for k, v in make().items()}
    reference.write_arrays(path, arrays, settings=settings)
  return arrays
