"""`Autoencoder`: a KL autoencoder network with its latent normalisation, and `load_autoencoder`.

    ae = load_autoencoder("/path/to/sdxl-vae")   # or a folder from launch/export_autoencoder.py
    z = ae.encode(images)                         # [B, H, W, C] in [-1, 1] -> scaled [B, h, w, c]
    x = ae.decode(z)                              # -> [B, H, W, C] (~[-1, 1])

The networks are the autoencoder family's (the top-level `autoencoder` package); this loader, which
the trainer and the latent precompute need, reaches them only by registered dotted names
(`common.registry`), as common/ imports no family.

Two on-disk formats load with `load_autoencoder(directory)`, told apart by `config.json`, and one
stand-in needs no files:

* a diffusers `AutoencoderKL` folder (`"_class_name": "AutoencoderKL"`): `config.json` plus
  `diffusion_pytorch_model.safetensors` (or `.bin`, read by `common.weights.torch_weights`), e.g. the SD, SDXL,
  SD3 or FLUX VAE downloaded by the user;
* "untrained:f8" (no files): an UNTRAINED random-init small autoencoder with the given
  downsampling factor, a stand-in for smoke runs (`untrained_autoencoder`);
* our export (`"format": "frugal-diffusion-autoencoder-v2"`, written by `save_autoencoder` through
  `launch/export_autoencoder.py`): `config.json` with the network's `config.model`, the latent
  normalisation and the SHA-256 of `params.safetensors` (dotted parameter names). The network
  name in it resolves only to a registered autoencoder (`common.registry.from_file`) and the
  weights are checked against the checksum before use.

Latents are normalised as the Stable Diffusion 3 / FLUX pipelines do: `(z - shift) * scale`, with
`shift` and `scale` per channel (constant for SD, SDXL, SD3, FLUX).
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from safetensors import flax as st_flax
from safetensors import numpy as st_numpy

from common import registry
from common.weights import deployment
from common.weights import tree_names
from common.errors import CheckpointError, ConfigError, DataNotFoundError, ShapeError
from common.nn.network import model_class
from common.paths import as_path
from common.weights.torch_weights import load_torch_weights

EXPORT_FORMAT = "frugal-diffusion-autoencoder-v2"
_OLD_FORMATS = ("frugal-diffusion-autoencoder",)
PARAMS_FILE = "params.safetensors"
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# The network of a diffusers AutoencoderKL folder: a registered autoencoder plug-in, with
# `read_diffusers_config` and `params_from_torch` (autoencoder/kl_vae.py).
DIFFUSERS_NETWORK = "autoencoder.kl_vae.AutoencoderKL"
# The network of the "untrained:f<F>" stand-in (autoencoder/small_kl.py).
UNTRAINED_NETWORK = "autoencoder.small_kl.SmallKLAutoencoder"


class Autoencoder:
  """A KL autoencoder (an NNX network with `encode_moments` and `decode`) and its latent scaling.

  Args:
    net: the network; `net.encode_moments(x [B,H,W,C]) -> (mean, logvar) [B,h,w,c]` and
      `net.decode(z [B,h,w,c]) -> [B,H,W,C]`, with `net.downsample_factor`, `net.in_channels` (C)
      and `net.latent_channels` (c).
    shift, scale: float32 [c] (or scalars): model latents are `(z - shift) * scale`.
    name: where it was loaded from, for messages.
  """

  def __init__(self, net: nnx.Module, *, shift: Any = 0.0, scale: Any = 1.0, name: str = ""):
    self.graphdef, self.params = nnx.split(net, nnx.Param)
    self.downsample_factor = int(net.downsample_factor)
    self.latent_channels = int(net.latent_channels)
    self.image_channels = int(net.in_channels)
    c = self.latent_channels
    try:
      self.shift = np.broadcast_to(np.asarray(shift, np.float32), (c,)).copy()
      self.scale = np.broadcast_to(np.asarray(scale, np.float32), (c,)).copy()
    except ValueError as e:
      raise ShapeError(f"autoencoder {name}: the latent shift/scale must be scalars or have {c} "
                       f"entries, got shapes {np.shape(shift)} and {np.shape(scale)}") from e
    if not (np.isfinite(self.shift).all() and np.isfinite(self.scale).all()
            and (self.scale != 0).all()):
      raise ShapeError(f"autoencoder {name}: the latent shift/scale are not finite or the scale "
                       "is zero")
    self.name = name
    self._moments = jax.jit(self._moments_fn)
    self._normalize = jax.jit(self._normalize_fn)
    self._decode = jax.jit(self._decode_fn)

  @property
  def net(self) -> nnx.Module:
    """The network, merged from the stored params."""
    return nnx.merge(self.graphdef, self.params)

  def _moments_fn(self, params, images):
    return nnx.merge(self.graphdef, params).encode_moments(images)

  def _normalize_fn(self, mean, logvar, key):
    z = mean
    if key is not None:  # a sample of the diagonal Gaussian posterior
      z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return (z - self.shift) * self.scale

  def _decode_fn(self, params, latents):
    z = latents.astype(jnp.float32) / self.scale + self.shift
    return nnx.merge(self.graphdef, params).decode(z)

  def latent_shape(self, image_shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """(H, W, C) of images -> (h, w, c) of their latents."""
    h, w, c = image_shape
    if c != self.image_channels:
      raise ShapeError(f"autoencoder {self.name} takes images with {self.image_channels} channel(s), "
                       f"got {c}")
    f = self.downsample_factor
    if h % f or w % f:
      raise ShapeError(f"autoencoder {self.name}: image size {h}x{w} is not divisible by its "
                       f"downsampling factor {f}")
    return (h // f, w // f, self.latent_channels)

  def encode(self, images, key: jax.Array | None = None) -> jax.Array:
    """images float32 [B, H, W, C] in [-1, 1] -> scaled latents float32 [B, H/f, W/f, c].

    The posterior mean when `key` is None, else a sample of the posterior.
    """
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
      raise ShapeError(f"autoencoder {self.name}: images must be [B, H, W, C], got {images.shape}")
    mean, logvar = self.moments(images)
    return self._normalize(mean, logvar, key)

  def moments(self, images) -> tuple[jax.Array, jax.Array]:
    """images float32 [B, H, W, C] in [-1, 1] -> the posterior's unscaled (mean, logvar) [B, h, w, c]."""
    images = jnp.asarray(images, jnp.float32)
    if images.ndim != 4:
      raise ShapeError(f"autoencoder {self.name}: images must be [B, H, W, C], got {images.shape}")
    self.latent_shape(images.shape[1:])
    return self._moments(self.params, images)

  def decode(self, latents) -> jax.Array:
    """scaled latents float32 [B, h, w, c] -> images float32 [B, h*f, w*f, C] (~[-1, 1])."""
    latents = jnp.asarray(latents, jnp.float32)
    if latents.ndim != 4 or latents.shape[-1] != self.latent_channels:
      raise ShapeError(f"autoencoder {self.name}: latents must be [B, h, w, {self.latent_channels}], "
                       f"got {latents.shape}")
    return self._decode(self.params, latents)


