"""The training loop, the sampling job and the model summary; family-agnostic.

`train` resumes from the newest checkpoint in the workdir by itself, saves on SIGTERM/SIGINT and exits
cleanly, writes PNG sample grids to `WORKDIR/samples/`, and stops on a NaN/inf loss keeping the last
good checkpoint.
"""

import contextlib
import os
import signal
import time

import jax
import ml_collections
import numpy as np

from common import sharding
from common.checkpoint import Checkpointer
from common.data import make_train_iterator
from common.errors import CheckpointError, NonFiniteLossError, ShapeError
from common.experiment import Experiment
from common.images import save_grid, to_uint8
from common.metrics import MetricWriter, Progress, format_duration


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


@contextlib.contextmanager
def _stop_signals():
  """Turns SIGTERM/SIGINT into a flag the loop polls, so it can checkpoint and exit 0."""
  flag = {"stop": None}

  def handler(signum, _frame):
    flag["stop"] = signal.Signals(signum).name

  old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
  try:
    yield flag
  finally:
    for s, h in old.items():
      signal.signal(s, h)


def _check_batch(batch: dict, exp: Experiment, local_batch: int) -> None:
  want = (local_batch,) + exp.sample_shape
  got = tuple(np.shape(batch.get("image")))
  if got != want:
    raise ShapeError(f"data batch 'image' has shape {got}, the config expects {want} "
                     f"(data.image_size={exp.info.image_size}, channels={exp.info.channels}).")


def _check_finite(step: int, metrics: dict, ckpt: Checkpointer) -> None:
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    last = ckpt.latest_step()
    kept = f"the last good checkpoint (step {last}) is kept" if last is not None else "no checkpoint was written"
    raise NonFiniteLossError(
        f"loss is {loss} at step {step}; training stopped and {kept} in {ckpt.directory}. "
        "Try a lower optim.learning_rate or a tighter optim.clip_norm.")


def write_sample_grid(exp: Experiment, params, path: str, *, num: int, seed: int) -> str:
  """Samples `num` class-cycled images with `config.sample` settings and writes a PNG grid."""
  fn = exp.config_sampler()
  labels = exp.sample_labels(num)
  images = fn(params, jax.random.key(seed), labels)
  ncols = exp.info.num_classes if 0 < exp.info.num_classes <= 16 else 8
  return save_grid(to_uint8(jax.device_get(images)), path, ncols)


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint.

  Args:
    config: the experiment config.
    workdir: checkpoints, `metrics.jsonl` and `samples/` go here.
    stop_after: stop (with a checkpoint) once this many steps are done in this call, as an
      interruption would; for tests and time-sliced jobs.

  Returns:
    `{"step": last step, "stopped_by": None | signal name | "stop_after", "loss": last loss}`.
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  os.makedirs(workdir, exist_ok=True)
  tc = config.train
  mesh = sharding.make_mesh(config.mesh)
  nproc = jax.process_count()
  if tc.batch_size % nproc:
    raise ShapeError(f"train.batch_size={tc.batch_size} is not divisible by {nproc} processes.")
  local_batch = tc.batch_size // nproc
  data = make_train_iterator(config.data, global_batch_size=tc.batch_size, seed=config.seed,
                             process_index=jax.process_index(), process_count=nproc)
  exp = Experiment(config, mesh)
  _log(f"model {config.model.name}: {exp.num_params / 1e6:.3f}M parameters; mesh "
       f"{dict(mesh.shape)}; global batch {tc.batch_size}")

  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=tc.keep_checkpoints)
  start = ckpt.latest_step()
  if start is not None:
    state = ckpt.restore(start, exp.abstract_state, data)
    _log(f"resumed from the checkpoint at step {start} in {ckpt.directory}")
  else:
    state = exp.init_state(config.seed)
    start = 0
  step = int(start)
  total = exp.total_steps
  writer = MetricWriter(workdir, tensorboard=tc.get("tensorboard", True))
  progress = Progress(total, step)
  samples_dir = os.path.join(workdir, "samples")
  result = {"step": step, "stopped_by": None, "loss": None}
  metrics = prev = None
  t_start = time.perf_counter()

  try:
    with _stop_signals() as stop:
      while step < total:
        batch = next(data)
        if prev is None:
          _check_batch(batch, exp, local_batch)
        gbatch = sharding.global_batch({"image": batch["image"], "label": batch["label"]}, mesh,
                                       exp.rules)
        state, metrics = exp.train_step(state, gbatch, exp.step_key(step))
        step += 1
        if prev is not None:  # check the previous step while this one runs
          _check_finite(step - 1, prev, ckpt)
        prev = metrics
        if step == start + 1:
          progress.restart_clock(step)
        if step % tc.log_every == 0 or step == total:
          _check_finite(step, metrics, ckpt)
          values = {k: float(v) for k, v in metrics.items()}
          writer.write(step, {**values, "steps_per_s": progress.rate(step)})
          progress.print(step, {"loss": values["loss"], "grad_norm": values["grad_norm"]})
        stopping = stop["stop"] or (stop_after is not None and step - start >= stop_after)
        if step % tc.checkpoint_every == 0 or step == total or stopping:
          _check_finite(step, metrics, ckpt)
          ckpt.save(step, state, data)
        if tc.sample_every and step % tc.sample_every == 0 and step < total:
          path = write_sample_grid(exp, state["ema"], os.path.join(samples_dir, f"step_{step:07d}.png"),
                                   num=tc.num_grid_samples, seed=config.seed)
          _log(f"wrote {path}")
        if stopping:
          result["stopped_by"] = stop["stop"] or "stop_after"
          _log(f"stopping at step {step} ({result['stopped_by']}); checkpoint saved in {ckpt.directory}")
          break
      if metrics is not None:
        _check_finite(step, metrics, ckpt)
        result["loss"] = float(metrics["loss"])
      if step >= total and result["stopped_by"] is None:
        path = write_sample_grid(exp, state["ema"], os.path.join(samples_dir, f"step_{step:07d}.png"),
                                 num=tc.num_grid_samples, seed=config.seed)
        _log(f"training done: {step} steps in {format_duration(time.perf_counter() - t_start)}; "
             f"samples: {path}")
  finally:
    ckpt.close()
    writer.close()
  result["step"] = step
  return result


