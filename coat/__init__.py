"""COAT (arXiv 2410.19313): FP8 quantizers with dynamic range expansion (`coat.fp8`), FP8 AdamW (`coat.optim`)."""
