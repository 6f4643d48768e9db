"""One device mesh with named axes (data, fsdp, tensor, expert), logical-axis rules, and declared
placement.

Parameters carry logical axis names (docs/DESIGN.md); `config.mesh.rules` maps each logical name to
mesh axes. A dimension whose size is not divisible by the product of its mesh axes is a ConfigError
naming the parameter, the dimension and the axes, unless the parameter's path matches one of
`config.mesh.replicated` (regexes, `re.fullmatch`): those parameters are replicated on purpose
(e.g. an output projection to 1 or 3 image channels). Mesh axes of size 1 shard nothing, so every
config runs on one device.

Train-state placement is declared, never guessed from shapes (`state_partition`): parameters, EMA
and the optimizer-state leaves that are copies of a parameter (AdamW's m and v) take the
parameter's spec; an optimizer-state object at a parameter's place that is not a copy declares its
own specs by a method

    partition_specs(self, param_spec: PartitionSpec) -> same pytree as self, of PartitionSpecs

(e.g. COAT's FP8 groups `[n_groups, 128]`, sharded over the parameter's mesh axes along the group
axis); optimizer-state leaves not at a parameter's place (step counts) are replicated. Optimizer
factories that take a `placement` keyword argument receive the parameters' `ParamPlacement`, so an
optimizer can lay its state out per shard.
"""

from collections.abc import Sequence
import dataclasses
import math
import re

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from common.errors import ConfigError
# A key path as "blocks/3/attn/qkv/kernel" (the numerics rules' path format).
from common.weights.tree_names import key_path_str as path_str

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
                         rules, *, path: str = "", replicate: bool = False) -> P:
  """Maps a PartitionSpec of logical names to one of mesh axes for an array of `shape`.

  Unknown logical names are replicated; a mesh axis is used at most once per array (a later
  dimension naming an axis already used is replicated); mesh axes of size 1 are dropped.

  Args:
    logical: logical axis names, one per leading dimension (missing trailing ones: None).
    shape: the array's shape.
    mesh: the mesh (only `mesh.shape` is read).
    rules: (logical name, mesh axes) pairs (`config.mesh.rules`).
    path: the parameter's path, for error messages.
    replicate: replicate the array whatever its names say (`config.mesh.replicated`).

  Raises:
    ConfigError: a dimension is not divisible by the product of the sizes of its mesh axes.
  """
  logical = tuple(logical) if logical is not None else ()
  if replicate:
    return P(*([None] * len(shape)))
  rules = _rules_dict(rules)
  logical = logical + (None,) * (len(shape) - len(logical))
  used, out = set(), []
  for i, (name, dim) in enumerate(zip(logical, shape)):
    axes = rules.get(name) if name is not None else None
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a not in used and mesh.shape[a] > 1)
    size = math.prod(mesh.shape[a] for a in axes)
    if not axes:
      out.append(None)
      continue
    if dim % size:
      raise ConfigError(
          f"parameter {path or '?'} {tuple(shape)}: dimension {i} ({name!r}, size {dim}) is not "
          f"divisible by mesh axes {axes} of size {size}; change config.mesh or the model, or "
          "replicate the parameter on purpose with a regex in config.mesh.replicated.")
    used.update(axes)
    out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out)


def _compile_patterns(patterns) -> list[re.Pattern]:
  out = []
  for p in patterns or ():
    try:
      out.append(re.compile(p))
    except (re.error, TypeError) as e:
      raise ConfigError(f"config.mesh.replicated: {p!r} is not a regex ({e}).") from e
  return out


def tree_shardings(abstract_tree, logical_specs, mesh: Mesh, rules, replicated: Sequence[str] = ()):
  """NamedShardings for a tree of arrays (or ShapeDtypeStructs) given a matching tree of logical
  specs; leaves whose path ("a/b/kernel") fully matches a regex of `replicated` are replicated."""
  patterns = _compile_patterns(replicated)
  used = [False] * len(patterns)

  def one(keypath, x, spec):
    path = path_str(keypath)
    hits = [i for i, p in enumerate(patterns) if p.fullmatch(path)]
    for i in hits:
      used[i] = True
    return NamedSharding(mesh, logical_to_mesh_spec(spec, x.shape, mesh, rules, path=path,
                                                    replicate=bool(hits)))

  specs = jax.tree.leaves(logical_specs, is_leaf=lambda x: isinstance(x, P) or x is None)
  flat, treedef = jax.tree_util.tree_flatten_with_path(abstract_tree)
  if len(specs) != len(flat):
    raise ValueError(f"{len(flat)} arrays but {len(specs)} logical specs")
  out = treedef.unflatten([one(kp, x, s) for (kp, x), s in zip(flat, specs)])
  unused = [p.pattern for p, u in zip(patterns, used) if not u]
  if unused:
    raise ConfigError(f"config.mesh.replicated: {unused} match no parameter path.")
  return out