# ------------------------------------------------------------------------------------------------
# Loading.


def _read_safetensors(path: epath.Path, data: bytes | None = None) -> dict[str, np.ndarray]:
  """The tensors of a safetensors file (or of its bytes `data`, already read) as float32."""
  try:
    # through jax: bfloat16 tensors load too. safetensors checks every declared shape and offset
    # against the bytes present before allocating.
    tensors = st_flax.load(path.read_bytes() if data is None else data)
  except Exception as e:  # safetensors raises its own error types for corrupt files
    raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from e
  return {k: np.asarray(v.astype(jnp.float32)) for k, v in tensors.items()}


def _abstract_params(net_fn) -> tuple[Any, dict]:
  abstract = nnx.eval_shape(net_fn)
  graphdef, params = nnx.split(abstract, nnx.Param)
  return graphdef, nnx.to_pure_dict(params)


def _merge(graphdef, pure_params: dict) -> nnx.Module:
  abstract = nnx.merge(graphdef, jax.tree.map(jnp.asarray, pure_params))
  return abstract


def load_diffusers_vae(directory: str, config: dict | None = None, *,
                       dtype: str = "float32") -> Autoencoder:
  """A diffusers `AutoencoderKL` folder -> Autoencoder with its scaling/shift factors.

  Args:
    directory: holds config.json and diffusion_pytorch_model.safetensors (or .bin).
    config: the parsed config.json (read from `directory` when None).
    dtype: compute dtype of the convolutions ("float32" or "bfloat16").
  """
  folder = as_path(directory)
  config = config if config is not None else deployment.read_json_object(folder / "config.json")
  cls = model_class(ml_collections.ConfigDict({"name": DIFFUSERS_NETWORK}), "autoencoder")
  kwargs, shift, scale = cls.read_diffusers_config(config)
  weights = next((folder / w for w in DIFFUSERS_WEIGHTS if (folder / w).is_file()), None)
  if weights is None:
    raise DataNotFoundError(
        f"no diffusion_pytorch_model.safetensors (or .bin) in {directory}: download the VAE's "
        f"diffusion_pytorch_model.safetensors beside its config.json into {directory}")
  if weights.name.endswith(".safetensors"):
    state_dict = _read_safetensors(weights)
  else:
    state_dict = {k: np.asarray(v, np.float32) for k, v in load_torch_weights(weights).items()}
  deployment.check_tensor_count(cls, kwargs, len(state_dict), weights)
  graphdef, abstract = _abstract_params(lambda: cls(**kwargs, dtype=dtype, rngs=nnx.Rngs(0)))
  params = cls.params_from_torch(state_dict, abstract, os.fspath(weights))
  return Autoencoder(_merge(graphdef, params), shift=shift, scale=scale, name=directory)


