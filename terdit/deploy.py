"""TerDiT's inference form: ternary layers that hold only 2-bit packed codes (arXiv 2405.14854).

`TernaryDense.deployed()` returns a `PackedTernaryDense`: its state is the uint8 packed codes
[ceil(K/4), N] (layout in kernels/ternary_matmul.py), the fp32 scale alpha and the fp32 bias,
and its forward runs `kernels.ternary_matmul` on the packed bytes, so the fp weight [K, N] never
exists. The official deployment (Lucky-Lance/TerDiT, `fairscale/.../layer_inference.py`)
unpacks every weight to fp32 on each call instead.

`common.weights.deployment.deploy(model)` swaps every layer with a `deployed()` method; `--mode=export`
writes the result and `--mode=sample --checkpoint=EXPORT_DIR` samples from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from common.errors import ConfigError, ShapeError
from kernels import target
from kernels import ternary_matmul as tm
from terdit import codes as ternary_codes

if TYPE_CHECKING:
  from terdit.ternary import TernaryDense


class PackedState(nnx.Variable):
  """Inference-only state of a deployed layer (not trained); saved and sharded like parameters."""


class PackedCodes(PackedState):
  """uint8 [ceil(K/4), N]: ternary codes packed four to a byte (kernels/ternary_matmul.py)."""


class PackedScale(PackedState):
  """fp32 (): the per-tensor scale alpha of a deployed ternary layer."""


class PackedBias(PackedState):
  """fp32 [N]: the (full-precision) bias of a deployed ternary layer."""


IMPLS = ("pallas", "reference", "triton")


class PackedTernaryDense(nnx.Module):
  """The deployed form of `terdit.ternary.TernaryDense`: y = alpha * (x @ codes) + b.

  Attributes:
    codes: PackedCodes uint8 [ceil(K/4), N], logical axes the layer's kernel axes.
    alpha: PackedScale fp32 ().
    bias: PackedBias fp32 [N] (logical axis kernel_axes[1]) or None.
    in_features, out_features: K and N.
    dtype: compute dtype (None: the input's); accumulation is fp32.
    impl: the matmul: "pallas" (the Pallas kernel; in interpret mode on CPU, where it runs as
      XLA loops over tiles: the fp weight never exists), "triton" (CUDA + jax-triton) or
      "reference" (jnp unpack + dot: it materialises the weight, for checks only).
  """

  def __init__(self, codes: jax.Array, alpha: jax.Array, bias: jax.Array | None = None, *,
               in_features: int, kernel_axes: Sequence[str | None] | None = None,
               dtype: Any = None, impl: str = "pallas"):
    """Args:
      codes: uint8 [ceil(in_features/4), N] from `kernels.ternary_matmul.pack_ternary`.
      alpha: the layer's scale, shape () or (1,).
      bias: fp32 [N] or None.
      in_features: K (the packed rows do not determine it when K % 4 != 0).
      kernel_axes: logical axis names of the (unpacked) kernel [K, N]; the packed rows take
        the name of K, the bias that of N. None: no sharding annotation.
      dtype: compute dtype of the matmul (None: the input's dtype).
      impl: see the class docstring.
    """
    if codes.ndim != 2 or codes.dtype != jnp.uint8 or codes.shape[0] != tm.packed_rows(in_features):
      raise ShapeError(f"PackedTernaryDense needs uint8 codes [ceil({in_features}/4), N], got "
                       f"{codes.dtype} {codes.shape}.")
    if impl not in IMPLS:
      raise ConfigError(f"PackedTernaryDense impl must be one of {IMPLS}, got {impl!r}.")
    self.in_features, self.out_features = int(in_features), int(codes.shape[1])
    self.dtype, self.impl = dtype, impl
    axes = tuple(kernel_axes) if kernel_axes is not None else None
    meta = {"out_sharding": axes} if axes else {}
    self.codes = PackedCodes(codes, **meta)
    self.alpha = PackedScale(jnp.asarray(alpha, jnp.float32).reshape(()))
    if bias is not None:
      bmeta = {"out_sharding": (axes[1],)} if axes else {}
      self.bias = PackedBias(jnp.asarray(bias, jnp.float32), **bmeta)
    else:
      self.bias = nnx.data(None)

  @classmethod
  def from_ternary(cls, layer: TernaryDense, impl: str = "pallas") -> PackedTernaryDense:
    """Packs a QAT layer: codes = ternarize(latent kernel), the same weights its forward uses."""
    codes, _ = ternary_codes.ternarize(layer.kernel[...])
    axes = getattr(layer.kernel, "out_sharding", None)
    return cls(ternary_codes.pack(codes), layer.alpha[...],
               None if layer.bias is None else layer.bias[...], in_features=layer.in_features,
               kernel_axes=axes, dtype=layer.dtype, impl=impl)

  def matmul_kwargs(self) -> dict[str, Any]:
    """`ternary_matmul` options of `impl` for the target device (`kernels.target`: the mesh being
    compiled for, else this machine's): Pallas runs in interpret mode only on a CPU."""
    if self.impl == "pallas":
      return {"impl": "pallas", "interpret": target.platform() == "cpu"}
    return {"impl": self.impl}

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., in_features] -> [..., out_features] in the compute dtype."""
    if x.shape[-1] != self.in_features:
      raise ShapeError(f"PackedTernaryDense expects [..., {self.in_features}] inputs, got "
                       f"{x.shape}.")
    dtype = self.dtype or x.dtype
    params = {"packed": self.codes[...], "alpha": self.alpha[...],
              "bias": None if self.bias is None else self.bias[...]}
    kwargs = self.matmul_kwargs()
    mesh = jax.sharding.get_abstract_mesh()
    if kwargs["impl"] == "pallas" and not kwargs.get("interpret") and mesh.size > 1:
      # XLA cannot partition a Mosaic or Triton kernel: each device runs it on its rows of the
      # batch, with the (small, packed) weights replicated.
      rows = _batch_spec(mesh, x.shape[0])
      return jax.shard_map(
          lambda p, v: ternary_codes.packed_dense(p, v, **kwargs), mesh=mesh, in_specs=(P(), rows),
          out_specs=rows, check_vma=False)(params, x.astype(dtype))
    return ternary_codes.packed_dense(params, x.astype(dtype), **kwargs)


def _batch_spec(mesh: jax.sharding.AbstractMesh, batch: int) -> P:
  """The leading axis over the mesh's axes (in order, those of size > 1) while their product divides
  `batch`; P() (replicated) when none does."""
  axes, size = [], 1
  for name in mesh.axis_names:
    n = mesh.shape[name]
    if n > 1 and batch % (size * n) == 0:
      axes.append(name)
      size *= n
  return P(tuple(axes)) if axes else P()
