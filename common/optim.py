"""Optimizer builder: AdamW with warmup then cosine or constant learning rate, and clipping."""

import ml_collections
import optax

from common.errors import ConfigError


def learning_rate_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 over `cfg.warmup_steps`, then constant or cosine to the end.

  Cosine decays from `cfg.learning_rate` to `cfg.learning_rate * cfg.final_lr_fraction` at
  `total_steps`.
  """
  lr, warmup = float(cfg.learning_rate), int(cfg.warmup_steps)
  if cfg.schedule == "constant":
    after = optax.constant_schedule(lr)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(
        lr, decay_steps=max(total_steps - warmup, 1), alpha=float(cfg.final_lr_fraction))
  else:
    raise ConfigError(f"optim.schedule={cfg.schedule!r}: expected 'constant' or 'cosine'.")
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """Builds the optimizer named by `cfg.name` ("adamw", or "fp8_adamw" from coat)."""
  lr = learning_rate_schedule(cfg, total_steps)
  if cfg.name == "adamw":
    opt = optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  elif cfg.name == "fp8_adamw":
    from coat.optim import fp8_adamw  # pylint: disable=import-outside-toplevel
    opt = fp8_adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay)
  else:
    raise ConfigError(f"optim.name={cfg.name!r}: expected 'adamw' or 'fp8_adamw'.")
  if cfg.clip_norm and cfg.clip_norm > 0:
    opt = optax.chain(optax.clip_by_global_norm(cfg.clip_norm), opt)
  return opt
