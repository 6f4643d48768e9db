"""The one entry point: `python launch/main.py --config=configs/X.py --workdir=DIR --mode=train|sample|eval|summary|export|compile`.

`--mode=compile --target=v5p-8` compiles the config's train step for hardware this machine does not
have (a Cloud TPU slice or a GPU node; default: the config's `target`) and says whether it fits; its
last line is one JSON object (common/training/compile_report.py); exit 1 when it does not fit.

`--mode=export` writes the newest EMA weights in their deployed form (e.g. 2-bit packed ternary
layers) to WORKDIR/export; `--mode=sample --checkpoint=WORKDIR/export` samples from it (the
config is read from the export when --config is not given).

Config overrides: `--config.train.steps=100`; config arguments: `--config=configs/sid2_in512.py:p4,runlocal`.
Errors a user can fix are printed on one line, without a traceback, and exit with status 1.
"""

import contextlib
import os
import sys
import warnings

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Compiling for a target uses no accelerator of this machine's: keep jax on the CPU (with the
# compile extra's CUDA plugin installed and no GPU, jax would first try and fail cuInit).
if "--mode=compile" in sys.argv[1:]:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from common import registry  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.training import trainer  # noqa: E402
from common.training.experiment import resolve_plugins  # noqa: E402
from common.weights import deployment  # noqa: E402
from configs import base  # noqa: E402
from launch import distributed  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/sid2_digits.py.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "summary", "export", "compile"],
                          "What to run.")
_TARGET = flags.DEFINE_string(
    "target", None, "compile: the hardware to compile for, e.g. v5p-8, v4-8, v5litepod-4, v6e-4, "
    "2xv5p-128 (Cloud TPU accelerator types), 1xh100, 8xh100, 8xh200, 8xb200, 8xa100, 4x8xh100 (GPU "
    "nodes); default: config.target.")
_MFU = flags.DEFINE_list("mfu", ["0.4", "0.6"], "compile: model FLOPs utilisations at which to "
                         "estimate step time, run time and cost.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "sample: an export folder (written by --mode=export) to sample from "
    "instead of WORKDIR's newest checkpoint; samples go to DIR/samples unless --workdir is given. "
    "compile: compile that export's deployed sampling call instead of the train step.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", None, "sample/eval: number of images (default "
                                    "config.sample.num_samples / config.eval.num_samples).")
