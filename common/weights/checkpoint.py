"""Checkpoints: an orbax CheckpointManager holding the train state and the data iterator's state.

Saves are asynchronous; the newest `keep` checkpoints are preserved. Nothing here deletes a
checkpoint that cannot be read.

Every step directory carries a checksum manifest (`MANIFEST`: the size and SHA-256 of each of its
files), written by the primary process in orbax's background finalisation, after every process has
written its files and before the directory is committed (renamed from its temporary name), so a
committed step always has one. Orbax's compressed chunks carry no checksum (a flipped byte in a
chunk restores silently as a changed weight), and tensorstore's `crc32c` codec, which orbax applies
to the shard index only, is not offered for the data. Every restore checks the manifest first: a
changed, truncated or missing file makes the step *damaged* (`DamagedCheckpointError`), and so
does an unverifiable step (no manifest: written before manifests existed) that orbax cannot read
while its metadata matches the expected state. `Checkpointer.restore_newest` then falls back to the newest
intact step, says so in one line, and (in a run that will save again) renames the damaged step to
`<step>.damaged`, a name orbax ignores, so the step can be saved again and the preservation policy
never counts it. A manifest only detects accidents: whoever can change the files can rewrite the
manifest to match. Multi-host: the primary process writes the manifest (orbax runs the callback on
it alone, after its cross-process barrier); every process verifies every file before reading.

Another run's checkpoint is read without a `Checkpointer` (and without writing to it) by
`find_checkpoints`, `verified_metadata` and `restore_state` (`config.init_from`,
common/weights/init_from.py).
"""

import concurrent.futures
import contextlib
import hashlib
import json
import logging
import os
import sys
from typing import Any

from absl import logging as absl_logging
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from common.errors import CheckpointError
from common.paths import as_path
from common.weights.tree_names import key_path_str

MANIFEST = "checksums.json"
# Not in the manifest: the manifest itself, and what orbax writes after it: the commit marker and
# the step metadata (handler names and timestamps, rewritten at commit; no array data).
_NOT_HASHED = frozenset({MANIFEST, "commit_success.txt", "_CHECKPOINT_METADATA"})
# A damaged step directory is renamed to <step>.damaged; orbax lists only names that are digits or
# end in "_<digits>" (orbax.checkpoint's path/step.py), so it ignores it.
DAMAGED_SUFFIX = ".damaged"
# Orbax writes a step into <step>.orbax-checkpoint-tmp and renames it when committed
# (orbax.checkpoint's path/atomicity_types.TMP_DIR_SUFFIX); on object stores it writes in place.
_TMP_SUFFIX = ".orbax-checkpoint-tmp"


class DamagedCheckpointError(CheckpointError):
  """A step whose files do not match its manifest, or, without a manifest, that orbax cannot read
  although its metadata fits the expected state."""

  def __init__(self, directory, step: int, why: str):
    self.directory, self.step, self.why = as_path(directory), int(step), why
    super().__init__(f"the checkpoint at step {self.step} in {self.directory} is damaged ({why})")


def _first_line(e: BaseException, limit: int = 300) -> str:
  """`Type: first line of the message` of the innermost cause of `e` (orbax wraps tensorstore's
  error, whose first line names the file, in one that appends kilobytes of its spec)."""
  while e.__cause__ is not None:
    e = e.__cause__
  text = str(e).strip()
  line = f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
  # tensorstore nests causes as "what: where: why": keep the start and the end
  return line if len(line) <= limit else f"{line[:limit // 2]} ... {line[-(limit // 2):]}"


def warn(msg: str) -> None:
  """Prints `warning: msg` on stderr (process 0)."""
  if jax.process_index() == 0:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


