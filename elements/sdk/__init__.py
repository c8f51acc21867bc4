"""The element SDK: subclass `Element`, implement a hook or two, `run()` it.

An element is a gRPC service (proto/element.proto) that judges the chunks of proxied
TCP connections. This module hides the protocol: it turns the proxy's batched
`Session` stream into per-connection hook calls in order, batches the verdicts
back, and brings the debug `Process` RPC, server reflection, health checking,
command-line options and graceful shutdown. Protobuf types stay at the edge: hooks
see `Connection`, `Chunk` (or, for a framed direction, `Message`) and return `Verdict`s.
"""

from elements.sdk.dispatch import BadEvent, Dispatcher
from elements.sdk.element import (
    Action,
    Address,
    Chunk,
    Close,
    CloseReason,
    Connection,
    Direction,
    Drop,
    Element,
    Event,
    Framer,
    FramingError,
    Hold,
    HookResult,
    Message,
    Mode,
    Pass,
    Reset,
    Verdict,
)
from elements.sdk.framers import Lines
from elements.sdk.serve import CannotServe, port_number, run, serve, serve_async
from elements.sdk.servicer import process

__all__ = ["Action", "Address", "BadEvent", "CannotServe", "Chunk", "Close", "CloseReason", "Connection", "Direction",
           "Dispatcher", "Drop", "Element", "Event", "Framer", "FramingError", "Hold", "HookResult", "Lines", "Message",
           "Mode", "Pass", "Reset", "Verdict", "port_number", "process", "run", "serve", "serve_async"]