_SAMPLER = flags.DEFINE_string("sampler", None, "sample: ddpm | ddim | heun (default config.sample.sampler).")
_STEPS = flags.DEFINE_integer("sample_steps", None, "sample: sampler steps (default config.sample.num_steps).")
_GUIDANCE = flags.DEFINE_float("guidance_scale", None, "sample: CFG scale (default config.sample.guidance_scale).")
_INTERVAL = flags.DEFINE_list("guidance_interval", None, "sample: 'lo,hi' logSNR interval where guidance applies.")
_SEED = flags.DEFINE_integer("sample_seed", None, "sample: PRNG seed (default config.seed).")
_PROMPTS = flags.DEFINE_string("prompts", None, "sample: a file of prompts, one a line (text-conditional "
                               "models; default config.sample.prompts).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Start jax.distributed for a multi-host run (one process per host): TPU pod "
    "slices, SLURM, Kubernetes and Vertex AI are detected; elsewhere give the three flags below "
    "(docs/SCALING.md).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "--distributed: HOST:PORT of process 0 (default: "
    "$JAX_COORDINATOR_ADDRESS, else detected).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "--distributed: number of processes (default: $JAX_NUM_PROCESSES, else "
    "detected).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "--distributed: this process's id (default: $JAX_PROCESS_ID, else detected).")


def _run(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  config = _CONFIG.value
  if _CHECKPOINT.value and _MODE.value not in ("sample", "compile"):
    raise app.UsageError("--checkpoint is for --mode=sample and --mode=compile")
  if _TARGET.value and _MODE.value != "compile":
    raise app.UsageError("--target is for --mode=compile")
  # A config read from an export is data: the names in it resolve only to registered plug-ins.
  trust, source = contextlib.nullcontext(), None
  if config is None and _CHECKPOINT.value:
    try:
      config = deployment.load_export_config(_CHECKPOINT.value, like=base.structure())
    except UserError as e:
      _fail(f"error: {e}")
    source = deployment.config_path(_CHECKPOINT.value)
    trust = registry.from_file(source)
  if config is None:
    raise app.UsageError("--config is required, e.g. --config=configs/sid2_digits.py")
  try:
    config.get("seed")  # config_flags defers a config file's load error to the first access
  except OSError as e:
    _fail(f"error: {str(e).splitlines()[-1].strip()} "
          f"(--config={flags.FLAGS['config'].config_filename})")
  try:
    with trust:
      if source is not None:  # refuse every unregistered name, used by this mode or not
        resolve_plugins(config)
      _dispatch(config)
  except UserError as e:
    _fail(f"error: {e}")
  except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
    if source is None:  # the user's own config: a bug to see in full
      raise
    # The export's config passed the structure check, but a value in it is still unusable.
    _fail(f"error: {source}: a value of the export's config cannot be used ({_describe(e)}); the "
          "export is damaged or was edited: export again with launch/main.py --mode=export.")


def _fail(message: str) -> None:
  """Prints `message` as the one last stderr line and exits with status 1."""
  print(message, file=sys.stderr, flush=True)
  # A failed asynchronous checkpoint write leaves orbax coroutines that are never awaited; their
  # RuntimeWarning would be printed at interpreter shutdown, after the error line.
  warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
  sys.exit(1)


def _describe(e: BaseException) -> str:
  """"Type: message at file:line" of the innermost frame of an exception, on one line."""
  tb = e.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  where = (f" at {os.path.relpath(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"
           if tb is not None else "")
  msg = " ".join(str(e).split())[:200]
  return f"{type(e).__name__}: {msg}{where}"


def _dispatch(config) -> None:
  """Runs `--mode` on `config`."""
  if _DISTRIBUTED.value:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  elif any(f.value is not None for f in (_COORDINATOR, _NUM_PROCESSES, _PROCESS_ID)):
    raise app.UsageError("--coordinator_address/--num_processes/--process_id need --distributed")
  if _MODE.value == "summary":
    trainer.summary(config)
    return
  if _MODE.value == "compile":
    if not trainer.compile_for_target(config, _TARGET.value, sampling=bool(_CHECKPOINT.value),
                                      mfus=[float(m) for m in _MFU.value]):
      sys.exit(1)
    return
  if not _WORKDIR.value and not (_MODE.value == "sample" and _CHECKPOINT.value):
    raise app.UsageError(f"--workdir is required for --mode={_MODE.value}")
  if _MODE.value == "train":
    trainer.train(config, _WORKDIR.value)
  elif _MODE.value == "eval":
    trainer.evaluate(config, _WORKDIR.value, num_samples=_NUM_SAMPLES.value)
  elif _MODE.value == "export":
    trainer.export(config, _WORKDIR.value)
  else:
    interval = tuple(float(v) for v in _INTERVAL.value) if _INTERVAL.value else None
    trainer.sample(config, _WORKDIR.value, num_samples=_NUM_SAMPLES.value, sampler=_SAMPLER.value,
                   num_steps=_STEPS.value, guidance_scale=_GUIDANCE.value,
                   guidance_interval=interval, seed=_SEED.value, prompts_file=_PROMPTS.value,
                   checkpoint=_CHECKPOINT.value)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with bad flags and unknown `--config.*` keys reported on one line."""
  try:
    return flags.FLAGS(argv)
  except UserError as e:  # raised by a config's get_config, e.g. an unknown config argument
    _fail(f"error: {e}")
  except Exception as e:  # pylint: disable=broad-except
    detail = str(e).strip().strip("'\"")
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    hint = f" (config overrides given: {', '.join(overrides)})" if overrides else ""
    _fail(f"error: cannot parse the command line: {type(e).__name__}: {detail}{hint}. Unknown "
          "config keys cannot be set from the command line; see the config file for the keys.")


def main() -> None:
  app.run(_run, flags_parser=_parse_flags)


if __name__ == "__main__":
  main()
