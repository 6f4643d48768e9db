"""FP8 AdamW with Dynamic Range Expansion (COAT, arXiv 2410.19313, Sec. 4).

`fp8_adamw` is a `common.training.optim.FusedGradientTransformation` (an `optax.GradientTransformation`):
the first and second moments live as float8_e4m3fn groups of 128 with fp32 (scale, k, c) per
group (`coat.fp8.QuantizedGroups`), 2 + 24/128 = 2.1875 bytes per parameter instead of 8 for fp32 AdamW; parameters and gradients stay
fp32. Each step: dequantize m and v, fp32 AdamW with COAT's bias correction

  denom = (sqrt(v) / sqrt(1 - b2^t) + eps) (1 - b1^t),   u = -lr (m / denom + wd p),

then requantize m and v per group. `update` returns `u` (= new_p - p), as optax expects; `apply`
(used by `common.training.optim.apply_gradients`, so by the trainer) returns the new parameters, written by
the fused kernel into the donated parameter buffers. Weight decay is decoupled and multiplied by the
learning rate (AdamW, as `optax.adamw`). Global-norm clipping passes its scale into the step.

Non-finite gradients: if any gradient element of the tree is NaN or inf (`skip_nonfinite=True`, the
default) the whole step is skipped: zero updates, and the state (count included) is returned
unchanged, like `optax.apply_if_finite`. Independently of that flag, a group whose new m, v or
update would not be finite (e.g. a finite gradient whose square overflows fp32) keeps its old state
and gets a zero update, so the state never holds NaN or inf.

Sharding: groups never straddle shards. Under the trainer, `placement` (the parameters'
`common.training.sharding.ParamPlacement`, which `common.training.optim.make_optimizer` passes to factories that take
it) cuts each parameter's groups per device shard (`coat.fp8.shard_grid`) and the groups declare
their placement (`QuantizedGroups.partition_specs`): the group axis sharded over the parameter's
mesh axes, so each device holds 2.1875 bytes per parameter of its own shard. Without a placement,
`num_shards` (an int, or a function of a parameter's shape returning an int) splits each parameter
along its leading axis into that many blocks; a parameter whose leading axis is not divisible, or a
scalar, uses one block.

Fused kernel: `impl="auto"` runs the Pallas kernel on TPU and on CUDA GPUs of compute capability
>= 8.9 (the jnp path on CPU and older GPUs); on a mesh of several devices each device runs it on
its own groups (`jax.shard_map` over the placement's mesh; without a placement the jnp path is used
there). With `apply` under a jit that donates the parameters and the state, the kernel writes the
new parameters and moments into their buffers (`input_output_aliases`).
"""

from __future__ import annotations

from collections.abc import Callable
import logging
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from coat import fp8
from jax.sharding import PartitionSpec as P

from common import registry
from common.errors import ConfigError
from common.training.optim import FusedGradientTransformation
from common.training.sharding import ParamPlacement, path_str
from kernels import fp8_adamw as fused
from kernels import target


class Fp8AdamWState(NamedTuple):
  """State of `fp8_adamw`.

  Attributes:
    count: int32 [], the number of steps taken (skipped steps excluded).
    mu: pytree like the params of `coat.fp8.QuantizedGroups`, the first moment.
    nu: same, the second moment.
  """
  count: jax.Array
  mu: Any
  nu: Any


def _num_shards_for(num_shards: int | Callable[[tuple[int, ...]], int], shape) -> int:
  n = num_shards(tuple(shape)) if callable(num_shards) else num_shards
  n = int(n)
  if n < 1:
    raise ValueError(f"num_shards must be >= 1, got {n}")
  if n > 1 and (len(shape) == 0 or shape[0] % n):
    return 1
  return n


def resolve_impl(impl: str, interpret: bool = False, sharded: bool = False) -> str:
  """"auto" -> "pallas" on TPU or on CUDA GPUs of compute capability >= 8.9, "jnp" elsewhere (CPU;
  older GPUs, with a warning; several devices without a placement (`sharded=False`), where XLA
  would gather sharded parameters around the kernel). "pallas" on a device the kernel does not
  support raises ConfigError (an explicit request is not silently replaced)."""
  if impl == "jnp" or interpret:
    return impl if impl != "auto" else "jnp"
  if impl == "auto" and target.device_count() > 1 and not sharded:
    return "jnp"
  try:
    fused.check_supported()
  except fused.KernelUnsupported as e:
    if impl == "pallas":
      raise ConfigError(str(e)) from e
    if target.platform() == "gpu":
      logging.warning("fp8_adamw: %s; using the jnp path.", e)
    return "jnp"
  return "pallas"


