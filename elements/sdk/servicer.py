"""The Element gRPC service of one element: Session, Describe and the debug Process RPC."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpc

from elements.api import VERDICTS_METADATA
from elements.api import element_pb2 as pb
from elements.api import element_pb2_grpc as pb_grpc
from elements.sdk import process as process_rpc
from elements.sdk.dispatch import Dispatcher
from elements.sdk.element import Element, Mode

log = logging.getLogger("elements")

ELEMENT_SERVICE = pb.DESCRIPTOR.services_by_name["Element"].full_name


class Servicer(pb_grpc.ElementServicer):
    """The Element service of one element; `stopping` ends every Session cleanly."""

    def __init__(self, element: Element, stopping: asyncio.Event) -> None:
        self.element = element
        self.stopping = stopping
        self._dispatchers: set[Dispatcher] = set()

    def open_connections(self) -> int:
        """Connections the proxies have open through this element, over all its Session streams."""
        return sum(dispatcher.open_connections for dispatcher in self._dispatchers)

    async def Session(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:  # noqa: N802
        changes_only = VERDICTS_METADATA[0] in (context.invocation_metadata() or ())
        dispatcher = Dispatcher(self.element, answer=self.element.mode != Mode.OBSERVE, changes_only=changes_only)
        self._dispatchers.add(dispatcher)
        reader = asyncio.create_task(_read(request_iterator, dispatcher))
        writer = asyncio.create_task(_write(context, dispatcher))
        stopping = asyncio.create_task(self.stopping.wait())
        try:
            await asyncio.wait({reader, writer, stopping}, return_when=asyncio.FIRST_COMPLETED)
            # Cancelling the reader loses no event: a batch is fed between two awaits.
            reader.cancel()
            (read_error,) = await asyncio.gather(reader, return_exceptions=True)
            if isinstance(read_error, Exception):
                log.warning("element %s: session read failed: %r", self.element.describe().name, read_error)
            await dispatcher.drain()
            dispatcher.closed = True
            dispatcher.ready.set()
            await writer
        finally:
            for task in (reader, writer, stopping):
                task.cancel()
            dispatcher.cancel()
            self._dispatchers.discard(dispatcher)

    async def Describe(self, request: pb.DescribeRequest,  # noqa: N802
                       context: grpc.aio.ServicerContext) -> pb.Description:
        return self.element.describe()

    async def Process(self, request: pb.ProcessRequest,  # noqa: N802
                      context: grpc.aio.ServicerContext) -> pb.ProcessResponse:
        try:
            return await process(self.element, request)
        except process_rpc.BadProcessRequest as error:
            context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            context.set_details(str(error))
            return pb.ProcessResponse()


async def _read(request_iterator: Any, dispatcher: Dispatcher) -> None:
    async for request in request_iterator:
        dispatcher.feed(request.events)


async def _write(context: grpc.aio.ServicerContext, dispatcher: Dispatcher) -> None:
    """The stream's one writer: sends whatever verdicts gathered meanwhile as one message.

    `closed` is read before the outbox is taken: verdicts added while a write was awaited
    (the last hooks finishing as the stream ends) must still go out in one more message."""
    while True:
        await dispatcher.ready.wait()
        dispatcher.ready.clear()
        closed = dispatcher.closed
        response = dispatcher.take()
        if response.verdicts:
            await context.write(response)
        if closed:
            return


async def process(element: Element, request: pb.ProcessRequest) -> pb.ProcessResponse:
    """Runs the element on one throw-away connection: Open, the chunks, Close (elements/sdk/process.py).
    Raises BadProcessRequest for a request no connection could produce."""
    opening = process_rpc.open_event(request)
    chunks = process_rpc.data_events(request, opening.connection_id)
    dispatcher = Dispatcher(element, answer=True)
    dispatcher.feed([pb.Event(open=opening), *(pb.Event(data=chunk) for chunk in chunks)])
    await dispatcher.drain()
    verdicts = list(dispatcher.take().verdicts)
    dispatcher.feed([pb.Event(close=process_rpc.close_event(opening.connection_id, chunks, verdicts))])
    await dispatcher.drain()
    return process_rpc.response(request, chunks, verdicts)


