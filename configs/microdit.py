"""MicroDiT text-to-image on latents (arXiv 2407.15811; official SonyResearch/micro_diffusion).

Args (comma-separated), e.g. `configs/microdit.py:XL_2,p3_512_masked`:
  XL_2 | Tiny_2      the official architectures (micro_diffusion `models/dit.py`, MicroDiT_XL_2 and
                     MicroDiT_Tiny_2: 1,165.4 M and 200.7 M parameters); XL_2 is the default.
  p1_256_masked      phase 1 (default): 256 px (32 x 32 latents), 75% deferred masking, 250K steps,
                     2.4e-4 cosine (2.5K warmup) decaying to 0.33x, clip 0.25, EDM P = (-0.6, 1.2).
  p2_256_unmasked    phase 2: no masking, +30K steps (to 280K) at 8e-5 constant, resuming phase 1's
                     whole train state (optimizer moments and step).
  p3_512_masked      phase 3: 512 px (64 x 64 latents, position interpolation 2), 75% masking,
                     50K steps at 8e-5 (500 warmup), clip 0.5, P = (0, 0.6), EMA 0.99975 from 25K;
                     phase 2's weights only (the fixed position embedding is recomputed).
  p4_512             phase 4: no masking, +5K steps (to 55K), resuming phase 3, EMA 0.9975.
  fashion            the laptop demo: a tiny MicroDiT on captioned Fashion-MNIST latents (the data,
                     autoencoder and text encoder of configs/sid2_t2i_fashion.py).
  runlocal           a tiny model for a few-second CPU smoke run on the Fashion-MNIST latents.
  unmasked | naive   (with fashion) mask ratio 0, or 75% masking without the patch mixer.
  coco_fid30k        --mode=eval scores zero-shot FID-30K on COCO 2014 (config.eval.coco: local
                     captions_val2014.json + val2014/, see docs/MICRODIT_DATA.md).

The 256 px phases train on `data_mixture(256)` and the 512 px ones on `data_mixture(512)`:
micro_diffusion's sources, each precomputed into data/microdit/<res>/<source>
(docs/MICRODIT_DATA.md).

The official trainer's two bugs are fixed: EMA is applied (config.train.ema_*), and the halved
learning rate for the MoE parameters reaches them (config.optim.lr_multipliers by parameter path).
The phases chain through `config.init_from.path` (set it to the previous phase's workdir).
"""

import ml_collections

from configs import sid2_t2i_fashion
from configs.base import base_config, parse_arg

PHASES = ("p1_256_masked", "p2_256_unmasked", "p3_512_masked", "p4_512")

# The MoE parameters (expert weights and router) of every MicroDiT block; dense SwiGLU kernels are
# ".../mlp/w1/kernel" and do not match.
MOE_PARAMS = r"(blocks|patch_mixer)/\d+/mlp/(expert_w1|expert_w2|gate)/kernel"


def architecture(name: str) -> dict:
  """config.model keys of MicroDiT_XL_2 / MicroDiT_Tiny_2 (micro_diffusion `models/dit.py`)."""
  common = dict(name="microdit.model.MicroDiT", patch_size=2, in_channels=4, multiple_of=256,
                caption_channels=1024, caption_len=77, norm_eps=1e-6, qkv_ratio=(0.5, 1.0),
                mlp_ratio=(0.5, 4.0), use_patch_mixer=True, patch_mixer_qkv_ratio=1.0,
                patch_mixer_mlp_ratio=4.0, use_bias=False, num_experts=8, expert_capacity=2.0,
                experts_every_n=2)
  if name == "XL_2":
    return dict(common, dim=1024, depth=28, head_dim=64, patch_mixer_depth=6,
                patch_mixer_dim=768)
  if name == "Tiny_2":
    return dict(common, dim=512, depth=16, head_dim=32, patch_mixer_depth=4,
                patch_mixer_dim=512)
  raise ValueError(name)


# The training sources of each resolution, as micro_diffusion's `configs/res_256_*.yaml` and
# `res_512_*.yaml` list them (`dataset.train.datadir`): SA1B (LLaVA captions), CC12M, TextCaps,
# JourneyDB, DiffusionDB at 256 px; at 512 px DiffusionDB is dropped and CC12M is its min-res-512
# subset. docs/MICRODIT_DATA.md prepares each directory.
MIX_SOURCES = {256: ("sa1b", "cc12m", "textcaps", "jdb", "diffdb"),
               512: ("sa1b", "cc12m_minres512", "textcaps", "jdb")}


