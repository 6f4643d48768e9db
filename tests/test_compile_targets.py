"""Compiling for hardware this machine does not have (`--mode=compile`, common/training/compile_report.py).

XLA compiles for Cloud TPU slices (libtpu) and NVIDIA GPU nodes (the CUDA plugin's compiler, with
ptxas) on a CPU-only machine, both from the `compile` extra that `make test` installs. These tests
compile for real: a tiny config's train step for a TPU and for a GPU target, both Pallas kernels for
both (Mosaic for the TPU, Triton to a cubin for the H100), and COAT's step for an H100 with its
float8 GEMMs counted; every kernel choice follows the target, not `jax.default_backend()`.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from coat.optim import resolve_impl
from common.training import compile_report
from common.training import targets
from common.errors import ConfigError
from configs import terdit as terdit_config
from kernels import fp8_adamw as fa
from kernels import target as kernel_target
from kernels import ternary_matmul as tm
from terdit import deploy

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _mesh(name: str, n: int = 1) -> Mesh:
  return Mesh(np.array(targets.parse_target(name).devices[:n]), ("x",))


# ---- targets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,devices,kind,hbm_gib", [
    ("v4-8", 4, "TPU v4", 30.75), ("v5p-8", 4, "TPU v5", 95.73), ("v5litepod-4", 4, "TPU v5 lite", 15.75),
    ("v6e-4", 4, "TPU v6 lite", 31.24), ("v5p-128", 64, "TPU v5", 95.73), ("2xv5p-128", 128, "TPU v5", 95.73),
    ("1xh100", 1, "NVIDIA H100 80GB HBM3", 79.11), ("8xh200", 8, "NVIDIA H200 141GB HBM3e", 141.0),
    ("8xb200", 8, "NVIDIA B200", 178.36), ("8xa100", 8, "NVIDIA A100-SXM4-80GB", 79.26),
    ("4x8xh100", 32, "NVIDIA H100 80GB HBM3", 79.11)])
def test_accelerator_names_become_their_devices(name, devices, kind, hbm_gib):
  t = targets.parse_target(name)
  assert (t.num_devices, t.device_kind) == (devices, kind)
  assert t.hbm_bytes / 2**30 == pytest.approx(hbm_gib, abs=0.01)
  assert {d.platform for d in t.devices} == {"tpu" if name[0] == "v" or "xv" in name else "gpu"}


@pytest.mark.parametrize("name,words", [("v5p-6", "not a slice size"), ("v9-8", "unknown TPU"),
                                        ("8xh999", "not a GPU node"), ("h100", "not a GPU node")])
def test_bad_target_names_are_one_clear_error(name, words):
  with pytest.raises(ConfigError, match=words):
    targets.parse_target(name)


def test_slice_shapes_follow_cloud_tpu():
  assert targets._torus(4, 3) == (2, 2, 1) and targets._torus(64, 3) == (4, 4, 4)
  assert targets._torus(128, 3) == (4, 4, 8) and targets._torus(256, 2) == (16, 16)
  assert targets._torus(32, 2) == (4, 8) and targets._torus(1, 2) == (1, 1)


# ---- every kernel choice follows the target -----------------------------------------------------


def test_kernel_choices_follow_the_target_not_the_default_backend(caplog):
  assert jax.default_backend() == "cpu"
  packed = deploy.PackedTernaryDense(tm.pack_ternary(jnp.zeros((8, 4), jnp.int8)), jnp.ones(()),
                                     in_features=8, impl="pallas")
  seen = {}
  for name in ("v5p-8", "1xh100", "8xa100"):
    with kernel_target.compiling_for(_mesh(name)):
      seen[name] = (kernel_target.platform(), resolve_impl("auto", sharded=True),
                    packed.matmul_kwargs()["interpret"], fa.default_block_rows())
  seen["cpu"] = (kernel_target.platform(), resolve_impl("auto", sharded=True),
                 packed.matmul_kwargs()["interpret"], fa.default_block_rows())
  assert seen == {"v5p-8": ("tpu", "pallas", False, 256), "1xh100": ("gpu", "pallas", False, 16),
                  "8xa100": ("gpu", "jnp", False, 16), "cpu": ("cpu", "jnp", True, 512)}
  assert "compute capability >= 8.9" in caplog.text  # the A100 fallback says why
  with kernel_target.compiling_for(_mesh("8xa100")):
    with pytest.raises(ConfigError, match=r"compute capability >= 8\.9.*A100.*8\.0"):
      resolve_impl("pallas")
  with pytest.raises(ConfigError, match="interpret=True"):  # an explicit request on this CPU
    resolve_impl("pallas")


def test_ternary_triton_impl_needs_a_cuda_target():
  args = (jnp.zeros((4, 8), jnp.bfloat16), jnp.zeros((2, 8), jnp.uint8), jnp.float32(1))
  with kernel_target.compiling_for(_mesh("v5p-8")):
    with pytest.raises(ValueError, match="target is 'tpu'"):
      tm.ternary_matmul(*args, impl="triton")


# ---- the Pallas kernels compile for both ---------------------------------------------------------


def _compiled_text(name, fn, *shapes_dtypes):
  mesh = _mesh(name)
  args = [jax.ShapeDtypeStruct(s, d, sharding=NamedSharding(mesh, P())) for s, d in shapes_dtypes]
  with kernel_target.compiling_for(mesh):
    return jax.jit(fn).lower(*args).compile().as_text()


@pytest.mark.parametrize("name,call", [("v5p-8", "tpu_custom_call"),
                                       ("1xh100", "__gpu$xla.gpu.triton")])
def test_ternary_matmul_kernel_compiles_for(name, call):
  k, n = 1536, 256
  text = _compiled_text(name, lambda x, p, a: tm.ternary_matmul(x, p, a, impl="pallas"),
                        ((16, k), jnp.bfloat16), ((tm.packed_rows(k), n), jnp.uint8),
                        ((), jnp.float32))
  assert compile_report.hlo_summary(text)["custom_calls"].get(call, 0) >= 1


@pytest.mark.parametrize("name,call", [("v5p-8", "tpu_custom_call"),
                                       ("1xh100", "__gpu$xla.gpu.triton")])
def test_fp8_adamw_kernel_compiles_for(name, call):
  n, g = 256, 128

  def step(grad, p, m, ms, v, vs):
    rows = lambda codes, s: (codes, s, jnp.ones_like(s), jnp.zeros_like(s))
    return fa.fp8_adamw_rows(grad, p, rows(m, ms), rows(v, vs), jnp.float32(1e-3),
                             jnp.float32(0.1), jnp.float32(0.1), weight_decay=0.01, out="params",
                             impl="pallas")

  text = _compiled_text(name, step, ((n, g), jnp.float32), ((n, g), jnp.float32),
                        ((n, g), jnp.float8_e4m3fn), ((n, 1), jnp.float32),
                        ((n, g), jnp.float8_e4m3fn), ((n, 1), jnp.float32))
  assert compile_report.hlo_summary(text)["custom_calls"].get(call, 0) == 1


# ---- whole train steps ---------------------------------------------------------------------------


def test_hlo_summary_counts_f8_dots_inside_fusions():
  text = """
