"""Checkpoints: an orbax CheckpointManager holding the train state and the data iterator's state.

Saves are asynchronous; the newest `keep` checkpoints are preserved. A checkpoint that cannot be read
raises `CheckpointError` and is never deleted.
"""

import os

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
