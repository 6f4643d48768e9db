"""Foreign weights ({name: array}, e.g. a PyTorch state dict) -> our nested params, by a rule table.

Every converter of weights made elsewhere is a `Table` applied by `apply`: the official MicroDiT
and TerDiT checkpoints (microdit.convert, terdit.convert), diffusers' AutoencoderKL
(autoencoder.kl_vae), BERT and OpenCLIP text towers (common.text), the FID Inception
(common.eval.inception) and files named by our own parameter paths (`PARAM_PATHS`).

`apply` walks our params (the abstract tree: arrays, ShapeDtypeStructs, or None for "any shape").
Each layer (a dict of arrays, e.g. a Dense's kernel and bias) and each array outside one is
converted by the first rule whose regex fullmatches its path (keys joined by the table's `sep`):
the rule's template, expanded with the match's groups (`re.Match.expand`), names the foreign
tensor (or, for a layer, the foreign module whose tensors its layout reads), and its layout builds
our arrays from them. The foreign names are first normalised by `rename` (a wrapper's prefix,
legacy spellings); those matching `ignore` have no place in our network by design (buffers).
Everything wrong is reported in one error: foreign tensors missing, foreign tensors left unused
and arrays whose shape differs from ours, each named.
"""

from collections.abc import Callable, Mapping
import dataclasses
import re
from typing import Any, NamedTuple

import numpy as np

from common.errors import CheckpointError
from common.weights.tree_names import key_path_str


class _Missing(Exception):
  """A required foreign tensor is absent (its name is the argument)."""


class Reader:
  """The foreign tensors one rule reads: `read(leaf)` is the tensor `name + sep + leaf`, `read()`
  the tensor `name` itself. A required absent tensor aborts the rule and is reported missing; an
  optional one is None. `names` lists the tensors read (for the error message)."""

  def __init__(self, tensors: Mapping[str, Any], name: str, sep: str, used: set[str]):
    self.tensors, self.name, self.sep, self.used = tensors, name, sep, used
    self.names: list[str] = []

  def __call__(self, leaf: str | None = None, *, optional: bool = False) -> Any:
    key = self.name if leaf is None else f"{self.name}{self.sep}{leaf}"
    if key not in self.tensors:
      if optional:
        return None
      raise _Missing(key)
    self.names.append(key)
    self.used.add(key)
    return self.tensors[key]


# layout(read, target) -> our value: for a layer, {leaf: array} with the keys of `target` (a dict of
# abstract arrays); for an array outside a layer, the array. Numpy errors (a reshape or broadcast
# that does not fit) are reported as shape differences.
Layout = Callable[[Reader, Any], Any]


class Rule(NamedTuple):
  """Our layers / arrays whose path fullmatches `ours` come from the foreign name `theirs`."""
  ours: str
  theirs: str
  layout: Layout


@dataclasses.dataclass(frozen=True)
class Table:
  """A converter: its rules (first match wins) and how foreign names are read.

  Attributes:
    rules: the rules, tried in order.
    sep: joins our path's keys (and a layer's foreign module name with its tensors' names).
    rename: normalises each foreign name before matching (strips a wrapper's prefix ...).
    ignore: regex of normalised foreign names that are not parameters of ours (buffers).
    hint: what a mismatch most likely means, appended to the error.
  """
  rules: tuple[Rule, ...]
  sep: str = "."
  rename: Callable[[str], str] | None = None
  ignore: str = ""
  hint: str = ""


def torch_kernel(w: Any, shape: tuple[int, ...]) -> np.ndarray:
  """A PyTorch weight -> our kernel of `shape`, float32: Linear [out, in] -> [in, out]; Conv2d
  [out, in, kh, kw] -> HWIO [kh, kw, in, out], or [kh * kw * in, out] in (row, col, channel) order
  for a 2-D kernel (a patch embedding, or a 1x1 conv used as a linear); other ranks as they are."""
  w = np.asarray(w, np.float32)
  if w.ndim == 4:
    w = w.transpose(2, 3, 1, 0)
    return w.reshape(-1, w.shape[-1]) if len(shape) == 2 else w
  return w.T if w.ndim == 2 else w