%fused_computation (param_0: f8e4m3fn[16,32], param_1: f8e4m3fn[32,64]) -> f32[16,64] {
  %param_0 = f8e4m3fn[16,32]{1,0} parameter(0)
  %param_1 = f8e4m3fn[32,64]{1,0} parameter(1)
  ROOT %dot.1 = f32[16,64]{1,0} dot(%param_0, %param_1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}
ENTRY %main (a: bf16[16,32], b: bf16[32,64]) -> f32[16,64] {
  %a = bf16[16,32]{1,0} parameter(0)
  %b = bf16[32,64]{1,0} parameter(1)
  %dot.2 = f32[16,64]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %c = f32[16,64]{1,0} custom-call(%a, %b), custom_call_target="__cublas$lt$matmul$f8"
  ROOT %f = f32[16,64]{1,0} fusion(%x, %y), kind=kCustom, calls=%fused_computation
}"""
  assert compile_report.hlo_summary(text) == {
      "custom_calls": {"__cublas$lt$matmul$f8": 1}, "dots": 2, "f8_dots": 2}


def test_coat_train_step_compiles_for_a_tpu_slice_with_the_mosaic_fp8_adamw_kernel():
  """A tiny config's whole COAT train step for a v5p-8 (4 chips, data-parallel): it fits, the TPU
  compiler gives its FLOPs, and the FP8 AdamW update is the fused Pallas kernel (Mosaic)."""
  config = terdit_config.get_config("runlocal,fp")
  with config.unlocked():
    config.precision = "coat"
    config.mesh.data = -1
  r = compile_report.compile_for_target(config, targets.parse_target("v5p-8"))
  assert r["fits"] and r["devices"] == 4 and r["flops_source"] == "compiler"
  assert 0 < r["memory"]["params"] <= r["per_device_gib"] < 0.1
  assert r["flops_per_step"] > 0 and r["estimates"]["mfu_0.4"]["step_s"] > 0
  assert r["custom_calls"].get("tpu_custom_call", 0) >= 1, r["custom_calls"]


def test_coat_train_step_keeps_its_gemms_in_float8_on_an_h100():
  """COAT's step compiled for an H100 has float8 dots (in Triton GEMM fusions); the bf16 step has
  none. The GPU compiler gives no FLOPs: they come from the CPU cost analysis."""
  config = terdit_config.get_config("runlocal,fp")
  with config.unlocked():
    config.precision = "coat"
  r = compile_report.compile_for_target(config, targets.parse_target("1xh100"))
  assert r["fits"] and r["flops_source"] == "cpu cost analysis" and r["flops_per_step"] > 0
  assert r["f8_dots"] >= 30 and r["dots"] > r["f8_dots"], r


def test_compile_mode_says_when_a_config_does_not_fit():
  """A batch that needs more HBM than a v5e chip has: the TPU compiler refuses it
  (CompileTimeHbmOom); --mode=compile prints the JSON line last, one line on stderr with the
  shortfall and what to change, and exits 1."""
  proc = subprocess.run(
      [sys.executable, "launch/main.py", "--config=configs/sid2_digits.py:runlocal",
       "--mode=compile", "--target=v5litepod-1", "--config.train.batch_size=1048576"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1 and proc.stdout.strip(), proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["fits"] is False and report["per_device_gib"] > report["capacity_gib"] == 15.75
  assert {"target", "devices", "per_device_gib", "capacity_gib", "fits", "flops_per_step",
          "custom_calls", "f8_dots"} <= set(report)
  err = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(err) == 1 and "GiB short" in err[0] and "grad_accum_steps" in err[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr


def test_every_paper_config_declares_a_target_it_can_be_compiled_for():
  from benchmarks import bench_targets  # pylint: disable=import-outside-toplevel
  from configs.base import load_config  # pylint: disable=import-outside-toplevel
  for config, _ in bench_targets.ROWS:
    t = targets.parse_target(load_config(config).target)
    assert t.num_devices >= 1, config


@pytest.mark.parametrize("name,call", [("v5p-8", "tpu_custom_call"),
                                       ("8xh100", "__gpu$xla.gpu.triton")])
def test_deployed_ternary_sampling_compiles_with_the_packed_kernel_for(name, call):
  """`--mode=compile --checkpoint=EXPORT` compiles the deployed network's sampling call: TerDiT's
  packed ternary layers run the target's Pallas kernel (Mosaic on a TPU, Triton on H100s), not
  interpret mode, on every device's rows of the batch (XLA cannot partition a Pallas kernel: the
  layer runs it under shard_map), and the report says how long sampling `eval.num_samples` takes."""
  config = terdit_config.get_config("runlocal")
  r = compile_report.compile_for_target(config, targets.parse_target(name), sampling=True)
  assert r["step"] == "sampling" and r["fits"] and r["flops_per_step"] > 0
  assert r["custom_calls"].get(call, 0) >= 1, r["custom_calls"]
  assert "optimizer_state" not in r["memory"] and r["memory"]["params"] > 0
  assert r["estimates"]["mfu_0.4"]["run_days"] > 0