def save_autoencoder(directory: str, model_config: ml_collections.ConfigDict | dict,
                     params: dict, *, shift: Any, scale: Any, image_shape: tuple[int, int, int],
                     extra: dict | None = None) -> None:
  """Writes our format: DIR/config.json and DIR/params.safetensors (dotted parameter names).

  Args:
    model_config: the network's `config.model` (its `name` and constructor arguments).
    params: the network's pure param dict (e.g. the EMA params of a checkpoint).
    shift, scale: latent normalisation, float32 [c] or scalars (latents = (z - shift) * scale).
    image_shape: (H, W, C) of the images it was trained on.
    extra: more JSON-serialisable entries for config.json (e.g. provenance).
  """
  folder = as_path(directory)
  folder.mkdir(parents=True, exist_ok=True)
  model = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
  model = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.items()}
  cfg = {"format": EXPORT_FORMAT, "model": model,
         "shift_factor": np.asarray(shift, np.float32).reshape(-1).tolist(),
         "scaling_factor": np.asarray(scale, np.float32).reshape(-1).tolist(),
         "image_shape": [int(s) for s in image_shape], **(extra or {})}
  flat = {k: np.ascontiguousarray(np.asarray(v, np.float32))
          for k, v in tree_names.flatten(params).items()}
  data = st_numpy.save(flat)
  (folder / PARAMS_FILE).write_bytes(data)
  cfg["sha256"] = {PARAMS_FILE: deployment.sha256_hex(data)}
  with (folder / "config.json").open("w") as f:
    json.dump(cfg, f, indent=2)


def _load_export(directory: str, config: dict) -> Autoencoder:
  """Our export: the network named in config.json (a registered autoencoder only) with the weights
  of params.safetensors, checked against the SHA-256 recorded beside them."""
  config_path = as_path(directory) / "config.json"
  redo = f"export the autoencoder again with launch/export_autoencoder.py --out={directory}"
  model = config.get("model")
  if not isinstance(model, dict):
    raise CheckpointError(f"{config_path}: \"model\" is {type(model).__name__}, not an object; "
                          f"{redo}")
  with registry.from_file(config_path):
    cls = model_class(ml_collections.ConfigDict(model), "autoencoder")
  kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in model.items() if k != "name"}
  registry.check_kwargs(cls.__init__, kwargs, f"{config_path} model")
  try:
    shift = np.asarray(config.get("shift_factor"), np.float32)
    scale = np.asarray(config.get("scaling_factor"), np.float32)
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{config_path}: shift_factor/scaling_factor must be numbers: {e}") from e
  sums = config.get("sha256")
  path = as_path(directory) / PARAMS_FILE
  data = deployment.read_checked(path, sums.get(PARAMS_FILE) if isinstance(sums, dict) else None,
                                 config_path, redo)
  flat = _read_safetensors(path, data)
  deployment.check_tensor_count(cls, kwargs, len(flat), path)
  try:
    graphdef, abstract = _abstract_params(lambda: cls(**kwargs, rngs=nnx.Rngs(0)))
  except (TypeError, ValueError) as e:
    raise CheckpointError(f"{config_path}: cannot build {model['name']}: {e}") from e
  want = tree_names.flatten(abstract)
  if set(flat) != set(want):
    diff = sorted(set(flat) ^ set(want))
    raise ShapeError(f"{path}: parameter names do not match {model['name']} built from "
                     f"config.json (e.g. {diff[:3]})")
  for k, v in want.items():
    if tuple(flat[k].shape) != tuple(v.shape):
      raise ShapeError(f"{path}: parameter {k} has shape {flat[k].shape}, config.json implies "
                       f"{tuple(v.shape)}")
  net = _merge(graphdef, tree_names.unflatten(flat))
  return Autoencoder(net, shift=shift, scale=scale, name=directory)


