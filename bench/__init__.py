"""The element-proxy benchmark: `python bench/run.py` (see bench/README.md)."""
