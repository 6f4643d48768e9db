"""Bad-input cases of the checkpoints (area "ckpt"): damaged steps of a run's workdir and of an
init_from source, a workdir that cannot be written, a disk that fills up during a save.

Each case damages a copy of the pristine run (checkpoints at steps 10 and 20, each with its
checksum manifest). A manifest edited to match a changed file is not a case: whoever can write
the checkpoint's files can write its manifest too; the manifest catches accidents (bit rot, a
truncated copy, a half-synced download), not an attacker, and orbax reads no code from the data.
"""

import ctypes
import os
import pathlib
import resource
import signal
import stat

from tests.bad_inputs.harness import Case, Pristine, copy

TRAIN = ["launch/main.py", "--config=configs/sid2_digits.py:runlocal"]
DISK_LIMIT = 100_000  # bytes per file: the step's biggest data files do not fit; logs do


def _run_dir(d: pathlib.Path, pristine: Pristine, name: str = "wd") -> pathlib.Path:
  return copy(pristine.workdir, d / name)


def _step_files(wd: pathlib.Path, step: int) -> list[pathlib.Path]:
  """The array data files of a step, biggest first."""
  files = [p for p in (wd / "checkpoints" / str(step) / "state").rglob("*") if p.is_file()
           and p.parent.name == "d"]
  return sorted(files, key=lambda p: -p.stat().st_size)


def _flip(path: pathlib.Path) -> None:
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x10
  path.write_bytes(bytes(data))


def _no_traceback(d: pathlib.Path) -> None:
  err = (d / "_logs" / "stderr").read_text(errors="replace")
  assert "Traceback" not in err, "a traceback on stderr"


def _steps(d: pathlib.Path, name: str = "wd") -> list[str]:
  return sorted(p.name for p in (d / name / "checkpoints").iterdir())


# ---- damaged steps ---------------------------------------------------------------------------


def build_flipped_newest(d, pristine):
  wd = _run_dir(d, pristine)
  _flip(_step_files(wd, 20)[0])
  return TRAIN + [f"--workdir={wd}", "--config.train.steps=30"]


def check_flipped_newest(d):
  _no_traceback(d)
  # step 20 was set aside (not deleted) and written again from step 10 onwards, then step 30
  assert _steps(d) == ["10", "20", "20.damaged", "30"], _steps(d)


def build_every_step_damaged(d, pristine):
  wd = _run_dir(d, pristine)
  for step in (10, 20):
    _flip(_step_files(wd, step)[0])
  return TRAIN + [f"--workdir={wd}", "--config.train.steps=30"]


def check_nothing_moved(d):
  assert _steps(d) == ["10", "20"], _steps(d)


def build_missing_file(d, pristine):
  wd = _run_dir(d, pristine)
  _step_files(wd, 20)[-1].unlink()
  return TRAIN + [f"--workdir={wd}", "--mode=sample", "--num_samples=4"]


def check_sampled_in_place(d):
  _no_traceback(d)
  assert (d / "wd" / "samples" / "samples.npz").is_file()
  check_nothing_moved(d)


def build_truncated(d, pristine):
  wd = _run_dir(d, pristine)
  path = _step_files(wd, 20)[0]
  path.write_bytes(path.read_bytes()[:100])
  return TRAIN + [f"--workdir={wd}", "--mode=export"]


def check_exported_step_10(d):
  _no_traceback(d)
  assert '"step": 10' in (d / "wd" / "export" / "config.json").read_text()


def build_legacy_unreadable(d, pristine):
  """Checkpoints without manifests (written before they existed) whose OCDBT manifests are
  corrupt: orbax itself fails (tensorstore's multi-kilobyte message, asyncio's late tracebacks)."""
  wd = _run_dir(d, pristine)
  for step in (10, 20):
    (wd / "checkpoints" / str(step) / "checksums.json").unlink()
    _flip(wd / "checkpoints" / str(step) / "state" / "manifest.ocdbt")
  return TRAIN + [f"--workdir={wd}", "--config.train.steps=30"]


def build_checkpoints_is_a_file(d, pristine):
  wd = d / "wd"
  wd.mkdir()
  (wd / "checkpoints").write_text("not a directory")
  return TRAIN + [f"--workdir={wd}"]


# ---- init_from -------------------------------------------------------------------------------


def build_init_from_damaged(d, pristine):
  src = _run_dir(d, pristine, "source")
  _flip(_step_files(src, 20)[0])
  return TRAIN + [f"--workdir={d / 'wd'}", f"--config.init_from.path={src}",
                  "--config.train.steps=2"]


def check_init_from_source_untouched(d):
  _no_traceback(d)
  assert _steps(d, "source") == ["10", "20"], _steps(d, "source")


def build_init_from_damaged_step(d, pristine):
  src = _run_dir(d, pristine, "source")
  _flip(_step_files(src, 20)[0])
  return TRAIN + [f"--workdir={d / 'wd'}", f"--config.init_from.path={src}/checkpoints/20",
                  "--config.train.steps=2"]


# ---- unwritable workdir, full disk -----------------------------------------------------------


def _read_only(root: pathlib.Path) -> None:
  for p in [root, *root.rglob("*")]:
    mode = p.stat().st_mode
    p.chmod(mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))


