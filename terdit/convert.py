"""Official TerDiT checkpoints (Lucky-Lance/TerDiT, https://huggingface.co/lucky-lance/TerDiT) to ours.

Two kinds of files are released per model, `consolidated{_ema}.00-of-01.pth` and
`consolidated{_ema}_ternary.00-of-01.pth` (read without torch by `common.weights.torch_weights`):

* latent weights (`consolidated`): every ternary linear holds its fp latent `weight` [out, in] and
  its scale `alphas` [1]; the forward ternarises the weight on the fly (fairscale fork,
  `fairscale/nn/model_parallel/layers.py::ternary`);
* packed ternary weights (`consolidated_ternary`, `layer_inference.py` there): `weight` is a uint8
  buffer [out/4, in] holding 2-bit codes c = w + 1 (-1 -> 0, 0 -> 1, +1 -> 2) packed HQQ-style in
  planar quarters of the OUTPUT rows: bits 7-6 of packed[r, k] hold row r, bits 5-4 row r + out/4,
  bits 3-2 row r + out/2, bits 1-0 row r + 3 out/4 (`kernel/hqq_aten_cuda_kernel.cu::
  unpack_2bit_u8_kernel`); dequantisation is alphas * (c - 1).

`from_official(tree, abstract_params)` is a `config.init_from.converter` ("terdit.convert.
from_official"). Into a ternary layer (`terdit.ternary.TernaryDense`, a kernel and an alpha) a latent
weight is copied as is, and packed codes become the latent kernel (codes ternarise to themselves,
so the forward is the packed model's exactly). Into a full-precision layer (an `_fp` config) a ternary
layer's effective weight alphas * ternary(W) is written, so the fp network computes the same function.
A full-precision Large-DiT checkpoint into a ternary layer starts QAT with alpha = mean|W|.
Torch linears are [out, in]; ours [in, out]. The patch embedding's inputs are reordered from the
official (C, p, p) patch layout to ours (p, p, C).
"""

from collections.abc import Mapping
import math
from typing import Any

import numpy as np

from common.weights.convert import TORCH, Layout, Reader, Rule, Table, apply, fields
from common.errors import CheckpointError

EPS = 1e-6  # gamma + 1e-6 of the official quantizer (layers.py::ternary).

_PREFIXES = ("module.", "_orig_mod.", "model.")


def unpack_hqq_2bit(packed: np.ndarray) -> np.ndarray:
  """HQQ's `unpack_2bit_u8`: uint8 [R, K] -> uint8 codes [4 R, K] in 0..3 (planar quarters)."""
  packed = np.asarray(packed)
  if packed.dtype != np.uint8 or packed.ndim != 2:
    raise CheckpointError(f"packed ternary weights must be uint8 [out/4, in], got {packed.dtype} "
                          f"{packed.shape}.")
  return np.concatenate([(packed >> s) & 3 for s in (6, 4, 2, 0)], axis=0)


def ternary_from_hqq(packed: np.ndarray, name: str = "weight") -> np.ndarray:
  """Packed official weights -> int8 ternary values [out, in] in {-1, 0, 1} (code - 1)."""
  codes = unpack_hqq_2bit(packed)
  if np.any(codes == 3):
    raise CheckpointError(f"{name}: packed code 3 (value 2) found; TerDiT's ternary weights use "
                          "only codes 0, 1, 2.")
  return codes.astype(np.int8) - 1


def ternarize(w: np.ndarray) -> np.ndarray:
  """The official absmean quantizer in float32: clip(round(w / (mean|w| + 1e-6)), -1, 1), round
  half to even (torch.round)."""
  w = np.asarray(w, np.float32)
  gamma = np.float32(np.mean(np.abs(w)))
  return np.clip(np.round(w / (gamma + np.float32(EPS))), -1, 1).astype(np.float32)


