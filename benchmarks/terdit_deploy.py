"""Benchmark: TerDiT deployment from packed 2-bit weights (checkpoint bytes, peak sampling memory).

    python benchmarks/terdit_deploy.py [--batches 1,8] [--sampler_steps 250] [--skip_sampler]

(a) Checkpoint bytes of TerDiT-600M (arXiv 2405.14854; Lucky-Lance/TerDiT `models.py`
    `DiT_Llama_600M_patch2`: dim 1536, 16 blocks, 32 heads, SwiGLU hidden 4096, patch 2 on 32x32x4
    latents, adaLN from a 1024-d condition, learned sigma): the export (`--mode=export`, a
    safetensors file of uint8 packed codes + fp32 alpha, biases and full-precision layers) against
    the same network's parameters as fp32 and bf16 safetensors files. Computed from abstract
    shapes with `common.deployment.safetensors_nbytes`; the script first checks that formula
    against a real export of a small model of the same family (file size equal to the byte).
    Goal: the export at least 7x smaller than fp32 (the paper: about 10x).
(b) Peak memory of sampling, from XLA's compiled memory analysis on CPU (deterministic; no
    weights are materialised: everything is lowered from ShapeDtypeStructs): one denoiser
    forward (one denoising step) and the whole CFG sampler (`--sampler_steps` ancestral DDPM steps,
    guidance 1.5: batch 2B through the network), at batch 1 and 8, for the packed network
    (ternary layers through `kernels.ternary_matmul`'s Pallas kernel, in interpret mode on CPU,
    fp32 activations) against the full-precision network with fp32 weights, and with bf16 weights
    and bf16 compute. The paper reports about 6x less memory.
    CPU caveats: XLA's CPU backend computes bf16 dots in fp32 (it converts the bf16 weights to
    fp32 temporaries), and interpret-mode Pallas copies each kernel's inputs and outputs into
    temporaries; both inflate "temp" on CPU relative to a GPU/TPU, where the kernel reads the
    packed weight in place.

The network is a local stand-in with the 600M shapes (`LargeDiTShapes`): the TerDiT network
(`terdit/`) was written on another branch at the same time. It has every parameter of the
official model (attention wq/wk/wv/wo, SwiGLU w1/w2/w3 and the adaLN linear ternary, as TerDiT
chooses; embedders, final layer, norms, biases and alpha in full precision) and a forward of
the same structure, without RoPE (which holds no parameter and little memory).
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from flax import nnx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402

from common import deployment, layers, numerics, tree_names  # noqa: E402
from common.diffusion import make_diffusion  # noqa: E402
from terdit.deploy import PackedTernaryDense  # noqa: E402

TERNARY_RULES = ((r"blocks/\d+/(attn/w[qkvo]|ffn/w[123]|adaln)", "terdit.ternary.TernaryDense", {}),)
SHAPES_600M = dict(dim=1536, depth=16, num_heads=32, ffn_hidden=4096)


class Block(nnx.Module):
  """Large-DiT block: RMSNorm pre-norms, MHA with QK-LayerNorm over the projection, SwiGLU, and
  adaLN = RMSNorm_{6 dim}(Linear(SiLU(c))) (TerDiT's RMS-normalised adaLN)."""

  def __init__(self, dim, num_heads, ffn_hidden, cond_dim, dtype, rngs):
    d = lambda i, o, names, bias=False: layers.Dense(i, o, names=names, use_bias=bias, dtype=dtype,
                                                     rngs=rngs)
    self.num_heads = num_heads
    self.attn = nnx.Dict(wq=d(dim, dim, ("embed", "heads")), wk=d(dim, dim, ("embed", "heads")),
                         wv=d(dim, dim, ("embed", "heads")), wo=d(dim, dim, ("heads", "embed")))
    self.q_norm = nnx.LayerNorm(dim, rngs=rngs)
    self.k_norm = nnx.LayerNorm(dim, rngs=rngs)
    self.ffn = nnx.Dict(w1=d(dim, ffn_hidden, ("embed", "mlp")), w3=d(dim, ffn_hidden, ("embed", "mlp")),
                        w2=d(ffn_hidden, dim, ("mlp", "embed")))
    self.attn_norm = layers.RMSNorm(dim, epsilon=1e-5, rngs=rngs)
    self.ffn_norm = layers.RMSNorm(dim, epsilon=1e-5, rngs=rngs)
    self.adaln = d(cond_dim, 6 * dim, (None, "embed"), bias=True)
    self.adaln_norm = layers.RMSNorm(6 * dim, epsilon=1e-5, rngs=rngs)
    self.dtype = dtype

  def __call__(self, x, c):
    b, t, dim = x.shape
    mod = self.adaln_norm(self.adaln(jax.nn.silu(c)))
    sh1, sc1, g1, sh2, sc2, g2 = jnp.split(mod[:, None, :].astype(x.dtype), 6, axis=-1)
    h = self.attn_norm(x) * (1 + sc1) + sh1
    q = self.q_norm(self.attn["wq"](h)).astype(x.dtype).reshape(b, t, self.num_heads, -1)
    k = self.k_norm(self.attn["wk"](h)).astype(x.dtype).reshape(b, t, self.num_heads, -1)
    v = self.attn["wv"](h).reshape(b, t, self.num_heads, -1)
    o = jax.nn.dot_product_attention(q, k, v).reshape(b, t, dim)
    x = x + g1 * self.attn["wo"](o).astype(x.dtype)
    h = self.ffn_norm(x) * (1 + sc2) + sh2
    f = self.ffn["w2"](jax.nn.silu(self.ffn["w1"](h)) * self.ffn["w3"](h))
    return x + g2 * f.astype(x.dtype)


class LargeDiTShapes(nnx.Module):
  """TerDiT / Large-DiT class-conditional denoiser with the official parameter shapes."""

  def __init__(self, *, dim=1536, depth=16, num_heads=32, ffn_hidden=4096, image_size=32,
               in_channels=4, patch_size=2, num_classes=1000, dtype="float32", rngs):
    cond = min(dim, 1024)
    dtype = layers.as_dtype(dtype)
    self.num_classes, self.image_size, self.in_channels = num_classes, image_size, in_channels
    self.patch_size, self.dtype = patch_size, dtype
    self.x_embed = layers.Dense(patch_size**2 * in_channels, dim, names=(None, "embed"),
                                dtype=dtype, rngs=rngs)
    self.t_fc1 = layers.Dense(256, cond, names=(None, "embed"), rngs=rngs)
    self.t_fc2 = layers.Dense(cond, cond, names=("embed", "embed"), rngs=rngs)
    self.y_embed = layers.ClassEmbedding(num_classes, cond, rngs=rngs)
    self.blocks = nnx.List([Block(dim, num_heads, ffn_hidden, cond, dtype, rngs)
                            for _ in range(depth)])
    self.final_adaln = layers.Dense(cond, 2 * dim, names=(None, "embed"), rngs=rngs)
    self.final = layers.Dense(dim, patch_size**2 * 2 * in_channels, names=("embed", None),
                              dtype=dtype, rngs=rngs)

  def __call__(self, x, noise_cond, cond, *, dropout_key=None):
    """x [B, H, W, 4] -> [B, H, W, 4] (the eps half of the learned-sigma output)."""
    del dropout_key
    b = x.shape[0]
    p = self.patch_size
    h = self.x_embed(layers.patchify(x, p)).reshape(b, -1, self.x_embed.out_features)
    t = layers.fourier_features(noise_cond, 256, 2 * jnp.pi, 2 * jnp.pi * 1e4)
    c = self.t_fc2(jax.nn.silu(self.t_fc1(t))) + self.y_embed(cond["label"])
    h = h.astype(self.dtype)
    for blk in self.blocks:
      h = blk(h, c)
    shift, scale = jnp.split(self.final_adaln(jax.nn.silu(c))[:, None, :].astype(h.dtype), 2, -1)
    h = jax.nn.standardize(h.astype(jnp.float32), axis=-1, epsilon=1e-6) * (1 + scale) + shift
    g = self.image_size // p
    out = layers.unpatchify(self.final(h).reshape(b, g, g, -1), p, 2 * self.in_channels)
    return out[..., :self.in_channels].astype(jnp.float32)

  def null_cond(self, cond):
    return {"label": jnp.full_like(cond["label"], self.num_classes)}

  def example_inputs(self, batch_size):
    s = self.image_size
    return (jax.ShapeDtypeStruct((batch_size, s, s, self.in_channels), jnp.float32),
            {"label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)})


def abstract_model(variant: str, **shapes) -> nnx.Module:
  """variant: "qat" (ternary rules, latent fp32 weights), "packed" (deployed), "fp32", "bf16"."""
  dtype = "bfloat16" if variant == "bf16" else "float32"

  def build():
    m = LargeDiTShapes(**shapes, dtype=dtype, rngs=nnx.Rngs(params=0))
    if variant in ("qat", "packed"):
      numerics.apply_rules(m, TERNARY_RULES)
    if variant == "packed":
      deployment.deploy(m)
    return m

  m = nnx.eval_shape(build)
  if variant == "bf16":  # weights stored in bf16 too
    g, s = nnx.split(m)
    m = nnx.merge(g, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), s))
  return m


def check_formula_on_a_real_export() -> tuple[int, int]:
  """Exports a small model of the family for real; returns (file bytes, formula bytes)."""
  small = dict(dim=64, depth=2, num_heads=4, ffn_hidden=192, num_classes=10)
  m = LargeDiTShapes(**small, rngs=nnx.Rngs(params=0))
  numerics.apply_rules(m, TERNARY_RULES)
  deployment.deploy(m)
  with tempfile.TemporaryDirectory() as d:
    nbytes = deployment.save_export(d, ml_collections.ConfigDict({"model": small}), m)
    on_disk = os.path.getsize(os.path.join(d, deployment.PARAMS_FILE))
  assert on_disk == nbytes
  formula = deployment.safetensors_nbytes(tree_names.flatten(nnx.to_pure_dict(nnx.state(m))))
  return on_disk, formula


def memory(model: nnx.Module, batch: int, *, sampler_steps: int = 0) -> dict[str, int]:
  """Compiled memory analysis of one forward (sampler_steps=0) or the whole CFG sampler."""
  g, state = nnx.split(model)
  x, cond = model.example_inputs(batch)
  if sampler_steps:
    recipe = make_diffusion(ml_collections.ConfigDict(
        {"name": "vp", "schedule": {"name": "cosine"}, "prediction": "eps"}))

    def fn(state, key, label):
      net = nnx.merge(g, state)
      c = {"label": label}
      return recipe.sample(lambda *a: net(*a), key, x.shape, c, net.null_cond(c), sampler="ddpm",
                           num_steps=sampler_steps, guidance_scale=1.5)

    args = (state, jax.ShapeDtypeStruct((), jax.random.key(0).dtype), cond["label"])
  else:
    fn = lambda state, x, t, c: nnx.merge(g, state)(x, t, c)
    args = (state, x, jax.ShapeDtypeStruct((batch,), jnp.float32), cond)
  ma = jax.jit(fn).lower(*args).compile().memory_analysis()
  out = {"args": ma.argument_size_in_bytes, "temp": ma.temp_size_in_bytes,
         "output": ma.output_size_in_bytes, "alias": ma.alias_size_in_bytes}
  out["peak"] = out["args"] + out["temp"] + out["output"] - out["alias"]
  return out


def _commit() -> str:
  try:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
  except OSError:
    return "?"


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--batches", default="1,8")
  ap.add_argument("--sampler_steps", type=int, default=250)
  ap.add_argument("--skip_sampler", action="store_true")
  ap.add_argument("--packed_impl", default="pallas", choices=("pallas", "reference"),
                  help="the packed layers' matmul (reference: jnp unpack + dot, one layer's weight "
                  "at a time, as the official deployment does)")
  ap.add_argument("--only", default="packed,bf16,fp32", help="networks for (b)")
  args = ap.parse_args()
  mib = lambda b: f"{b / 2**20:,.1f} MiB"
  print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, commit {_commit()}, "
        f"jax {jax.__version__}, device {jax.devices()[0].device_kind}")

  on_disk, formula = check_formula_on_a_real_export()
  print(f"byte formula vs a real export (small model of the family): file {on_disk} B, formula "
        f"{formula} B: {'equal' if on_disk == formula else 'DIFFERENT'}")

  qat, packed = abstract_model("qat", **SHAPES_600M), abstract_model("packed", **SHAPES_600M)
  ternary = sum(int(v.size) for _, v in nnx.to_flat_state(nnx.state(qat))
                if type(v).__name__ == "TernaryKernel")
  sizes = deployment.model_sizes(nnx.to_pure_dict(nnx.state(qat, nnx.Param)),
                                 nnx.to_pure_dict(nnx.state(packed)))
  print(f"\n(a) TerDiT-600M shapes: {sizes['params'] / 1e6:.2f}M parameters, "
        f"{ternary / 1e6:.2f}M ternary")
  print("| file | bytes | MiB | fp32 / file |")
  print("|---|---|---|---|")
  for k in ("export", "bf16", "fp32"):
    print(f"| {k} | {sizes[k]:,} | {sizes[k] / 2**20:,.1f} | {sizes['fp32'] / sizes[k]:.2f}x |")
  ratio = sizes["fp32"] / sizes["export"]
  print(f"goal >= 7x smaller than fp32: {'met' if ratio >= 7 else 'NOT met'} ({ratio:.2f}x)")

  for _, node in nnx.iter_graph(packed):
    if isinstance(node, PackedTernaryDense):
      node.impl = args.packed_impl
  only = args.only.split(",")
  models = {k: packed if k == "packed" else abstract_model(k, **SHAPES_600M) for k in only}
  runs = [("one denoising step (forward)", 0)]
  if not args.skip_sampler:
    runs.append((f"whole sampler ({args.sampler_steps} DDPM steps, CFG)", args.sampler_steps))
  print(f"\n(b) peak memory, XLA compiled memory analysis (args + temp + output - alias); packed "
        f"layers impl={args.packed_impl}")
  print("| what | batch | network | args | temp | peak |")
  print("|---|---|---|---|---|---|")
  for what, steps in runs:
    for b in (int(v) for v in args.batches.split(",")):
      for k, m in models.items():
        r = memory(m, b, sampler_steps=steps)
        print(f"| {what} | {b} | {k} | {mib(r['args'])} | {mib(r['temp'])} | {mib(r['peak'])} |",
              flush=True)


if __name__ == "__main__":
  main()
