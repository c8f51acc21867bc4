"""logger: an observe-mode tap that logs one line per connection open and close.

    python -m elements.logger --port 50051 [--log-format console|json]

The proxy never waits for an observe-mode element, so logging costs connections
nothing. Lines go to stdout through the `elements.logger` logger, in the format of
every element's and the proxy's own log (`--log-format`, or LOG_FORMAT):

    2026-12-02T04:29:55.514Z info    elements.logger: open id=c1 client=10.0.0.5:40112 destination=10.0.0.9:6379 listener=127.0.0.1:15001
    2026-12-02T04:29:55.530Z info    elements.logger: close id=c1 reason=COMPLETED request_bytes=14 response_bytes=7

With `--log-format json` each line is one JSON object with the same fields, the
event ("open" or "close") as its `message`, ready for a log shipper. The element asks
for a 1-byte limit per direction, so the proxy bypasses it for data after the first
chunk: it only needs Open and Close events, and the Close event carries the byte counts.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any, Self

from elements import logs
from elements.sdk import CloseReason, Connection, Element, Mode, Verdict, run


class Logger(Element):
    """Observe mode, wants Open: logs each connection's open and close."""

    name = "logger"
    wants_open = True
    mode = Mode.OBSERVE
    read_only = True
    request_bytes_limit = 1
    response_bytes_limit = 1

    def __init__(self) -> None:
        self.out = logging.getLogger("elements.logger")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Self:
        """The connection lines go to stdout, apart from the element's diagnostics on stderr,
        and at any --log-level."""
        out = logging.getLogger("elements.logger")
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logs.formatter(args.log_format))
        out.addHandler(handler)
        out.setLevel(logging.INFO)
        out.propagate = False
        return cls()

    def on_open(self, conn: Connection) -> Verdict | None:
        self._line("open", id=conn.id, client=str(conn.client), destination=str(conn.original_destination),
                   listener=str(conn.listener))
        return None

    def on_close(self, conn: Connection, reason: CloseReason, request_bytes: int, response_bytes: int) -> None:
        self._line("close", id=conn.id, reason=reason.name, request_bytes=request_bytes,
                   response_bytes=response_bytes)

    def _line(self, event: str, **values: Any) -> None:
        self.out.info(event, extra=logs.fields(**values))


if __name__ == "__main__":
    run(Logger)
