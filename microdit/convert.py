"""Official MicroDiT weights -> our parameters.

`from_official` converts the state dict of `micro_diffusion.models.dit.DiT` (SonyResearch/
micro_diffusion; e.g. read with `common.weights.torch_weights.load_torch_weights`) by name. It is the
`config.init_from.converter` "microdit.convert.from_official":

  --config.init_from.path=MicroDiT_XL_2.pt --config.init_from.converter=microdit.convert.from_official

The buffers `pos_embed` (recomputed in our forward pass for the actual grid) and `mask_token`
(all zero) are not parameters here and are skipped.
"""

import re
from typing import Any

import numpy as np

from common.weights.convert import TORCH, Reader, Rule, Table, apply


def _experts(read: Reader, target: Any) -> dict[str, np.ndarray]:
  """A bare nn.Parameter of the MoE experts, [E, in, out] as ours."""
  del target
  return {"kernel": np.asarray(read(), np.float32)}


# Our layer -> the official module. Linear / conv weights become kernels (`torch_kernel`: [out, in]
# transposed; the patch embedding's [D, C, p, p] conv to [p * p * C, D]), LayerNorm weights scales.
TABLE = Table(
    rules=(
        Rule(r"t_embedder\.fc1", "t_embedder.mlp.0", TORCH),
        Rule(r"t_embedder\.fc2", "t_embedder.mlp.2", TORCH),
        Rule(r"y_embedder\.(\w+)", r"y_embedder.y_proj.\1", TORCH),
        Rule(r"x_embedder", "x_embedder.proj", TORCH),
        Rule(r"(.*)\.adaLN_modulation", r"\1.adaLN_modulation.1", TORCH),
        Rule(r"(patch_mixer_map_\w+)\.norm", r"\1.0", TORCH),
        Rule(r"(patch_mixer_map_\w+)\.linear", r"\1.1", TORCH),
        Rule(r"(.*)\.expert_(w\d)", r"\1.\2", _experts),
        Rule(r".*", r"\g<0>", TORCH),
    ),
    # A Composer checkpoint wraps the DiT as "dit." inside the LatentDiffusion model.
    rename=lambda name: re.sub(r"^(?:.*\.)?dit\.", "", name),
    ignore=r"pos_embed|mask_token",
    hint="check config.model against the checkpoint")


def from_official(tree: dict[str, np.ndarray], abstract_params: dict) -> dict:
  """The official DiT state dict -> our nested params (the structure of `abstract_params`,
  `nnx.to_pure_dict` of a `microdit.model.MicroDiT`), as float32 numpy arrays.

  Raises:
    CheckpointError: parameters missing from the checkpoint, checkpoint tensors with no place in
      the model, or shapes that differ (each named).
  """
  return apply(TABLE, tree, abstract_params, "the official MicroDiT checkpoint")
