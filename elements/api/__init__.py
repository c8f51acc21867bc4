"""Generated gRPC code for proto/element.proto (regenerate with `python proto/generate.py`), and
the one protocol constant the proto states in a comment rather than a message."""

# The Session call's metadata with which a proxy that never waits for the session's verdicts
# (detect or shadow mode) asks for only those that change traffic: the element may leave every
# plain PASS out (proto/element.proto, rpc Session). The proxy sends it, the SDK honours it.
VERDICTS_METADATA = (("element-proxy-verdicts", "changes"),)
