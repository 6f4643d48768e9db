"""Paths for workdirs, checkpoints, metrics, samples and datasets: local or cloud (`gs://...`).

All file access in `common/` and `launch/` goes through `etils.epath` (tests/test_epath_io.py checks
it), so any of these may be a `gs://bucket/dir` path; orbax and grain accept the same paths.
"""

import os

from etils import epath


def as_path(path: str | os.PathLike) -> epath.Path:
  """`path` as an epath.Path: local paths get `~` expanded and are made absolute; URIs stay as given.

  Args:
    path: "/abs/dir", "rel/dir", "~/dir" or "gs://bucket/dir" (any scheme epath knows).
  """
  p = epath.Path(path)
  return p if is_remote(p) else p.expanduser().absolute()


def is_remote(path: str | os.PathLike) -> bool:
  """True for URIs such as gs://... (object stores: no append, no atomic rename)."""
  return "://" in os.fspath(path)
