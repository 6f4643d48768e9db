"""Diffusion math: logSNR/sigma schedules, parametrizations, losses, samplers, and the recipes (VP, EDM, ADM) that combine them."""
