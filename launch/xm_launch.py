r"""Runs a config, or a sweep over config overrides, as an XManager experiment, one work unit per point.

Needs the `xm` extra (`pip install -e '.[xm]'`). Each work unit runs
`launch/main.py --config=CONFIG --workdir=ROOT/EXPERIMENT/NN_POINT --config.KEY=VALUE ...`, so every
point has its own checkpoints, `metrics.jsonl` and samples.

Sweeps (combined as a cartesian product, in this order):
  --sweep_file=configs/sweeps/sid2_digits_lr.py[:arg]   a file defining `get_sweep(arg=None)` that
      returns a list of {"key.path": value} dicts, one per point;
  --sweep=optim.learning_rate=1e-3,3e-4 --sweep=seed=0,1   comma-separated values per key;
  --set=train.steps=100   fixed overrides applied to every point.

Executors:
  local       (default) each work unit is a subprocess of this machine running launch/main.py
              (no docker), `--max_parallel` (default 1) at a time; the launcher waits, prints each
              unit's status and exits 1 if any failed. A status file
              ROOT/EXPERIMENT/xm_status.json lists the units.
  vertex      a Vertex AI custom job per point, built from this checkout with `xm.python_container`
              (docker and `gcloud auth` needed; see docs/SCALING.md). `--accelerator=h100
              --accelerator_count=8 --num_hosts=2` asks for 2 VMs with 8 H100s each; the replicas
              find each other through Vertex's CLUSTER_SPEC (--distributed, launch/distributed.py).
              TPUs: xmanager 0.8.5 maps only tpu_v2/tpu_v3 onto Vertex machine types.
  kubernetes  a Kubernetes Job per host (GKE by default; `kubectl` credentials needed), CPUs or
              GPUs. Host i gets JAX_PROCESS_ID=i, JAX_NUM_PROCESSES=num_hosts and
              JAX_COORDINATOR_ADDRESS=host 0's pod name under xmanager's headless `experiments`
              service. (xmanager 0.8.5 does not request GKE TPU slices.)
  Cloud work units need --workdir_root on shared storage (gs://...) and a config inside this
  checkout; they are submitted and the launcher returns.

Example (what tests/test_xm_launch.py runs):
  python launch/xm_launch.py --config=configs/sid2_digits.py:runlocal --workdir_root=/tmp/xm \
      --sweep=seed=0,1 --set=train.steps=4
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import os
import re
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from etils import epath  # noqa: E402

from common.errors import ConfigError, UserError  # noqa: E402
from common.paths import is_remote  # noqa: E402
from launch.distributed import DEFAULT_PORT, ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID  # noqa: E402

MAIN = os.path.join(ROOT, "launch", "main.py")
EXECUTORS = ("local", "vertex", "kubernetes")
GPUS = ("t4", "v100", "a100", "a100_80gib", "l4", "h100")
TPUS = ("tpu_v2", "tpu_v3", "tpu_v4", "tpu_v5e", "tpu_v5p", "tpu_v6e")
VERTEX_TPUS = ("tpu_v2", "tpu_v3")  # the TPU types xmanager 0.8.5 maps onto Vertex machine types



# ---- sweeps ---------------------------------------------------------------------------------------


def _parse_value(text: str) -> Any:
  """'1e-3' -> 0.001, '4' -> 4, 'true' -> True, anything else stays a string."""
  low = text.strip().lower()
  if low in ("true", "false"):
    return low == "true"
  for cast in (int, float):
    try:
      return cast(text)
    except ValueError:
      pass
  return text.strip()


def _key_value(item: str, flag: str) -> tuple[str, str]:
  key, sep, value = item.partition("=")
  key = key.strip().removeprefix("--").removeprefix("config.")
  if not sep or not key:
    raise ConfigError(f"--{flag}={item!r}: expected KEY=VALUE, e.g. --{flag}=train.steps=100")
  return key, value


def load_sweep_file(spec: str) -> list[dict[str, Any]]:
  """Calls `get_sweep(arg)` of the file in `spec` ("path.py" or "path.py:arg")."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"--sweep_file={path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location("_xm_sweep", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_sweep"):
    raise ConfigError(f"--sweep_file={path!r} defines no get_sweep(arg=None)")
  points = module.get_sweep(arg or None)
  if not isinstance(points, (list, tuple)) or not all(isinstance(p, dict) for p in points):
    raise ConfigError(f"{path}: get_sweep must return a list of {{key: value}} dicts")
  return [dict(p) for p in points]


def expand_sweep(fixed: list[str], axes: list[str],
                 file_points: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
  """The sweep points: file points x each --sweep axis, every point updated with --set.

  Args:
    fixed: "KEY=VALUE" overrides for every point.
    axes: "KEY=V1,V2,..." sweep axes.
    file_points: points from a sweep file (None: one empty point).

  Returns:
    one {key: value} dict of config overrides per work unit, in launch order.
  """
  points = [dict(p) for p in (file_points or [{}])]
  for item in axes:
    key, values = _key_value(item, "sweep")
    options = [_parse_value(v) for v in values.split(",") if v.strip()]
    if not options:
      raise ConfigError(f"--sweep={item!r} gives no values")
    points = [{**p, key: v} for p, v in itertools.product(points, options)]
  base = dict(_key_value(item, "set") for item in fixed)
  return [{**{k: _parse_value(v) for k, v in base.items()}, **p} for p in points]


def _format_value(value: Any) -> str:
  if isinstance(value, (list, tuple)):
    return "(" + ",".join(_format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
  return str(value)


def point_name(index: int, point: dict[str, Any], sweep_keys: list[str]) -> str:
  """A folder name such as '01_seed=1_learning_rate=0.0003' (swept keys only)."""
  parts = [f"{k.rsplit('.', 1)[-1]}={_format_value(point[k])}" for k in sweep_keys if k in point]
  name = "_".join([f"{index:02d}"] + parts)
  return re.sub(r"[^A-Za-z0-9._=+-]", "-", name)[:120]


def main_args(config: str, workdir: str, point: dict[str, Any], extra: list[str] = (),
              distributed: bool = False) -> list[str]:
  """The launch/main.py flags of one work unit."""
  args = [f"--config={config}", f"--workdir={workdir}"]
  args += [f"--config.{k}={_format_value(v)}" for k, v in point.items()]
  if distributed:
    args.append("--distributed")
  return args + list(extra)


# ---- executors ------------------------------------------------------------------------------------


def requirements_kwargs(executor: str, accelerator: str | None, count: int, num_hosts: int,
                        cpu: int | None, ram_gib: int | None) -> dict[str, Any]:
  """Keyword arguments of `xm.JobRequirements` for one host of a cloud work unit."""
  if executor == "vertex" and accelerator in TPUS and accelerator not in VERTEX_TPUS:
    raise ConfigError(
        f"--executor=vertex --accelerator={accelerator}: xmanager 0.8.5 maps only {VERTEX_TPUS} "
        "onto Vertex AI machine types; create TPU v5e/v5p/v6e slices with the gcloud commands in "
        "docs/SCALING.md")
  if executor == "kubernetes" and accelerator in TPUS:
    raise ConfigError(
        f"--executor=kubernetes --accelerator={accelerator}: xmanager 0.8.5's Kubernetes executor "
        "does not request GKE TPU slices (no google.com/tpu limits or topology selectors); create "
        "TPU slices with the gcloud commands in docs/SCALING.md")
  if count <= 0 or num_hosts <= 0:
    raise ConfigError(f"--accelerator_count={count} and --num_hosts={num_hosts} must be positive")
  kwargs: dict[str, Any] = {}
  if accelerator:
    kwargs[accelerator] = count
  if cpu:
    kwargs["cpu"] = cpu
  if ram_gib:
    kwargs["ram"] = ram_gib * 2**30
  return kwargs


def _container(xm, spec, args: list[str], extra: str):
  """This checkout as a python container running launch/main.py with `args`."""
  name = os.path.basename(ROOT)
  return xm.python_container(
      executor_spec=spec, path=ROOT, base_image=_BASE_IMAGE.value,
      docker_instructions=[f"COPY {name}/ /workdir/{name}", f"WORKDIR /workdir/{name}",
                           f"RUN python -m pip install --no-cache-dir -e '.{extra}'"],
      entrypoint=xm.ModuleName("launch.main"), args=args)


def _accelerator_extra(accelerator: str | None) -> str:
  """The install extra of the container: "[tpu]", "[gpu]" or "" (CPU)."""
  if accelerator in TPUS:
    return "[tpu]"
  return "[gpu]" if accelerator in GPUS else ""


def make_job_generator(executor: str, config: str, name: str, workdir: str,
                       point: dict[str, Any]):
  """An xmanager job generator `async (work_unit) -> None` adding this point's job(s).

  Local jobs are named `name`: their output lines are prefixed with `[name]`.
  """
  # xmanager is the optional `xm` extra: imported only when a sweep is launched.
  from xmanager import xm  # pylint: disable=import-outside-toplevel
  from xmanager import xm_local  # the same extra  pylint: disable=import-outside-toplevel
  num_hosts = _NUM_HOSTS.value if executor != "local" else 1
  args = main_args(config, workdir, point, _EXTRA_ARGS.value, distributed=num_hosts > 1)

  if executor == "local":
    async def local_job(work_unit, **_):
      [executable] = work_unit.experiment.package([xm.binary(
          executor_spec=xm_local.LocalSpec(), path=sys.executable, args=[MAIN] + args)])
      work_unit.add(xm.Job(executable, executor=xm_local.Local(), name=name))
    return local_job

  req = requirements_kwargs(executor, _ACCEL.value, _ACCEL_COUNT.value, num_hosts, _CPU.value,
                            _RAM_GIB.value)
  extra = _accelerator_extra(_ACCEL.value)
  if executor == "vertex":
    async def vertex_job(work_unit, **_):
      [executable] = work_unit.experiment.package(
          [_container(xm, xm_local.Vertex.Spec(), args, extra)])
      # Vertex runs one worker pool per job: the primary (process 0, the coordinator in
      # CLUSTER_SPEC) and num_hosts - 1 identical replicas.
      jobs = {"primary": xm.Job(executable, executor=xm_local.Vertex(
          requirements=xm.JobRequirements(**req, replicas=1)))}
      if num_hosts > 1:
        jobs["workers"] = xm.Job(executable, executor=xm_local.Vertex(
            requirements=xm.JobRequirements(**req, replicas=num_hosts - 1)))
      work_unit.add(xm.JobGroup(**jobs))
    return vertex_job

  async def kubernetes_job(work_unit, **_):
    # The optional `xm` extra's Kubernetes executor (its cloud dependencies).
    from xmanager.cloud import kubernetes  # pylint: disable=import-outside-toplevel
    [executable] = work_unit.experiment.package(
        [_container(xm, xm_local.Kubernetes.Spec(), args, extra)])
    host0 = kubernetes.convert_to_valid_label(work_unit.get_full_job_name("host0"))
    jobs = {}
    for i in range(num_hosts):
      env = ({ENV_COORDINATOR: f"{host0}.experiments:{DEFAULT_PORT}",
              ENV_NUM_PROCESSES: str(num_hosts), ENV_PROCESS_ID: str(i)} if num_hosts > 1 else {})
      jobs[f"host{i}"] = xm.Job(
          executable, name=f"host{i}", env_vars=env,
          executor=xm_local.Kubernetes(requirements=xm.JobRequirements(**req)))
    work_unit.add(xm.JobGroup(**jobs))
  return kubernetes_job


# ---- the experiment -------------------------------------------------------------------------------


async def _run_experiment(title: str, executor: str, config: str,
                          units: list[tuple[str, str, dict[str, Any]]],
                          max_parallel: int) -> list[dict[str, Any]]:
  # xmanager is the optional `xm` extra: imported only when a sweep is launched.
  from xmanager import xm_local  # pylint: disable=import-outside-toplevel
  results = []
  try:
    await _add_and_wait(xm_local.create_experiment(experiment_title=title), executor, config,
                        units, max_parallel, results)
  except RuntimeError:
    # On exit xm_local waits for every local job once more and re-raises a failed one's non-zero
    # exit; each unit's outcome is already in `results`.
    if not any(r.get("status") == "failed" for r in results):
      raise
  return results


async def _add_and_wait(experiment, executor: str, config: str,
                        units: list[tuple[str, str, dict[str, Any]]], max_parallel: int,
                        results: list[dict[str, Any]]) -> None:
  async with experiment:
    if executor != "local":  # cloud jobs run on; follow them in the Vertex / GKE console
      for name, workdir, point in units:
        work_unit = await experiment.add(make_job_generator(executor, config, name, workdir, point))
        results.append({"name": name, "workdir": workdir, "overrides": point,
                        "work_unit_id": work_unit.work_unit_id, "status": "submitted"})
      return
    # Local units share this machine's cores and accelerators: run at most max_parallel at once.
    for start in range(0, len(units), max_parallel):
      batch, work_units = units[start:start + max_parallel], []
      for name, workdir, point in batch:
        work_unit = await experiment.add(make_job_generator(executor, config, name, workdir, point))
        work_units.append(work_unit)
        results.append({"name": name, "workdir": workdir, "overrides": point,
                        "work_unit_id": work_unit.work_unit_id})
      outcomes = await asyncio.gather(*(wu.wait_until_complete() for wu in work_units),
                                      return_exceptions=True)
      for r, outcome in zip(results[start:], outcomes):
        failed = isinstance(outcome, BaseException)
        r["status"] = "failed" if failed else "completed"
        if failed:
          r["error"] = str(outcome).splitlines()[0] if str(outcome) else type(outcome).__name__


def run(config: str, workdir_root: str, points: list[dict[str, Any]], *, executor: str = "local",
        experiment_name: str | None = None, sweep_keys: list[str] | None = None,
        max_parallel: int = 1) -> list[dict]:
  """Launches one work unit per point and (local executor) waits for them.

  Args:
    config: "configs/X.py[:arg]" as for launch/main.py.
    workdir_root: parent of the experiment folder (a local path or gs://...).
    points: config overrides per work unit (`expand_sweep`).
    executor: "local", "vertex" or "kubernetes".
    experiment_name: experiment title and folder name.
    sweep_keys: keys that name each unit's folder (default: all keys that vary).
    max_parallel: local executor: work units running at once (they share this machine).

  Returns:
    per unit {"name", "workdir", "overrides", "work_unit_id", "status": "completed" | "failed" |
    "submitted", ["error"]}; also written to WORKDIR_ROOT/EXPERIMENT/xm_status.json.
  """
  config_path = config.partition(":")[0]
  if not os.path.isfile(config_path):
    raise ConfigError(f"--config={config!r}: file {config_path} does not exist")
  if executor == "local":  # absolute, so work units do not depend on their working directory
    config = os.path.abspath(config_path) + config[len(config_path):]
  else:  # the container holds this checkout: the config goes by its path inside it
    inside = os.path.relpath(os.path.abspath(config_path), ROOT)
    if inside.startswith(".."):
      raise ConfigError(f"--config={config_path}: cloud work units run this checkout in a "
                        f"container; the config must lie inside {ROOT}")
    if not is_remote(workdir_root):
      raise ConfigError(f"--workdir_root={workdir_root}: cloud work units need shared storage "
                        "such as gs://BUCKET/DIR")
    config = inside + config[len(config_path):]
  stem = os.path.splitext(os.path.basename(config_path))[0]
  title = experiment_name or f"{stem}_{time.strftime('%Y%m%d_%H%M%S')}"
  if sweep_keys is None:
    keys = list(dict.fromkeys(k for p in points for k in p))
    sweep_keys = [k for k in keys if len({repr(p.get(k)) for p in points}) > 1]
  exp_dir = epath.Path(workdir_root) / title
  exp_dir.mkdir(parents=True, exist_ok=True)
  units = []
  for i, point in enumerate(points):
    name = point_name(i, point, sweep_keys)
    units.append((name, os.fspath(exp_dir / name), point))
  if max_parallel <= 0:
    raise ConfigError(f"--max_parallel={max_parallel} must be positive")
  results = asyncio.run(_run_experiment(title, executor, config, units, max_parallel))
  (exp_dir / "xm_status.json").write_text(json.dumps(results, indent=1, default=str))
  return results


def _main(argv) -> None:
  logging.set_verbosity(logging.WARNING)  # xmanager's database migrations log at INFO
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not _CONFIG.value or not _WORKDIR_ROOT.value:
    raise app.UsageError("--config and --workdir_root are required")
  try:
    file_points = load_sweep_file(_SWEEP_FILE.value) if _SWEEP_FILE.value else None
    points = expand_sweep(_SET.value, _SWEEP.value, file_points)
    try:
      # Only to say in one line that the optional `xm` extra is missing.
      import xmanager  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    except ImportError:
      raise ConfigError("launch/xm_launch.py needs the `xm` extra: pip install -e '.[xm]'") from None
    results = run(_CONFIG.value, _WORKDIR_ROOT.value, points, executor=_EXECUTOR.value,
                  experiment_name=_NAME.value, max_parallel=_MAX_PARALLEL.value)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(1)
  print(f"{len(results)} work unit(s):", flush=True)
  for r in results:
    detail = f" ({r['error']})" if r.get("error") else ""
    print(f"  [{r['status']}] {r['name']}: {r['workdir']}{detail}", flush=True)
  if any(r["status"] == "failed" for r in results):
    sys.exit(1)


if __name__ == "__main__":
  # Flags are defined only when this file runs as a program, so importing its functions (tests,
  # other tools) claims no flag names that other programs in the same process define.
  _CONFIG = flags.DEFINE_string("config", None, "Config file and optional argument, e.g. "
                                "configs/sid2_digits.py:runlocal (as for launch/main.py).")
  _WORKDIR_ROOT = flags.DEFINE_string("workdir_root", None, "Work units write to "
                                      "WORKDIR_ROOT/EXPERIMENT/NN_POINT (local path or gs://).")
  _NAME = flags.DEFINE_string("experiment_name", None, "Experiment title and folder (default: config "
                              "name and time).")
  _SET = flags.DEFINE_multi_string("set", [], "KEY=VALUE config override applied to every work unit.")
  _SWEEP = flags.DEFINE_multi_string("sweep", [], "KEY=V1,V2,... one sweep axis (cartesian product).")
  _SWEEP_FILE = flags.DEFINE_string("sweep_file", None, "Python file with get_sweep(arg=None) -> "
                                    "list of {key: value} dicts; FILE[:arg].")
  _EXECUTOR = flags.DEFINE_enum("executor", "local", EXECUTORS, "Where the work units run.")
  _ACCEL = flags.DEFINE_enum("accelerator", None, GPUS + TPUS, "vertex/kubernetes: accelerator type.")
  _ACCEL_COUNT = flags.DEFINE_integer("accelerator_count", 1, "vertex/kubernetes: accelerators per "
                                      "host (GPUs, or TPU chips for tpu_v2/v3 on Vertex).")
  _NUM_HOSTS = flags.DEFINE_integer("num_hosts", 1, "vertex/kubernetes: hosts per work unit; > 1 "
                                    "starts jax.distributed (launch/main.py --distributed).")
  _CPU = flags.DEFINE_integer("cpu", None, "vertex/kubernetes: vCPUs per host.")
  _RAM_GIB = flags.DEFINE_integer("ram_gib", None, "vertex/kubernetes: RAM per host in GiB.")
  _BASE_IMAGE = flags.DEFINE_string("base_image", "python:3.12-slim", "vertex/kubernetes: docker "
                                    "base image (jax's CUDA and TPU wheels bring their own runtimes).")
  _MAX_PARALLEL = flags.DEFINE_integer("max_parallel", 1, "local: work units running at once (they "
                                      "share this machine's cores and accelerators).")
  _EXTRA_ARGS = flags.DEFINE_multi_string("main_arg", [], "Extra launch/main.py flag for every unit, "
                                          "e.g. --main_arg=--mode=train.")
  app.run(_main)
