"""Every kernel entry point lowers for TPU (Mosaic) and CUDA (Triton) on a CPU machine.

`jax.export` lowers a jitted function for a platform other than the one it runs on: the Pallas TPU
kernels become a Mosaic `tpu_custom_call`; the Pallas GPU kernels lower under an abstract H100
(`kernels.cuda_inspect.lower_for_cuda`) to a `__gpu$xla.gpu.triton` custom call (its
serialization check is disabled: Triton calls carry no compatibility guarantee). A kernel that no
longer lowers fails here. Mosaic's layout passes and Triton's GPU compilation run only on the
device (or, for Triton, in the inspection test at the end, which compiles for sm_90 with the
`triton` package).
"""

import re
import warnings

import jax
import jax.numpy as jnp
from jax import export
import pytest

from kernels import cuda_inspect
from kernels import fp8_adamw as fa
from kernels import ternary_matmul as tm

TRITON_CALL = "__gpu$xla.gpu.triton"
# (M, K, N): TerDiT's K with M = 1, 16, 4096 and a small N (one or two output tiles).
SMALL_N_SHAPES = [(1, 3072, 128), (16, 1536, 256), (4096, 8192, 128)]
# Every M with every TerDiT (K, N) layer shape (lowering takes well under a second each).
TERDIT_SHAPES = [(m, k, n) for m in (1, 16, 4096)
                 for k, n in ((1536, 4096), (3072, 8192), (8192, 3072))]


def _export_tpu(fn, *args):
  return export.export(jax.jit(fn), platforms=["tpu"])(*args)


def _export_cuda(fn, *args):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # the Pallas Triton backend
    return cuda_inspect.lower_for_cuda(fn, *args)


def _ternary_args(m, k, n, dtype=jnp.bfloat16):
  return (jax.ShapeDtypeStruct((m, k), dtype),
          jax.ShapeDtypeStruct((tm.packed_rows(k), n), jnp.uint8),
          jax.ShapeDtypeStruct((), jnp.float32))


def _pads_the_weight(text: str) -> bool:
  """Whether the lowered module pads a uint8 array (the packed weight) before the kernel."""
  return bool(re.search(r"stablehlo\.pad[^\n]*xui8>", text))


def _check_ternary(m, k, n):
  args = _ternary_args(m, k, n)
  tpu = _export_tpu(
      lambda x, p, a: tm.ternary_matmul(x, p, a, impl="pallas", pallas_variant="tpu"), *args)
  text = tpu.mlir_module()
  assert "tpu_custom_call" in text and tpu.out_avals[0].shape == (m, n)
  assert not _pads_the_weight(text), "the TPU kernel pads the packed weight on every call"
  gpu = _export_cuda(
      lambda x, p, a: tm.ternary_matmul(x, p, a, impl="pallas", pallas_variant="gpu"), *args)
  text = gpu.mlir_module()
  assert text.count(TRITON_CALL) == 1 and gpu.out_avals[0].shape == (m, n)
  assert gpu.platforms == ("cuda",) and tpu.platforms == ("tpu",)
  return text


@pytest.mark.parametrize("m,k,n", SMALL_N_SHAPES)
def test_ternary_matmul_lowers_for_tpu_and_cuda(m, k, n):
  _check_ternary(m, k, n)


@pytest.mark.parametrize("m,k,n", TERDIT_SHAPES)
def test_ternary_matmul_lowers_for_tpu_and_cuda_terdit_shapes(m, k, n):
  text = _check_ternary(m, k, n)
  if m <= 16:  # split-K: fp32 partials [S, M, N], reduced outside the kernel
    assert re.search(r"tensor<\d+x16x\d+xf32>", text)


def test_ternary_matmul_float32_lowers():
  _check_ternary(5, 1536, 128)  # odd M, float32 activations
  args = _ternary_args(5, 1536, 128, jnp.float32)
  _export_cuda(lambda x, p, a: tm.ternary_matmul(x, p, a, impl="pallas", pallas_variant="gpu"),
               *args)


def _fp8_adamw_args(n_groups):
  rows = jax.ShapeDtypeStruct((n_groups, 128), jnp.float32)
  meta = jax.ShapeDtypeStruct((n_groups, 1), jnp.float32)
  codes = jax.ShapeDtypeStruct((n_groups, 128), jnp.float8_e4m3fn)
  scalar = jax.ShapeDtypeStruct((), jnp.float32)
  return (rows, rows, codes, meta, meta, meta, codes, meta, meta, meta, scalar, scalar, scalar,
          scalar, jax.ShapeDtypeStruct((), jnp.bool_))


def _fp8_adamw_fn(backend, out, weight_decay):
  def fn(g, p, mc, ms, mk, mcc, vc, vs, vk, vcc, lr, bc1, bc2, scale, skip):
    return fa.fp8_adamw_rows(g, p, (mc, ms, mk, mcc), (vc, vs, vk, vcc), lr, bc1, bc2, scale,
                             skip, weight_decay=weight_decay, out=out, impl="pallas",
                             backend=backend)
  return fn


@pytest.mark.parametrize("n_groups", [8, 1000])
@pytest.mark.parametrize("out,weight_decay", [("params", 0.1), ("params", 0.0), ("update", 0.1)])
def test_fp8_adamw_lowers_for_tpu_and_cuda(n_groups, out, weight_decay):
  args = _fp8_adamw_args(n_groups)
  tpu = _export_tpu(_fp8_adamw_fn("tpu", out, weight_decay), *args).mlir_module()
  gpu = _export_cuda(_fp8_adamw_fn("gpu", out, weight_decay), *args).mlir_module()
  assert "tpu_custom_call" in tpu and gpu.count(TRITON_CALL) == 1
  for text in (tpu, gpu):
    call = next(line for line in text.splitlines()
                if "tpu_custom_call" in line or TRITON_CALL in line)
    aliases = re.findall(r"output_tuple_indices = \[(\d+)\]", call)
    if out == "params":  # the parameter and the 8 moment arrays are written in place
      assert sorted(int(a) for a in aliases) == list(range(9)), call[:2000]
    else:
      assert not aliases


def test_small_m_triton_kernels_compile_for_sm90_without_spills():
  """The done-criterion of the small-M ternary path, checked by compiling for the H100.

  The jax-triton kernel (M = 1, K = 3072, N = 8192): every global load is an async copy
  (cp.async, vectorized 8/16 bytes) feeding a multi-stage pipeline, no single-byte global loads,
  no register spills. The Pallas GPU kernel (split-K) compiles without spills.
  """
  pytest.importorskip("triton")
  compiled, cfg, _ = cuda_inspect.compile_jax_triton(1, 3072, 8192, "bfloat16", 90)
  r = cuda_inspect.report("jax-triton", "", compiled, cfg["num_warps"], cfg["num_stages"], "sm_90a")
  assert r.spill_stores == r.spill_loads == 0
  assert r.byte_loads == 0 and not r.loads, r.loads  # nothing but async copies from global
  assert sum(r.cp_async.values()) >= 16 and all(
      int(k.split()[-1][:-1]) >= 8 for k in r.cp_async), r.cp_async
  assert r.mma_sync > 0
  (compiled, warps, stages), = cuda_inspect.pallas_ternary(1, 3072, 8192, "bfloat16", 90)
  r = cuda_inspect.report("pallas-gpu", "", compiled, warps, stages, "sm_90a")
  assert r.spill_stores == r.spill_loads == 0
