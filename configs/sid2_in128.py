"""SiD2 (arXiv 2410.19324) on ImageNet 128x128, pixel space.

SiD2's ImageNet128 model is not in the readable text (it is not published). Our documented choice: the same
network as configs/sid2_in512.py at the same token grids as the published models:
  p1        UViT/1 (default): grid 128^2 at level 0, the compute of UViT/4 @512 / UViT/2 @256:
            138.4 G multiply-accumulates per forward (paper "GFLOPs" = XLA flops / 2).
  p2        UViT/2: grid 64^2, about a quarter of that (32.8 G MACs), for cheaper runs.
  runlocal  tiny model on the embedded digits, for a CPU smoke run.
The sigmoid bias moves with the schedule shift, b_128 = b_512 + 2 log 4 (our rule: b follows the schedule shift).
"""

import ml_collections

from common.errors import ConfigError
from configs.base import parse_arg
from configs.sid2_in512 import make_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  flags = parse_arg(arg)
  unknown = flags - {"p1", "p2", "runlocal"}
  if unknown or {"p1", "p2"} <= flags:
    raise ConfigError(f"sid2_in128: unknown or conflicting args {sorted(flags)}; "
                     "use p1 | p2 [,runlocal].")
  patch = 2 if "p2" in flags else 1
  return make_config(128, patch, flags)
