"""TerDiT (Lu et al., arXiv 2405.14854): a ternary Large-DiT trained with quantization-aware training.

Usage: --config=configs/terdit.py:ARG, ARG a comma-separated list of one variant and options:
  600M_256   TerDiT-600M (dim 1536, 16 blocks, 32 heads), ImageNet 256: SD-VAE latents 32x32x4
  600M_512   the same network on 512 px (latents 64x64x4; no TerDiT-600M-512 was released)
  4.2B_256   TerDiT-4.2B (dim 3072, 32 blocks, 32 heads; Large-DiT's `DiT_Llama_3B_patch2`)
  4.2B_512   the same network on 512 px
  <any>_fp   the same shapes without ternary rules: the full-precision Large-DiT baseline
  digits     a small TerDiT (dim 96, 4 blocks, 0.73 M parameters) on the embedded scikit-learn
             digits (8x8 pixels, 10 classes, patch 2: 16 tokens), for a CPU demo
  runlocal   a tiny model on the digits for a few-second smoke run
  runlocal_latents  the same tiny model on precomputed latents 8x8x4 (e.g. a tiny ILSVRC-layout
             folder through `launch/precompute.py --source=imagenet`); set data.path and
             autoencoder (docs/REPRODUCE_TERDIT.md)
options:
  no_adaln_norm  drop TerDiT's RMSNorm after the block adaLN (ablation, TerDiT Fig. 7)
  alpha_gamma    initialise each ternary layer's alpha as mean|W| (ours) instead of N(0, 1)
  fp             same as the `_fp` suffix

Numerics: TerDiT's choice (official models.py of Lucky-Lance/TerDiT) makes the attention q/k/v/o,
the SwiGLU w1/w2/w3 and each block's adaLN linear ternary (`TERNARY_RULES`); the patch, timestep and
label embedders, the final layer, all norms, biases and the alphas stay full precision. Alpha starts
as in the official code, alpha ~ N(0, 1) (`torch.randn(1)` in fairscale's `layers.py` there).

Recipe: the DiT/ADM discrete diffusion (`common.diffusion.adm.ADMDiffusion`): 1000 linear-beta steps, learned
variance trained with the hybrid loss L_simple + 0.001 L_vlb (Nichol & Dhariwal, arXiv 2102.09672,
Sec. 3.1), class-dropout 0.1 for classifier-free guidance, sampled with 250 respaced DDPM steps.
Optimiser of Large-DiT's trainer (Alpha-VLLM/LLaMA2-Accessory, Large-DiT-ImageNet/train.py): AdamW
betas (0.9, 0.999), weight decay 0, gradient clipping 2.0, EMA 0.9999 over all parameters; TerDiT's
learning rate 5e-4 then 1e-4. Schedule of TerDiT's experiment settings (arXiv 2405.14854):
600M trains 1750K iterations at batch 256 (8 A100-80G) and drops the learning
rate after 1550K; 4.2B trains 1180K iterations at batch 512 (16 A100-80G) and drops it after 550K.
4.2B-512 has no published length: 1.36M steps at batch 512 (696 M images, TerDiT's result table);
600M_512 (not released) takes 600M's schedule.

Data: latents of the SD VAE (sd-vae-ft-ema; scale 0.18215) written by
`launch/precompute.py --source=imagenet --latent=moments` at `LATENTS[size]` (the ILSVRC train set
with ADM's center crop, both flips, a posterior sample per step: Large-DiT's data loading); the VAE
itself (a local diffusers folder) at `AUTOENCODER`. Override with --config.data.path=... and
--config.autoencoder=....

Evaluation (`--mode=eval`): FID-50K, sFID, IS, precision and recall against ADM's reference batch
(`REFERENCES[size]`, downloaded by hand; openai/guided-diffusion evaluations), with samples of 250
DDPM steps at guidance 1.5, as TerDiT's ImageNet table reports them. docs/REPRODUCE_TERDIT.md has
the whole sequence of commands.
"""

import ml_collections

from common.errors import ConfigError
from configs.base import base_config, parse_arg

# (dim, depth, heads) of official models.py: DiT_Llama_600M_patch2, DiT_Llama_3B_patch2 (TerDiT-4.2B).
SHAPES = {"600M": (1536, 16, 32), "4.2B": (3072, 32, 32)}
# (optimizer steps, global batch, step of the 5e-4 -> 1e-4 switch) per variant: TerDiT's
# experiment settings (arXiv 2405.14854); 4.2B_512's length from its result table (696 M images
# at batch 512); 600M_512 (not released) as 600M_256.
SCHEDULES = {"600M_256": (1_750_000, 256, 1_550_000), "600M_512": (1_750_000, 256, 1_550_000),
             "4.2B_256": (1_180_000, 512, 550_000), "4.2B_512": (1_360_000, 512, 550_000)}