def _linear(read: Reader, target: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """One official linear (`weight`, optional `alphas`, `bias`) -> our Dense / TernaryDense params
  for `target`'s keys."""
  w = read("weight")
  alpha = read("alphas", optional=True)
  if alpha is not None:
    alpha = np.float32(np.asarray(alpha, np.float32).reshape(-1)[0])
  out: dict[str, np.ndarray] = {}
  if np.asarray(w).dtype == np.uint8:          # consolidated_ternary: packed codes
    if alpha is None:
      raise CheckpointError(f"{read.name}.weight is packed (uint8) but {read.name}.alphas is "
                            "missing.")
    codes = ternary_from_hqq(w, read.name + ".weight").astype(np.float32)      # [out, in]
    latent, effective = codes, alpha * codes
  else:
    w = np.asarray(w, np.float32)
    latent = w
    effective = w if alpha is None else alpha * ternarize(w)
  if "alpha" in target:                      # our ternary layer: latent kernel + alpha
    out["kernel"] = latent.T
    out["alpha"] = np.asarray(alpha if alpha is not None else np.mean(np.abs(w)), np.float32)
  else:
    out["kernel"] = np.ascontiguousarray(effective.T)
  if "bias" in target:
    out["bias"] = np.asarray(read("bias"), np.float32)
  return out


def _patch_embed(in_channels: int) -> Layout:
  """The patch embedding: a linear whose inputs are reordered from the official (C, p, p) patch
  layout to ours (p, p, C); `in_channels` C gives p from the width p * p * C."""

  def layout(read: Reader, target: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = _linear(read, target)
    k_in, dim = np.shape(out["kernel"])
    p = math.isqrt(max(k_in // in_channels, 0))
    if p * p * in_channels != k_in:
      raise CheckpointError(f"x_embedder has {k_in} inputs, not p*p*{in_channels} for any patch "
                            "size p: wrong in_channels?")
    out["kernel"] = np.ascontiguousarray(
        out["kernel"].reshape(in_channels, p, p, dim).transpose(1, 2, 0, 3).reshape(k_in, dim))
    return out
  return layout


def _table(in_channels: int) -> Table:
  """Our layer -> the official module (`DiT_Llama` of the TerDiT repository)."""
  return Table(
      rules=(
          Rule(r"x_embedder", "x_embedder", _patch_embed(in_channels)),
          Rule(r"t_embedder\.0", "t_embedder.mlp.0", _linear),
          Rule(r"t_embedder\.1", "t_embedder.mlp.2", _linear),
          Rule(r"y_embedder", "y_embedder.embedding_table", fields(table="weight")),
          Rule(r"blocks\.(\d+)\.attn\.(w[qkvo])", r"layers.\1.attention.\2", _linear),
          Rule(r"blocks\.(\d+)\.attn\.([qk]_norm)", r"layers.\1.attention.\2", TORCH),
          Rule(r"blocks\.(\d+)\.attn_norm", r"layers.\1.attention_norm", TORCH),
          Rule(r"blocks\.(\d+)\.mlp_norm", r"layers.\1.ffn_norm", TORCH),
          Rule(r"blocks\.(\d+)\.mlp\.(w\d)", r"layers.\1.feed_forward.\2", _linear),
          Rule(r"blocks\.(\d+)\.adaln", r"layers.\1.adaLN_modulation.1", _linear),
          Rule(r"blocks\.(\d+)\.adaln_norm", r"layers.\1.adaLN_modulation.2", TORCH),
          Rule(r"final\.adaln", "final_layer.adaLN_modulation.1", _linear),
          Rule(r"final\.linear", "final_layer.linear", _linear),
      ),
      rename=_strip_prefixes,
      ignore=r"freqs_cis",
      hint="is it an official TerDiT / Large-DiT consolidated file of config.model's depth, "
           "qk_norm and adaln_norm?")


def _strip_prefixes(name: str) -> str:
  for p in _PREFIXES:
    name = name.removeprefix(p)
  return name


def from_official(tree: Mapping[str, np.ndarray], abstract_params: Mapping[str, Any], *,
                  in_channels: int = 4) -> dict:
  """Converts an official TerDiT / Large-DiT state dict to our `terdit.model.TerDiT` params.

  Args:
    tree: {torch parameter name: array}, e.g. `common.weights.torch_weights.load_torch_weights(path)` of a
      `consolidated*.pth` file (latent or packed ternary weights).
    abstract_params: our model's params as a nested pure dict (`nnx.to_pure_dict`) of arrays or
      ShapeDtypeStructs: which layers are ternary and every shape.
    in_channels: C of the latents (4 for every released model): with the patch embedding's width
      p*p*C it gives the patch size p for the (C, p, p) -> (p, p, C) reordering.

  Returns:
    A nested dict of float32 numpy arrays with exactly the structure of `abstract_params`.

  Raises:
    CheckpointError: missing or unused checkpoint entries, shapes that differ from ours, or
      malformed packed weights.
  """
  return apply(_table(in_channels), tree, abstract_params, "the TerDiT checkpoint")
