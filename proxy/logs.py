"""The proxy's logging: elements/logs.py, shared with every SDK element, so the proxy's
lines and its elements' read alike (same console layout, same JSON keys)."""

from elements.logs import fields, setup

__all__ = ["fields", "setup"]
