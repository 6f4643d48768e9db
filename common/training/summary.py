"""Model summaries for `--mode=summary`: parameters per module and forward FLOPs, without data.

FLOP convention: XLA's cost analysis counts a multiply-accumulate as 2 flops. Papers that quote
"GFLOPs" for diffusion backbones (DiT, SiD2/JiT tables: fvcore convention) count MACs, so
paper GFLOPs = XLA flops / 2 (`forward_macs`).
"""

from collections.abc import Sequence
from typing import Any

from flax import nnx
import jax
import numpy as np

from common.weights.tree_names import key_path_str

Array = jax.Array


def count_params_per_module(model: nnx.Module, depth: int = 1) -> dict[str, int]:
  """Number of parameters (`nnx.Param` elements) grouped by the first `depth` path components.

  Works on concrete and abstract (`nnx.eval_shape`) models. Returns an insertion-ordered dict
  {module path: count} plus the key "total".
  """
  counts: dict[str, int] = {}
  total = 0
  for path, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    n = int(np.prod(leaf.shape))
    if len(path) > depth:
      key = key_path_str(path[:depth], ".")
    else:
      key = key_path_str(path[:-1], ".") or "."
    counts[key] = counts.get(key, 0) + n
    total += n
  counts["total"] = total
  return counts


def count_params_by_kind(model: nnx.Module) -> dict[str, int]:
  """Number of parameter elements per kind of parameter: the `nnx.Variable` class name.

  A full-precision network gives {"Param": n}; a network whose linear layers `config.numerics.rules`
  made ternary (terdit.ternary.TernaryDense) also has {"TernaryKernel": m, "TernaryScale": k}.
  Works on concrete and abstract (`nnx.eval_shape`) models; insertion-ordered, "Param" first when
  present.
  """
  counts: dict[str, int] = {}
  for _, leaf in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    kind = type(leaf).__name__
    counts[kind] = counts.get(kind, 0) + int(np.prod(leaf.shape))
  if "Param" in counts:
    counts = {"Param": counts["Param"], **{k: v for k, v in counts.items() if k != "Param"}}
  return counts


def _abstract(x: Any) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  if hasattr(x, "shape") and hasattr(x, "dtype"):
    return jax.ShapeDtypeStruct(x.shape, x.dtype)
  return x


def forward_flops(model: nnx.Module, example_inputs: Sequence[Any],
                  example_kwargs: dict[str, Any] | None = None) -> float:
  """XLA flops of one forward pass `model(*example_inputs, **example_kwargs)`.

  Everything is abstract: `model` may come from `nnx.eval_shape` and the inputs may be
  `jax.ShapeDtypeStruct`s, so no large array is allocated; the function is lowered and compiled
  (no execution) and `cost_analysis()["flops"]` is returned (2 flops per multiply-accumulate).
  """
  graphdef, state = nnx.split(model)
  state = jax.tree.map(_abstract, state)
  inputs = jax.tree.map(_abstract, tuple(example_inputs))
  kwargs = jax.tree.map(_abstract, dict(example_kwargs or {}))

  def forward(state, inputs, kwargs):
    return nnx.merge(graphdef, state)(*inputs, **kwargs)

  compiled = jax.jit(forward).lower(state, inputs, kwargs).compile()
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):    # older jax: one dict per computation
    cost = cost[0]
  return float(cost["flops"])


def forward_macs(model: nnx.Module, example_inputs: Sequence[Any], **kw) -> float:
  """Multiply-accumulates of one forward pass = `forward_flops / 2` (paper "GFLOPs")."""
  return forward_flops(model, example_inputs, **kw) / 2


def _human(n: int) -> str:
  return f"{n / 1e9:.4g} B" if n >= 1e9 else f"{n / 1e6:.4g} M"


def summary_lines(model: nnx.Module, example_inputs: Sequence[Any], *,
                  per_example: int | None = None, depth: int = 1) -> list[str]:
  """Human-readable summary: params per module, total, forward flops and MACs.

  Args:
    per_example: batch size of `example_inputs`, to also report per-example numbers.
  """
  counts = count_params_per_module(model, depth=depth)
  width = max(len(k) for k in counts)
  lines = [f"{k:<{width}}  {v:>14,d}" for k, v in counts.items() if k != "total"]
  lines.append(f"{'total':<{width}}  {counts['total']:>14,d}  ({counts['total'] / 1e6:.2f} M)")
  if hasattr(model, "active_params_per_token"):   # e.g. MoE: only the experts a token uses
    active = int(model.active_params_per_token())
    lines.append(f"{'active per token':<{width}}  {active:>14,d}  ({active / 1e6:.2f} M)")
  kinds = count_params_by_kind(model)
  if set(kinds) != {"Param"}:
    lines.append("parameters by kind: " + ", ".join(
        f"{k} {v:,d} ({_human(v)})" for k, v in kinds.items()))
  if "TernaryKernel" in kinds:
    tern = kinds["TernaryKernel"]
    lines.append(f"ternary weights: {tern:,d} ({_human(tern)}); full precision (the rest, "
                 f"alphas included): {counts['total'] - tern:,d} ({_human(counts['total'] - tern)})")
  flops = forward_flops(model, example_inputs)
  b = per_example or 1
  lines.append(f"forward: {flops / b / 1e9:.4g} GFLOP (XLA, 2 per MAC) = {flops / b / 2e9:.4g} "
               f"G multiply-accumulates (paper 'GFLOPs') per example")
  return lines
