"""Network building blocks (layers, shared transformer pieces), how a network is built from its config, and its numerics (precision rules)."""
