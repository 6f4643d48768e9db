"""COAT as a precision mode of the trainer (arXiv 2410.19313): `config.precision = "coat"`.

`COAT` is a `common.nn.numerics.Precision`: the numerics rules below (applied after the config's own
`config.numerics.rules`, so finer rules override them, and not required to match: a family may
lack a layer kind) and the FP8 AdamW optimizer (`coat.optim.fp8_adamw`, used unless
`config.optim.name` names another optimizer than the default "adamw").

Where the FP8 flow runs: in the network's stacks of blocks, as COAT's runs through the decoder
layers only (official NVlabs/COAT `coat/models/coat_llama.py`: `quantize_input_before_block` ...
`quantize_output_after_block`; the token embedding, the final norm and the LM head stay BF16).
A block of a stack is a module under a list index in its path ("blocks/3/...", "mid/0/...",
"enc_blocks/1/0/..."); the embedders, conditioning MLPs (MicroDiT's caption prompt block
included), stage maps and output layers are single modules outside them and stay high precision.

What is FP8 there, as COAT's precision flow (Sec. 5, Fig. 3) mapped onto diffusion networks:
  * the linear layers of attention, cross-attention and MLP branches (path components `attn`,
    `cross_attn`, `attention`, `cross`, `mlp`, `ffn`, `ff`): `coat.linear.FP8Dense`, E4M3
    forward GEMMs with just-in-time per-tensor scales, E5M2 gradient GEMMs, FP8 residuals; a
    mixture of experts' per-expert maps (`common.nn.layers.ExpertDense`) likewise, one FP8 GEMM per
    expert (`coat.linear.FP8ExpertDense`). Not the MoE router (`gate`, `router`): its scores pick
    the tokens of each expert, and FP8 trainers keep gating in high precision (DeepSeek-V3,
    arXiv 2412.19437, Sec. 3.3.1);
  * the non-linear layers outside attention (block norms, FiLM modulation, activation functions
    and the gated product): `coat.activations.FP8Residuals`, inputs saved as 1x16 E4M3 with bf16
    scales;
  * optimizer moments: E4M3 groups of 128 with Dynamic Range Expansion (`coat.optim`).
High precision inside the blocks: attention itself with its QK-norms, the adaLN / FiLM linears
(vectors [B, D]), convolutions and the residual stream; everywhere: master weights (fp32) and the
gradients given to the optimizer (fp32). docs/DESIGN.md ("Numerics and precision modes") tabulates
the result per layer role; tests/test_precision_coverage.py checks it on every family.
"""

from common import registry
from common.nn.numerics import Precision

# A path component naming an attention module ("attn", "cross_attn", "attention", "cross").
_ATTENTION = r"([^/]*attn|[^/]*attention|cross)"
# A path inside a stack of blocks: under a list index ("blocks/3/", "enc_blocks/1/0/").
_IN_BLOCKS = r"(.*/)?\d+/"
# Linear layers of a block's attention or MLP branch ("mid/0/attn/qkv", "blocks/3/mlp/w1"), but
# not a mixture of experts' router ("blocks/1/mlp/gate").
BRANCH_LINEARS = (rf"{_IN_BLOCKS}(.*/)?({_ATTENTION}|mlp|ffn|ff)/(.*/)?"
                  r"(?!(gate|router)$)[^/]+")
# Every path of a block that does not pass through an attention module (its QK-norms stay bf16).
BLOCKS_OUTSIDE_ATTENTION = rf"(?!(.*/)?{_ATTENTION}/){_IN_BLOCKS}.*"

COAT = registry.add("precision", "coat.precision.COAT", Precision(
    rules=(
        (BRANCH_LINEARS, "coat.linear.FP8Dense", {}),
        (BRANCH_LINEARS, "coat.linear.FP8ExpertDense", {}),
        (BLOCKS_OUTSIDE_ATTENTION, "coat.activations.FP8Residuals", {}),
    ),
    optimizer="coat.optim.fp8_adamw",
))
