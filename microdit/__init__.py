"""MicroDiT (Sehwag et al., "Stretching Each Dollar", arXiv 2407.15811): `model.MicroDiT` (the network
of SonyResearch/micro_diffusion `models/dit.py`), `layers` (its blocks: QK-LayerNorm attention,
SwiGLU, expert-choice MoE, fixed sin-cos positions) and `convert.from_official` (official weights)."""
