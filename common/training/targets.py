"""Hardware to compile for without having it: Cloud TPU slices and NVIDIA GPU nodes as XLA devices.

`parse_target(name)` turns an accelerator name into the devices of `jax.experimental.topologies`,
which XLA compiles for on a CPU-only machine (MaxText's `train_compile` does the same for TPUs):

* Cloud TPU accelerator types: `v4-8`, `v5p-8`, `v5p-128`, `v5litepod-4` (= `v5e-4`), `v6e-4`, ...;
  several slices as `2xv5p-128`. v4 and v5p count TensorCores (two per chip, one device per chip
  in megacore mode); v5e and v6e count chips. Needs `libtpu` (the `compile` extra).
* GPU nodes `NxMODEL` (`1xh100`, `8xh100`, `8xh200`, `8xb200`, `8xa100`) and several nodes as
  `HxNxMODEL` (`4x8xh100`). XLA's own description of each GPU (a `stream_executor.GpuTargetConfigProto`,
  shipped inside the CUDA plugin's shared library) is read from the installed plugin. Needs
  `jax-cuda13-plugin` (the `compile` extra) and `JAX_PLATFORMS=cpu` on a machine without a GPU.

Each target also carries what the step-time and cost estimates need: usable memory per device
(TPU: what the compiler reports as available HBM; GPU: the spec's device memory), the dense bf16
peak per device (the MFU denominator) and an on-demand price per device-hour (an assumption, to be
overridden with the user's own price).
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import importlib.util
import math
import mmap
import os
import re
from typing import Any

from jax.experimental import topologies


from common.errors import ConfigError

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Generation:
  """One TPU generation: how its accelerator types map to a topology, and its per-chip figures."""
  topology_prefix: str      # jax.experimental.topologies' name: "v5" for v5p
  megacore: bool            # accelerator type counts TensorCores (2 per chip), one device a chip
  dims: int                 # 3D torus (v4, v5p) or 2D (v5e, v6e)
  hbm_bytes: int            # HBM available to a program per chip, as the compiler reports it
  peak_flops: float         # dense bf16 FLOP/s per chip
  price: float              # USD per chip-hour, on demand (assumption)


# HBM: the "available HBM" of XLA's CompileTimeHbmOom message for each chip (libtpu 0.0.50).
# Peaks and prices: Cloud TPU system-architecture and pricing pages (bf16, on demand, us-central).
TPU_GENERATIONS = {
    "v4": Generation("v4", True, 3, int(30.75 * GiB), 275e12, 3.22),
    "v5p": Generation("v5", True, 3, int(95.73 * GiB), 459e12, 4.20),
    "v5e": Generation("v5e", False, 2, int(15.75 * GiB), 197e12, 1.20),
    "v6e": Generation("v6e", False, 2, int(31.24 * GiB), 918e12, 2.70),
}
_TPU_ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class GpuModel:
  """One GPU model: XLA's name for its spec, dense bf16 peak and price."""
  description: str          # device_description_str of XLA's GpuTargetConfigProto
  peak_flops: float         # dense bf16 FLOP/s (NVIDIA datasheets; SXM parts)
  price: float              # USD per GPU-hour (assumption)


# H100 price: MicroDiT's reported $1,890 for 2.6 days on 8 H100s (arXiv 2407.15811) is $3.79 a
# GPU-hour; the others are scaled from typical on-demand cloud prices (assumptions).
GPU_MODELS = {
    "h100": GpuModel("NVIDIA H100 80GB HBM3", 989.4e12, 3.79),
    "h200": GpuModel("NVIDIA H200 141GB HBM3e", 989.4e12, 4.50),
    "b200": GpuModel("NVIDIA B200", 2250e12, 6.50),
    "a100": GpuModel("NVIDIA A100-SXM4-80GB", 312e12, 2.00),
}


@dataclasses.dataclass(frozen=True)
class Target:
  """Devices to compile for, with the figures the estimates use.

  Attributes:
    name: the accelerator name as normalised ("v5p-8", "2xv5p-128", "8xh100", "4x8xh100").
    platform: "tpu" or "gpu".
    devices: the topology's devices (what a `Mesh` is built from).
    device_kind: e.g. "TPU v5", "NVIDIA H100 80GB HBM3".
    hbm_bytes: memory a program may use per device.
    peak_flops: dense bf16 FLOP/s per device.
    price_per_device_hour: USD (an assumption; see the module docstring).
  """
  name: str
  platform: str
  devices: tuple[Any, ...]
  device_kind: str
  hbm_bytes: int
  peak_flops: float
  price_per_device_hour: float

  @property
  def num_devices(self) -> int:
    return len(self.devices)


def _torus(chips: int, dims: int) -> tuple[int, ...]:
  """The slice shape of `chips` chips, as Cloud TPU lays them out: 2x2(x1) first, then the
  smallest side doubles, the last such side first (v5p-128: 4x4x4, v5e-32: 4x8)."""
  if chips == 1:
    return (1,) * dims
  shape = [2, 2] + [1] * (dims - 2)
  while math.prod(shape) < chips:
    i = max(j for j in range(dims) if shape[j] == min(shape))
    shape[i] *= 2
  return tuple(shape)