VARIANTS = tuple(SCHEDULES)
# The hardware each size is compiled for by `--mode=compile` (docs/TARGETS.md), and how the 4.2B
# model fits it at the paper's global batch: parameters, EMA and AdamW state sharded over all 8
# GPUs (fsdp; 67 GB replicated) and micro-batches per optimizer step by resolution (XLA's memory
# analysis: 85.6 GiB per H100 at 256 px without accumulation).
TARGETS = {"600M": "8xh100", "4.2B": "8xh100"}
GRAD_ACCUM_4B = {256: 2, 512: 8}

AUTOENCODER = "weights/sd-vae-ft-ema"          # a local diffusers AutoencoderKL folder
LATENTS = {256: "workdirs/imagenet256_latents", 512: "workdirs/imagenet512_latents"}
# ADM's reference batches (openai/guided-diffusion evaluations/README.md), the FID reference of
# DiT / Large-DiT / TerDiT: common.eval.reference.ADM_REFERENCE_URLS says where to download them.
REFERENCES = {256: "data/adm/VIRTUAL_imagenet256_labeled.npz",
              512: "data/adm/VIRTUAL_imagenet512.npz"}

# TerDiT's ternary layers: every attention and SwiGLU linear and the block adaLN linear.
TERNARY_PATHS = r"blocks/\d+/(attn/w[qkvo]|mlp/w[123]|adaln)"


def ternary_rules(alpha_init: str | float = "normal") -> tuple:
  """`config.numerics.rules` that make TerDiT's layers ternary (terdit.ternary.TernaryDense)."""
  return ((TERNARY_PATHS, "terdit.ternary.TernaryDense", {"alpha_init": alpha_init}),)


def _diffusion() -> ml_collections.ConfigDict:
  """The DiT/ADM recipe's keys (common.diffusion.adm.ADMDiffusion)."""
  d = ml_collections.ConfigDict()
  d.name = "common.diffusion.adm.ADMDiffusion"
  d.diffusion_steps = 1000
  d.noise_schedule = "linear"          # beta_t from 1e-4 to 0.02 (DDPM / ADM "linear")
  d.learn_sigma = True                 # the network outputs [eps, v] (2 C channels)
  d.vlb_weight = 0.001                 # L_simple + 0.001 L_vlb (Improved DDPM hybrid loss)
  d.noise_cond = "timestep"            # the network gets the original timestep t in [0, 1000)
  d.cond_drop_prob = 0.1               # class dropout to the null class (Large-DiT: 0.1)
  return d


def _optim(c: ml_collections.ConfigDict, lr: float, lr_after: float, switch: int) -> None:
  c.optim.name = "adamw"
  c.optim.learning_rate = lr
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.warmup_steps = 0
  c.optim.clip_norm = 2.0
  c.optim.schedule = "step"            # learning_rate, then lr_after_switch from lr_switch_step
  c.optim.lr_switch_step = switch
  c.optim.lr_after_switch = lr_after


def _imagenet(c: ml_collections.ConfigDict, variant: str) -> None:
  size_name, res = variant.split("_")
  res = int(res)
  dim, depth, heads = SHAPES[size_name]
  latent = res // 8
  c.target = TARGETS[size_name]
  c.model.image_size = latent
  c.model.in_channels = 4
  c.model.dim, c.model.depth, c.model.num_heads = dim, depth, heads
  c.model.num_classes = 1000
  c.model.qk_norm = True               # Large-DiT's ImageNet scripts train with --qk_norm
  c.model.remat = True
  c.model.dtype = "bfloat16"

  c.autoencoder = AUTOENCODER
  c.data = ml_collections.ConfigDict()
  c.data.name = "latents"
  c.data.path = LATENTS[res]

  steps, batch, switch = SCHEDULES[variant]
  c.train.steps = steps
  c.train.batch_size = batch
  if size_name == "4.2B":
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.train.grad_accum_steps = GRAD_ACCUM_4B[res]
  c.train.ema_decay = 0.9999
  c.train.log_every = 100
  c.train.checkpoint_every = 5_000
  c.train.sample_every = 50_000
  _optim(c, 5e-4, 1e-4, switch)

  c.sample.sampler = "ddpm"
  c.sample.num_steps = 250             # respaced DDPM steps (DiT / TerDiT sample.py)
  # TerDiT's forward_with_cfg (DiT legacy) guides only the first 3 of the 4 eps channels.
  c.diffusion.guided_channels = 3
  c.sample.guidance_scale = 1.5        # the "-G" FIDs (DiT convention); 4.0 for pictures
  c.sample.num_samples = 50_000
  c.sample.batch_size = 125
  c.eval.num_samples = 50_000          # FID-50K
  c.eval.reference = REFERENCES[res]


