"""SiD2 text-to-image on latents: captioned Fashion-MNIST, our own KL autoencoder, all-MiniLM-L6-v2.

The latent pipeline end to end on a laptop (`make t2i-demo` runs every step):
  1. train the autoencoder:  launch/main.py --config=configs/autoencoder_fashion.py --workdir=AE
  2. export it:              launch/export_autoencoder.py --config=configs/autoencoder_fashion.py
                               --workdir=AE --out=AE/export
  3. precompute the data:    launch/precompute.py --source=fashion_mnist --autoencoder=AE/export
                               --text_encoder=minilm --output=LATENTS
  4. train this config:      launch/main.py --config=configs/sid2_t2i_fashion.py --workdir=W
  5. sample from prompts:    launch/main.py ... --mode=sample [--prompts=FILE]
The paths of steps 2-3 are `config.autoencoder` and `config.data.path` below (override them with
--config.autoencoder=... and --config.data.path=...).

The network is the SiD2 Residual U-ViT with its text-conditional variant (SiD2 publishes none; ours:
the pooled caption embedding joins the global conditioning, the transformer blocks cross-attend to the
caption tokens, the null caption is all-zero embeddings as in MicroDiT). The 7 x 7 x 4 latent grid
is one transformer level. Captions use ten training phrasings; samples and evaluation use four
held-out phrasings (common.data.captions.fashion_eval_prompts).

Args (comma-separated): "runlocal" for a few-second smoke run (tiny model, 20 steps).
"""

import ml_collections

from common.data import captions
from configs.base import base_config, parse_arg

AUTOENCODER = "workdirs/ae_fashion/export"
LATENTS = "workdirs/fashion_latents"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  args = parse_arg(arg)
  c = base_config()
  # The output layer maps to the image/latent channels (1 to 16 features): replicated.
  c.mesh.replicated = ("out_proj/.*",)
  c.seed = 0
  c.autoencoder = AUTOENCODER
  c.text_encoder = "minilm"

  c.data = ml_collections.ConfigDict()
  c.data.name = "latents"
  c.data.path = LATENTS
  c.data.read_threads = 0              # in-process reads are fastest on a 2-core machine

  c.model = ml_collections.ConfigDict()
  c.model.name = "sid2.model.ResidualUViT"
  c.model.image_size = 7
  c.model.in_channels = 4
  c.model.patch_size = 1
  c.model.channels = (96,)
  c.model.level_types = ("transformer",)
  c.model.blocks_per_level = ()
  c.model.mid_blocks = 4
  c.model.head_dim = 32
  c.model.mlp_ratio = 4.0
  c.model.dropout = (0.0,)
  c.model.num_classes = 0
  c.model.text_dim = 384               # all-MiniLM-L6-v2
  c.model.text_len = 32                # its default max_length in common.text
  c.model.cond_dim = 128
  c.model.remat = False
  c.model.dtype = "float32"

  c.diffusion = ml_collections.ConfigDict()
  c.diffusion.name = "vp"
  # The latents are scaled to unit variance by the autoencoder's export. The "sid2" schedule shifts
  # the cosine by 2 log(noise_d / image_d) (SiD, arXiv 2301.11093; interpolated 32 -> 256 in t, see
  # common/diffusion/schedules.py): at image_d = 8 (the digits demo's shift) half the training times have
  # logSNR > 4.9, where the sigmoid weight (bias -1) is tiny, and only t > 0.87 reaches logSNR < 2,
  # where the garment's shape (coat vs pullover) is decided;
  # the judge's accuracy stalled at 76-77% (1500 and 3000 steps). image_d = 64 centres t = 0.5 at
  # logSNR 0.7 (where MicroDiT's EDM noise, P_mean -0.6 at sigma_data 0.9, centres too): 85.5% at
  # 1500 steps, same seed and data (docs/BENCHMARKS.md).
  c.diffusion.schedule = ml_collections.ConfigDict({"name": "sid2", "image_d": 64})
  c.diffusion.prediction = "v"
  c.diffusion.weighting = "sigmoid"
  c.diffusion.sigmoid_bias = -1.0
  c.diffusion.cond_drop_prob = 0.1

  c.train.steps = 1500
  c.train.batch_size = 32
  c.train.log_every = 100
  c.train.checkpoint_every = 500
  c.train.sample_every = 500
  c.train.num_grid_samples = 40        # 4 held-out prompts per class x 10 classes
  c.train.ema_decay = 0.999
  c.train.ema_warmup = True

  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 200
  c.optim.schedule = "cosine"
  c.optim.final_lr_fraction = 0.05
  c.optim.b2 = 0.99
  c.optim.clip_norm = 1.0

  prompts, _ = captions.fashion_eval_prompts(4)
  c.sample.prompts = tuple(prompts)    # held-out phrasings, grouped by class
  c.sample.sampler = "ddpm"
  c.sample.num_steps = 64
  c.sample.num_samples = 1000
  c.sample.batch_size = 250
  c.sample.guidance_scale = 5.0        # 76.0% vs 73.5% (CFG 3, no interval) at image_d 8
  c.sample.guidance_interval = (-10.0, 2.0)

  # FID against real Fashion-MNIST test images.
  c.eval.reference_data = ml_collections.ConfigDict({"name": "fashion_mnist"})
  c.eval.reference_split = "test"
  c.eval.num_samples = 1000

  if "runlocal" in args:
    c.model.channels = (32,)
    c.model.mid_blocks = 1
    c.model.head_dim = 16
    c.model.cond_dim = 32
    c.train.steps = 20
    c.train.batch_size = 16
    c.train.log_every = 5
    c.train.checkpoint_every = 10
    c.train.sample_every = 0
    c.train.num_grid_samples = 10
    c.optim.warmup_steps = 2
    c.sample.num_steps = 8
    c.sample.num_samples = 20
    c.sample.batch_size = 20
  return c
