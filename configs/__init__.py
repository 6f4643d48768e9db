"""Experiment configs: `configs/<family>_<variant>.py` with `get_config(arg)`; `configs.base` holds the defaults."""
