"""Official MicroDiT weights -> our parameters.

`from_official` converts the state dict of `micro_diffusion.models.dit.DiT` (SonyResearch/
micro_diffusion; e.g. read with `common.torch_weights.load_torch_weights`) by name. It is the
`config.init_from.converter` "microdit.convert.from_official":

  --config.init_from.path=MicroDiT_XL_2.pt --config.init_from.converter=microdit.convert.from_official

The buffers `pos_embed` (recomputed in our forward pass for the actual grid) and `mask_token`
(all zero) are not parameters here and are skipped.
"""

import re
from typing import Any

import numpy as np

from common.errors import CheckpointError

_BUFFERS = ("pos_embed", "mask_token")
# A Composer checkpoint wraps the DiT as "dit." inside the LatentDiffusion model.
_PREFIX = re.compile(r"^(?:.*\.)?dit\.")

# Official module path -> ours (applied to the dotted name without the last part).
_RENAMES = (
    (re.compile(r"^t_embedder\.mlp\.0$"), "t_embedder.fc1"),
    (re.compile(r"^t_embedder\.mlp\.2$"), "t_embedder.fc2"),
    (re.compile(r"^y_embedder\.y_proj\."), "y_embedder."),
    (re.compile(r"^x_embedder\.proj$"), "x_embedder"),
    (re.compile(r"\.adaLN_modulation\.1$"), ".adaLN_modulation"),
    (re.compile(r"^(patch_mixer_map_\w+)\.0$"), r"\1.norm"),
    (re.compile(r"^(patch_mixer_map_\w+)\.1$"), r"\1.linear"),
)


def _flatten(tree: dict, prefix: tuple = ()) -> dict[tuple, Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _our_path(name: str) -> tuple[str, str]:
  """'blocks.3.adaLN_modulation.1.weight' -> ('blocks.3.adaLN_modulation', 'weight')."""
  module, _, leaf = name.rpartition(".")
  for pattern, repl in _RENAMES:
    module = pattern.sub(repl, module)
  return module, leaf


def _convert_leaf(name: str, value: np.ndarray, leaf: str, target: tuple[int, ...]) -> np.ndarray:
  """Converts one tensor to our layout: Linear weight [out, in] -> kernel [in, out], conv patch
  embed [D, C, p, p] -> [p * p * C, D] in (row, col, channel) order, the rest (the experts'
  [E, in, out] included) as is."""
  value = np.asarray(value, np.float32)
  if leaf == "kernel" and value.ndim == 4:
    value = value.transpose(2, 3, 1, 0).reshape(-1, value.shape[0])
  elif leaf == "kernel" and value.ndim == 2:
    value = value.T
  if tuple(value.shape) != tuple(target):
    raise CheckpointError(f"official MicroDiT weight {name!r} has shape {tuple(value.shape)} "
                          f"(converted), the model's parameter {leaf} needs {tuple(target)}: the "
                          "checkpoint was made for another architecture (config.model).")
  return value


def from_official(tree: dict[str, np.ndarray], abstract_params: dict) -> dict:
  """The official DiT state dict -> our nested params (the structure of `abstract_params`,
  `nnx.to_pure_dict` of a `microdit.model.MicroDiT`), as float32 numpy arrays.

  Raises:
    CheckpointError: a parameter missing from the checkpoint, a checkpoint tensor with no place in
      the model, or a shape that differs (each named).
  """
  flat = _flatten(abstract_params)
  by_name = {".".join(str(p) for p in path): path for path in flat}
  out: dict[tuple, np.ndarray] = {}
  unexpected = []
  for raw_name, value in tree.items():
    name = _PREFIX.sub("", raw_name)
    if name in _BUFFERS:
      continue
    module, leaf = _our_path(name)
    if leaf == "bias":
      candidates = (f"{module}.bias",)
    elif leaf == "weight":           # a Linear / conv weight, or a LayerNorm weight
      candidates = (f"{module}.kernel", f"{module}.scale")
    else:                            # a bare nn.Parameter: the MoE experts' w1, w2 [E, in, out]
      candidates = (f"{module}.expert_{leaf}.kernel",)
    ours = next((c for c in candidates if c in by_name), None)
    if ours is None:
      unexpected.append(raw_name)
      continue
    path = by_name[ours]
    out[path] = _convert_leaf(raw_name, value, ours.rpartition(".")[2], flat[path].shape)
  if unexpected:
    raise CheckpointError(f"official MicroDiT checkpoint has tensors the model does not: "
                          f"{sorted(unexpected)[:8]} (check config.model against the checkpoint).")
  missing = [".".join(str(p) for p in path) for path in flat if path not in out]
  if missing:
    raise CheckpointError(f"official MicroDiT checkpoint lacks parameters {missing[:8]}"
                          f"{' ...' if len(missing) > 8 else ''} (config.model has more layers or "
                          "biases than the checkpoint).")
  result: dict = {}
  for path, value in out.items():
    node = result
    for p in path[:-1]:
      node = node.setdefault(p, {})
    node[path[-1]] = value
  return result
