"""Starting a fresh run from another run's weights or from a weights file (`config.init_from`).

The trainer calls `initial_state` when a run starts fresh, i.e. its own workdir has no checkpoint;
a run with checkpoints of its own resumes from them and ignores `init_from` (so a preempted
fine-tuning run resumes where it stopped, not from its source again).

`config.init_from` keys:

* `path`: "" (off); another run's workdir, its `checkpoints/` directory (the newest step) or one
  step directory (`checkpoints/500`); or a weights file (`.pt/.pth/.bin/.safetensors`, read by
  `common.weights.torch_weights` without torch and without running pickled code).
* `load`: "params": params <- the source's params and ema <- the source's EMA (a weights file has
  one set of weights, which fills both); the optimizer state is initialised afresh and the step is
  0. "state": params, ema and the optimizer state come from the source checkpoint; the step is 0
  unless `keep_step`. The optimizer state's own counters come along with it (they drive Adam's bias
  correction, which must match the restored moments, and the learning-rate schedule, which
  therefore continues where the source left it). Only checkpoints hold an optimizer state.
* `converter`: dotted name of `convert(tree: dict[str, np.ndarray], abstract_params: dict) -> dict`
  turning a file's flat tensors into our nested params dict (`nnx.to_pure_dict` layout; e.g.
  "microdit.convert.from_official"); required for weights files. `from_param_paths` (below) reads
  files whose tensor names are our own parameter paths.
* `keep_step`: with load="state", continue the source's step count.

Parameters are matched by path; a missing, unexpected or differently shaped parameter raises
`CheckpointError` naming it. Networks whose parameter shapes do not depend on the image size (fixed
position embeddings computed in the forward pass, RoPE) can therefore be initialised from a run at
another resolution (MicroDiT's 256 -> 512 phase). Checkpoints are restored straight onto the
experiment's shardings (orbax reads each device's shards); a weights file is read whole on every
process and each device takes its slices.
"""

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from common.weights import checkpoint
from common.weights import convert
from common import registry
from common.errors import CheckpointError, ConfigError
from common.paths import as_path
from common.weights.torch_weights import load_torch_weights

LOADS = ("params", "state")


def check_match(source: Any, target: Any, *, what: str, where: str) -> None:
  """Raises CheckpointError unless `source` and `target` hold the same paths with the same shapes.

  Args:
    source: the tree read (arrays or metadata leaves).
    target: what the experiment expects (ShapeDtypeStructs).
    what: a prefix for the paths in the message (e.g. "params/").
    where: the source, for the message.
  """
  src, tgt = checkpoint.leaf_shapes(source), checkpoint.leaf_shapes(target)
  missing = sorted(set(tgt) - set(src))
  unexpected = sorted(set(src) - set(tgt))
  differ = sorted(p for p in set(src) & set(tgt) if src[p] != tgt[p])
  if not (missing or unexpected or differ):
    return
  details = convert.mismatch([what + p for p in missing], [what + p for p in unexpected],
                             [f"{what}{p} {src[p]} (ours {tgt[p]})" for p in differ])
  raise CheckpointError(f"init_from {where} does not match config.model: {details}.")


@registry.register("converter")
def from_param_paths(tree: dict[str, np.ndarray], abstract_params: dict) -> dict:
  """A converter for files whose tensor names are our parameter paths, joined with "/" or "."
  ("blocks/0/attn/qkv/kernel", "blocks.0.attn.qkv.kernel"): `init_from.converter =
  "common.weights.init_from.from_param_paths"` (`common.weights.convert.PARAM_PATHS`)."""
  return convert.apply(convert.PARAM_PATHS, tree, abstract_params, "the weights file")


def _load_file(exp, cfg, path: str) -> tuple[Any, Any, str]:
  if cfg.load != "params":
    raise ConfigError(f"init_from.load={cfg.load!r} needs a checkpoint directory: the weights file "
                      f"{path} holds no optimizer state (use load='params').")
  if not cfg.converter:
    raise ConfigError(f"init_from.path={path} is a weights file: set init_from.converter to the "
                      "dotted name of convert(tree, abstract_params) -> params (e.g. "
                      "'common.weights.init_from.from_param_paths' for files named by our parameter "
                      "paths).")
  converter = registry.import_object(cfg.converter, "init_from.converter", "converter")
  tree = load_torch_weights(path)
  where = f"{path} (via {cfg.converter})"
  try:
    params = converter(tree, exp.abstract_params)
  except CheckpointError as e:
    raise CheckpointError(f"init_from {where}: {e}") from e
  check_match(params, exp.abstract_params, what="", where=where)

  def place(value, spec, sh):
    value = np.asarray(value).astype(spec.dtype)
    return jax.make_array_from_callback(spec.shape, sh, lambda idx: value[idx])

  shardings = exp.state_shardings["params"]
  # Two separate device copies: the train step donates params and ema independently.
  params_dev = jax.tree.map(place, params, exp.abstract_params, shardings)
  ema_dev = jax.tree.map(place, params, exp.abstract_params, shardings)
  return params_dev, ema_dev, f"params and EMA from the weights file {path} (via {cfg.converter})"


