"""Checkpoints carry checksums: a damaged step is never used silently, the newest intact one is used
instead (and named), nothing is deleted, and failed writes or unwritable workdirs are one line.

Small pytrees through `common.weights.checkpoint.Checkpointer` (no training); the trainer's use of it
(fallback on resume, set-aside, the one-line messages) is run end to end by the bad-input corpus
(tests/bad_inputs/cases_checkpoints.py)."""

import errno
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.weights import checkpoint
from common import paths
from common.training import trainer
from common.weights.checkpoint import Checkpointer, DamagedCheckpointError
from common.errors import CheckpointError, NotWritableError
from configs import sid2_digits


def tree(step: int) -> dict:
  """A state with one array big enough to sit in a data file of its own."""
  return {"w": jnp.asarray(np.random.default_rng(step).normal(size=(64, 64)), jnp.float32),
          "step": jnp.int32(step)}


ABSTRACT = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree(0))


def saved(directory, steps, keep=5) -> Checkpointer:
  ck = Checkpointer(str(directory), keep=keep)
  for s in steps:
    ck.save(s, tree(s))
  ck.wait()
  return ck


def biggest_file(step_dir):
  return max((p for p in step_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def flip_byte(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))


def test_each_step_has_a_manifest_of_its_files(tmp_path):
  saved(tmp_path, [1]).close()
  manifest = json.loads((tmp_path / "1" / checkpoint.MANIFEST).read_text())
  unhashed = {checkpoint.MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt"}  # orbax's own
  files = {str(p.relative_to(tmp_path / "1")) for p in (tmp_path / "1").rglob("*")
           if p.is_file() and p.name not in unhashed}
  assert set(manifest["files"]) == files
  assert any(name.startswith("state/") for name in manifest["files"])
  assert checkpoint.verify_manifest(tmp_path, 1)


def test_a_flipped_byte_falls_back_to_the_newest_intact_step(tmp_path, capsys):
  ck = saved(tmp_path, [1, 2])
  flip_byte(biggest_file(tmp_path / "2" / "state"))
  with pytest.raises(DamagedCheckpointError, match=r"step 2 .* is damaged \(state/.* does not "
                     "match its SHA-256"):
    ck.restore(2, ABSTRACT)
  step, state = ck.restore_newest(ABSTRACT, set_aside=True)
  assert step == 1
  np.testing.assert_array_equal(state["w"], tree(1)["w"])
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"warning: checkpoint at step 2 in {tmp_path} is "
                                             "damaged (")
  assert err[0].endswith(f"resuming from step 1, the newest intact one; step 2 is kept, renamed "
                         f"to {tmp_path}/2.damaged")
  # nothing deleted; orbax no longer sees step 2, so it can be written again
  assert (tmp_path / "2.damaged" / "state").is_dir() and ck.all_steps() == [1]
  ck.save(2, tree(2))
  ck.wait()
  assert ck.all_steps() == [1, 2]
  np.testing.assert_array_equal(ck.restore(2, ABSTRACT)["w"], tree(2)["w"])
  ck.close()


def test_a_read_only_restore_leaves_the_damaged_step_in_place(tmp_path, capsys):
  ck = saved(tmp_path, [1, 2])
  (biggest_file(tmp_path / "2" / "state")).unlink()
  step, _ = ck.restore_newest(ABSTRACT)
  assert step == 1 and ck.all_steps() == [1, 2]
  err = capsys.readouterr().err
  assert "is missing); using step 1, the newest intact one; step 2 is left in place" in err
  ck.close()


def test_damaged_steps_do_not_count_for_keep_n(tmp_path, capsys):
  ck = saved(tmp_path, [1, 2, 3], keep=2)
  assert ck.all_steps() == [2, 3]
  flip_byte(biggest_file(tmp_path / "3" / "state"))
  assert ck.restore_newest(ABSTRACT, set_aside=True)[0] == 2
  ck.save(4, tree(4))
  ck.wait()
  # step 2, the last intact one before this run, is kept: the damaged step 3 did not count
  assert ck.all_steps() == [2, 4] and (tmp_path / "3.damaged").is_dir()
  ck.close()


def test_no_intact_step_is_one_error_and_nothing_moves(tmp_path):
  ck = saved(tmp_path, [1, 2])
  for s in (1, 2):
    flip_byte(biggest_file(tmp_path / str(s) / "state"))
  with pytest.raises(CheckpointError, match=r"no intact checkpoint .* step 2 is damaged .*; step 1 "
                     r"is damaged .* Nothing was moved or deleted"):
    ck.restore_newest(ABSTRACT, set_aside=True)
  assert ck.all_steps() == [1, 2] and not list(tmp_path.glob("*.damaged*"))
  ck.close()


def test_a_step_without_manifest_is_restored_with_a_warning(tmp_path, capsys):
  ck = saved(tmp_path, [1])
  (tmp_path / "1" / checkpoint.MANIFEST).unlink()
  capsys.readouterr()
  np.testing.assert_array_equal(ck.restore(1, ABSTRACT)["w"], tree(1)["w"])
  assert "has no checksums.json (written before checkpoints carried checksums): restored " \
         "unverified" in capsys.readouterr().err
  # Unverified and unreadable while its metadata matches: damaged, not "another config".
  biggest_file(tmp_path / "1" / "state").write_bytes(b"x")
  with pytest.raises(DamagedCheckpointError, match=r"cannot be read: ValueError: .*"):
    ck.restore(1, ABSTRACT)
  ck.close()


def test_a_failed_background_save_is_one_checkpoint_error(tmp_path, monkeypatch):
  ck = saved(tmp_path, [1])

  def disk_full(step_dir):
    raise OSError(errno.ENOSPC, "No space left on device", str(step_dir))

  monkeypatch.setattr(checkpoint, "write_manifest", disk_full)
  ck.save(2, tree(2))  # returns at once; the failure comes from the save's thread
  with pytest.raises(CheckpointError, match=r"^cannot write the checkpoint at step 2 in .*: "
                     r"OSError: .*No space left on device.*; the checkpoint of step 1 is intact"):
    ck.wait()
  monkeypatch.undo()
  assert ck.all_steps() == [1] and checkpoint.verify_manifest(tmp_path, 1)
  ck.close()


def test_write_probe_refuses_an_unwritable_directory(tmp_path):
  (tmp_path / "file").write_text("")
  with pytest.raises(NotWritableError, match=r"cannot write in .*file/wd .*give a writable "
                     "--workdir"):
    paths.check_writable(tmp_path / "ok", tmp_path / "file" / "wd")
  assert (tmp_path / "ok").is_dir() and not list((tmp_path / "ok").iterdir())


def test_sample_checks_its_output_before_restoring_or_sampling(tmp_path, monkeypatch):
  (tmp_path / "file").write_text("")

  def forbidden(*args, **kwargs):
    raise AssertionError("work done before the write check")

  monkeypatch.setattr(trainer, "restore_newest", forbidden)
  monkeypatch.setattr(trainer, "generate", forbidden)
  with pytest.raises(NotWritableError, match="samples"):
    trainer.sample(sid2_digits.get_config("runlocal"), str(tmp_path / "file"))