def data_mixture(resolution: int, root: str = "data/microdit") -> tuple:
  """config.data.mixture of the `resolution` px phases: ((f"{root}/{resolution}/{source}",
  "count"), ...). "count" weights each source by its number of images: micro_diffusion's
  StreamingDataset over one Stream per dataset without proportions visits every sample once per
  epoch (`datasets/latents_loader.py`), and neither the paper nor the code gives other
  proportions."""
  return tuple((f"{root}/{resolution}/{name}", "count") for name in MIX_SOURCES[resolution])


def _init_from(path: str = "", load: str = "params", keep_step: bool = False):
  return ml_collections.ConfigDict(
      {"path": path, "load": load, "converter": "", "keep_step": keep_step})


def _phase(c: ml_collections.ConfigDict, phase: str) -> None:
  """The settings of one training phase (micro_diffusion `configs/res_*.yaml`)."""
  c.optim.b1, c.optim.b2, c.optim.eps, c.optim.weight_decay = 0.9, 0.999, 1e-8, 0.1
  c.optim.lr_multipliers = ((MOE_PARAMS, 0.5),)
  c.train.batch_size = 2048
  # The official YAMLs' device_train_microbatch_size on 8 GPUs (256, 64, 32, 16 by phase) as
  # micro-batches of the global batch: 2048 / (8 x microbatch).
  c.train.grad_accum_steps = {"p1_256_masked": 1, "p2_256_unmasked": 4, "p3_512_masked": 8,
                              "p4_512": 16}[phase]
  c.train.ema_start_step = 0
  c.init_from = _init_from()
  if phase.startswith("p1") or phase.startswith("p2"):
    c.model.input_size, c.model.pos_interp_scale = 32, 1.0
    c.diffusion.p_mean, c.diffusion.p_std = -0.6, 1.2
    c.optim.clip_norm = 0.25
    c.data.path, c.data.mixture = "", data_mixture(256)
  else:
    c.model.input_size, c.model.pos_interp_scale = 64, 2.0
    c.diffusion.p_mean, c.diffusion.p_std = 0.0, 0.6
    c.optim.clip_norm = 0.5
    c.data.path, c.data.mixture = "", data_mixture(512)
  if phase == "p1_256_masked":
    c.model.mask_ratio = 0.75
    c.train.steps = 250_000
    c.optim.learning_rate, c.optim.schedule = 2.4e-4, "cosine"
    c.optim.warmup_steps, c.optim.final_lr_fraction = 2500, 0.33
    c.train.ema_decay = 0.0              # the official phase has no EMA: ema = params
  elif phase == "p2_256_unmasked":
    c.model.mask_ratio = 0.0
    c.train.steps = 280_000              # cumulative: phase 1's 250K + 30K
    c.optim.learning_rate, c.optim.schedule, c.optim.warmup_steps = 8e-5, "constant", 0
    c.train.ema_decay = 0.0
    c.init_from = _init_from("workdirs/microdit_p1", "state", keep_step=True)
  elif phase == "p3_512_masked":
    c.model.mask_ratio = 0.75
    c.train.steps = 50_000
    c.optim.learning_rate, c.optim.schedule, c.optim.warmup_steps = 8e-5, "constant", 500
    c.train.ema_decay, c.train.ema_start_step = 0.99975, 25_000
    c.init_from = _init_from("workdirs/microdit_p2", "params")
  elif phase == "p4_512":
    c.model.mask_ratio = 0.0
    c.train.steps = 55_000               # cumulative: phase 3's 50K + 5K
    c.optim.learning_rate, c.optim.schedule, c.optim.warmup_steps = 8e-5, "constant", 0
    c.train.ema_decay, c.train.ema_start_step = 0.9975, 51_000   # official: 1K steps in
    c.init_from = _init_from("workdirs/microdit_p3", "state", keep_step=True)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  unknown = args - {"XL_2", "Tiny_2", "runlocal", "fashion", "unmasked", "naive", "coco_fid30k",
                    *PHASES}
  if unknown:
    raise ValueError(f"configs/microdit.py: unknown argument(s) {sorted(unknown)}.")
  c = base_config()
  c.seed = 18
  c.target = "8xh100"                  # all four phases: 2.6 days on 8xH100 (arXiv 2407.15811)
  c.model = ml_collections.ConfigDict(architecture("Tiny_2" if "Tiny_2" in args else "XL_2"))
  c.model.mask_ratio = 0.75
  c.model.remat = False
  c.model.dtype = "bfloat16"

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.name = "edm"
  c.diffusion.sigma_data = 0.9
  c.diffusion.p_mean = -0.6
  c.diffusion.p_std = 1.2
  c.diffusion.cond_drop_prob = 0.1     # caption dropout: all-zero embeddings

  c.sample.sampler = "heun"
  c.sample.num_steps = 30
  c.sample.guidance_scale = 5.0        # CFG on F, everywhere (no guidance interval)
  c.sample.guidance_interval = (-1e9, 1e9)

  c.data = ml_collections.ConfigDict({"name": "latents", "path": "", "read_threads": 0})
  c.mesh.expert = 1

  phases = [p for p in PHASES if p in args]
  if len(phases) > 1:
    raise ValueError(f"configs/microdit.py: choose one phase, got {phases}.")
  _phase(c, phases[0] if phases else PHASES[0])

  if "fashion" in args or "runlocal" in args:
    _fashion(c, args)
  if "runlocal" in args:
    _runlocal(c)
  if "coco_fid30k" in args:
    c.eval.num_samples = 30_000
    c.eval.coco = coco_fid30k()
  return c


