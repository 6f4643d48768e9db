"""The entry point (`launch/main.py`) and launch helpers."""
