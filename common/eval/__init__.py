"""Sample-quality evaluation: the FID Inception network and the metrics built on its features."""