def _without_root_override() -> None:
  """preexec: as root, drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the capability bounding
  set, so the command (exec'd as root) obeys file modes like any user; nothing to do otherwise."""
  if os.geteuid() != 0:
    return
  libc = ctypes.CDLL(None, use_errno=True)
  for cap in (1, 2):  # linux/capability.h: CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    if libc.prctl(24, cap, 0, 0, 0):  # PR_CAPBSET_DROP
      raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def build_read_only_train(d, pristine):
  wd = _run_dir(d, pristine)
  _read_only(wd)
  return TRAIN + [f"--workdir={wd}", "--config.train.steps=30"]


def build_read_only_sample(d, pristine):
  wd = _run_dir(d, pristine)
  _read_only(wd)
  return TRAIN + [f"--workdir={wd}", "--mode=sample", "--num_samples=4"]


def check_unchanged(d):
  assert _steps(d) == ["10", "20"], _steps(d)
  assert not (d / "wd" / "samples" / "samples.npz").exists()


def _full_disk() -> None:
  """preexec: files stop growing at DISK_LIMIT bytes (EFBIG stands in for ENOSPC)."""
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
  resource.setrlimit(resource.RLIMIT_FSIZE, (DISK_LIMIT, DISK_LIMIT))


def build_disk_full(d, pristine):
  wd = _run_dir(d, pristine)
  return TRAIN + [f"--workdir={wd}", "--config.train.steps=30"]


def check_previous_intact(d):
  from common.weights.checkpoint import verify_manifest  # pylint: disable=import-outside-toplevel
  names = _steps(d)
  assert "10" in names and "20" in names and "30" not in names, names
  for step in (10, 20):
    assert verify_manifest(d / "wd" / "checkpoints", step), step


DAMAGED = r"checkpoint at step 20 in \S+/checkpoints is damaged"

CASES = [
    Case(name="ckpt/flipped-byte-newest", build=build_flipped_newest, kind="handled", exit_code=0,
         message=DAMAGED + r" \(state/\S+ does not match its SHA-256\); resuming from step 10, the "
         r"newest intact one; step 20 is kept, renamed to \S+/checkpoints/20\.damaged$",
         needs=("workdir",), check=check_flipped_newest),
    Case(name="ckpt/every-step-damaged", build=build_every_step_damaged,
         message=r"no intact checkpoint in \S+/checkpoints: step 20 is damaged \(.*\); step 10 is "
         r"damaged \(.*\)\. Nothing was moved or deleted", needs=("workdir",),
         check=check_nothing_moved),
    Case(name="ckpt/missing-file-newest", build=build_missing_file, kind="handled", exit_code=0,
         message=DAMAGED + r" \(state/\S+ is missing\); using step 10, the newest intact one; "
         r"step 20 is left in place$", needs=("workdir",), check=check_sampled_in_place),
    Case(name="ckpt/truncated-data-file", build=build_truncated, kind="handled", exit_code=0,
         message=DAMAGED + r" \(state/\S+ has 100 bytes, \d+ were written\); using step 10",
         needs=("workdir",), check=check_exported_step_10),
    Case(name="ckpt/unverified-unreadable", build=build_legacy_unreadable,
         message=r"no intact checkpoint in \S+: step 20 is damaged \(it cannot be read: "
         r"ValueError: DATA_LOSS: .{0,400}\); step 10 is damaged", needs=("workdir",),
         check=check_nothing_moved),
    Case(name="ckpt/checkpoints-is-a-file", build=build_checkpoints_is_a_file,
         message=r"cannot write in \S+/wd/checkpoints \(\w+Error: .*\); nothing was done"),
    Case(name="ckpt/init-from-damaged-source", build=build_init_from_damaged, kind="handled",
         exit_code=0, message=DAMAGED + r" \(.*\); initialising from step 10, the newest intact "
         r"one; step 20 is left in place$", needs=("workdir",),
         check=check_init_from_source_untouched),
    Case(name="ckpt/init-from-damaged-step-dir", build=build_init_from_damaged_step,
         message=r"the checkpoint at step 20 in \S+/source/checkpoints is damaged \(state/\S+ "
         r"does not match its SHA-256\)$", needs=("workdir",),
         check=check_init_from_source_untouched),
    Case(name="ckpt/read-only-workdir-train", build=build_read_only_train,
         preexec=_without_root_override, needs=("workdir",), check=check_unchanged,
         message=r"cannot write in \S+/wd \(PermissionError: .*\); nothing was done: give a "
         r"writable --workdir"),
    Case(name="ckpt/read-only-workdir-sample", build=build_read_only_sample,
         preexec=_without_root_override, needs=("workdir",), check=check_unchanged,
         message=r"cannot write in \S+/wd/samples \(PermissionError: .*\); nothing was done"),
    Case(name="ckpt/disk-full-during-save", build=build_disk_full, preexec=_full_disk,
         needs=("workdir",), check=check_previous_intact,
         message=r"cannot write the checkpoint at step 30 in \S+: .*File too large.*; the "
         r"checkpoints of steps 10, 20 are intact"),
]
