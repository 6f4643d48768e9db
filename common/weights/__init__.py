"""Weights and formats: checkpoints, exports (deployed networks), torch/safetensors reading, foreign-weight converters, parameter path names."""
