"""The device a computation is being traced for: every kernel and implementation choice asks here.

On a machine with an accelerator that is `jax.devices()[0]`. When a step is compiled ahead of time
for hardware this machine does not have (`--mode=compile --target=v5p-8` on a CPU: the mesh is made
of `jax.experimental.topologies` devices), `jax.default_backend()` still says "cpu" and would pick
the CPU answer (jnp paths, Pallas interpret mode). Inside `compiling_for(mesh)` the target is the
mesh's devices instead:

    with target.compiling_for(mesh):
      compiled = jax.jit(step).lower(*abstract_args).compile()

It also enters `jax.sharding.use_abstract_mesh(mesh.abstract_mesh)`, which Pallas' Triton lowering
needs to lower for a GPU it cannot see, and which is part of jax's tracing-cache key, so a function
traced for the CPU is never reused for the target.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Iterator

import jax

_DEVICE: contextvars.ContextVar[Any] = contextvars.ContextVar("kernels_target_device", default=None)


@contextlib.contextmanager
def compiling_for(mesh: jax.sharding.Mesh) -> Iterator[None]:
  """Makes `mesh`'s devices the target of every choice made while tracing in this block."""
  token = _DEVICE.set(mesh.devices.flat[0])
  try:
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      yield
  finally:
    _DEVICE.reset(token)


def device() -> Any:
  """The target device: the `compiling_for` mesh's first device, else `jax.devices()[0]`."""
  d = _DEVICE.get()
  return d if d is not None else jax.devices()[0]


def platform() -> str:
  """"tpu", "gpu" (CUDA or ROCm) or "cpu" for the target device."""
  p = str(device().platform).lower()
  return "gpu" if p in ("gpu", "cuda", "rocm") else p


def device_count() -> int:
  """Devices the traced computation runs on: the `compiling_for` mesh's size, else
  `jax.device_count()`."""
  if _DEVICE.get() is not None:
    return int(jax.sharding.get_abstract_mesh().size)
  return jax.device_count()


def is_rocm() -> bool:
  """Whether the target is an AMD GPU."""
  if platform() != "gpu":
    return False
  d = device()
  version = str(getattr(getattr(d, "client", None), "platform_version", "")).lower()
  return "rocm" in version or str(d.platform).lower() == "rocm"


def cuda_capability() -> tuple[int, int] | None:
  """(major, minor) of the target CUDA device; None for other platforms or when unknown."""
  if platform() != "gpu":
    return None
  cc = getattr(device(), "compute_capability", None)
  if not cc:
    return None
  try:
    major, minor = str(cc).split(".")[:2]
    return int(major), int(minor)
  except ValueError:
    return None
