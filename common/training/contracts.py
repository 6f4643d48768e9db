"""The extension contract, typed: what the trainer reads of a family's network and of a recipe.

A family plugs in a network class (`config.model.name`) and trains it with a recipe
(`config.diffusion`, common/diffusion/recipes.py). What each must provide is written here as
`typing.Protocol`s, checked structurally (the families subclass nothing of ours):

* `Network`: every trained network; `Denoiser`: a network the diffusion recipes train (VPDiffusion,
  EDMDiffusion, ADMDiffusion); `autoencoder.recipe.KLAutoencoderNet`: one the autoencoder
  recipe trains. The recipe names the protocol of its network (`Recipe.network`).
* `ClassConditional`: required of a network whose `example_inputs` declares cond["label"].
* Optional, read where used: `common.weights.deployment.TensorCountBound` (`min_param_tensors`),
  `common.weights.deployment.Deployable` (a layer's `deployed()` inference form) and
  `ReadsCaptionPadding` (a text-conditional network that attends to the caption's padding).

`Experiment` calls `check_network` once the network is built (abstractly), so a missing piece is
one ConfigError naming it, not an AttributeError deep in a jitted step. docs/DESIGN.md ("Add a
family") walks through a new family.
"""

from __future__ import annotations

from collections.abc import Mapping
import inspect
from typing import Any, Protocol

import jax
import jax.numpy as jnp

from common.errors import ConfigError


class Network(Protocol):
  """What the trainer reads of every network (an `nnx.Module` holding only `nnx.Param`s)."""

  def example_inputs(self, batch_size: int) -> tuple[jax.ShapeDtypeStruct, Mapping[str, Any]]:
    """(x ShapeDtypeStruct [B, H, W, C], cond: {name: ShapeDtypeStruct [B, ...]}): what the network
    takes for `batch_size` examples. Batch checks, sample shapes and --mode=summary use it."""


class Denoiser(Network, Protocol):
  """A network the diffusion recipes train (docs/DESIGN.md, "The network contract")."""

  def __call__(self, x: jax.Array, noise_cond: jax.Array, cond: Mapping[str, Any], *,
               dropout_key: jax.Array | None = None) -> Any:
    """x: [B, H, W, C] (already scaled by the recipe); noise_cond: [B] float32 (logSNR, EDM's
    c_noise or ADM's timestep); cond: the batch's cond; dropout is active iff `dropout_key` is
    given. Returns F [B, H, W, C], or (F, aux dict) (e.g. {"loss_mask": float32 [B, H, W]})."""

  def null_cond(self, cond: Mapping[str, Any]) -> Mapping[str, Any]:
    """The unconditional version of `cond` (same structure and shapes): CFG dropout in training
    and the unconditional branch when sampling."""


class ClassConditional(Protocol):
  """A network whose `example_inputs` declares cond["label"]: labels are 0..num_classes-1, and
  sampling cycles through them."""

  num_classes: int


class ReadsCaptionPadding(Protocol):
  """Optional: a text-conditional network declares `reads_caption_padding = True` when it attends
  to every caption token position, padding included, without the mask (MicroDiT: micro_diffusion
  passes no attention mask, so all 77 CLIP positions are read). Such a network must not train on
  latents precomputed with `--trim_padding` (their padding positions read back as zeros, not as
  the encoder's outputs): the trainer refuses that pairing
  (`common.data.latents.check_padding_kept`). Absent means False (the network masks the padding, or takes no captions)."""

  reads_caption_padding: bool


def reads_caption_padding(model: Any) -> bool:
  """Whether `model` declares `ReadsCaptionPadding.reads_caption_padding` True."""
  return getattr(model, "reads_caption_padding", False) is True


class Recipe(Protocol):
  """A training objective (`config.diffusion`; docs/DESIGN.md, "The recipe contract")."""

  network: type  # the Protocol its network implements (e.g. Denoiser)

  def loss(self, model: Any, batch: Mapping[str, Any],
           key: jax.Array) -> tuple[jax.Array, Mapping[str, jax.Array]]:
    """(per-example loss float32 [B], metrics {name: scalar}) of batch {"x", "cond"}."""

  def preview(self, model: Any, batch: Mapping[str, Any], key: jax.Array,
              settings: Mapping[str, Any]) -> jax.Array:
    """float32 [B, H, W, C]: samples for batch["cond"] (diffusion) or reconstructions of batch["x"]
    (an autoencoder), drawn with `settings` (config.sample)."""


