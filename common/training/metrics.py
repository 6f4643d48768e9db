"""Metrics: JSON lines always, TensorBoard when installed, and a progress line with steps/s and ETA."""

import json
import os
import sys
import time

import jax
import numpy as np

from common.paths import as_path, is_remote


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


class MetricWriter:
  """Writes `{"step": int, **values}` lines to `WORKDIR/metrics.jsonl` (and TensorBoard if available).

  Only process 0 writes. `workdir` may be local (the file is appended to and flushed per line) or a
  `gs://` path: objects cannot be appended to, so the file is rewritten with all its lines at each
  write (metrics are logged every `train.log_every` steps, so it stays small). TensorBoard goes
  through `clu.metric_writers`, which imports TensorFlow; it is used only when `tensorboard=True`
  and TensorFlow is installed (the `tensorboard` extra).
  """

  def __init__(self, workdir: str | os.PathLike, *, tensorboard: bool = True):
    self._active = jax.process_index() == 0
    workdir = as_path(workdir)
    self._path = workdir / "metrics.jsonl"
    self._tb = None
    self._file = None
    self._lines: list[str] = []
    if not self._active:
      return
    workdir.mkdir(parents=True, exist_ok=True)
    if is_remote(self._path):
      if self._path.exists():
        self._lines = self._path.read_text().splitlines(keepends=True)
    else:
      self._file = self._path.open("a")
    if tensorboard:
      try:
        # The optional `tensorboard` extra (TensorFlow, which clu's SummaryWriter needs).
        import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        from clu import metric_writers  # the same extra  pylint: disable=import-outside-toplevel
        self._tb = metric_writers.SummaryWriter(os.fspath(workdir / "tensorboard"))
      except ImportError:
        self._tb = None

  @property
  def path(self):
    """The epath.Path of the JSON-lines file."""
    return self._path

  def write(self, step: int, values: dict) -> None:
    if not self._active:
      return
    values = {k: _scalar(v) for k, v in values.items()}
    line = json.dumps({"step": int(step), **values}) + "\n"
    if self._file is not None:
      self._file.write(line)
      self._file.flush()
    else:
      self._lines.append(line)
      self._path.write_text("".join(self._lines))
    if self._tb is not None:
      self._tb.write_scalars(int(step), {k: v for k, v in values.items() if isinstance(v, float)})

  def close(self) -> None:
    if self._active:
      if self._file is not None:
        self._file.close()
      if self._tb is not None:
        self._tb.close()


def format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class Progress:
  """Prints `step N/T | loss ... | X steps/s | ETA ...` lines on process 0."""

  def __init__(self, total_steps: int, start_step: int = 0, stream=None):
    self.total, self._stream = int(total_steps), stream or sys.stdout
    self._t0, self._s0 = time.perf_counter(), int(start_step)

  def restart_clock(self, step: int) -> None:
    """Starts timing from `step` (call after the first, compiling step)."""
    self._t0, self._s0 = time.perf_counter(), int(step)

  def rate(self, step: int) -> float:
    dt = time.perf_counter() - self._t0
    return (step - self._s0) / dt if dt > 0 and step > self._s0 else 0.0

  def line(self, step: int, values: dict) -> str:
    rate = self.rate(step)
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    vals = " | ".join(f"{k} {_fmt(v)}" for k, v in values.items())
    eta_s = format_duration(eta) if np.isfinite(eta) else "?"
    return f"step {step}/{self.total} | {vals} | {rate:.2f} steps/s | ETA {eta_s}"

  def print(self, step: int, values: dict) -> None:
    if jax.process_index() == 0:
      print(self.line(step, values), file=self._stream, flush=True)


def _fmt(v) -> str:
  v = _scalar(v)
  return f"{v:.4g}" if isinstance(v, float) else str(v)
