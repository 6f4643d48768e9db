"""One device mesh with named axes (data, fsdp, tensor, expert) and logical-axis rules.

Parameters carry logical axis names (docs/DESIGN.md); `config.mesh.rules` maps each logical name to
mesh axes. A dimension whose size is not divisible by the product of its mesh axes is replicated, so
the same model runs on 1 CPU, 8 simulated devices, one GPU or a TPU pod.
"""

from collections.abc import Sequence
import math

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np

from common.errors import ConfigError

AXES = ("data", "fsdp", "tensor", "expert")   # expert: mixture-of-experts weights (MicroDiT)


def make_mesh(cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor, expert) mesh; an axis of size -1 takes the remaining devices
  (a missing axis has size 1)."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [int(cfg.get(a, 1)) for a in AXES]
  if sizes.count(-1) > 1:
    raise ConfigError(f"mesh: at most one axis may be -1, got {dict(zip(AXES, sizes))}.")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ConfigError(f"mesh: {len(devices)} devices are not divisible by {known} "
                        f"(mesh {dict(zip(AXES, sizes))}).")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ConfigError(f"mesh {dict(zip(AXES, sizes))} needs {math.prod(sizes)} devices, "
                      f"{len(devices)} are available.")
  return jax.make_mesh(tuple(sizes), AXES, axis_types=(AxisType.Auto,) * len(AXES),
                       devices=devices)


def _rules_dict(rules) -> dict:
  out = {}
  for logical, mesh_axes in rules:
    out[logical] = mesh_axes
  return out


def logical_to_mesh_spec(logical: P | Sequence | None, shape: Sequence[int], mesh: Mesh,
                         rules) -> P:
  """Maps a PartitionSpec of logical names to one of mesh axes for an array of `shape`.

  Unknown logical names and dimensions not divisible by their mesh axes are replicated; a mesh axis
  is used at most once per array.
  """
  rules = _rules_dict(rules)
  logical = tuple(logical) if logical is not None else ()
  logical = logical + (None,) * (len(shape) - len(logical))
  used, out = set(), []
  for name, dim in zip(logical, shape):
    axes = rules.get(name) if name is not None else None
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes or dim % size:
      out.append(None)
      continue
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out)


def tree_shardings(abstract_tree, logical_specs, mesh: Mesh, rules):
  """NamedShardings for a tree of arrays (or ShapeDtypeStructs) given a matching tree of logical specs."""
  return jax.tree.map(
      lambda x, spec: NamedSharding(mesh, logical_to_mesh_spec(spec, x.shape, mesh, rules)),
      abstract_tree, logical_specs, is_leaf=lambda x: isinstance(x, P))


def batch_sharding(mesh: Mesh, rules, ndim: int = 1) -> NamedSharding:
  """Sharding of a batch: the leading axis over the mesh axes of the logical 'batch' axis."""
  axes = _rules_dict(rules).get("batch", ("data", "fsdp"))
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return NamedSharding(mesh, P(axes, *([None] * (ndim - 1))))


def global_batch(local_batch: dict, mesh: Mesh, rules) -> dict:
  """Assembles per-process numpy batches into global jax.Arrays sharded along the batch axes."""
  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(batch_sharding(mesh, rules, x.ndim), x)
  return jax.tree.map(put, local_batch)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