def _tiny_latents(c: ml_collections.ConfigDict) -> None:
  """The smoke run on latents: the tiny digits model on 8x8x4 class-labelled latents (data.path,
  autoencoder to be set); sample grids off, the ImageNet recipe's 250-step sampler shrunk to 8."""
  _digits(c, tiny=True)
  c.data = ml_collections.ConfigDict()
  c.data.name = "latents"
  c.data.path = "workdirs/imagenet_tiny_latents"
  c.model.image_size = 8
  c.model.in_channels = 4
  c.train.steps = 4
  c.train.batch_size = 8
  c.train.log_every = 2
  c.train.checkpoint_every = 4
  c.train.num_grid_samples = 4
  c.sample.num_samples = 4
  c.sample.batch_size = 4
  c.eval.num_samples = 8
  c.eval.batch_size = 8


def _digits(c: ml_collections.ConfigDict, tiny: bool) -> None:
  """The embedded-data demo (and, with `tiny`, the smoke run): digits 8x8x1, patch 2 (16 tokens)."""
  c.data = ml_collections.ConfigDict()
  c.data.name = "digits"
  c.data.image_size = 8
  c.data.random_flip = False
  c.model.image_size = 8
  c.model.in_channels = 1
  c.model.dim, c.model.depth, c.model.num_heads = (32, 2, 2) if tiny else (96, 4, 4)
  c.model.multiple_of = 32
  c.model.num_classes = 10
  c.model.qk_norm = True
  c.model.remat = False
  c.model.dtype = "float32"

  steps = 20 if tiny else 3000
  c.train.steps = steps
  c.train.batch_size = 16 if tiny else 64
  c.train.log_every = 5 if tiny else 100
  c.train.checkpoint_every = 10 if tiny else 500
  c.train.sample_every = 0 if tiny else 1000
  c.train.num_grid_samples = 20 if tiny else 100
  c.train.ema_decay = 0.999
  c.train.ema_warmup = True
  _optim(c, 1e-3, 2e-4, int(0.8 * steps))  # a short run: TerDiT's 5:1 switch, from a higher lr

  c.sample.sampler = "ddpm"
  c.sample.num_steps = 8 if tiny else 100
  c.sample.guidance_scale = 3.0
  c.sample.num_samples = 20 if tiny else 1000
  c.sample.batch_size = 20 if tiny else 500
  c.eval.num_samples = 1000


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  flags = parse_arg(arg)
  fp = "fp" in flags
  variants = []
  for f in flags:
    base = f[:-3] if f.endswith("_fp") else f
    if base in VARIANTS or base in ("digits", "runlocal", "runlocal_latents"):
      variants.append(base)
      fp = fp or f.endswith("_fp")
  unknown = flags - {"fp", "no_adaln_norm", "alpha_gamma"} - {
      f for f in flags if (f[:-3] if f.endswith("_fp") else f) in variants}
  if unknown or len(set(variants) - {"runlocal"}) > 1 or not variants:
    raise ConfigError(
        f"configs/terdit.py: bad args {sorted(flags)}; use one of {list(VARIANTS)} or 'digits' "
        "(each optionally with _fp), or 'runlocal' / 'runlocal_latents', plus options fp, "
        "no_adaln_norm, alpha_gamma.")

  c = base_config()
  c.seed = 0
  c.model = ml_collections.ConfigDict()
  c.model.name = "terdit.model.TerDiT"
  c.model.patch_size = 2
  c.model.learn_sigma = True
  c.model.multiple_of = 256
  c.model.norm_eps = 1e-5
  c.model.adaln_norm = "no_adaln_norm" not in flags
  c.diffusion = _diffusion()
  c.numerics.rules = () if fp else ternary_rules("gamma" if "alpha_gamma" in flags else "normal")

  if "runlocal_latents" in variants:
    _tiny_latents(c)
  elif "runlocal" in variants:
    _digits(c, tiny=True)
  elif "digits" in variants:
    _digits(c, tiny=False)
  else:
    _imagenet(c, variants[0])
  return c
