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


CACHE_ENV = "FRUGAL_DIFFUSION_CACHE"


def user_cache_dir(override: str | os.PathLike | None = None) -> epath.Path:
  """Where results that never change between runs are kept across workdirs (e.g. the FID Inception
  statistics of the demo's real digits): `override` when given, else `$FRUGAL_DIFFUSION_CACHE`,
  else `$XDG_CACHE_HOME/frugal-diffusion`, else `~/.cache/frugal-diffusion`. Not created here.

  Everything kept there is a `common.eval.cache` file, keyed on the settings that made it, so a
  stale or foreign file is recomputed, never trusted; deleting the folder is always safe.
  """
  if override:
    return as_path(override)
  if os.environ.get(CACHE_ENV):
    return as_path(os.environ[CACHE_ENV])
  return as_path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "frugal-diffusion"
