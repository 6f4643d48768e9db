"""Paths for workdirs, checkpoints, metrics, samples and datasets: local or cloud (`gs://...`).

All file access in `common/` and `launch/` goes through `etils.epath` (tests/test_epath_io.py checks
it), so any of these may be a `gs://bucket/dir` path; orbax and grain accept the same paths.
"""

import os
import socket

from etils import epath

from common.errors import NotWritableError


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


def check_writable(*dirs: str | os.PathLike, flag: str = "--workdir") -> None:
  """Creates each directory and writes (then removes) a small file in it, before any work whose
  output would go there is done.

  A write probe, not a permission check: permissions say nothing about a read-only mount, and
  root writes whatever the mode bits say.

  Raises:
    NotWritableError: a directory cannot be created or written (named, with the cause).
  """
  for d in dirs:
    d = as_path(d)
    probe = d / f".write-probe-{socket.gethostname()}-{os.getpid()}"  # unique across hosts
    try:
      d.mkdir(parents=True, exist_ok=True)
      probe.write_text("")
      probe.unlink()
    except Exception as e:  # pylint: disable=broad-except  # OSError locally; other types on gs://
      cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
      raise NotWritableError(f"cannot write in {d} ({type(e).__name__}: {cause}); nothing was "
                             f"done: give a writable {flag}.") from e