def coco_fid30k(root: str = "data/coco2014") -> ml_collections.ConfigDict:
  """config.eval.coco of the zero-shot FID-30K on COCO 2014 that MicroDiT reports (arXiv
  2407.15811; micro_diffusion README's FID-30K table; protocol in common/eval/coco.py): 30K val2014
  captions drawn with seed 0, real images and samples compared at 256 px (center crop + resize;
  Inception at 299)."""
  return ml_collections.ConfigDict({
      "captions": f"{root}/annotations/captions_val2014.json", "images": f"{root}/val2014",
      "seed": 0, "image_size": 256})


def _fashion(c: ml_collections.ConfigDict, args: set[str]) -> None:
  """A tiny MicroDiT on the captioned Fashion-MNIST latents of configs/sid2_t2i_fashion.py (its
  data, autoencoder, text encoder, held-out prompts and FID reference)."""
  f = sid2_t2i_fashion.get_config()
  c.seed = 0
  c.data, c.autoencoder, c.text_encoder, c.eval = f.data, f.autoencoder, f.text_encoder, f.eval
  c.sample.prompts = f.sample.prompts
  c.sample.num_samples, c.sample.batch_size = f.sample.num_samples, f.sample.batch_size
  c.model.update(dict(
      input_size=7, patch_size=1, in_channels=4, caption_channels=f.model.text_dim,
      caption_len=f.model.text_len, dim=96, depth=4, head_dim=32, multiple_of=32,
      patch_mixer_depth=2, patch_mixer_dim=64, num_experts=4, pos_interp_scale=1.0,
      mask_ratio=0.75, use_patch_mixer=True, dtype="float32"))
  if "unmasked" in args:
    c.model.mask_ratio = 0.0
  if "naive" in args:
    c.model.use_patch_mixer = False
  c.diffusion.p_mean, c.diffusion.p_std = -0.6, 1.2
  c.init_from = _init_from()
  c.train.steps = 1500
  c.train.batch_size = 32
  c.train.grad_accum_steps = 1
  c.train.log_every = 100
  c.train.checkpoint_every = 500
  c.train.sample_every = 500
  c.train.num_grid_samples = 40
  c.train.ema_decay, c.train.ema_start_step, c.train.ema_warmup = 0.999, 0, True
  c.optim.learning_rate, c.optim.schedule, c.optim.warmup_steps = 1e-3, "cosine", 200
  c.optim.final_lr_fraction, c.optim.b2, c.optim.weight_decay = 0.05, 0.99, 0.0
  c.optim.clip_norm = 1.0
  c.sample.num_steps = 30


def _runlocal(c: ml_collections.ConfigDict) -> None:
  """A tiny model on the Fashion-MNIST latents (`make t2i-demo` prepares them)."""
  c.model.update(dict(dim=64, depth=3, head_dim=16, multiple_of=32, patch_mixer_depth=2,
                      patch_mixer_dim=32, num_experts=4, dtype="float32"))
  c.init_from = _init_from()
  c.train.steps = 20
  c.train.batch_size = 16
  c.train.log_every = 5
  c.train.checkpoint_every = 10
  c.train.sample_every = 0
  c.train.num_grid_samples = 8
  c.optim.warmup_steps = 2
  c.sample.num_steps = 4
  c.sample.num_samples = 8
  c.sample.batch_size = 8
