"""SiD2 (Simpler Diffusion, arXiv 2410.19324): the Residual U-ViT denoiser (`sid2.model`)."""