def _tpu_target(name: str, slices: int) -> Target:
  m = re.fullmatch(r"(v\d+[a-z]*)-(\d+)", name)
  if not m:
    raise ConfigError(f"--target={name!r}: not a Cloud TPU accelerator type (e.g. v5p-8, v4-8, "
                      "v5litepod-4, v6e-4, 2xv5p-128).")
  gen_name = _TPU_ALIASES.get(m.group(1), m.group(1))
  gen = TPU_GENERATIONS.get(gen_name)
  if gen is None:
    raise ConfigError(f"--target={name!r}: unknown TPU generation {m.group(1)!r}; known: "
                      f"{sorted(TPU_GENERATIONS) + sorted(_TPU_ALIASES)}.")
  count = int(m.group(2))
  chips = count // 2 if gen.megacore else count
  if chips < 1 or chips & (chips - 1) or (gen.megacore and count % 2):
    raise ConfigError(f"--target={name!r}: {count} is not a slice size of {gen_name} (a power of "
                      f"two{' of TensorCores, 2 per chip' if gen.megacore else ' of chips'}).")
  shape = _torus(chips, gen.dims)
  bounds = (1, 1, 1) if chips == 1 else (2, 2, 1)
  # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) so that one process owns the TPU; a
  # compile-only client owns none, and a second compiling process would be refused without this.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    topo = topologies.get_topology_desc(
        topology_name=f"{gen.topology_prefix}:{'x'.join(map(str, shape))}", platform="tpu",
        chip_config_name="megacore" if gen.megacore else "default", chips_per_host_bounds=bounds,
        num_slices=slices)
  except Exception as e:  # pylint: disable=broad-except  # libtpu missing or refusing the topology
    raise ConfigError(f"--target={name}: cannot describe the TPU topology ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}); install the compile extra: "
                      "pip install -e '.[compile]'.") from e
  devices = tuple(topo.devices)
  return Target(name=(f"{slices}x" if slices > 1 else "") + name, platform="tpu", devices=devices,
                device_kind=devices[0].device_kind, hbm_bytes=gen.hbm_bytes,
                peak_flops=gen.peak_flops, price_per_device_hour=gen.price)


@functools.cache
def _plugin_library() -> str:
  """Path of the installed CUDA PJRT plugin's shared library."""
  for package in ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12"):
    try:
      spec = importlib.util.find_spec(package)
    except ImportError:
      spec = None
    if spec is not None and spec.submodule_search_locations:
      for folder in spec.submodule_search_locations:
        found = glob.glob(os.path.join(folder, "xla_cuda_plugin.so"))
        if found:
          return found[0]
  raise ConfigError("compiling for a GPU target needs the CUDA plugin: pip install -e "
                    "'.[compile]' (jax-cuda13-plugin; set JAX_PLATFORMS=cpu on a machine "
                    "without a GPU).")


@functools.cache
def gpu_spec(description: str) -> str:
  """XLA's GpuTargetConfigProto (text format) of the GPU named `description`, read from the
  installed CUDA plugin, where XLA keeps its spec files as text."""
  path = _plugin_library()
  key = f'device_description_str: "{description}"'.encode()
  with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
    end = blob.find(key)
    if end < 0:
      raise ConfigError(f"the CUDA plugin at {path} has no GPU spec named {description!r}.")
    start = blob.rfind(b"\0", 0, end) + 1
    text = blob[start:blob.find(b"\0", end)].decode("utf-8", errors="strict")
  if "gpu_device_info" not in text:
    raise ConfigError(f"the GPU spec of {description!r} in {path} is not a GpuTargetConfigProto.")
  return text


def _gpu_target(name: str) -> Target:
  m = re.fullmatch(r"(?:(\d+)x)?(\d+)x([a-z0-9]+)", name)
  if not m or m.group(3) not in GPU_MODELS:
    raise ConfigError(f"--target={name!r}: not a GPU node (NxMODEL or HOSTSxNxMODEL with MODEL in "
                      f"{sorted(GPU_MODELS)}, e.g. 8xh100, 4x8xh100).")
  hosts, per_host, model = int(m.group(1) or 1), int(m.group(2)), GPU_MODELS[m.group(3)]
  if hosts < 1 or per_host < 1:
    raise ConfigError(f"--target={name!r}: hosts and GPUs per host must be >= 1.")
  spec = gpu_spec(model.description)
  memory = re.search(r"device_memory_size:\s*(\d+)", spec)
  try:
    topo = topologies.get_topology_desc(platform="cuda", topology=f"1x{hosts}x{per_host}",
                                        target_config=spec)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"--target={name}: cannot describe the GPU topology ({type(e).__name__}: "
                      f"{str(e).splitlines()[0] if str(e) else ''}).") from e
  devices = tuple(topo.devices)
  return Target(name=name, platform="gpu", devices=devices, device_kind=devices[0].device_kind,
                hbm_bytes=int(memory.group(1)), peak_flops=model.peak_flops,
                price_per_device_hour=model.price)


def parse_target(name: str) -> Target:
  """The `Target` of an accelerator name (module docstring); ConfigError for anything else."""
  name = str(name).strip().lower()
  m = re.fullmatch(r"(\d+)x(v\d.*)", name)
  if m:
    return _tpu_target(m.group(2), int(m.group(1)))
  if name.startswith("v"):
    return _tpu_target(name, 1)
  return _gpu_target(name)
