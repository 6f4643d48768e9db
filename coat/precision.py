"""COAT as a precision mode of the trainer (arXiv 2410.19313): `config.precision = "coat"`.

`COAT` is a `common.numerics.Precision`: the numerics rules below (applied after the config's own
`config.numerics.rules`, so finer rules override them, and not required to match: a family may
lack a layer kind) and the FP8 AdamW optimizer (`coat.optim.fp8_adamw`, used unless
`config.optim.name` names another optimizer than the default "adamw").

What is FP8, as COAT's precision flow (Sec. 5, Fig. 3) mapped onto diffusion networks:
  * the linear layers of attention and MLP branches (module paths with an `attn`, `attention`,
    `cross`, `mlp`, `ffn` or `ff` component): `coat.linear.FP8Dense`, E4M3 forward GEMMs with
    just-in-time per-tensor scales, E5M2 gradient GEMMs, FP8 residuals; a mixture of experts'
    per-expert maps (`common.layers.ExpertDense`) likewise, one FP8 GEMM per expert
    (`coat.linear.FP8ExpertDense`);
  * the non-linear layers outside attention (norms, FiLM modulation, activation functions and the
    gated product): `coat.activations.FP8Residuals`, inputs saved as 1x16 E4M3 with bf16 scales;
  * optimizer moments: E4M3 groups of 128 with Dynamic Range Expansion (`coat.optim`).
What stays in high precision, as in COAT (embeddings, LM head, attention, loss in BF16): the patch
embedding and the final projection, the noise/class/caption conditioning MLPs (vectors [B, D],
small), attention itself with its QK-norms, convolutions, the residual stream, master weights
(fp32) and the gradients given to the optimizer (fp32).
"""

from common import registry
from common.numerics import Precision

# Module paths inside an attention or MLP branch ("mid/0/attn/qkv", "blocks/3/mlp/fc1").
BRANCH_LINEARS = r"(.*/)?(attn|attention|cross|mlp|ffn|ff)/(.*/)?[^/]+"
# Every path that does not pass through an attention module (its QK-norms stay bf16).
OUTSIDE_ATTENTION = r"(?!(.*/)?(attn|attention|cross)/).*"

COAT = registry.add("precision", "coat.precision.COAT", Precision(
    rules=(
        (BRANCH_LINEARS, "coat.linear.FP8Dense", {}),
        (BRANCH_LINEARS, "coat.linear.FP8ExpertDense", {}),
        (OUTSIDE_ATTENTION, "coat.activations.FP8Residuals", {}),
    ),
    optimizer="coat.optim.fp8_adamw",
))
