"""Checkpoints: an orbax CheckpointManager holding the train state and the data iterator's state.

Saves are asynchronous; the newest `keep` checkpoints are preserved. A checkpoint that cannot be read
raises `CheckpointError` and is never deleted.

Another run's checkpoint is read without a `Checkpointer` (and without writing to it) by
`find_checkpoint`, `state_metadata` and `restore_state` (`config.init_from`, common/init_from.py).
"""

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from common.errors import CheckpointError
from common.paths import as_path


class Checkpointer:
  """Saves and restores `{"state": pytree, "data": grain iterator}` under `directory`.

  `directory` may be local or a `gs://` path (orbax writes through epath and tensorstore).
  """

  def __init__(self, directory: str | os.PathLike, *, keep: int = 3, async_save: bool = True):
    self.directory = as_path(directory)
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.LatestN(max(int(keep), 1)),
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, data_iterator=None) -> None:
    """Starts saving `state` (and the iterator's position) at `step`; returns before it is written."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

  def restore(self, step: int, abstract_state, data_iterator=None):
    """Restores the state at `step` onto the shardings of `abstract_state` (ShapeDtypeStruct leaves).

    `data_iterator`, when given, is moved to the saved position in place.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    try:
      restored = self._manager.restore(int(step), args=ocp.args.Composite(**items))
    except Exception as e:  # orbax raises many types for unreadable or mismatched checkpoints
      raise CheckpointError(
          f"cannot restore the checkpoint at step {step} in {self.directory}: {type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''}. It was left untouched; move it away to start "
          "over, or use a workdir whose checkpoints match this config.") from e
    return restored["state"]

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_like(tree, shardings=None):
  """ShapeDtypeStructs (with shardings when given) describing `tree`, for `Checkpointer.restore`."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def find_checkpoint(path: str | os.PathLike) -> tuple[Any, int]:
  """(checkpoints directory, step) of another run's checkpoint, for reading it.

  Args:
    path: a run's workdir (its `checkpoints/` is used), a checkpoints directory (its newest
      step), or one step directory (`.../checkpoints/500`).
  Raises:
    CheckpointError: nothing is there, or no finished checkpoint.
  """
  p = as_path(path)
  if not p.exists():
    raise CheckpointError(f"{path}: no such checkpoint directory.")
  if (p / "checkpoints").is_dir():
    p = p / "checkpoints"
  if p.name.isdigit() and (p / "state").is_dir():
    return p.parent, int(p.name)
  manager = ocp.CheckpointManager(p, options=ocp.CheckpointManagerOptions(read_only=True))
  step = manager.latest_step()
  manager.close()
  if step is None:
    raise CheckpointError(f"{path}: holds no finished checkpoint (expected a run's workdir, its "
                          "checkpoints/ directory or a step directory such as checkpoints/500).")
  return p, int(step)


def state_metadata(directory: str | os.PathLike, step: int) -> Any:
  """The saved train state's tree at `step`, with orbax metadata leaves (`.shape`, `.dtype`);
  dict keys are strings and tuples are lists, as orbax stores them."""
  path = as_path(directory) / str(int(step)) / "state"
  try:
    meta = ocp.PyTreeCheckpointer().metadata(path)
  except Exception as e:  # orbax raises many types for unreadable checkpoints
    raise CheckpointError(f"cannot read the checkpoint metadata in {path}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
  meta = getattr(meta, "item_metadata", meta)
  return getattr(meta, "tree", meta)


def restore_state(directory: str | os.PathLike, step: int, abstract: Any, *,
                  partial: bool = False) -> Any:
  """Reads the train state saved at `step` in `directory` onto `abstract`'s shardings.

  Each process reads only the shards its devices hold (orbax restores straight onto the
  `jax.ShapeDtypeStruct(..., sharding=...)` leaves of `abstract`), casting to their dtypes.

  Args:
    directory: a checkpoints directory (`find_checkpoint`).
    step: the step to read.
    abstract: ShapeDtypeStructs with shardings: the whole state, or (with `partial`) a subset of
      its top-level entries, e.g. {"params": ..., "ema": ...}.
    partial: read only the entries of `abstract`.
  """
  path = as_path(directory) / str(int(step)) / "state"
  args = ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
      partial_restore=partial)
  try:
    return ocp.PyTreeCheckpointer().restore(path, args=args)
  except Exception as e:  # orbax raises many types for unreadable or mismatched checkpoints
    raise CheckpointError(f"cannot restore the checkpoint in {path}: {type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}") from e
