"""Multi-host start-up: `jax.distributed.initialize` from flags, our environment variables, or the cluster.

Where the three settings (coordinator address, number of processes, this process's id) come from, in
order of precedence:

1. explicit values (`launch/main.py --coordinator_address=HOST:PORT --num_processes=N --process_id=I`);
2. the environment variables `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` (what
   `launch/xm_launch.py` sets for Kubernetes jobs, and what any scheduler can export);
3. Vertex AI's `CLUSTER_SPEC` (multi-replica custom jobs: the primary replica, `workerpool0`, is the
   coordinator);
4. jax's own cluster detection for whatever is still unset: Cloud TPU VMs and pod slices (the TPU
   metadata server), SLURM (`SLURM_*`), Open MPI (`OMPI_*`), Kubernetes indexed Jobs / JobSets.

Whatever fails (nothing detected, a coordinator that never answers) raises `DistributedError` with one
line saying what was tried and which flags or variables to set.
"""

from __future__ import annotations

import json
import os

import jax

from common.errors import UserError

ENV_COORDINATOR = "JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "JAX_PROCESS_ID"
DEFAULT_PORT = 8476  # the port jax's own cluster detection uses for the coordinator


class DistributedError(UserError):
  """The multi-host runtime could not be started."""


def _int_or_none(value, name: str) -> int | None:
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise DistributedError(f"{name}={value!r} is not an integer") from None


def vertex_cluster_spec(env=None) -> tuple[str, int, int] | None:
  """(coordinator "host:port", num_processes, process_id) from Vertex AI's CLUSTER_SPEC, if set.

  CLUSTER_SPEC is JSON: `{"cluster": {"workerpool0": ["host:port"], "workerpool1": [...], ...},
  "task": {"type": "workerpoolK", "index": i}}`. Processes are numbered pool by pool (workerpool0's
  single primary replica is process 0, the coordinator).
  """
  env = os.environ if env is None else env
  raw = env.get("CLUSTER_SPEC")
  if not raw:
    return None
  try:
    spec = json.loads(raw)
    pools = spec["cluster"]
    names = sorted(pools, key=lambda n: int(n.removeprefix("workerpool")))
    task = spec["task"]
    offset = 0
    for name in names:
      if name == task["type"]:
        process_id = offset + int(task["index"])
        break
      offset += len(pools[name])
    else:
      raise KeyError(task["type"])
    num = sum(len(pools[n]) for n in names)
    host = pools[names[0]][0].rsplit(":", 1)[0]
  except (ValueError, KeyError, TypeError, IndexError) as e:
    raise DistributedError(f"cannot read Vertex AI's CLUSTER_SPEC ({type(e).__name__}: {e}): "
                           f"{raw[:200]}") from None
  return f"{host}:{DEFAULT_PORT}", num, process_id


def resolve(coordinator_address: str | None = None, num_processes: int | None = None,
            process_id: int | None = None, env=None) -> tuple[str | None, int | None, int | None]:
  """The settings from arguments, then our environment variables, then Vertex's CLUSTER_SPEC.

  Returns:
    (coordinator_address, num_processes, process_id); any may be None, left to jax's detection.
  """
  env = os.environ if env is None else env
  coord = coordinator_address or env.get(ENV_COORDINATOR) or None
  num = num_processes if num_processes is not None else _int_or_none(
      env.get(ENV_NUM_PROCESSES), ENV_NUM_PROCESSES)
  pid = process_id if process_id is not None else _int_or_none(
      env.get(ENV_PROCESS_ID), ENV_PROCESS_ID)
  if None in (coord, num, pid):
    vertex = vertex_cluster_spec(env)
    if vertex is not None:
      coord = coord or vertex[0]
      num = vertex[1] if num is None else num
      pid = vertex[2] if pid is None else pid
  if num is not None and num <= 0:
    raise DistributedError(f"the number of processes must be positive, got {num}")
  if pid is not None and num is not None and not 0 <= pid < num:
    raise DistributedError(f"process id {pid} is not in [0, {num}) (num_processes={num})")
  return coord, num, pid


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, timeout_s: int = 300) -> tuple[int, int]:
  """Starts jax's multi-process runtime; call before any other jax call.

  Args:
    coordinator_address: "host:port" of process 0's coordinator service.
    num_processes: processes in the job (one per host on TPU pods and usually per node on GPUs).
    process_id: this process's id in [0, num_processes).
    timeout_s: seconds to wait for all processes to connect.

  Returns:
    (jax.process_index(), jax.process_count()).
  """
  coord, num, pid = resolve(coordinator_address, num_processes, process_id)
  try:
    jax.distributed.initialize(coordinator_address=coord, num_processes=num, process_id=pid,
                               initialization_timeout=int(timeout_s))
  except Exception as e:  # jax raises ValueError/RuntimeError/XlaRuntimeError; all end here
    first = (str(e).strip().splitlines() or [""])[0]
    raise DistributedError(
        f"--distributed: cannot start jax.distributed ({type(e).__name__}: {first}) with "
        f"coordinator={coord!r}, num_processes={num}, process_id={pid}. On a TPU pod slice, SLURM, "
        "Kubernetes (indexed Job/JobSet) or Vertex AI they are detected; elsewhere pass "
        "--coordinator_address=HOST:PORT --num_processes=N --process_id=I (or set "
        f"{ENV_COORDINATOR}, {ENV_NUM_PROCESSES}, {ENV_PROCESS_ID}).") from None
  return jax.process_index(), jax.process_count()
