"""Generated gRPC code for proto/element.proto (regenerate with `python proto/generate.py`)."""