@dataclasses.dataclass(frozen=True)
class ParamPlacement:
  """Where each parameter lives: its mesh-axis PartitionSpec by path ("blocks/0/attn/qkv/kernel").

  Given to optimizer factories that take a `placement` argument, so they can lay out their state
  per shard (`shards_per_dim`) and declare its placement.

  Attributes:
    mesh: the device mesh.
    specs: {parameter path: PartitionSpec of mesh axes (one entry per dimension)}.
  """
  mesh: Mesh
  specs: dict

  @classmethod
  def from_shardings(cls, mesh: Mesh, param_shardings) -> "ParamPlacement":
    flat = jax.tree_util.tree_flatten_with_path(param_shardings)[0]
    return cls(mesh, {path_str(kp): s.spec for kp, s in flat})

  def spec(self, path: str) -> P:
    try:
      return self.specs[path]
    except KeyError:
      raise ConfigError(f"no parameter {path!r} in the placement (known: "
                        f"{sorted(self.specs)[:8]}...)") from None

  def shards_per_dim(self, path: str, ndim: int) -> tuple[int, ...]:
    """Number of shards of each of the parameter's `ndim` dimensions (1: not sharded)."""
    spec = tuple(self.spec(path)) + (None,) * ndim
    out = []
    for axes in spec[:ndim]:
      axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
      out.append(math.prod(self.mesh.shape[a] for a in axes))
    return tuple(out)


def spec_axes(spec: P) -> tuple[str, ...]:
  """The mesh axes a PartitionSpec uses, in dimension order: P("fsdp", ("x", "y")) -> (fsdp, x, y)."""
  out = []
  for axes in tuple(spec):
    if axes is None:
      continue
    out.extend((axes,) if isinstance(axes, str) else axes)
  return tuple(out)


def _is_array(x) -> bool:
  return isinstance(x, (jax.ShapeDtypeStruct, jax.Array, np.ndarray))


def state_partition(tx: optax.GradientTransformation, abstract_opt_state, abstract_params,
                    param_specs, path_prefix: str = "opt_state"):
  """Declared PartitionSpecs (mesh axes) of every leaf of an optimizer state.

  Which subtrees of the state sit at a parameter's place is found by `optax.tree_map_params` from
  the optimizer's own state structure (by path, not by shape). There, an object with a
  `partition_specs(param_spec)` method declares its specs; an array of the parameter's shape is a
  copy of it and takes its spec; anything else is a ConfigError (its placement is unknown).
  Leaves elsewhere (counts, schedules' states) are replicated.

  Args:
    tx: the optimizer.
    abstract_opt_state: `tx.init` of the parameters, abstract (`jax.eval_shape`).
    abstract_params: the parameters (ShapeDtypeStructs).
    param_specs: a tree like the parameters of mesh-axis PartitionSpecs.
    path_prefix: the state's name in error messages.

  Returns:
    A tree like `abstract_opt_state` of PartitionSpecs.
  """
  params_flat, params_def = jax.tree_util.tree_flatten_with_path(abstract_params)
  paths = params_def.unflatten([path_str(kp) for kp, _ in params_flat])

  def at_param(value, spec, param, path):
    if isinstance(value, optax.MaskedNode):  # optax.masked: no state for this parameter
      return value
    declare = getattr(value, "partition_specs", None)
    if callable(declare):
      return declare(spec)
    if _is_array(value) and tuple(value.shape) == tuple(param.shape):
      return spec
    if _is_array(value) and value.ndim == 0:
      return P()

    def bad(x):
      raise ConfigError(
          f"{path_prefix}: the optimizer state at parameter {path} {tuple(param.shape)} holds a "
          f"{type(x).__name__} {getattr(x, 'shape', '')} that is neither a copy of the parameter "
          "nor declares its placement (a partition_specs(param_spec) method).")
    return jax.tree.map(bad, value)

  def replicated_tree(value):
    return jax.tree.map(lambda _: P(), value)

  return optax.tree_map_params(
      tx, at_param, abstract_opt_state, param_specs, abstract_params, paths,
      transform_non_params=replicated_tree,
      is_leaf=lambda x: (not isinstance(x, (dict, list, tuple)) or isinstance(x, P)
                         or isinstance(x, optax.MaskedNode)))


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
