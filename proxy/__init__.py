"""The transparent proxy. Importing `elements` first sets gRPC's defaults before grpc loads."""

import elements  # noqa: F401
