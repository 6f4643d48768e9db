"""SiD2 (arXiv 2410.19324) on ImageNet 256x256, pixel space.

Usage: --config=configs/sid2_in256.py:ARG with ARG a comma-separated subset of
  p2        UViT/2 (default): token grid 128^2 at level 0, the same compute as UViT/4 @512:
            138.5 G multiply-accumulates per forward vs. 137 published (SiD2, arXiv 2410.19324: FID 1.73).
  p1        UViT/1: grid 256^2, the same compute as UViT/2 @512 (657.9 G MACs; published 653, FID 1.38).
  runlocal  tiny model on the embedded digits, for a CPU smoke run.

Same network as configs/sid2_in512.py (flop-heavy scaling); MACs = XLA flops / 2 (paper
"GFLOPs", fvcore convention). All other choices are documented in sid2_in512.py; the sigmoid bias
moves with the schedule shift, b_256 = b_512 + 2 log 2 (our rule: b follows the schedule shift).
"""

import ml_collections

from common.errors import ConfigError
from configs.base import parse_arg
from configs.sid2_in512 import make_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  flags = parse_arg(arg)
  unknown = flags - {"p1", "p2", "runlocal"}
  if unknown or {"p1", "p2"} <= flags:
    raise ConfigError(f"sid2_in256: unknown or conflicting args {sorted(flags)}; "
                     "use p2 | p1 [,runlocal].")
  patch = 1 if "p1" in flags else 2
  return make_config(256, patch, flags)
