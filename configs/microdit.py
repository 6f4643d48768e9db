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
  official_effective what the official trainer actually ran (train.py): no EMA in any phase (its
                     `ema` algorithm is skipped as "not supported") and the full learning rate for
                     the MoE parameters (its "moe" name filter matches no parameter: the MoE
                     module is named `mlp`). Without it the YAMLs' intent: EMA in phases 3 and 4,
                     half the learning rate for the MoE parameters.
  fashion            the laptop demo: a tiny MicroDiT on captioned Fashion-MNIST latents (the data,
                     autoencoder and text encoder of configs/sid2_t2i_fashion.py).
  runlocal           a tiny model of the phase's latent shape (32 x 32 x 4; 64 x 64 x 4 at 512 px)
                     for a CPU smoke run of about a minute on SYNTHETIC latents and caption
                     embeddings (data.name="synthetic"), with stand-ins that exist offline: the
                     embedded MiniLM text encoder (32 x 384 caption tokens instead of CLIP's
                     77 x 1024) and an UNTRAINED random-init f8 autoencoder ("untrained:f8"), so
                     the end-of-phase sample grid is drawn and decoded (to noise). The phases
                     chain through workdirs/microdit_pN_runlocal. With fashion: a tiny model on the
                     Fashion-MNIST latents (`make t2i-demo` prepares them).
  unmasked | naive   (with fashion) mask ratio 0, or 75% masking without the patch mixer.
  coco_fid30k        (the phases' default; with runlocal or fashion, replacing their evaluation)
                     --mode=eval scores zero-shot FID-30K on COCO 2014 (config.eval.coco: local
                     captions_val2014.json + val2014/, see docs/MICRODIT_DATA.md).

The 256 px phases train on `data_mixture(256)` and the 512 px ones on `data_mixture(512)`:
micro_diffusion's sources, each precomputed into data/microdit/<res>/<source>
(docs/MICRODIT_DATA.md).

By default the official trainer's two bugs are fixed: EMA is applied (config.train.ema_*), and the
halved learning rate for the MoE parameters reaches them (config.optim.lr_multipliers by parameter
path); `official_effective` restores them. The phases chain through `config.init_from.path` (the
previous phase's workdir, workdirs/microdit_pN by default). The text encoder, autoencoder and
evaluation files are local paths (TEXT_ENCODER, AUTOENCODER below, `coco_fid30k()`; override with
--config.text_encoder=..., --config.eval.coco.captions=... etc.): docs/REPRODUCE_MICRODIT.md.
"""

import ml_collections

from configs import sid2_t2i_fashion
from configs.base import base_config, parse_arg

PHASES = ("p1_256_masked", "p2_256_unmasked", "p3_512_masked", "p4_512")
# The workdir each phase is trained in, which the next phase's init_from reads.
WORKDIRS = {"p1_256_masked": "workdirs/microdit_p1", "p2_256_unmasked": "workdirs/microdit_p2",
            "p3_512_masked": "workdirs/microdit_p3", "p4_512": "workdirs/microdit_p4"}

# The official encoders (micro_diffusion configs/res_*.yaml, `text_encoder_name:
# openclip:hf-hub:apple/DFN5B-CLIP-ViT-H-14-378`, `vae_name:
# stabilityai/stable-diffusion-xl-base-1.0` whose `vae` subfolder models/model.py loads), as local
# folders: an OpenCLIP folder (open_clip_config.json, open_clip_model.safetensors or
# open_clip_pytorch_model.bin, tokenizer.json; common.text.clip) and a diffusers AutoencoderKL
# folder (config.json, diffusion_pytorch_model.safetensors; common.autoencoders). Nothing is
# downloaded.
TEXT_ENCODER = "workdirs/DFN5B-CLIP-ViT-H-14-378"
AUTOENCODER = "workdirs/sdxl-vae"

# The prompts of the official sample grids (micro_diffusion configs/res_*.yaml, callbacks
# `image_monitor`: LogDiffusionImages, 30 steps, guidance 5).
PROMPTS = (
    "a photograph of an astronaut riding a horse",
    "An astronaut riding a pig, highly realistic dslr photo, cinematic shot",
    "Panda mad scientist mixing sparkling chemicals, artstation",
    "a close-up of a fire spitting dragon, cinematic shot.",
    "A small cactus with a happy face in the Sahara desert",
    "Pirate ship trapped in a cosmic maelstrom nebula, rendered in cosmic beach whirlpool engine, "
    "volumetric lighting, spectacular, ambient lights, light pollution, cinematic atmosphere, art "
    "nouveau style, illustration art artwork by SenseiJaye, intricate detail.",
    "A dog that has been meditating all the time",
    "A Pikachu with an angry expression and red eyes, with lightning around it, hyper realistic "
    "style",
    "A worker that looks like a mixture of cow and horse is working hard to type code",
    "A capybara made of lego sitting in a realistic, natural field",
    "A grand piano with a white bench.",
    "In a fantastical setting, a highly detailed furry humanoid skunk with piercing eyes "
    "confidently poses in a medium shot, wearing an animal hide jacket. The artist has masterfully "
    "rendered the character in digital art, capturing the intricate details of fur and clothing "
    "texture.",
    "A illustration from a graphic novel. A bustling city street under the shine of a full moon. "
    "The sidewalks bustling with pedestrians enjoying the nightlife. At the corner stall, a young "
    "woman with fiery red hair, dressed in a signature velvet cloak, is haggling with the grumpy "
    "old vendor. the grumpy vendor, a tall, sophisticated man is wearing a sharp suit, sports a "
    "noteworthy moustache is animatedly conversing on his steampunk telephone.",
    "A fierce garden gnome warrior, clad in armor crafted from leaves and bark, brandishes a tiny "
    "sword and shield. He stands valiantly on a rock amidst a blooming garden, surrounded by "
    "colorful flowers and towering plants. A determined expression is painted on his face, ready "
    "to defend his garden kingdom.",
    "A giant cobra snake made from corn",
    "A green sign that says \"Very Deep Learning\" and is at the edge of the Grand Canyon. Puffy "
    "white clouds are in the sky",
)
# The prompts of PROMPTS that fit MiniLM's 32 tokens (runlocal's stand-in text encoder).
SHORT_PROMPTS = tuple(PROMPTS[i] for i in (0, 1, 2, 3, 4, 6, 10, 14))

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
    c.init_from = _init_from(WORKDIRS["p1_256_masked"], "state", keep_step=True)
  elif phase == "p3_512_masked":
    c.model.mask_ratio = 0.75
    c.train.steps = 50_000
    c.optim.learning_rate, c.optim.schedule, c.optim.warmup_steps = 8e-5, "constant", 500
    c.train.ema_decay, c.train.ema_start_step = 0.99975, 25_000
    c.init_from = _init_from(WORKDIRS["p2_256_unmasked"], "params")
  elif phase == "p4_512":
    c.model.mask_ratio = 0.0
    c.train.steps = 55_000               # cumulative: phase 3's 50K + 5K
    c.optim.learning_rate, c.optim.schedule, c.optim.warmup_steps = 8e-5, "constant", 0
    c.train.ema_decay, c.train.ema_start_step = 0.9975, 51_000   # official: 1K steps in
    c.init_from = _init_from(WORKDIRS["p3_512_masked"], "state", keep_step=True)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  unknown = args - {"XL_2", "Tiny_2", "runlocal", "fashion", "unmasked", "naive", "coco_fid30k",
                    "official_effective", *PHASES}
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
  c.sample.prompts = PROMPTS
  c.sample.num_samples = len(PROMPTS)
  c.sample.batch_size = len(PROMPTS)
  c.train.num_grid_samples = len(PROMPTS)   # one image per prompt, as the official callback
  c.text_encoder = TEXT_ENCODER
  c.autoencoder = AUTOENCODER
  c.eval.batch_size = 250

  c.data = ml_collections.ConfigDict({"name": "latents", "path": "", "read_threads": 0})
  c.mesh.expert = 1

  phases = [p for p in PHASES if p in args]
  if len(phases) > 1:
    raise ValueError(f"configs/microdit.py: choose one phase, got {phases}.")
  phase = phases[0] if phases else PHASES[0]
  _phase(c, phase)
  if "official_effective" in args:
    c.optim.lr_multipliers = ()        # full lr everywhere, as train.py's dead "moe" filter
    c.train.ema_decay, c.train.ema_start_step = 0.0, 0     # ema = params, as its skipped EMA

  if "fashion" in args:
    _fashion(c, args)
  if "runlocal" in args:
    _runlocal(c, phase, synthetic="fashion" not in args)
  if "coco_fid30k" in args or not {"fashion", "runlocal"} & args:
    c.eval.num_samples = 30_000        # the paper's zero-shot FID-30K on COCO 2014
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


def _runlocal(c: ml_collections.ConfigDict, phase: str, synthetic: bool) -> None:
  """A tiny model for a CPU smoke run: on SYNTHETIC latents of the phase's shape, or (fashion) on
  the Fashion-MNIST latents (`make t2i-demo` prepares them).

  The phases keep their chaining (init_from load / keep_step), position interpolation, masking,
  schedule shapes and EMA starts, with steps scaled down: 10 + 5 steps at 256 px, 6 + 3 at 512."""
  c.model.update(dict(dim=64, depth=3, head_dim=16, multiple_of=32, patch_mixer_depth=2,
                      patch_mixer_dim=32, num_experts=4, dtype="float32"))
  c.train.batch_size = 8
  c.train.grad_accum_steps = 1
  c.train.log_every = 5
  c.train.checkpoint_every = 10
  c.train.sample_every = 0
  c.train.num_grid_samples = 8
  c.optim.warmup_steps = min(c.optim.warmup_steps, 2)
  c.sample.num_steps = 4
  c.sample.num_samples = 8
  c.sample.batch_size = 8
  if not synthetic:
    c.init_from = _init_from()
    c.train.steps = 20
    return
  c.train.steps, c.train.ema_start_step = {
      "p1_256_masked": (10, 0), "p2_256_unmasked": (15, 0), "p3_512_masked": (6, 3),
      "p4_512": (9, 7)}[phase]
  c.train.checkpoint_every = 5
  if c.init_from.path:
    previous = PHASES[PHASES.index(phase) - 1]
    c.init_from.path = WORKDIRS[previous] + "_runlocal"
  side = c.model.input_size
  c.model.caption_len, c.model.caption_channels = 32, 384      # MiniLM's tokens
  c.text_encoder = "minilm"
  c.autoencoder = "untrained:f8"       # the SDXL VAE's factor 8 and 4 channels, UNTRAINED
  c.sample.prompts = SHORT_PROMPTS
  c.data = ml_collections.ConfigDict({
      "name": "synthetic", "image_size": side, "channels": 4, "num_classes": 0,
      "num_examples": 64, "text_len": 32, "text_width": 384})
  # --mode=eval scores against SYNTHETIC RGB images of the decoded size (meaningless numbers,
  # the whole evaluation path).
  c.eval.reference = ""
  c.eval.reference_data = ml_collections.ConfigDict({
      "name": "synthetic", "image_size": 8 * side, "channels": 3, "num_classes": 0,
      "num_examples": 16})
  c.eval.reference_limit = 16
  c.eval.num_samples = 16
  c.eval.train_num_samples = 16
  c.eval.batch_size = 16
