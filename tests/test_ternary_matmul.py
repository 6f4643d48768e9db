"""Tests for kernels/ternary_matmul.py (reference, Pallas in interpret mode) and the
Triton kernel of kernels/_triton_ternary.py (in triton's own interpreter, if installed)."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels import ternary_matmul as tm

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _problem(m, k, n, dtype, seed=0):
  rng = np.random.default_rng(seed)
  codes = rng.integers(-1, 2, size=(k, n)).astype(np.int8)
  x = jnp.asarray(rng.normal(size=(m, k)), dtype)
  alpha = jnp.float32(0.37)
  exact = (np.asarray(x, np.float64) @ codes.astype(np.float64)) * 0.37
  return x, tm.pack_ternary(codes), alpha, exact


def _close(got, want, dtype):
  got = np.asarray(got, np.float64)
  want = np.asarray(want, np.float64)
  if dtype == jnp.float32:
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  else:  # one bf16 rounding of the output
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_reference_equals_exact(dtype):
  x, packed, alpha, exact = _problem(5, 37, 19, dtype)
  y = tm.ternary_matmul(x, packed, alpha)
  assert y.shape == (5, 19) and y.dtype == dtype
  _close(y, exact, dtype)


@pytest.mark.parametrize("variant", ["gpu", "tpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_interpret_equals_reference_odd_shape(variant, dtype):
  x, packed, alpha, exact = _problem(5, 37, 19, dtype, seed=1)
  ref = tm.ternary_matmul(x, packed, alpha, impl="reference")
  y = tm.ternary_matmul(x, packed, alpha, impl="pallas", interpret=True, pallas_variant=variant)
  assert y.shape == (5, 19) and y.dtype == dtype
  _close(y, exact, dtype)
  if dtype == jnp.float32:
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  else:  # both round the same fp32 accumulator to bf16: at most one ulp apart
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref, np.float32),
                               rtol=2 ** -7, atol=1e-2)


@pytest.mark.parametrize("variant,dtype,k,blocks", [
    # H = 38 packed rows -> 48 with block_q = 16: 3 K steps, 2 M tiles, 3 N tiles.
    ("gpu", jnp.bfloat16, 150, (16, 16, 16)),
    # TPU-legal tiles (lane dims multiples of 128): H = 275 -> 384, 3 K steps, 2 M tiles.
    ("tpu", jnp.float32, 1100, (16, 128, 128)),
])
def test_pallas_interpret_multi_tile_multi_step(variant, dtype, k, blocks):
  x, packed, alpha, exact = _problem(21, k, 35, dtype, seed=2)
  bm, bn, bq = blocks
  y = tm.ternary_matmul(x, packed, alpha, impl="pallas", interpret=True,
                        pallas_variant=variant, block_m=bm, block_n=bn, block_q=bq)
  _close(y, exact, dtype)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_gpu_split_k_equals_exact(dtype):
  # H = 64 packed rows, block_q = 16: 4 K steps, split in 2 and in 4 (one step each).
  x, packed, alpha, exact = _problem(3, 256, 40, dtype, seed=4)
  for split in (2, 4):
    y = tm.ternary_matmul(x, packed, alpha, impl="pallas", interpret=True, pallas_variant="gpu",
                          block_m=16, block_n=16, block_q=16, split_k=split)
    assert y.shape == (3, 40) and y.dtype == dtype
    _close(y, exact, dtype)
  with pytest.raises(ValueError, match="split_k"):
    tm.ternary_matmul(x, packed, alpha, impl="pallas", interpret=True, pallas_variant="gpu",
                      block_q=16, split_k=3)


def test_gpu_split_k_heuristic_fills_the_sms():
  # TerDiT shapes at M <= 16: bm 16, bn 64, bq 32 -> 48 to 128 output tiles for 132 SMs.
  for k, n in ((1536, 4096), (3072, 8192), (8192, 3072)):
    steps = tm.packed_rows(k) // 32
    split = tm._gpu_split_k(1, n // 64, steps, None)
    assert steps % split == 0 and steps // split >= tm.GPU_MIN_STEPS_PER_SPLIT, (k, n, split)
    assert (n // 64) * split >= tm.GPU_NUM_SMS_HINT, (k, n, split)  # at least one wave
  assert tm._gpu_split_k(32, 64, 12, None) == 1  # large M: enough tiles already


def test_tpu_blocks_divide_terdit_packed_rows():
  # No per-call padding of the packed weight on TPU: bq divides H, bn divides N.
  for k, n in ((1536, 4096), (3072, 8192), (8192, 3072)):
    h = tm.packed_rows(k)
    for m in (1, 16, 4096):
      _, bn, bq = tm._pallas_blocks("tpu", m, n, h, None, None, None)
      assert h % bq == 0 and n % bn == 0 and bq % 128 == 0 and bn % 128 == 0, (k, n, bq, bn)
  # K = 3072: 768 packed rows -> blocks of 384 (two K steps), not 512 rows padded to 1024
  assert tm._pallas_blocks("tpu", 16, 8192, 768, None, None, None)[2] == 384


def test_leading_dims_and_alpha_shapes():
  x, packed, _, _ = _problem(6, 13, 7, jnp.float32, seed=3)
  x3 = x.reshape(2, 3, 13)
  y = tm.ternary_matmul(x3, packed, jnp.array([0.37], jnp.float32))
  assert y.shape == (2, 3, 7)
  np.testing.assert_allclose(y.reshape(6, 7), tm.ternary_matmul(x, packed, 0.37), rtol=1e-6)
  f = jax.jit(lambda a, b: tm.ternary_matmul(a, b, 0.37, impl="reference"))
  np.testing.assert_allclose(f(x, packed), tm.ternary_matmul(x, packed, 0.37), rtol=1e-6)


def test_bad_inputs_give_clear_errors():
  x, packed, alpha, _ = _problem(5, 37, 19, jnp.float32)
  with pytest.raises(ValueError, match="ceil"):
    tm.ternary_matmul(x[:, :30], packed, alpha)  # K=30 needs 8 packed rows, not 10
  with pytest.raises(ValueError, match="uint8"):
    tm.ternary_matmul(x, packed.astype(jnp.int32), alpha)
  with pytest.raises(ValueError, match="float32 and bfloat16"):
    tm.ternary_matmul(x.astype(jnp.float16), packed, alpha)
  with pytest.raises(ValueError, match="impl"):
    tm.ternary_matmul(x, packed, alpha, impl="cuda")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="checks the non-CUDA error")
def test_triton_impl_refuses_non_cuda_backend():
  x, packed, alpha, _ = _problem(5, 37, 19, jnp.float32)
  with pytest.raises(ValueError, match="needs a CUDA GPU"):
    tm.ternary_matmul(x, packed, alpha, impl="triton")


_TRITON_INTERPRETER_SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"
    import ml_dtypes
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as ti

    # triton's interpreter multiplies bf16 bit patterns (it stores bf16 as uint16) in
    # tl.dot; widen them to f32 first so the bf16 kernel path can be checked.
    _dot = ti.InterpreterBuilder.create_dot
    def _widen(h):
      if h.dtype.scalar == tl.bfloat16:
        return ti.TensorHandle((h.data.astype(np.uint32) << 16).view(np.float32), tl.float32)
      return h
    ti.InterpreterBuilder.create_dot = (
        lambda self, a, b, d, p, m: _dot(self, _widen(a), _widen(b), d, p, m))

    class _Storage:
      def __init__(self, arr): self.arr = arr
      def data_ptr(self): return self.arr.ctypes.data
      def cpu(self): return self
      def copy_(self, other): pass

    class Shim:
      # The bits of a torch tensor triton's interpreter uses, over a NumPy array.
      # One dtype object per dtype for the whole run: triton's native specialization appears to cache by
      # the dtype object, so a per-tensor object whose address a later one of another dtype
      # reuses made a bf16 tensor read as f32 (depending on PYTHONHASHSEED, about 1 run in 5).
      dtypes = {np.dtype(dt): type("dtype", (), {"__str__": lambda s, n=name: "torch." + n})()
                for dt, name in ((np.float32, "float32"), (np.uint8, "uint8"),
                                 (ml_dtypes.bfloat16, "bfloat16"))}
      def __init__(self, arr):
        self.arr = np.ascontiguousarray(arr)
        self.dtype = self.dtypes[self.arr.dtype]
      def data_ptr(self): return self.arr.ctypes.data
      def untyped_storage(self): return _Storage(self.arr)
      def new_empty(self, *a, **k): return self
      def set_(self, *a, **k): return self
      def copy_(self, other): pass
      def storage_offset(self): return 0
      def size(self): return self.arr.shape
      def stride(self): return tuple(s // self.arr.itemsize for s in self.arr.strides)
      def element_size(self): return self.arr.itemsize

    from kernels import _triton_ternary as tt
    from kernels.ternary_matmul import pack_ternary

    rng = np.random.default_rng(0)
    cases = [  # (M, K, N, dtype, config overrides)
        (5, 37, 19, np.float32, dict(BM=16, BN=16, BQ=16)),
        (5, 37, 19, ml_dtypes.bfloat16, dict(BM=16, BN=16, BQ=16)),
        (5, 300, 19, ml_dtypes.bfloat16, dict(BM=16, BN=16, BQ=16, SPLIT_K=3)),
        (40, 301, 70, np.float32, dict(BM=16, BN=32, BQ=16, SPLIT_K=1, GROUP_M=2)),
        (3, 1000, 17, np.float32, {}),  # the heuristic small-M config (split-K)
        # tiles divide the shape: the unmasked (EVEN_N, EVEN_Q) path, split-K
        (3, 512, 32, ml_dtypes.bfloat16, dict(BM=16, BN=16, BQ=16, SPLIT_K=2)),
    ]
    for m, k, n, dt, over in cases:
      codes = rng.integers(-1, 2, size=(k, n)).astype(np.int8)
      packed = np.asarray(pack_ternary(codes))
      h = packed.shape[0]
      x = rng.normal(size=(m, k)).astype(dt)
      cfg = tt.default_config(m, n, h)
      cfg.update(over)
      consts, grid = tt.kernel_constexprs(m, k, n, h, dt, cfg)
      split = grid[1]
      out = (np.zeros((split, m, n), np.float32) if split > 1 else np.zeros((m, n), dt))
      o = Shim(out)
      tt.ternary_matmul_kernel[grid](
          Shim(x), Shim(packed), Shim(np.array([0.37], np.float32)), o, **consts)
      got = o.arr.astype(np.float64)
      if split > 1:
        got = 0.37 * got.sum(0)
      want = (x.astype(np.float64) @ codes.astype(np.float64)) * 0.37
      tol = 1e-5 if dt == np.float32 or split > 1 else 2 ** -7
      np.testing.assert_allclose(got, want, rtol=tol, atol=max(tol, 1e-5) * 4)
      print("ok", m, k, n, np.dtype(dt).name, split, consts["EVEN_N"] and consts["EVEN_Q"])
""")


def test_triton_kernel_in_triton_interpreter():
  pytest.importorskip("triton")
  pytest.importorskip("ml_dtypes")
  proc = subprocess.run([sys.executable, "-c", _TRITON_INTERPRETER_SCRIPT], cwd=REPO,
                        capture_output=True, text=True, timeout=600,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert proc.stdout.count("ok") == 6, proc.stdout
  assert "True" in proc.stdout  # the unmasked path ran
