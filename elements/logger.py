"""logger: an observe-mode tap that logs one line per connection open and close.

    python -m elements.logger --port 50051 [--format console|json]

The proxy never waits for an observe-mode element, so logging costs connections
nothing. Lines go to stdout through the `elements.logger.connections` logger:

    open id=c1 client=10.0.0.5:40112 destination=10.0.0.9:6379 listener=127.0.0.1:15001
    close id=c1 reason=COMPLETED request_bytes=14 response_bytes=7

With `--format json` each line is one JSON object with the same fields and an
`event` key ("open" or "close"), ready for a log shipper. The element asks for a
1-byte limit per direction, so the proxy bypasses it for data after the first chunk:
it only needs Open and Close events, and the Close event carries the byte counts.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Self

from elements.sdk import CloseReason, Connection, Element, Mode, Verdict, run


class Logger(Element):
    """Observe mode, wants Open: logs each connection's open and close."""

    name = "logger"
    wants_open = True
    mode = Mode.OBSERVE
    request_bytes_limit = 1
    response_bytes_limit = 1

    def __init__(self, fmt: str = "console") -> None:
        self.fmt = fmt
        self.out = logging.getLogger("elements.logger.connections")

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--format", choices=["console", "json"], default="console",
                            help="connection line format (default: %(default)s)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        out = logging.getLogger("elements.logger.connections")
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("%(message)s" if args.format == "json" else "%(asctime)s %(message)s"))
        out.addHandler(handler)
        out.setLevel(logging.INFO)  # the access log shows whatever --log-level says
        out.propagate = False
        return cls(args.format)

    def on_open(self, conn: Connection) -> Verdict | None:
        self._line("open", id=conn.id, client=str(conn.client), destination=str(conn.original_destination),
                   listener=str(conn.listener))
        return None

    def on_close(self, conn: Connection, reason: CloseReason, request_bytes: int, response_bytes: int) -> None:
        self._line("close", id=conn.id, reason=reason.name, request_bytes=request_bytes,
                   response_bytes=response_bytes)

    def _line(self, event: str, **fields: Any) -> None:
        if self.fmt == "json":
            self.out.info("%s", json.dumps({"event": event, **fields}))
        else:
            self.out.info("%s %s", event, " ".join(f"{key}={value}" for key, value in fields.items()))


if __name__ == "__main__":
    run(Logger)
