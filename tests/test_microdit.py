"""MicroDiT: parity with the official micro_diffusion DiT, the kept-patch loss, MoE, configs."""

import json
import os

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from common.diffusion import losses
from common.diffusion.recipes import EDMDiffusion
from common.errors import CheckpointError, ShapeError
from common.weights.torch_weights import load_torch_weights
from microdit import convert
from microdit.layers import ExpertChoiceMoE, sincos_pos_embed
from microdit.model import MicroDiT, qkv_width

FIX = os.path.join(os.path.dirname(__file__), "fixtures", "microdit")


def _fixture_model():
  with open(os.path.join(FIX, "microdit_arch.json")) as f:
    arch = json.load(f)
  io = dict(np.load(os.path.join(FIX, "microdit_io.npz")))
  kw = {k: arch[k] for k in (
      "input_size", "patch_size", "in_channels", "dim", "depth", "head_dim", "multiple_of",
      "caption_channels", "pos_interp_scale", "norm_eps", "use_patch_mixer", "patch_mixer_depth",
      "patch_mixer_dim", "patch_mixer_qkv_ratio", "patch_mixer_mlp_ratio", "use_bias",
      "num_experts", "expert_capacity", "experts_every_n", "mask_ratio")}
  model = MicroDiT(**kw, qkv_ratio=tuple(arch["qkv_ratio"]), mlp_ratio=tuple(arch["mlp_ratio"]),
                   caption_len=io["y"].shape[2], rngs=nnx.Rngs(params=jax.random.key(0)))
  state = nnx.state(model, nnx.Param)
  tree = load_torch_weights(os.path.join(FIX, "microdit_weights.safetensors"))
  params = convert.from_official(tree, nnx.to_pure_dict(state))
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  return model, io, tree


def _call(model, *args, **kwargs):
  """model(*args, **kwargs) compiled as one XLA program (op-by-op dispatch is slow on CPU)."""
  graphdef, state = nnx.split(model)
  return jax.jit(lambda s, a, k: nnx.merge(graphdef, s)(*a, **k))(state, args, kwargs)


def _inputs(io):
  x = jnp.asarray(io["x"].transpose(0, 2, 3, 1))
  return x, jnp.asarray(io["t"]), {"tokens": jnp.asarray(io["y"][:, 0])}


def test_official_parity_unmasked():
  model, io, _ = _fixture_model()
  out = _call(model, *_inputs(io))
  np.testing.assert_allclose(np.asarray(out), io["out"].transpose(0, 2, 3, 1), rtol=1e-4,
                             atol=1e-4)


def test_official_parity_masked():
  model, io, _ = _fixture_model()
  out, aux = _call(model, *_inputs(io), mask_noise=jnp.asarray(io["mask_noise"]))
  np.testing.assert_allclose(np.asarray(out), io["out_masked"].transpose(0, 2, 3, 1), rtol=1e-4,
                             atol=1e-4)
  p = model.patch_size
  kept = 1.0 - io["mask"].reshape(2, 4, 4)                 # official mask: 1 = removed
  np.testing.assert_array_equal(np.asarray(aux["loss_mask"]),
                                kept.repeat(p, axis=1).repeat(p, axis=2))
  assert not np.allclose(io["out_masked"], io["out"])       # the mask really changed the output


def test_converter_names_wrong_shapes_and_missing():
  model, _, tree = _fixture_model()
  abstract = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  bad = dict(tree)
  bad["blocks.0.attn.qkv.weight"] = np.zeros((3, 3), np.float32)
  with pytest.raises(CheckpointError, match="blocks.0.attn.qkv.weight"):
    convert.from_official(bad, abstract)
  missing = {k: v for k, v in tree.items() if k != "final_layer.linear.bias"}
  with pytest.raises(CheckpointError, match="final_layer.linear.bias"):
    convert.from_official(missing, abstract)
  prefixed = {f"dit.{k}": v for k, v in tree.items()}
  convert.from_official(prefixed, abstract)                # Composer's "dit." prefix


def test_kept_patch_loss_equals_official_pooling():
  """The recipe's per-example loss with the pixel loss_mask equals micro_diffusion's edm_loss:
  weight * error, mean over channels, avg_pool2d per patch, mean over kept patches."""
  rng = np.random.default_rng(0)
  b, g, p, c = 3, 4, 2, 4
  d, x = rng.normal(size=(2, b, g * p, g * p, c)).astype(np.float32)
  kept = (rng.random((b, g, g)) < 0.4).astype(np.float32)
  kept[:, 0, 0] = 1
  pix = kept.repeat(p, 1).repeat(p, 2)
  ours = np.asarray(losses.masked_mean_sq_error(d, x, pix))
  err = ((d - x)**2).mean(-1).reshape(b, g, p, g, p).mean((2, 4)).reshape(b, -1)
  official = (err * kept.reshape(b, -1)).sum(1) / kept.reshape(b, -1).sum(1)
  np.testing.assert_allclose(ours, official, rtol=1e-6)


def _tiny(**kw):
  args = dict(input_size=8, dim=32, depth=3, head_dim=8, multiple_of=16, caption_channels=12,
              caption_len=3, patch_mixer_depth=2, patch_mixer_dim=16, num_experts=4,
              mask_ratio=0.75, rngs=nnx.Rngs(params=jax.random.key(0)))
  args.update(kw)
  return MicroDiT(**args)