@registry.register("optimizer")
def fp8_adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
              eps: float = 1e-8, weight_decay: float = 0.0, *, impl: str = "auto",
              interpret: bool = False, expand: bool = True,
              num_shards: int | Callable[[tuple[int, ...]], int] = 1,
              skip_nonfinite: bool = True, group_size: int = fp8.OPTIM_GROUP_SIZE,
              block_rows: int | None = None,
              placement: ParamPlacement | None = None) -> FusedGradientTransformation:
  """AdamW with float8_e4m3fn moments in groups of 128 (COAT).

  Also the optimizer factory of `config.optim.name = "coat.optim.fp8_adamw"` (common/training/optim.py calls
  it with learning_rate, b1, b2, eps, weight_decay and `config.optim.options`).

  Args:
    learning_rate: a float or an optax schedule (called with the step count from 0).
    b1, b2, eps: Adam hyper-parameters.
    weight_decay: decoupled weight decay (times the learning rate, as AdamW).
    impl: "auto" (the fused kernel on TPU or on CUDA GPUs of compute capability >= 8.9, per
      device shard on a mesh; the jnp path elsewhere: see `resolve_impl`), "pallas" (the fused
      kernel of kernels/fp8_adamw.py; a ConfigError where it does not compile, e.g. GPUs below
      compute capability 8.9) or "jnp" (XLA). Resolved when the step is traced.
    interpret: run the Pallas kernel in interpret mode (CPU).
    expand: Dynamic Range Expansion of the moments (False: plain per-group absmax scaling).
    num_shards: leading-axis shards per parameter (int or shape -> int) when there is no
      placement; see the module docstring.
    skip_nonfinite: skip the whole step when a gradient holds NaN or inf.
    group_size: elements per group (COAT: 128).
    block_rows: groups per Pallas program (None: the backend's default).
    placement: the parameters' placement on the mesh (the trainer passes it): the groups are cut
      per device shard and sharded like the parameter; parameters are then matched by path
      ("blocks/0/mlp/fc1/kernel"), so `init` must get the trainer's parameter tree.

  Returns:
    A `common.training.optim.FusedGradientTransformation` (an optax.GradientTransformation whose state is
    `Fp8AdamWState`); its `apply` writes the new parameters and moments in place (donate them)
    and takes `lr_scale` (per-parameter learning-rate multipliers, `optim.lr_multipliers`).
  """
  if impl not in ("auto", "jnp", "pallas"):
    raise ConfigError(f"fp8_adamw impl must be 'auto', 'jnp' or 'pallas', got {impl!r}")
  hyper = dict(b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, expand=expand,
               interpret=interpret, block_rows=block_rows)

  def shards_of(path, shape):
    if placement is not None:
      return placement.shards_per_dim(path_str(path), len(shape))
    return _num_shards_for(num_shards, shape)

  def init_fn(params):
    def empty(path, p):
      shape = tuple(jnp.shape(p))
      return fp8.empty_groups(shape, group_size, shards_of(path, shape))
    mu = jax.tree_util.tree_map_with_path(empty, params)
    nu = jax.tree_util.tree_map_with_path(empty, params)
    return Fp8AdamWState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)

  mesh = placement.mesh if placement is not None else None
  on_mesh = mesh is not None and mesh.size > 1

  def leaf_rows(g_rows, p_rows, m_rows, v_rows, scalars, kernel_impl, group_axis, out):
    """fused.fp8_adamw_rows, per device shard (shard_map) when the groups live on a mesh."""
    def run(g_rows, m_rows, v_rows, scalars, *p_rows):
      return fused.fp8_adamw_rows(g_rows, p_rows[0] if p_rows else None, m_rows, v_rows,
                                  *scalars, out=out, impl=kernel_impl, **hyper)
    extra = () if p_rows is None else (p_rows,)
    if not (on_mesh and kernel_impl == "pallas"):
      return run(g_rows, m_rows, v_rows, scalars, *extra)
    rows = P(group_axis, None)
    moment = (rows, rows, rows, rows)
    scalar_specs = tuple(P() for _ in scalars)
    return jax.shard_map(
        run, mesh=mesh, in_specs=(rows, moment, moment, scalar_specs) + (rows,) * len(extra),
        out_specs=(rows, moment, moment), check_vma=False)(g_rows, m_rows, v_rows, scalars, *extra)

  def step(grads, state, params, grad_scale, out, lr_scale=None):
    """out="update": (updates, state); out="params": (new params, state). lr_scale: None or a
    pytree like params of floats multiplying each parameter's learning rate."""
    if (weight_decay or out == "params") and params is None:
      raise ValueError("fp8_adamw with weight_decay != 0 needs `params` in update()")
    count = state.count
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    lr = jnp.asarray(lr, jnp.float32)
    t = (count + 1).astype(jnp.float32)
    bc1 = 1.0 - jnp.power(jnp.float32(b1), t)
    sqrt_bc2 = jnp.sqrt(1.0 - jnp.power(jnp.float32(b2), t))
    flat, treedef = jax.tree_util.tree_flatten_with_path(grads)
    paths = [kp for kp, _ in flat]
    leaves = [g for _, g in flat]
    mus = treedef.flatten_up_to(state.mu)
    nus = treedef.flatten_up_to(state.nu)
    ps = treedef.flatten_up_to(params) if params is not None else [None] * len(leaves)
    scales = treedef.flatten_up_to(lr_scale) if lr_scale is not None else [1.0] * len(leaves)
    skip = jnp.bool_(False)
    if skip_nonfinite and leaves:
      skip = jnp.logical_not(jnp.stack([jnp.all(jnp.isfinite(g)) for g in leaves]).all())
    kernel_impl = resolve_impl(impl, interpret, sharded=on_mesh)
    outs, new_mu, new_nu = [], [], []
    done = ()  # the previous leaf's results
    for path, g, m, v, p, s in zip(paths, leaves, mus, nus, ps, scales):
      g = jnp.asarray(g)
      out_dtype = p.dtype if p is not None else g.dtype
      use_p = p is not None and (weight_decay or out == "params")
      # One leaf at a time: the barrier makes this leaf's inputs wait for the previous leaf's
      # results, so XLA cannot dequantize every leaf's moments to fp32 at once (on CPU that
      # held about 7x the fp32 parameter bytes in temporaries for a tree of 8 1024x1024 leaves).
      # Every result leaves through a barrier too: otherwise XLA fuses the update into the
      # EMA's fusion as well, which then reads the old parameter after the new one has
      # overwritten it, so every parameter got an fp32 copy, made early and alive through the
      # backward pass.
      (g, m, v, p), done = jax.lax.optimization_barrier(
          ((g, m, v, p if use_p else None), done))
      if done:  # the previous leaf's results as the barrier gives them (see below)
        outs[-1], new_mu[-1], new_nu[-1] = done
      n = m.num_shards
      g_rows = fp8.to_groups(g, group_size, n)
      p_rows = fp8.to_groups(jnp.asarray(p), group_size, n) if use_p else None
      m_rows = (m.codes, m.scale[:, None], m.k[:, None], m.c[:, None])
      v_rows = (v.codes, v.scale[:, None], v.k[:, None], v.c[:, None])
      group_axis = (m.partition_specs(placement.spec(path_str(path))).codes[0] if on_mesh
                    else None)
      lr_p = lr if isinstance(s, float) and s == 1.0 else lr * jnp.asarray(s, jnp.float32)
      try:
        res, m_rows, v_rows = leaf_rows(
            g_rows, p_rows, m_rows, v_rows,
            (lr_p, bc1, sqrt_bc2, jnp.float32(1.0) if grad_scale is None else grad_scale, skip),
            kernel_impl, group_axis, out)
      except fused.KernelUnsupported as e:
        raise ConfigError(str(e)) from e
      outs.append(fp8.from_groups(res, g.shape, n).astype(out_dtype))
      new_mu.append(_rows_to_groups(m_rows, m))
      new_nu.append(_rows_to_groups(v_rows, v))
      done = (outs[-1], new_mu[-1], new_nu[-1])
    if done:
      outs[-1], new_mu[-1], new_nu[-1] = jax.lax.optimization_barrier(done)
    new_count = count + jnp.where(skip, 0, 1).astype(count.dtype)
    return (treedef.unflatten(outs),
            Fp8AdamWState(count=new_count, mu=treedef.unflatten(new_mu),
                          nu=treedef.unflatten(new_nu)))

  def update_fn(updates, state, params=None):
    return step(updates, state, params, None, "update")

  def apply_fn(grads, state, params, grad_scale=None, lr_scale=None):
    return step(grads, state, params, grad_scale, "params", lr_scale)

  return FusedGradientTransformation(init_fn, update_fn, apply_fn, accepts_lr_scale=True)


def _rows_to_groups(rows, like: fp8.QuantizedGroups) -> fp8.QuantizedGroups:
  codes, scale, k, c = rows
  return fp8.QuantizedGroups(codes=codes, scale=scale[:, 0], k=k[:, 0], c=c[:, 0],
                             shape=like.shape, num_shards=like.num_shards)


def state_bytes(state: Any) -> int:
  """Bytes occupied by an optimizer state (every array leaf, metadata and counters included)."""
  return fp8.tree_nbytes(state)
