"""The training loop, the sampling and evaluation jobs and the model summary; family-agnostic.

`train` resumes from the newest checkpoint in the workdir by itself (a fresh run may start from
another run's weights, `config.init_from`: common/weights/init_from.py), saves on SIGTERM/SIGINT and exits
cleanly, writes PNG sample grids to `WORKDIR/samples/`, evaluates every `config.eval.every` steps
when asked, and stops on a NaN/inf loss keeping the last good checkpoint.

Every file access goes through `etils.epath`, so a workdir may be a `gs://` path.
"""

import contextlib
import json
import signal
import sys
import time
from typing import Sequence

from etils import epath
from flax import nnx
import jax
import ml_collections
import numpy as np

from common.training import compile_report
from common.training import contracts
from common.weights import deployment
from common.weights import init_from
from common import registry
from common.training import sharding
from common.training import targets
from common.paths import as_path, check_writable
from common.weights.checkpoint import Checkpointer
from common.data import latents as latent_data
from common.data import load_arrays, make_train_iterator
from common.data.captions import read_prompts
from common.diffusion.recipes import make_diffusion
from common.errors import CheckpointError, ConfigError, NonFiniteLossError, ShapeError
from common.eval import cache
from common.eval import coco as coco_eval
from common.eval.features import even_batch_size, evaluate_images, make_reference
from common.eval.inception import weights_identity
from common.eval.reference import check_reference_file, write_arrays
from common.training.experiment import Experiment, numerics_rules
from common.images import save_grid, to_uint8
from common.training.memory import memory_lines, train_step_memory
from common.training.metrics import MetricWriter, Progress, format_duration
from common.nn.network import build_model, model_class
from common.training.summary import summary_lines


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


def _check_finite(step: int, metrics: dict, ckpt: Checkpointer) -> None:
  loss = float(metrics["loss"])
  if not np.isfinite(loss):
    last = ckpt.latest_step()
    kept = f"the last good checkpoint (step {last}) is kept" if last is not None else "no checkpoint was written"
    raise NonFiniteLossError(
        f"loss is {loss} at step {step}; training stopped and {kept} in {ckpt.directory}. "
        "Try a lower optim.learning_rate or a tighter optim.clip_norm.")


def generate(exp: Experiment, params, n: int, *, seed: int, batch_size: int | None = None,
             prompts: Sequence[str] | None = None, data_x=None, progress: bool = False,
             **settings) -> tuple[np.ndarray, dict]:
  """`n` samples from `params` as uint8 images [n, H, W, C] (decoded through the autoencoder when
  there is one), with what conditioned them ({"labels": [n]} or {"prompts": [n]} or {}).

  Conditions cycle (classes, or prompts) from 0; batch i uses the key fold_in(key(seed), i), so
  the same call gives the same images. `settings` override config.sample (sampler, num_steps, ...).
  The n samples are cut into equal batches of at most `batch_size` (`even_batch_size`: 1000 at 500
  stays 2 x 500, 1100 at 500 becomes 3 x 367) and a short last batch is padded with further
  conditions and cut back: every batch has one shape, so the sampler compiles once per call
  instead of once more for a partial last batch.
  """
  bs = even_batch_size(n, int(batch_size or exp.config.sample.batch_size))
  fn = exp.generator(**settings)
  key = jax.random.key(seed)
  images, meaning = [], {}
  prog = Progress(-(-n // bs)) if progress else None
  for i, start in enumerate(range(0, n, bs)):
    keep = min(bs, n - start)
    batch, m = exp.preview_batch(bs, offset=start, prompts=prompts, data_x=data_x)
    x = fn(params, jax.random.fold_in(key, i), batch)
    images.append(to_uint8(exp.to_images(x))[:keep])
    for k, v in m.items():
      meaning.setdefault(k, []).append(np.asarray(v)[:keep])
    if prog is not None:
      if i == 0:
        prog.restart_clock(1)
      prog.print(i + 1, {"images": start + keep})
  return np.concatenate(images), {k: np.concatenate(v) for k, v in meaning.items()}


def write_sample_grid(exp: Experiment, params, path, *, num: int, seed: int,
                      data_x=None) -> str:
  """Samples `num` images with `config.sample` settings (conditions cycled) into a PNG grid."""
  images, meaning = generate(exp, params, num, seed=seed, batch_size=num, data_x=data_x)
  ncols = exp.grid_columns(len(set(meaning["prompts"])) if "prompts" in meaning else None)
  return save_grid(images, str(path), ncols)


def restore_newest(exp: Experiment, workdir: str | epath.Path, keep: int = 3):
  """(step, state) of the newest intact checkpoint in WORKDIR/checkpoints, restored into `exp`'s
  abstract state (its shardings); damaged newer ones are reported and left in place
  (`Checkpointer.restore_newest`). CheckpointError if there is none."""
  ckpt = Checkpointer(str(as_path(workdir) / "checkpoints"), keep=keep)
  try:
    found = ckpt.restore_newest(exp.abstract_state)
  finally:
    ckpt.close()
  if found is None:
    raise CheckpointError(f"no checkpoint in {ckpt.directory}; train first with --mode=train.")
  return found


def _write_config(config: ml_collections.ConfigDict, workdir: epath.Path) -> None:
  if jax.process_index() == 0:
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))