UNTRAINED_PREFIX = "untrained:"
_UNTRAINED = re.compile(r"untrained:f(\d+)(?:c(\d+))?")


def untrained_autoencoder(spec: str) -> Autoencoder:
  """"untrained:f<F>[c<c>]" -> an UNTRAINED, randomly initialised (seed 0) `SmallKLAutoencoder`
  with downsampling factor F (a power of two), c latent channels (default 4) and RGB images,
  latents unscaled: a stand-in that decodes latents of the right shape into noise, for CPU smoke
  runs of latent configs whose real autoencoder (e.g. the SDXL VAE) is a user's local download.
  Its name says UNTRAINED wherever it is reported."""
  m = _UNTRAINED.fullmatch(spec)
  factor = int(m.group(1)) if m else 0
  if not m or factor < 1 or factor & (factor - 1):
    raise ConfigError(f"autoencoder spec {spec!r}: expected 'untrained:f<F>' or "
                      "'untrained:f<F>c<C>' with F a power of two (e.g. untrained:f8)")
  levels = factor.bit_length()                       # f = 2 ** (levels - 1)
  channels = int(m.group(2) or 4)
  cls = model_class(ml_collections.ConfigDict({"name": UNTRAINED_NETWORK}), "autoencoder")
  net = cls(image_size=8 * factor, in_channels=3, channels=(8,) * levels, blocks_per_level=1,
            mid_blocks=0, latent_channels=channels, norm_groups=4, rngs=nnx.Rngs(0))
  return Autoencoder(net, name=f"{spec} (UNTRAINED random-init stand-in: decodes to noise)")


def load_autoencoder(spec: str) -> Autoencoder:
  """Loads an autoencoder from a local directory (never downloads).

  Args:
    spec: a diffusers AutoencoderKL folder (config.json + diffusion_pytorch_model.safetensors),
      e.g. a copy of stabilityai/sdxl-vae, or a folder written by launch/export_autoencoder.py;
      or "untrained:f8" (`untrained_autoencoder`: a random-init stand-in for smoke runs).

  Raises:
    ConfigError: empty spec; DataNotFoundError: missing folder or files; CheckpointError /
    ShapeError: unreadable or mismatching files.
  """
  if not spec:
    raise ConfigError("no autoencoder given: set config.autoencoder (or --autoencoder) to a local "
                      "folder (a diffusers AutoencoderKL or one written by launch/export_autoencoder.py)")
  if spec.startswith(UNTRAINED_PREFIX):
    return untrained_autoencoder(spec)
  folder = as_path(spec)
  directory = os.fspath(folder)
  config_path = folder / "config.json"
  if not config_path.is_file():
    what = "does not exist" if not folder.is_dir() else "has no config.json"
    raise DataNotFoundError(
        f"autoencoder folder {directory} {what}: download a diffusers VAE's config.json and "
        f"diffusion_pytorch_model.safetensors (e.g. from stabilityai/sdxl-vae) into {directory}, or "
        "export ours with launch/export_autoencoder.py --out=" + directory)
  config = deployment.read_json_object(config_path)
  if config.get("_class_name") == "AutoencoderKL":
    return load_diffusers_vae(directory, config)
  if config.get("format") == EXPORT_FORMAT:
    return _load_export(directory, config)
  if config.get("format") in _OLD_FORMATS:
    raise CheckpointError(f"{config_path} is an autoencoder export of an older format (without "
                          "checksums): export it again with launch/export_autoencoder.py --out="
                          f"{directory}")
  raise CheckpointError(
      f"{config_path} is neither a diffusers AutoencoderKL config (\"_class_name\": "
      f"\"AutoencoderKL\"; got {config.get('_class_name')!r:.80}) nor one written by "
      "launch/export_autoencoder.py")