def members(contract: type) -> dict[str, Any]:
  """{name: declaration} of a Protocol and the Protocols it extends: its methods (functions) and
  its annotated attributes (their annotation, a string under postponed evaluation)."""
  out = {}
  for base in reversed(contract.__mro__):
    if base is Protocol or not getattr(base, "_is_protocol", False):
      continue
    out.update(base.__dict__.get("__annotations__", {}))
    out.update({k: v for k, v in vars(base).items()
                if inspect.isfunction(v) and (k == "__call__" or not k.startswith("_"))})
  return out


_ATTRIBUTE_TYPES = {"int": int, "type": type}


def _call_form(name: str, declared: Any) -> tuple[list[str], list[str], str]:
  """(positional parameter names, keyword-only names, "name(x, y, *, z)") of a declared method."""
  params = list(inspect.signature(declared).parameters.values())[1:]  # without self
  positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  keywords = [p.name for p in params if p.kind == p.KEYWORD_ONLY]
  form = ", ".join(positional + (["*"] + keywords if keywords else []))
  return positional, keywords, f"{name}({form})"


def missing(obj: Any, contract: type) -> list[str]:
  """What `obj` lacks of `contract`, one phrase each: absent members, attributes of the wrong type,
  and methods that cannot be called the way the contract calls them."""
  problems = []
  for name, declared in members(contract).items():
    if not hasattr(obj, name):
      problems.append(f"no {name}")
      continue
    value = getattr(obj, name)
    if not inspect.isfunction(declared):
      want = _ATTRIBUTE_TYPES[declared if isinstance(declared, str) else declared.__name__]
      if not isinstance(value, want) or isinstance(value, bool):
        problems.append(f"{name} is {type(value).__name__}, not {want.__name__}")
      continue
    positional, keywords, form = _call_form(name, declared)
    try:
      inspect.signature(value).bind(*positional, **dict.fromkeys(keywords))
    except (TypeError, ValueError):
      problems.append(f"{name} cannot be called as {form}")
  return problems


def check(obj: Any, contract: type, where: str) -> None:
  """Raises ConfigError naming what `obj` (named by `where`) lacks of `contract`."""
  problems = missing(obj, contract)
  if problems:
    raise ConfigError(f"{where} does not implement {contract.__module__}.{contract.__qualname__}: "
                      f"{'; '.join(problems)} (docs/DESIGN.md, \"Add a family\").")


def check_network(model: Any, contract: type, where: str) -> None:
  """Checks a built (or abstract) network against the protocol its recipe trains (`contract`),
  `example_inputs(1)`'s form, and `ClassConditional` when it declares class labels.

  Raises:
    ConfigError: naming `where` (e.g. "config.model.name='pkg.mod.Net'") and what is missing.
  """
  check(model, contract, where)
  example = model.example_inputs(1)
  if not (isinstance(example, tuple) and len(example) == 2 and hasattr(example[0], "shape")
          and isinstance(example[1], Mapping)):
    raise ConfigError(f"{where}: example_inputs(1) must return (x ShapeDtypeStruct [1, ...], cond "
                      f"dict), got {type(example).__name__} {example!r:.120}.")
  if "label" in example[1]:
    check(model, ClassConditional, f"{where} (its example_inputs declares cond['label'])")
    if model.num_classes < 1:
      raise ConfigError(f"{where}: declares cond['label'] but num_classes={model.num_classes}.")


def forward_arguments(model: Any, contract: type, batch_size: int = 1) -> tuple:
  """The positional arguments of one forward pass `model(*args)` as `contract.__call__` names them,
  built from `model.example_inputs(batch_size)`: (x, noise_cond float32 [B], cond) for a
  Denoiser, (x,) for a network whose forward takes the images alone. For --mode=summary."""
  x, cond = model.example_inputs(batch_size)
  values = {"x": x, "noise_cond": jax.ShapeDtypeStruct((batch_size,), jnp.float32), "cond": cond}
  positional, _, _ = _call_form("__call__", contract.__call__)
  return tuple(values[name] for name in positional)