def test_masking_only_with_a_key_and_recipe_loss():
  model = _tiny()
  x, cond = jnp.ones((2, 8, 8, 4)), {"tokens": jnp.ones((2, 3, 12))}
  assert not isinstance(_call(model, x, jnp.zeros(2), cond), tuple)       # sampling: no mask
  _, aux = _call(model, x, jnp.zeros(2), cond, dropout_key=jax.random.key(1))
  assert aux["loss_mask"].shape == (2, 8, 8)
  np.testing.assert_array_equal(aux["loss_mask"].sum((1, 2)), [16, 16])   # 4 of 16 patches
  recipe = EDMDiffusion(sigma_data=0.9, p_mean=-0.6, p_std=1.2, cond_drop_prob=0.1)
  graphdef, state = nnx.split(model)
  loss, _ = jax.jit(lambda s, b, k: recipe.loss(nnx.merge(graphdef, s), b, k))(
      state, {"x": x, "cond": cond}, jax.random.key(2))
  assert loss.shape == (2,) and np.all(np.isfinite(loss))
  null = model.null_cond(cond)
  assert not np.any(null["tokens"])
  with pytest.raises(ShapeError):
    model(x, jnp.zeros(2), {"tokens": jnp.ones((2, 3, 5))})


def test_expert_choice_top_k_per_sample():
  moe = ExpertChoiceMoE(8, 16, 16, num_experts=4, capacity=1.0, dtype="float32",
                        rngs=nnx.Rngs(params=jax.random.key(0)))
  x = jax.random.normal(jax.random.key(1), (2, 8, 8))
  out = _call(moe, x)
  assert moe.tokens_per_expert(8) == 2
  # Sample 0 alone gives the same output: experts choose within each sample.
  np.testing.assert_allclose(_call(moe, x[:1]), out[:1], rtol=1e-5, atol=1e-6)
  probs = jax.nn.softmax(x @ moe.gate.kernel[...], -1)
  picked = np.zeros((2, 8), bool)
  for bi in range(2):
    for e in range(4):
      picked[bi, np.argsort(-np.asarray(probs[bi, :, e]))[:2]] = True
  np.testing.assert_array_equal(np.asarray(out)[~picked], 0.0)   # unpicked tokens: no FFN output


def test_layerwise_widths_and_pos_embed_interpolation():
  widths = [qkv_width(1024, r, 64) for r in np.linspace(0.5, 1.0, 28)]
  assert widths[0] == 512 and widths[1:7] == [640] * 6 and widths[-1] == 1024
  pe16 = sincos_pos_embed(64, 16, 16, 1.0).reshape(16, 16, 64)
  pe32 = sincos_pos_embed(64, 32, 32, 2.0).reshape(32, 32, 64)    # positions 0, 0.5, ..., 15.5
  np.testing.assert_allclose(pe32[::2, ::2], pe16, atol=1e-6)


def test_configs_load():
  from configs import microdit as cfg  # pylint: disable=import-outside-toplevel
  for arg in ("XL_2", "Tiny_2", "runlocal", "fashion", "fashion,runlocal", "fashion,naive",
              "XL_2,p2_256_unmasked", "XL_2,p3_512_masked", "XL_2,p4_512"):
    c = cfg.get_config(arg)
    assert c.model.name == "microdit.model.MicroDiT" and c.diffusion.sigma_data == 0.9
  p3 = cfg.get_config("p3_512_masked")
  assert (p3.model.input_size, p3.model.pos_interp_scale, p3.diffusion.p_mean) == (64, 2.0, 0.0)
  assert p3.init_from.load == "params" and cfg.get_config("p2_256_unmasked").init_from.load == (
      "state")
  import re  # pylint: disable=import-outside-toplevel
  rx = p3.optim.lr_multipliers[0][0]
  assert re.fullmatch(rx, "blocks/1/mlp/expert_w1/kernel")
  assert re.fullmatch(rx, "patch_mixer/3/mlp/gate/kernel")
  assert not re.fullmatch(rx, "blocks/0/mlp/w1/kernel")
  # The official YAMLs' per-GPU micro-batches on 8 H100s, at the global batch 2048.
  for phase, micro in (("p1_256_masked", 256), ("p2_256_unmasked", 64), ("p3_512_masked", 32),
                       ("p4_512", 16)):
    c = cfg.get_config(phase)
    assert (c.train.batch_size, c.train.batch_size // c.train.grad_accum_steps // 8,
            c.target) == (2048, micro, "8xh100"), phase
  assert cfg.get_config("p4_512,runlocal").train.grad_accum_steps == 1


def test_official_effective_is_what_the_official_trainer_ran():
  from configs import microdit as cfg  # pylint: disable=import-outside-toplevel
  for phase in cfg.PHASES:
    intended, ran = cfg.get_config(phase), cfg.get_config(f"{phase},official_effective")
    # train.py skips the YAMLs' `ema` ("not supported") and its "moe" filter matches no parameter
    assert ran.train.ema_decay == 0.0 and ran.optim.lr_multipliers == ()
    assert intended.optim.lr_multipliers == ((cfg.MOE_PARAMS, 0.5),)
    # everything else is the phase as the YAMLs write it
    for key in ("model", "diffusion", "data", "init_from", "sample"):
      assert ran[key].to_dict() == intended[key].to_dict(), (phase, key)
    assert (ran.optim.learning_rate, ran.train.steps) == (intended.optim.learning_rate,
                                                          intended.train.steps)
  assert cfg.get_config("p3_512_masked").train.ema_decay == 0.99975
  assert cfg.get_config("p4_512").train.ema_decay == 0.9975