def _fresh_optimizer_state(exp, params, ema):
  def build(p, e):
    return {"step": jnp.zeros((), jnp.int32), "params": p, "opt_state": exp.tx.init(p), "ema": e}
  shardings = exp.state_shardings
  return jax.jit(build, in_shardings=(shardings["params"], shardings["ema"]),
                 out_shardings=shardings)(params, ema)


def initial_state(exp, cfg: ml_collections.ConfigDict | None) -> tuple[dict, str] | None:
  """The train state a fresh run starts from by `config.init_from`, placed on the experiment's
  shardings, and one line saying what was loaded from where; None when `cfg.path` is empty.

  Args:
    exp: the `common.training.experiment.Experiment` of the new run.
    cfg: `config.init_from` (module docstring), or None.
  Raises:
    ConfigError: a bad `load`, a weights file without `converter`, or load="state" from a file.
    CheckpointError: the source cannot be read, or its parameters (or, with load="state", its
      optimizer state) do not match the experiment's (the paths are named).
  """
  if cfg is None or not cfg.get("path", ""):
    return None
  path = str(cfg.path)
  if cfg.get("load", "params") not in LOADS:
    raise ConfigError(f"init_from.load={cfg.get('load')!r}: expected one of {LOADS}.")
  if cfg.get("keep_step", False) and cfg.load != "state":
    raise ConfigError("init_from.keep_step=True needs init_from.load='state' (load='params' "
                      "starts at step 0).")
  src = as_path(path)
  if not src.exists():
    raise CheckpointError(f"init_from.path={path}: no such file or directory.")
  if not src.is_dir():
    params, ema, what = _load_file(exp, cfg, path)
    return _fresh_optimizer_state(exp, params, ema), f"initialised {what}; fresh optimizer state"

  directory, steps = checkpoint.find_checkpoints(src)
  damaged = []
  for step in steps:
    try:
      state, what = _from_checkpoint(exp, cfg, directory, step)
    except checkpoint.DamagedCheckpointError as e:
      if len(steps) == 1:  # a step directory named explicitly (or the only step): refused
        raise
      damaged.append(e)
      continue
    for e in damaged:
      checkpoint.warn(f"{checkpoint.damage_line(e)}; initialising from step {step}, the newest "
                      f"intact one; step {e.step} is left in place")
    return state, what
  raise CheckpointError(f"init_from.path={path}: no intact checkpoint: " + "; ".join(
      f"step {e.step} is damaged ({e.why})" for e in damaged) + ". Point init_from.path at an "
      "intact copy.")


def _from_checkpoint(exp, cfg, directory, step: int) -> tuple[dict, str]:
  """`initial_state` from the checkpoint at `step` in `directory` (DamagedCheckpointError when its
  files are damaged)."""
  where = f"{directory}/{step}"
  meta, verified = checkpoint.verified_metadata(directory, step)
  if not isinstance(meta, dict) or "params" not in meta:
    raise CheckpointError(f"init_from {where} holds no train state (params, ema, opt_state).")
  abstract = exp.abstract_state
  if cfg.load == "params":
    for part in ("params", "ema"):
      check_match(meta.get(part, {}), abstract[part], what=f"{part}/", where=where)
    got = checkpoint.restore_state(
        directory, step, {"params": abstract["params"], "ema": abstract["ema"]}, partial=True,
        verified=verified)
    state = _fresh_optimizer_state(exp, got["params"], got["ema"])
    return state, (f"initialised params and EMA from the step-{step} checkpoint in {directory}; "
                   "fresh optimizer state, step 0")
  for part in ("params", "ema"):
    check_match(meta.get(part, {}), abstract[part], what=f"{part}/", where=where)
  check_match(meta.get("opt_state", {}), abstract["opt_state"], what="opt_state/",
              where=f"{where} (optimizer state: is config.optim the source's?)")
  state = checkpoint.restore_state(directory, step, abstract, verified=verified)
  if not cfg.get("keep_step", False):
    state["step"] = jax.device_put(jnp.zeros((), jnp.int32), exp.state_shardings["step"])
  return state, (f"initialised params, EMA and optimizer state from the step-{step} checkpoint "
                 f"in {directory}; step {int(state['step'])}")
