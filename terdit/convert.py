"""Official TerDiT checkpoints (Lucky-Lance/TerDiT, https://huggingface.co/lucky-lance/TerDiT) to ours.

Two kinds of files are released per model, `consolidated{_ema}.00-of-01.pth` and
`consolidated{_ema}_ternary.00-of-01.pth` (read without torch by `common.torch_weights`):

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


class _Reader:
  """The checkpoint's arrays by name, with the names that were read recorded."""

  def __init__(self, tree: Mapping[str, Any]):
    self.arrays: dict[str, np.ndarray] = {}
    for k, v in tree.items():
      for p in _PREFIXES:
        if k.startswith(p):
          k = k[len(p):]
      self.arrays[k] = v
    self.used: set[str] = set()

  def get(self, name: str, required: bool = True) -> np.ndarray | None:
    if name not in self.arrays:
      if required:
        raise CheckpointError(f"the TerDiT checkpoint has no {name!r} (is it an official "
                              "TerDiT / Large-DiT consolidated file of this model's size?)")
      return None
    self.used.add(name)
    return np.asarray(self.arrays[name])


def _linear(r: _Reader, name: str, target: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """One official linear `name` -> our Dense / TernaryDense params for `target`'s keys."""
  w = r.get(name + ".weight")
  alpha = r.get(name + ".alphas", required=False)
  if alpha is not None:
    alpha = np.float32(np.asarray(alpha, np.float32).reshape(-1)[0])
  out: dict[str, np.ndarray] = {}
  if w.dtype == np.uint8:                    # consolidated_ternary: packed codes
    if alpha is None:
      raise CheckpointError(f"{name}.weight is packed (uint8) but {name}.alphas is missing.")
    codes = ternary_from_hqq(w, name + ".weight").astype(np.float32)      # [out, in]
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
  if "bias" in target and target["bias"] is not None:
    out["bias"] = np.asarray(r.get(name + ".bias"), np.float32)
  return out


def _vector(r: _Reader, name: str) -> np.ndarray:
  return np.asarray(r.get(name), np.float32)


def from_official(tree: Mapping[str, np.ndarray], abstract_params: Mapping[str, Any], *,
                  in_channels: int = 4) -> dict:
  """Converts an official TerDiT / Large-DiT state dict to our `terdit.model.TerDiT` params.

  Args:
    tree: {torch parameter name: array}, e.g. `common.torch_weights.load_torch_weights(path)` of a
      `consolidated*.pth` file (latent or packed ternary weights).
    abstract_params: our model's params as a nested pure dict (`nnx.to_pure_dict`) of arrays or
      ShapeDtypeStructs: which layers are ternary and every shape.
    in_channels: C of the latents (4 for every released model): with the patch embedding's width
      p*p*C it gives the patch size p for the (C, p, p) -> (p, p, C) reordering.

  Returns:
    A nested dict of float32 numpy arrays with exactly the structure of `abstract_params`.

  Raises:
    CheckpointError: a missing or unused checkpoint entry, a shape that differs from ours, or
      malformed packed weights.
  """
  r = _Reader(tree)
  ap = abstract_params
  out: dict[str, Any] = {}

  xe = _linear(r, "x_embedder", ap["x_embedder"])
  k_in, dim = np.shape(xe["kernel"])
  p = math.isqrt(max(k_in // in_channels, 0))
  if p * p * in_channels != k_in:
    raise CheckpointError(f"x_embedder has {k_in} inputs, not p*p*{in_channels} for any patch "
                          "size p: wrong in_channels?")
  xe["kernel"] = np.ascontiguousarray(
      xe["kernel"].reshape(in_channels, p, p, dim).transpose(1, 2, 0, 3).reshape(k_in, dim))
  out["x_embedder"] = xe
  # List entries are keyed by int (nnx.to_pure_dict) or str (after a round trip through a file).
  t0, t1 = sorted(ap["t_embedder"], key=int)
  out["t_embedder"] = {t0: _linear(r, "t_embedder.mlp.0", ap["t_embedder"][t0]),
                       t1: _linear(r, "t_embedder.mlp.2", ap["t_embedder"][t1])}
  out["y_embedder"] = {"table": _vector(r, "y_embedder.embedding_table.weight")}

  blocks = {}
  for i in sorted(ap["blocks"], key=int):
    t = ap["blocks"][i]
    o = f"layers.{i}."
    attn = {n: _linear(r, o + "attention." + n, t["attn"][n]) for n in ("wq", "wk", "wv", "wo")}
    for n in ("q_norm", "k_norm"):
      if t["attn"].get(n) is not None:
        attn[n] = {"scale": _vector(r, o + f"attention.{n}.weight"),
                   "bias": _vector(r, o + f"attention.{n}.bias")}
    b = {"attn": attn,
         "attn_norm": {"scale": _vector(r, o + "attention_norm.weight")},
         "mlp_norm": {"scale": _vector(r, o + "ffn_norm.weight")},
         "mlp": {n: _linear(r, o + "feed_forward." + n, t["mlp"][n]) for n in ("w1", "w2", "w3")},
         "adaln": _linear(r, o + "adaLN_modulation.1", t["adaln"])}
    if t.get("adaln_norm") is not None:
      b["adaln_norm"] = {"scale": _vector(r, o + "adaLN_modulation.2.weight")}
    blocks[i] = b
  out["blocks"] = blocks
  out["final"] = {"adaln": _linear(r, "final_layer.adaLN_modulation.1", ap["final"]["adaln"]),
                  "linear": _linear(r, "final_layer.linear", ap["final"]["linear"])}

  unused = sorted(set(r.arrays) - r.used - {"freqs_cis"})
  if unused:
    raise CheckpointError(f"{len(unused)} entries of the TerDiT checkpoint have no place in this "
                          f"model (more blocks than config.model.depth, or qk_norm / adaln_norm "
                          f"off?): {unused[:8]}")
  _check_shapes(out, ap, "")
  return out


def _check_shapes(got: Any, want: Any, path: str) -> None:
  if isinstance(want, Mapping):
    if not isinstance(got, Mapping) or set(got) != set(k for k, v in want.items()
                                                       if v is not None):
      raise CheckpointError(f"TerDiT conversion: entries under {path or '/'} differ from the "
                            f"model's: {sorted(map(str, got))} vs {sorted(map(str, want))}")
    for k, v in want.items():
      if v is not None:
        _check_shapes(got[k], v, f"{path}/{k}")
    return
  if tuple(np.shape(got)) != tuple(np.shape(want)):
    raise CheckpointError(f"TerDiT conversion: parameter {path} has shape {np.shape(got)} in the "
                          f"checkpoint but {tuple(np.shape(want))} in the model (config.model).")