def fields(**names: str) -> Layout:
  """A layout for a PyTorch module: each leaf of our layer reads the module's tensor `names[leaf]`
  (default: `kernel` and `scale` read `weight`, other leaves their own name); kernels go through
  `torch_kernel`, all arrays become float32."""
  names = {"kernel": "weight", "scale": "weight", **names}

  def layout(read: Reader, target: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {leaf: (torch_kernel(read(names.get(leaf, leaf)), np.shape(t)) if leaf == "kernel" else
                   np.asarray(read(names.get(leaf, leaf)), np.float32))
            for leaf, t in target.items()}
  return layout


TORCH = fields()


def tensor(read: Reader, target: Any) -> np.ndarray:
  """An array outside a layer: the foreign tensor itself, float32."""
  del target
  return np.asarray(read(), np.float32)


def same(read: Reader, target: Any) -> Any:
  """Our layer or array read under its own names, values untouched."""
  return {leaf: read(leaf) for leaf in target} if isinstance(target, Mapping) else read()


# Files whose tensor names are our parameter paths, joined with "/" or ".".
PARAM_PATHS = Table(rules=(Rule(r".*", r"\g<0>", same),), sep="/",
                    rename=lambda name: name.replace(".", "/"))


def _listing(items: list[str], limit: int = 8) -> str:
  more = f" ... ({len(items) - limit} more)" if len(items) > limit else ""
  return ", ".join(items[:limit]) + more


def mismatch(missing: list[str], unexpected: list[str], differ: list[str]) -> str:
  """One line naming what does not match: "missing a, b; unexpected c (no place in the model);
  shape differs d" (the parts that are not empty)."""
  parts = []
  if missing:
    parts.append(f"missing {_listing(missing)}")
  if unexpected:
    parts.append(f"unexpected {_listing(unexpected)} (no place in the model)")
  if differ:
    parts.append(f"shape differs {_listing(differ)}")
  return "; ".join(parts)


def _is_layer(node: Any) -> bool:
  return (isinstance(node, Mapping) and bool(node)
          and not any(isinstance(v, Mapping) for v in node.values()))


def apply(table: Table, weights: Mapping[str, Any], abstract: Mapping[Any, Any], source: str, *,
          error: type[Exception] = CheckpointError) -> dict:
  """Converts `weights` into the structure of `abstract` by `table` (see the module docstring).

  Args:
    table: the converter's rules.
    weights: {foreign name: array}.
    abstract: our params, a nested dict (`nnx.to_pure_dict`) of arrays or ShapeDtypeStructs (the
      shapes to check), or of None (any shape: names only).
    source: the weights, for the error message ("the official MicroDiT checkpoint", a path).
    error: the exception class raised.

  Returns:
    A nested dict with exactly the keys of `abstract` (int list indices included).

  Raises:
    `error`: naming every foreign tensor missing or left unused and every array whose converted
      shape differs from ours.
  """
  tensors: dict[str, Any] = {}
  unused: list[str] = []
  for name, value in weights.items():
    key = table.rename(name) if table.rename else name
    if table.ignore and re.fullmatch(table.ignore, key):
      continue
    if key in tensors:
      unused.append(f"{name} (a second {key})")
    tensors[key] = value
  used: set[str] = set()
  missing: list[str] = []
  differ: list[str] = []

  def convert(path: tuple, target: Any) -> Any:
    name = key_path_str(path, table.sep)
    found = next(((r, m) for r in table.rules if (m := re.fullmatch(r.ours, name))), None)
    if found is None:
      missing.append(f"{name} (no conversion rule)")
      return None
    rule, match = found
    read = Reader(tensors, match.expand(rule.theirs), table.sep, used)
    try:
      value = rule.layout(read, target)
    except _Missing as e:
      missing.append(e.args[0])
      # The module's other tensors are not reported unused: the missing one says what is wrong.
      used.update(k for k in tensors if k.startswith(read.name + table.sep))
      return None
    except ValueError as e:
      differ.append(f"{name} ({e})")
      return None
    pairs = ([(f"{name}{table.sep}{k}", value[k], t) for k, t in target.items()]
             if isinstance(target, Mapping) else [(name, value, target)])
    bad = [f"{leaf} {np.shape(got)} (ours {tuple(np.shape(want))})" for leaf, got, want in pairs
           if want is not None and np.shape(got) != tuple(np.shape(want))]
    if bad and sorted(read.names) != sorted(p for p, _, _ in pairs):
      bad[-1] += f" from {', '.join(read.names)}"  # the foreign tensors, once per layer
    differ.extend(bad)
    return {k: value[k] for k in target} if isinstance(target, Mapping) else value

  def walk(node: Mapping[Any, Any], path: tuple) -> dict:
    out = {}
    for k, v in node.items():
      if isinstance(v, Mapping) and not _is_layer(v):
        out[k] = walk(v, (*path, k))
      else:
        out[k] = convert((*path, k), v)
    return out

  out = walk(abstract, ())
  unused += sorted(set(tensors) - used)
  if missing or unused or differ:
    hint = f" ({table.hint})" if table.hint else ""
    raise error(f"{source} does not match the model: {mismatch(missing, unused, differ)}{hint}.")
  return out