def sample(config: ml_collections.ConfigDict, workdir: str, *, num_samples: int | None = None,
           sampler: str | None = None, num_steps: int | None = None,
           guidance_scale: float | None = None, guidance_interval=None, seed: int | None = None) -> str:
  """Samples from the newest checkpoint's EMA weights into `WORKDIR/samples/samples.npz` and a grid.

  Arguments left as None come from `config.sample`. Returns the path of the npz file, which holds
  `images` (uint8 [N, H, W, C]) and `labels` (int32 [N]).
  """
  workdir = os.path.abspath(os.path.expanduser(workdir))
  mesh = sharding.make_mesh(config.mesh)
  exp = Experiment(config, mesh)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints)
  step = ckpt.latest_step()
  if step is None:
    ckpt.close()
    raise CheckpointError(f"no checkpoint in {ckpt.directory}; train first with --mode=train.")
  state = ckpt.restore(step, exp.abstract_state)
  ckpt.close()
  params = state["ema"]
  del state
  n = int(num_samples or config.sample.num_samples)
  bs = int(config.sample.batch_size)
  fn = exp.config_sampler(sampler=sampler, num_steps=num_steps, guidance_scale=guidance_scale,
                          guidance_interval=guidance_interval)
  key = jax.random.key(config.seed if seed is None else seed)
  images, labels = [], []
  progress = Progress(-(-n // bs))
  for i, start in enumerate(range(0, n, bs)):
    lab = exp.sample_labels(bs, offset=start)
    x = fn(params, jax.random.fold_in(key, i), lab)
    images.append(to_uint8(jax.device_get(x)))
    labels.append(np.asarray(lab))
    if i == 0:
      progress.restart_clock(1)
    progress.print(i + 1, {"images": min(start + bs, n)})
  images = np.concatenate(images)[:n]
  labels = np.concatenate(labels)[:n].astype(np.int32)
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, "samples.npz")
  if jax.process_index() == 0:
    np.savez_compressed(path, images=images, labels=labels)
    ncols = exp.info.num_classes if 0 < exp.info.num_classes <= 16 else 8
    grid = save_grid(images[:max(ncols * 10, 64)], os.path.join(out_dir, "samples.png"), ncols)
    _log(f"wrote {n} samples from the step-{step} EMA weights to {path} and {grid}")
  return path


def summary(config: ml_collections.ConfigDict) -> str:
  """Parameters per module and forward GFLOPs per example (XLA cost analysis); needs no data.

  The network is built abstractly (no parameter memory) and its forward pass is lowered for one
  example of `config.model.image_size` x `config.model.in_channels`.
  """
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from common.experiment import build_model  # pylint: disable=import-outside-toplevel
  from common.summary import summary_lines  # pylint: disable=import-outside-toplevel
  m = config.model
  if "image_size" not in m or "in_channels" not in m:
    raise ShapeError("summary needs config.model.image_size and config.model.in_channels.")
  model = nnx.eval_shape(lambda: build_model(m, jax.random.key(0)))
  x = jax.ShapeDtypeStruct((1, m.image_size, m.image_size, m.in_channels), jax.numpy.float32)
  noise = jax.ShapeDtypeStruct((1,), jax.numpy.float32)
  cond = jax.ShapeDtypeStruct((1,), jax.numpy.int32)
  text = "\n".join([f"{m.name} ({m.image_size}x{m.image_size}x{m.in_channels})"]
                   + summary_lines(model, (x, noise, cond), per_example=1))
  _log(text)
  return text
