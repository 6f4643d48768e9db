"""Precision coverage per family: which layers each precision mode puts in FP8, ternary or high
precision, compared with the role table of docs/DESIGN.md ("Numerics and precision modes").

Every family's small config is built as `Experiment` builds it (`build_model` with
`numerics_rules(config)`) under each mode. Every layer (a module that holds parameters, or a
linear or non-linear layer a numerics rule can reach) gets a role from its module path (`ROLES`,
first match wins; a layer no role matches fails) and a kind from the class it ended up with; the
kind must be the table's entry for that role and mode."""

import functools
import pathlib
import re

import jax
import pytest
from flax import nnx

from coat import activations, linear
from common.nn import layers
from common.training.experiment import build_model, numerics_rules
from configs.base import load_config
from terdit import ternary

DESIGN = pathlib.Path(__file__).resolve().parents[1] / "docs" / "DESIGN.md"
HEADER = ("Role", "Layers", "bf16", "coat", "ternary", "ternary + coat")
KINDS = {"fp8", "fp8-residuals", "ternary", "high", "-"}

# (role, regex fullmatched by the module path with every list index written "N"), first match wins.
ROLES = (
    ("conditioning", r"class_embed|cond_fc\d|noise_embed/proj|pooled_embed|t_embedder/.+"
                     r"|y_embedder(/.+)?|y_emb_preprocess/.+|pooled_y_emb_process/.+"),
    ("input layers", r"patch_embed/proj|x_embedder|(enc|dec)_in"),
    ("output layers", r"out_norm|out_proj/proj|final(_layer)?/.+|(enc|dec)_(norm|out)"),
    ("stage maps", r"patch_mixer_map_(xin|xout|y)/(norm|linear)"),
    ("QK-norms", r".+/N/(attn|cross|cross_attn)/(q_norm|k_norm|ln_q|ln_k)"),
    ("attention linears", r".+/N/attn/(qkv|out|proj|w[qkvo])"),
    ("cross-attention linears", r".+/N/(cross|cross_attn)/(q|kv|out|q_linear|kv_linear|proj)"),
    ("MLP linears", r".+/N/mlp/(fc[12]|w[123])"),
    ("MoE expert maps", r".+/N/mlp/expert_w[12]"),
    ("MoE router", r".+/N/mlp/gate"),
    ("modulation linears", r".+/N/(adaLN_modulation|adaln|(norm/)?film/proj)"),
    ("block norms", r".+/N/(norm[123]|norm/norm|attn_norm|mlp_norm|adaln_norm)"),
    ("FiLM", r".+/N/(norm/)?film"),
    ("activations", r".+/N/(act[12]|mlp/act)"),
    ("convolutions", r".+/N/(conv[12]?|conv_shortcut)"),
)

# Each family's small config and whether it carries TerDiT's ternary rules (table columns
# "ternary" and "ternary + coat" instead of "bf16" and "coat").
CONFIGS = {
    "configs/sid2_digits.py:runlocal": False,        # U-ViT: ResBlocks, FiLM, class label
    "configs/sid2_t2i_fashion.py:runlocal": False,   # U-ViT with cross-attention to captions
    "configs/microdit.py:runlocal": False,           # cross-attention, MoE, patch mixer + maps
    "configs/terdit.py:runlocal,fp": False,
    "configs/terdit.py:runlocal": True,
    "configs/autoencoder_fashion.py:runlocal": False,
}
PRECISIONS = ("bf16", "coat")
LAYERS = (layers.Dense, layers.ExpertDense) + layers.NONLINEAR_LAYERS


def design_table() -> dict[str, dict[str, str]]:
  """{role: {column: kind}} from the role table of docs/DESIGN.md."""
  section = DESIGN.read_text().split("## Numerics and precision modes", 1)[1].split("\n## ", 1)[0]
  rows = [[c.strip() for c in line.strip().strip("|").split("|")]
          for line in section.splitlines() if line.startswith("|")]
  assert rows and tuple(rows[0]) == HEADER, rows[:1]
  table = {}
  for row in rows[2:]:
    assert row[0] not in table, f"role {row[0]!r} twice in docs/DESIGN.md"
    table[row[0]] = dict(zip(HEADER[2:], row[2:], strict=True))
  return table


def kind(module: nnx.Module) -> str:
  """The numerics a layer ended up with: "fp8", "ternary", "fp8-residuals" or "high"."""
  if isinstance(module, (linear.FP8Dense, linear.FP8ExpertDense)):
    return "fp8"
  if isinstance(module, ternary.TernaryDense):
    return "ternary"
  if isinstance(getattr(module, "residuals", None), activations.FP8Residuals):
    return "fp8-residuals"
  return "high"


def role(path: str) -> str | None:
  generic = re.sub(r"(^|/)\d+(?=/|$)", r"\1N", path)
  return next((name for name, regex in ROLES if re.fullmatch(regex, generic)), None)


@functools.cache
def coverage(spec: str, precision: str) -> dict[str, tuple[str | None, str]]:
  """{module path: (role, kind)} of every layer of `spec` built in `precision`."""
  c = load_config(spec)
  c.precision = precision
  model = nnx.eval_shape(lambda: build_model(c.model, jax.random.key(0), numerics_rules(c)))
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and (isinstance(node, LAYERS) or any(
        isinstance(v, nnx.Variable) for v in vars(node).values())):
      p = "/".join(str(k) for k in path)
      out[p] = (role(p), kind(node))
  return out


def column(spec: str, precision: str) -> str:
  return {"bf16": "ternary", "coat": "ternary + coat"}[precision] if CONFIGS[spec] else precision


def test_design_table_states_a_kind_for_every_role():
  table = design_table()
  assert sorted(table) == sorted(name for name, _ in ROLES)
  bad = {r: k for r, kinds in table.items() for k in kinds.values() if k not in KINDS}
  assert not bad, bad


@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("spec", CONFIGS)
def test_layers_get_the_numerics_of_their_role(spec, precision):
  table, col = design_table(), column(spec, precision)
  layers_ = coverage(spec, precision)
  assert layers_
  unknown = sorted(p for p, (r, _) in layers_.items() if r is None)
  assert not unknown, f"layers without a role (add one to ROLES and docs/DESIGN.md): {unknown}"
  wrong = [f"{p}: {k}, docs/DESIGN.md says {table[r][col]} for {r} under {col}"
           for p, (r, k) in sorted(layers_.items()) if k != table[r][col]]
  assert not wrong, "\n".join(wrong)


def test_every_role_occurs_where_the_table_says():
  """A role marked "-" in a column has no layer in that column's configs, every other one has."""
  table = design_table()
  seen = {}
  for spec in CONFIGS:
    for precision in PRECISIONS:
      roles = {r for r, _ in coverage(spec, precision).values()}
      seen.setdefault(column(spec, precision), set()).update(roles)
  for col, roles in seen.items():
    assert roles == {r for r, kinds in table.items() if kinds[col] != "-"}, col
