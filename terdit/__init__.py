"""TerDiT (arXiv 2405.14854): ternary quantizer, QAT dense layer, 2-bit packing (`terdit.ternary`),
the Large-DiT network (`terdit.model`) and official-checkpoint conversion (`terdit.convert`)."""