class _DropOrbaxTracebacks(logging.Filter):
  """Drops the tracebacks orbax logs from its save threads: each failure is raised again from
  `wait_until_finished` and reported as one line by `Checkpointer.wait`."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.exc_info and f"{os.sep}orbax{os.sep}" in record.pathname)


def _drop_orbax_tracebacks() -> None:
  logger = absl_logging.get_absl_logger()
  if not any(isinstance(f, _DropOrbaxTracebacks) for f in logger.filters):
    logger.addFilter(_DropOrbaxTracebacks())


@contextlib.contextmanager
def _quiet_failed_read():
  """Keeps a failed orbax read to the one-line error raised for it.

  Orbax logs the failure (absl, kilobytes of tensorstore spec) before raising; after it gives up,
  its asyncio tasks end with "Task exception was never retrieved", and tensorstore reads still in
  flight call back into orbax's closed event loop, each printing a RuntimeError("Event loop is
  closed") traceback through `sys.unraisablehook`, during the read and up to seconds after it.
  Orbax's logging is off inside the block; from the first read on, those two late kinds of report
  are dropped for the rest of the process (nothing else is filtered).
  """
  _drop_late_read_noise()
  absl_logger = absl_logging.get_absl_logger()
  level = absl_logger.level
  absl_logger.setLevel(logging.CRITICAL + 1)
  try:
    yield
  finally:
    absl_logger.setLevel(level)


def _drop_late_read_noise() -> None:
  if getattr(sys.unraisablehook, "_drops_closed_loop", False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    if not (isinstance(unraisable.exc_value, RuntimeError) and
            str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)

  hook._drops_closed_loop = True  # pylint: disable=protected-access
  sys.unraisablehook = hook
  logging.getLogger("asyncio").addFilter(
      lambda record: "exception was never retrieved" not in record.getMessage())


def _warn_unverified(directory, step: int) -> None:
  warn(f"the checkpoint at step {step} in {as_path(directory)} has no {MANIFEST} (written before "
        "checkpoints carried checksums): restored unverified.")


def _sha256(path) -> tuple[int, str]:
  """(size in bytes, SHA-256 hex digest) of the file at `path`, read in 4 MiB pieces."""
  digest, size = hashlib.sha256(), 0
  with path.open("rb") as f:
    while piece := f.read(1 << 22):
      digest.update(piece)
      size += len(piece)
  return size, digest.hexdigest()


def _hash_files(step_dir, names: list[str]) -> list[tuple[int, str]]:
  # hashlib releases the GIL on large updates: threads overlap reading (GCS latency) and hashing.
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    return list(pool.map(lambda name: _sha256(step_dir / name), names))


def _relative_files(d, prefix: str = "") -> list[str]:
  """Paths of the files under `d`, relative to it ("state/d/0a1b"); epath has no recursive glob
  on object stores."""
  out = []
  for p in d.iterdir():
    if p.is_dir():
      out += _relative_files(p, f"{prefix}{p.name}/")
    else:
      out.append(prefix + p.name)
  return out


def write_manifest(step_dir: str | os.PathLike) -> None:
  """Writes `step_dir/MANIFEST`: {"files": {relative path: {"bytes", "sha256"}}} of its files."""
  step_dir = as_path(step_dir)
  names = sorted(name for name in _relative_files(step_dir)
                 if name.split("/")[-1] not in _NOT_HASHED)
  files = {name: {"bytes": size, "sha256": digest}
           for name, (size, digest) in zip(names, _hash_files(step_dir, names))}
  (step_dir / MANIFEST).write_text(json.dumps({"algorithm": "sha256", "files": files}, indent=0))


def verify_manifest(directory: str | os.PathLike, step: int) -> bool:
  """Checks every file of `directory/step` against its manifest.

  Every process reads every file (a checkpoint's files are not split by reader).

  Returns:
    True when every file matches; False when the step has no manifest (written before manifests
    existed): it cannot be verified.
  Raises:
    DamagedCheckpointError: a file is missing, has another size or another checksum, or the
      manifest itself is unreadable.
  """
  step_dir = as_path(directory) / str(int(step))
  path = step_dir / MANIFEST
  if not path.exists():
    return False
  try:
    files = json.loads(path.read_text())["files"]
    expected = {str(name): (int(f["bytes"]), str(f["sha256"])) for name, f in files.items()}
  except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
    raise DamagedCheckpointError(directory, step, f"its {MANIFEST} is unreadable: "
                                 f"{_first_line(e)}") from e
  names = sorted(expected)
  for name in names:
    if ".." in name.split("/") or name.startswith("/") or not (step_dir / name).is_file():
      raise DamagedCheckpointError(directory, step, f"{name} is missing")
  for name, (size, digest) in zip(names, _hash_files(step_dir, names)):
    if size != expected[name][0]:
      raise DamagedCheckpointError(directory, step,
                                   f"{name} has {size} bytes, {expected[name][0]} were written")
    if digest != expected[name][1]:
      raise DamagedCheckpointError(directory, step, f"{name} does not match its SHA-256")
  return True


def leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{leaf path: shape} of a state tree (arrays, ShapeDtypeStructs or orbax metadata leaves);
  paths as `common.weights.tree_names.key_path_str` ("/"-joined keys)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {key_path_str(k): tuple(getattr(v, "shape", np.shape(v))) for k, v in leaves}


def _restore_error(directory, step: int, e: Exception, abstract, verified: bool,
                   partial: bool = False) -> CheckpointError:
  """The error for orbax failing to restore `directory/step`: damage when the step is unverified
  and its metadata is unreadable or matches `abstract` (its top-level entries, with `partial`), so
  the files, not the config, are at fault; otherwise a mismatch with the config (the checkpoint is
  fine and stays where it is)."""
  if not verified:
    try:
      meta = state_metadata(directory, step)
    except CheckpointError:
      return DamagedCheckpointError(directory, step, f"it cannot be read: {_first_line(e)}")
    if partial and isinstance(meta, dict) and isinstance(abstract, dict):
      meta = {k: meta.get(k) for k in abstract}
    if abstract is None or leaf_shapes(meta) == leaf_shapes(abstract):
      return DamagedCheckpointError(directory, step, f"it cannot be read: {_first_line(e)}")
  return CheckpointError(
      f"cannot restore the checkpoint at step {step} in {as_path(directory)}: {_first_line(e)}. "
      "It was left untouched; it does not fit this config: use the config it was written with, "
      "or another --workdir for a new run.")


class Checkpointer:
  """Saves and restores `{"state": pytree, "data": grain iterator}` under `directory`.

  `directory` may be local or a `gs://` path (orbax writes through epath and tensorstore).
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    self.directory = as_path(directory)
    self._keep, self._async = max(int(keep), 1), async_save
    self._saving: int | None = None  # the step of the save in flight
    _drop_orbax_tracebacks()
    self._manager = self._open()

  def _open(self) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.LatestN(self._keep),
        enable_async_checkpointing=self._async,
        async_options=(ocp.AsyncOptions(post_finalization_callback=self._write_saving_manifest)
                       if self._async else None),
        create=True,
    )
    return ocp.CheckpointManager(self.directory, options=options)

  def _write_saving_manifest(self) -> None:
    """The manifest of the step in flight: orbax calls this on the primary process, in the save's
    background thread, once every process has written its files and before the step is committed
    (so it stays off the train step's path, and a committed step always has its manifest)."""
    tmp = self.directory / f"{self._saving}{_TMP_SUFFIX}"
    write_manifest(tmp if tmp.exists() else self.directory / str(self._saving))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_iterator=None) -> None:
    """Starts saving `state` (and the iterator's position) at `step`; returns before it is written.

    Raises:
      CheckpointError: this save or the previous one failed (disk full, no permission); the
        committed checkpoints are intact.
    """
    self.wait()  # orbax waits for the previous save too; it must be done before _saving changes
    self._saving = int(step)
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)
      if not self._async and jax.process_index() == 0:
        write_manifest(self.directory / str(int(step)))
    except Exception as e:  # pylint: disable=broad-except  # any write failure, one line
      raise self._save_error(e) from e

  def _save_error(self, e: Exception) -> CheckpointError:
    step, self._saving = self._saving, None
    intact = [s for s in self.all_steps() if s != step]
    if len(intact) > 1:
      kept = f"the checkpoints of steps {', '.join(map(str, intact))} are intact"
    else:
      kept = (f"the checkpoint of step {intact[0]} is intact" if intact else
              "no earlier checkpoint exists")
    return CheckpointError(f"cannot write the checkpoint at step {step} in {self.directory}: "
                           f"{_first_line(e)}; {kept}. Free space or fix the permissions, then "
                           "rerun to resume.")

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the state at `step` onto the shardings of `abstract_state` (ShapeDtypeStruct
    leaves), after checking its files against the manifest (a step without one is restored with a
    warning).

    `data_iterator`, when given, is moved to the saved position in place.

    Raises:
      DamagedCheckpointError: the step's files are damaged.
      CheckpointError: the step does not fit `abstract_state` (another config).
    """
    verified = verify_manifest(self.directory, step)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      with _quiet_failed_read():
        restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types for unreadable or mismatched checkpoints
      raise _restore_error(self.directory, step, e, abstract_state, verified) from e
    if not verified:
      _warn_unverified(self.directory, step)
    return restored["state"]

  def restore_newest(self, abstract_state, data_iterator=None, *, set_aside: bool = False):
    """(step, state) of the newest intact checkpoint (`restore`), or None when there is none.

    Each damaged newer step is reported in one line and deleted never; with `set_aside` (a run that
    will save again) it is renamed to `<step>.damaged`, which orbax ignores, so that step can be
    written again and the preservation policy does not count it.

    Raises:
      CheckpointError: every checkpoint is damaged (nothing is moved), or the newest intact one
        does not fit `abstract_state`.
    """
    damaged = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except DamagedCheckpointError as e:
        damaged.append(e)
        continue
      for e in damaged:
        if set_aside:
          warn(f"{damage_line(e)}; resuming from step {step}, the newest intact one; "
               f"{self._set_aside(e.step)}")
        else:
          warn(f"{damage_line(e)}; using step {step}, the newest intact one; step {e.step} is "
               "left in place")
      return step, state
    if damaged:
      raise CheckpointError(
          f"no intact checkpoint in {self.directory}: " +
          "; ".join(f"step {e.step} is damaged ({e.why})" for e in damaged) +
          ". Nothing was moved or deleted; restore them from a copy, or use another --workdir.")
    return None

  def _set_aside(self, step: int) -> str:
    """Renames the step directory out of orbax's sight; says where it went."""
    src = self.directory / str(step)
    dst, n = self.directory / f"{step}{DAMAGED_SUFFIX}", 1
    while dst.exists():
      n += 1
      dst = self.directory / f"{step}{DAMAGED_SUFFIX}{n}"
    if jax.process_index() == 0:
      src.rename(dst)
    if jax.process_count() > 1:  # every process reopens after the rename
      multihost_utils.sync_global_devices(f"checkpoint set aside {step}")
    self._manager.close()
    self._manager = self._open()  # forget the step
    return f"step {step} is kept, renamed to {dst}"

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written.

    Raises:
      CheckpointError: the save failed (the message says which checkpoints are intact).
    """
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  # a background write failed
      raise self._save_error(e) from e

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self._manager.close()


def damage_line(e: DamagedCheckpointError) -> str:
  """`checkpoint at step N in DIR is damaged (why)`, the start of the fallback line."""
  return f"checkpoint at step {e.step} in {e.directory} is damaged ({e.why})"


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs (with shardings when given) describing `tree`, for `Checkpointer.restore`."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)

def find_checkpoints(path: str | os.PathLike) -> tuple[Any, list[int]]:
  """(checkpoints directory, steps to read, newest first) of another run, for reading it.

  Args:
    path: a run's workdir (its `checkpoints/` is used) or a checkpoints directory (all its
      finished steps: the newest intact one is used), or one step directory (`.../checkpoints/500`:
      that step alone, used or refused).
  Raises:
    CheckpointError: nothing is there, or no finished checkpoint.
  """
  p = as_path(path)
  if not p.exists():
    raise CheckpointError(f"{path}: no such checkpoint directory.")
  if (p / "checkpoints").is_dir():
    p = p / "checkpoints"
  if p.name.isdigit() and (p / "state").is_dir():
    return p.parent, [int(p.name)]
  if not p.is_dir():
    raise CheckpointError(f"{path}: not a directory (expected a run's workdir, its checkpoints/ "
                          "directory or a step directory such as checkpoints/500).")
  manager = ocp.CheckpointManager(p, options=ocp.CheckpointManagerOptions(read_only=True))
  steps = sorted(manager.all_steps(), reverse=True)
  manager.close()
  if not steps:
    raise CheckpointError(f"{path}: holds no finished checkpoint (expected a run's workdir, its "
                          "checkpoints/ directory or a step directory such as checkpoints/500).")
  return p, [int(s) for s in steps]


def state_metadata(directory: str | os.PathLike, step: int) -> Any:
  """The saved train state's tree at `step`, with orbax metadata leaves (`.shape`, `.dtype`);
  dict keys are strings and tuples are lists, as orbax stores them."""
  path = as_path(directory) / str(int(step)) / "state"
  try:
    with _quiet_failed_read():
      meta = ocp.PyTreeCheckpointer().metadata(path)
  except Exception as e:  # orbax raises many types for unreadable checkpoints
    raise CheckpointError(f"cannot read the checkpoint metadata in {path}: {_first_line(e)}") from e
  meta = getattr(meta, "item_metadata", meta)
  meta = getattr(meta, "tree", meta)
  if not jax.tree.leaves(meta):  # orbax logs a failed read and returns nothing
    raise CheckpointError(f"cannot read the checkpoint metadata in {path}: it holds no arrays")
  return meta


def verified_metadata(directory: str | os.PathLike, step: int) -> tuple[Any, bool]:
  """(`state_metadata`, whether the step was verified by its manifest): checks the step's files
  first (`verify_manifest`).

  Raises:
    DamagedCheckpointError: a file is damaged, or the metadata cannot be read.
  """
  verified = verify_manifest(directory, step)
  try:
    return state_metadata(directory, step), verified
  except CheckpointError as e:
    raise DamagedCheckpointError(directory, step, "its metadata cannot be read: "
                                 f"{_first_line(e.__cause__ or e)}") from e


def restore_state(directory: str | os.PathLike, step: int, abstract: Any, *,
                  partial: bool = False, verified: bool | None = None) -> Any:
  """Reads the train state saved at `step` in `directory` onto `abstract`'s shardings.

  Each process reads only the shards its devices hold (orbax restores straight onto the
  `jax.ShapeDtypeStruct(..., sharding=...)` leaves of `abstract`), casting to their dtypes.

  Args:
    directory: a checkpoints directory (`find_checkpoints`).
    step: the step to read.
    abstract: ShapeDtypeStructs with shardings: the whole state, or (with `partial`) a subset of
      its top-level entries, e.g. {"params": ..., "ema": ...}.
    partial: read only the entries of `abstract`.
    verified: what `verify_manifest` (or `verified_metadata`) said of this step when the caller
      has just checked it; None checks it here.
  Raises:
    DamagedCheckpointError: the step's files are damaged.
    CheckpointError: the step does not fit `abstract`.
  """
  if verified is None:
    verified = verify_manifest(directory, step)
  path = as_path(directory) / str(int(step)) / "state"
  args = ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=partial)
  try:
    with _quiet_failed_read():
      state = ocp.PyTreeCheckpointer().restore(path, args=args)
  except Exception as e:  # orbax raises many types for unreadable or mismatched checkpoints
    raise _restore_error(directory, step, e, abstract, verified, partial) from e
  if not verified:
    _warn_unverified(directory, step)
  return state