def train(config: ml_collections.ConfigDict, workdir: str, *, stop_after: int | None = None) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint.

  Args:
    config: the experiment config.
    workdir: checkpoints, `config.json`, `metrics.jsonl`, `samples/` and `eval/` go here.
    stop_after: stop (with a checkpoint) once this many steps are done in this call, as an
      interruption would; for tests and time-sliced jobs.

  Returns:
    `{"step": last step, "stopped_by": None | signal name | "stop_after", "loss": last loss}`.
  """
  wd = as_path(workdir)
  tc = config.train
  eval_every = int(config.get("eval", {}).get("every", 0) or 0)
  check_writable(wd, wd / "checkpoints", wd / "samples", *([wd / "eval"] if eval_every else []))
  if eval_every and config.eval.get("reference"):  # before training, not at the first evaluation
    check_reference_file(str(config.eval.reference))
  mesh = sharding.make_mesh(config.mesh)
  nproc = jax.process_count()
  if tc.batch_size % nproc:
    raise ShapeError(f"train.batch_size={tc.batch_size} is not divisible by {nproc} processes.")
  data = make_train_iterator(config.data, global_batch_size=tc.batch_size, seed=config.seed,
                             process_index=jax.process_index(), process_count=nproc)
  exp = Experiment(config, mesh)
  if config.data.get("name", None) == "latents" and contracts.reads_caption_padding(
      exp.abstract_model):
    latent_data.check_padding_kept(config.data, reader=config.model.name)
  exp.check_generation()  # encoders present and fitting: the end-of-training grid needs them
  if eval_every and config.eval.get("coco"):  # the periodic evaluation's COCO files, checked now
    exp.check_generation(coco_eval.draw(config.eval.coco,
                                        int(config.eval.train_num_samples)).prompts[:1])
  _write_config(config, wd)
  accum = f" in {exp.grad_accum} micro-batches" if exp.grad_accum > 1 else ""
  _log(f"model {config.model.name}: {exp.num_params / 1e6:.3f}M parameters; mesh "
       f"{dict(mesh.shape)}; global batch {tc.batch_size}{accum}")

  ckpt = Checkpointer(str(wd / "checkpoints"), keep=tc.keep_checkpoints)
  try:
    found = ckpt.restore_newest(exp.abstract_state, data, set_aside=True)
  except BaseException:
    ckpt.close()
    raise
  if found is not None:
    start, state = found
    _log(f"resumed from the checkpoint at step {start} in {ckpt.directory}")
  else:
    loaded = init_from.initial_state(exp, config.get("init_from", None))
    if loaded is None:
      state, start = exp.init_state(config.seed), 0
    else:
      state, what = loaded
      start = int(state["step"])
      _log(what)
  step = int(start)
  total = exp.total_steps
  writer = MetricWriter(str(wd), tensorboard=tc.get("tensorboard", True))
  progress = Progress(total, step)
  samples_dir = wd / "samples"
  result = {"step": step, "stopped_by": None, "loss": None}
  metrics = prev = preview_x = None
  t_start = time.perf_counter()

  def grid(at_step):
    path = write_sample_grid(exp, state["ema"], samples_dir / f"step_{at_step:07d}.png",
                             num=tc.num_grid_samples, seed=config.seed, data_x=preview_x)
    _log(f"wrote {path}")

  try:
    with _stop_signals() as stop:
      while step < total:
        batch = exp.model_batch(next(data))
        if prev is None:
          preview_x = batch["x"]
        state, metrics = exp.train_step(state, sharding.global_batch(batch, mesh, exp.rules),
                                        exp.step_key(step))
        step += 1
        if prev is not None:  # check the previous step while this one runs
          _check_finite(step - 1, prev, ckpt)
        prev = metrics
        if step == start + 1:
          progress.restart_clock(step)
        if step % tc.log_every == 0 or step == total:
          _check_finite(step, metrics, ckpt)
          values = {k: float(v) for k, v in metrics.items()}
          writer.write(step, {**values, "steps_per_s": progress.rate(step),
                              "wall_s": time.perf_counter() - t_start})
          progress.print(step, {"loss": values["loss"], "grad_norm": values["grad_norm"]})
        stopping = stop["stop"] or (stop_after is not None and step - start >= stop_after)
        if step % tc.checkpoint_every == 0 or step == total or stopping:
          _check_finite(step, metrics, ckpt)
          ckpt.save(step, state, data)
        if tc.sample_every and step % tc.sample_every == 0 and step < total:
          grid(step)
        if eval_every and step % eval_every == 0:
          _check_finite(step, metrics, ckpt)
          scores = evaluate_params(exp, state["ema"], step, wd,
                                   num_samples=int(config.eval.train_num_samples))
          writer.write(step, scores)
        if stopping:
          result["stopped_by"] = stop["stop"] or "stop_after"
          _log(f"stopping at step {step} ({result['stopped_by']}); checkpoint saved in {ckpt.directory}")
          break
      if metrics is not None:
        _check_finite(step, metrics, ckpt)
        result["loss"] = float(metrics["loss"])
      if step >= total and result["stopped_by"] is None:
        if preview_x is None:
          preview_x = next(data)["x"]
        grid(step)
        _log(f"training done: {step} steps in {format_duration(time.perf_counter() - t_start)}")
  finally:
    ckpt.close()
    writer.close()
  result["step"] = step
  return result


def sample(config: ml_collections.ConfigDict, workdir: str | None, *,
           num_samples: int | None = None, sampler: str | None = None,
           num_steps: int | None = None, guidance_scale: float | None = None,
           guidance_interval=None, seed: int | None = None, prompts_file: str | None = None,
           checkpoint: str | None = None) -> str:
  """Samples from the newest checkpoint's EMA weights into `WORKDIR/samples/samples.npz` and a grid.

  With `checkpoint` = an export folder (`export`), samples from the deployed network it holds
  (e.g. packed ternary weights run through the packed matmul) instead; the files then go to
  `checkpoint/samples/` unless `workdir` is given.

  Arguments left as None come from `config.sample`. Returns the path of the npz file, which holds
  `images` (uint8 [N, H, W, C], decoded through `config.autoencoder` for latent models) and
  `labels` (int32 [N], class-conditional models) or `prompts` ([N] str, text-conditional ones).
  """
  # Read before any work, so a bad file costs no model load.
  prompts = read_prompts(prompts_file, f"--prompts={prompts_file}") if prompts_file else None
  mesh = sharding.make_mesh(config.mesh)
  if not (workdir or checkpoint):
    raise ConfigError("sampling needs --workdir (a training run) or --checkpoint (an export).")
  check_writable(as_path(workdir or checkpoint) / "samples",
                 flag="--workdir" if workdir else "--workdir for the samples")
  if checkpoint:
    if not deployment.is_export(checkpoint):
      raise CheckpointError(f"--checkpoint={checkpoint} is not an export folder (config.json "
                            f"and {deployment.PARAMS_FILE} written by --mode=export).")
    weights = deployment.read_export_weights(checkpoint)  # checksum-verified
    # The config may come from the export itself: it must not imply a network far larger than the
    # weights before that network is traced.
    deployment.check_tensor_count(model_class(config.model), registry.config_kwargs(config.model),
                                  len(weights), as_path(checkpoint) / deployment.PARAMS_FILE)
    exp = Experiment(config, mesh, deployed=True)
    params = jax.device_put(deployment.load_export_state(checkpoint, exp.abstract_params,
                                                         weights=weights),
                            exp.param_shardings)
    step = deployment.export_step(checkpoint)
    wd = as_path(workdir or checkpoint)
    what = f"the deployed network in {checkpoint} (step {step})"
  else:
    wd = as_path(workdir)
    exp = Experiment(config, mesh)
    step, state = restore_newest(exp, wd, config.train.keep_checkpoints)
    params = state["ema"]
    del state
    what = f"the step-{step} EMA weights"
  n = int(num_samples or config.sample.num_samples)
  images, meaning = generate(
      exp, params, n, seed=config.seed if seed is None else seed,
      prompts=prompts, progress=True, sampler=sampler, num_steps=num_steps,
      guidance_scale=guidance_scale, guidance_interval=guidance_interval)
  out_dir = wd / "samples"
  path = out_dir / "samples.npz"
  if jax.process_index() == 0:
    out_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"images": images}
    if "labels" in meaning:
      arrays["labels"] = meaning["labels"].astype(np.int32)
    if "prompts" in meaning:
      arrays["prompts"] = meaning["prompts"].astype(str)
    with path.open("wb") as f:
      np.savez_compressed(f, **arrays)
    ncols = exp.grid_columns(len(set(meaning["prompts"])) if "prompts" in meaning else None)
    grid = save_grid(images[:max(ncols * 10, 64)], str(out_dir / "samples.png"), ncols)
    _log(f"wrote {n} samples from {what} to {path} and {grid}")
  return str(path)


# ---- export --------------------------------------------------------------------------------------


def export(config: ml_collections.ConfigDict, workdir: str, *, out: str | None = None) -> dict:
  """`--mode=export`: the newest checkpoint's EMA weights in their deployed form.

  Every layer with an inference form (`deployed()`, e.g. ternary layers as 2-bit packed codes) is
  swapped (`common.weights.deployment.deploy`); the whole network is written to `out` (default
  WORKDIR/export) as params.safetensors + config.json, which `sample(..., checkpoint=out)` reads
  without the workdir. Prints the export's size next to the fp32 and bf16 sizes of the network.

  Returns:
    {"path": the folder, "step", "deployed": {module path: class}, "bytes": {"export", "fp32",
    "bf16", "params"}}.
  """
  wd = as_path(workdir)
  folder = as_path(out) if out else wd / "export"
  check_writable(folder)
  exp = Experiment(config, sharding.make_mesh(config.mesh))
  step, state = restore_newest(exp, wd, config.train.keep_checkpoints)
  ema = jax.device_get(state["ema"])
  del state
  model = nnx.merge(exp.graphdef, ema)
  swapped = deployment.deploy(model)
  sizes = deployment.model_sizes(ema, nnx.to_pure_dict(nnx.state(model)))
  extra = {"source": {"workdir": str(wd), "step": int(step)}, "bytes": sizes,
           "deployed": swapped}
  if jax.process_index() == 0:
    sizes["export"] = deployment.save_export(folder, config, model, extra=extra)
  kinds = sorted(set(swapped.values()))
  _log(f"exported the step-{step} EMA weights to {folder}: {len(swapped)} layers deployed "
       f"({', '.join(kinds) or 'none: the network has no layer with a deployed form'})")
  _log(deployment.format_sizes(sizes))
  return {"path": str(folder), "step": int(step), "deployed": swapped, "bytes": sizes}


# ---- evaluation ----------------------------------------------------------------------------------


def _reference(config: ml_collections.ConfigDict, wd: epath.Path,
               coco: coco_eval.CocoEval | None = None):
  """`config.eval.reference` (a path to images or statistics), or statistics of the config's own
  real images (`eval.reference_data`, default config.data, split `eval.reference_split`), cached in
  WORKDIR/eval/reference.npz with the settings that made it (`common.eval.cache`); with
  `eval.coco`, of the N drawn COCO images, in WORKDIR/eval/reference_coco_nN.npz (periodic and
  final evaluations draw different N and keep one file each)."""
  ec = config.eval
  if ec.get("reference"):
    check_reference_file(str(ec.reference))
    return str(ec.reference)
  inception = ec.get("inception") or None
  made_by = {"cache": "reference statistics", "inception": weights_identity(inception)}
  if coco is not None:
    path = wd / "eval" / f"reference_coco_n{len(coco.paths)}.npz"
    settings = {**made_by, **coco_eval.settings(coco)}
    what = f"{len(coco.paths)} COCO images"
    read_images = lambda: coco_eval.RealImages(coco, int(ec.batch_size))  # noqa: E731
  else:
    path = wd / "eval" / "reference.npz"
    data_cfg = ec.get("reference_data") or config.data
    limit = int(ec.get("reference_limit") or 0) or None
    settings = {**made_by, "data": data_cfg.to_dict(), "split": ec.reference_split,
                "limit": limit}
    what = f"{data_cfg.name} ({ec.reference_split})"
    read_images = lambda: load_arrays(data_cfg, split=ec.reference_split, limit=limit)[0]  # noqa: E731
  if cache.load(str(path), settings, ["mu", "sigma"], what="reference statistics") is None:
    _log(f"writing the reference statistics of {what} to {path}")
    make_reference(str(path), read_images(), inception_path=inception,
                   batch_size=int(ec.batch_size), store_images=False, settings=settings)
  return str(path)


def _samples_settings(config: ml_collections.ConfigDict, step: int, n: int,
                      coco: coco_eval.CocoEval | None = None) -> dict:
  """Everything that shapes the evaluation samples of checkpoint `step` (common.eval.cache)."""
  sample = {k: v for k, v in config.sample.to_dict().items() if k != "num_samples"}
  extra = coco_eval.settings(coco) if coco is not None else {}
  return {"cache": "evaluation samples", **extra, "step": int(step), "num_samples": int(n),
          "seed": int(config.eval.seed), "sample": sample, "precision": config.get("precision"),
          "model": cache.fingerprint(config.model),
          "diffusion": cache.fingerprint(config.diffusion),
          "numerics": cache.fingerprint(config.get("numerics") or {}),
          "autoencoder": config.get("autoencoder"), "text_encoder": config.get("text_encoder")}


def evaluate_params(exp: Experiment, params, step: int, wd: epath.Path, *,
                    num_samples: int | None = None,
                    coco: coco_eval.CocoEval | None = None) -> dict:
  """Samples `num_samples` (default config.eval.num_samples) images from `params` and scores them
  (FID, sFID, IS, precision, recall) against the reference. The samples of a step are kept in
  WORKDIR/eval/samples_step_N_nM.npz with the settings that made them and reused while those are
  the same (`common.eval.cache`); the scores go to WORKDIR/eval/step_N.json.

  With `config.eval.coco` (zero-shot COCO FID, `common.eval.coco`) the prompts are the drawn COCO
  captions (`coco`, drawn here when None) and the reference their images.

  Returns the scores with the keys prefixed "eval/" (for metrics.jsonl).
  """
  config = exp.config
  ec = config.eval
  if ec.get("reference"):  # before sampling
    check_reference_file(str(ec.reference))
  n = int(num_samples or ec.num_samples)
  eval_dir = wd / "eval"
  eval_dir.mkdir(parents=True, exist_ok=True)
  samples_path = eval_dir / f"samples_step_{step:07d}_n{n}.npz"
  if coco is None and ec.get("coco"):
    coco = coco_eval.draw(ec.coco, n)
  settings = _samples_settings(config, step, n, coco)
  cached = cache.load(str(samples_path), settings, ["images"], what="evaluation samples")
  if cached is not None and (cached["images"].dtype != np.uint8 or len(cached["images"]) != n):
    cache.warn(f"the cached evaluation samples {samples_path} hold {cached['images'].dtype} "
               f"{list(cached['images'].shape)}, not {n} uint8 images; recomputing them")
    cached = None
  if cached is not None:
    images = cached["images"]
    _log(f"evaluating the {len(images)} samples already in {samples_path}")
  else:
    _log(f"sampling {n} images for evaluation at step {step}")
    images, _ = generate(exp, params, n, seed=int(ec.seed), batch_size=int(config.sample.batch_size),
                         prompts=None if coco is None else list(coco.prompts), progress=True)
    if jax.process_index() == 0:
      write_arrays(str(samples_path), {"images": images}, settings=settings)
  if coco is not None:
    images = coco_eval.resize_samples(images, coco.image_size)
  scores = evaluate_images(images, _reference(config, wd, coco),
                           inception_path=ec.get("inception") or None,
                           batch_size=int(ec.batch_size), progress=True)
  scores = {"step": int(step), **scores}
  if jax.process_index() == 0:
    (eval_dir / f"step_{step:07d}.json").write_text(json.dumps(scores, indent=2))
  shown = ", ".join(f"{k} {v:.4g}" for k, v in scores.items()
                    if isinstance(v, float) and k != "step")
  _log(f"eval at step {step} ({n} samples): {shown}")
  return {f"eval/{k}": v for k, v in scores.items()
          if isinstance(v, (int, float)) and v is not None and k != "step"}


def evaluate(config: ml_collections.ConfigDict, workdir: str, *,
             num_samples: int | None = None) -> dict:
  """`--mode=eval`: scores the newest checkpoint's EMA weights (see `evaluate_params`) and appends
  the scores to WORKDIR/metrics.jsonl."""
  wd = as_path(workdir)
  check_writable(wd, wd / "eval")
  coco = None
  if config.eval.get("coco"):  # the COCO files are checked before the network is built
    coco = coco_eval.draw(config.eval.coco, int(num_samples or config.eval.num_samples))
  exp = Experiment(config, sharding.make_mesh(config.mesh))
  step, state = restore_newest(exp, wd, config.train.keep_checkpoints)
  scores = evaluate_params(exp, state["ema"], step, wd, num_samples=num_samples, coco=coco)
  writer = MetricWriter(str(wd), tensorboard=False)
  writer.write(step, scores)
  writer.close()
  return scores


# ---- summary -------------------------------------------------------------------------------------


def summary(config: ml_collections.ConfigDict) -> str:
  """Parameters per module and forward GFLOPs per example (XLA cost analysis); needs no data.

  The network is built abstractly (no parameter memory), checked against the contract of its
  recipe, and its forward pass is lowered for the inputs it declares (`example_inputs(1)`), in the
  form the contract calls it (`common.training.contracts.forward_arguments`).
  """
  m = config.model
  model = nnx.eval_shape(lambda: build_model(m, jax.random.key(0), numerics_rules(config)))
  contract = make_diffusion(config.diffusion).network
  contracts.check_network(model, contract, f"config.model.name={m.name!r}")
  inputs = contracts.forward_arguments(model, contract)
  shape = "x".join(str(d) for d in inputs[0].shape[1:])
  lines = [f"{m.name} ({shape})"] + summary_lines(model, inputs, per_example=1)
  lines += _memory_lines(config)
  text = "\n".join(lines)
  _log(text)
  return text


def compile_for_target(config: ml_collections.ConfigDict, target: str | None, *,
                       sampling: bool = False, mfus=compile_report.MFUS) -> bool:
  """`--mode=compile`: compiles the train step (with `sampling`, the deployed sampling call) for
  `target` (default `config.target`), prints the report and, last, its JSON line on stdout; when it
  does not fit, also one line on stderr saying what to change. Returns whether it fits."""
  name = target or config.get("target", "")
  if not name:
    raise ConfigError("--mode=compile needs --target (e.g. v5p-8, 8xh100) or config.target.")
  report = compile_report.compile_for_target(config, targets.parse_target(name), sampling=sampling,
                                             mfus=mfus)
  print("\n".join(compile_report.report_lines(report)), flush=True)
  if not report["fits"]:
    print(f"error: does not fit {report['target']}: {report['advice']}", file=sys.stderr, flush=True)
  print(json.dumps(report), flush=True)
  return report["fits"]


def _memory_lines(config: ml_collections.ConfigDict) -> list[str]:
  """The train step's memory per device for the config's batch and mesh (common/training/memory.py), on a
  mesh of the available devices; a mesh those devices cannot form is said in one line."""
  try:
    mesh = sharding.make_mesh(config.mesh)
  except ConfigError as e:
    return [f"train-step memory: not computed on {jax.device_count()} device(s): {e}"]
  return memory_lines(train_step_memory(Experiment(config, mesh)))
