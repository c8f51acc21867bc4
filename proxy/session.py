"""One element's batched Session stream, shared by every connection of this worker.

Per-message cost dominates gRPC in Python, so events queue in an outbox and one
writer task sends everything queued as one SessionRequest while the previous write
is in flight: the busier the proxy, the bigger the batches. Events are encoded by
wire.py, which copies a chunk's bytes once, when its batch is sent. Verdicts come back keyed
by (connection id, sequence) and go to whoever waits for them. When the stream is
down, late or answers nonsense, the element's failure policy answers instead:
fail-open passes the chunk unchanged, fail-closed resets the connection.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from elements.api import element_pb2 as pb
from elements.api import element_pb2_grpc as pb_grpc
from proxy.chain import Action, Direction, Outcome, Payload, VerdictTarget
from proxy.config import ElementConfig
from proxy.stats import ElementStats
from proxy.wire import (
    EncodedEvent,
    close_event,
    data_event,
    encoded_size,
    message_event,
    open_session,
    session_request,
)

log = logging.getLogger("proxy.session")

MAX_MESSAGE_BYTES = 64 * 1024 * 1024
BATCH_BYTES = 1024 * 1024
# Observe-mode events are never waited for, so nothing else bounds them: past this many
# queued bytes they are dropped (and counted) rather than growing the proxy's memory.
OBSERVE_BACKLOG_BYTES = 4 * 1024 * 1024
# Nobody waits for an observe-mode element, so its events may wait a little to share a
# message: per-message cost, not bytes, is what gRPC charges the proxy.
OBSERVE_FLUSH_DELAY = 0.002
OBSERVE_FLUSH_EVENTS = 512
# Per-message cost, not bytes, is what gRPC charges for small events: below this many queued
# bytes, with other events already awaiting verdicts, the writer waits one loop turn to batch more
# (bench, one element: churn +25%, GET at 50 clients +8%, GET at 1 client and bulk unchanged).
COALESCE_BELOW_BYTES = 16 * 1024
BACKOFF_FIRST = 0.05
BACKOFF_CAP = 0.5
DESCRIBE_TIMEOUT = 2.0
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    # gRPC servers refuse pings more often than every 5 minutes by default (GOAWAY
    # "too_many_pings", which would drop the session): a dead element shows up as a
    # broken connection long before a keepalive would notice anyway.
    ("grpc.keepalive_time_ms", 300_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    ("grpc.initial_reconnect_backoff_ms", 50),
    ("grpc.max_reconnect_backoff_ms", 500),
]
# The stats key of a verdict by (is it Open's, action): looked up, not formatted, per verdict.
# An action missing here is one the proxy does not know.
_VERDICT_KEYS = {(is_open, int(action)): f"{'open' if is_open else 'data'}/{action.name.lower()}"
                 for is_open in (True, False) for action in (Action.PASS, Action.DROP, Action.CLOSE, Action.RESET)}

# What trips the breaker: failures that cost a wait or show a broken element. A session
# that is down already fails every event at once, so tripping on it would save nothing.
_BREAKER_CAUSES = frozenset(("timeout", "invalid_verdict"))

Waiter = tuple[VerdictTarget, int, int, float]  # target, its stage position, sequence, sent at (monotonic)


class ElementSession:
    """Keeps one Session stream to one element open, reconnecting with capped backoff."""

    def __init__(self, index: int, config: ElementConfig, on_describe: Callable[[], None],
                 max_replacement_bytes: int) -> None:
        self.index = index
        self.config = config
        self.name = config.name or config.address
        self.description: pb.Description | None = None
        self.up = False
        self.tripped = False
        self._observer = False
        self.stats = ElementStats()
        self.unknown_verdicts = 0
        self._max_replacement = max_replacement_bytes
        self._consecutive_failures = 0
        self._probe: asyncio.Task[None] | None = None
        self._on_describe = on_describe
        self._outbox: list[EncodedEvent] = []
        self._outbox_bytes = 0
        self._wakeup = asyncio.Event()
        self._pending: dict[tuple[str, int], Waiter] = {}
        self._deadlines: deque[tuple[float, tuple[str, int]]] = deque()
        self._timeout = config.timeout_ms / 1000
        self._task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"session-{self.name}")

    async def stop(self) -> None:
        for task in (self._task, self._probe):
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._fail_all("proxy_stopping")

    def send_open(self, event: pb.OpenEvent, target: VerdictTarget | None, pos: int) -> None:
        self._send(message_event(pb.Event(open=event)), "open", event.connection_id, 0, target, pos)

    def send_data(self, connection_id: str, seq: int, direction: Direction, data: Payload, end_of_stream: bool,
                  metadata: Mapping[str, str] | None, target: VerdictTarget | None, pos: int) -> None:
        if target is None and self._outbox_bytes > OBSERVE_BACKLOG_BYTES:
            self.stats.failures["backlog_full"] += 1
            return
        self._send(data_event(connection_id, seq, direction, data, end_of_stream, metadata), "data",
                   connection_id, seq, target, pos)

    def send_close(self, connection_id: str, outcome: Outcome, request_bytes: int, response_bytes: int) -> None:
        if self.up:
            self.stats.events["close"] += 1
            self._queue(close_event(connection_id, outcome, request_bytes, response_bytes))

    def _send(self, event: EncodedEvent, kind: str, connection_id: str, seq: int, target: VerdictTarget | None,
              pos: int) -> None:
        if not self.up or self.tripped:
            if target is not None:
                self._loop.call_soon(self._apply_policy, (target, pos, seq, 0.0),
                                     "breaker_open" if self.tripped else "session_down")
            return
        self.stats.events[kind] += 1
        if target is not None:
            key = (connection_id, seq)
            now = time.monotonic()
            self._pending[key] = (target, pos, seq, now)
            self._deadlines.append((now + self._timeout, key))
        self._queue(event)

    def _queue(self, event: EncodedEvent) -> None:
        self._outbox.append(event)
        self._outbox_bytes += encoded_size(event)
        if len(self._outbox) == 1:
            self._wakeup.set()

    def _apply_policy(self, waiter: Waiter, why: str) -> None:
        """Answers for an element that could not: PASS unchanged when fail-open, FAIL when fail-closed."""
        self.stats.failures[why] += 1
        if why in _BREAKER_CAUSES:
            self._consecutive_failures += 1
            if self.config.breaker_failures and self._consecutive_failures >= self.config.breaker_failures:
                self._open_breaker()
        target, pos, seq, _ = waiter
        target.on_verdict(pos, seq, Action.PASS if self.config.fail_open else Action.FAIL, None, None)

    def _open_breaker(self) -> None:
        """K failures in a row: stop asking the element (fail-open: skip it; fail-closed: refuse new
        connections) for a cool-down, then probe its health before trusting it again."""
        if self.tripped:
            return
        self.tripped = True
        log.warning("element %s: circuit breaker open after %d failures in a row; %s for %d ms, then probing",
                    self.name, self._consecutive_failures,
                    "skipping it" if self.config.fail_open else "refusing new connections",
                    self.config.breaker_cooldown_ms)
        self._on_describe()
        self._probe = asyncio.create_task(self._probe_until_healthy())

    def _close_breaker(self, why: str) -> None:
        self._consecutive_failures = 0
        if self.tripped:
            self.tripped = False
            log.info("element %s: circuit breaker closed (%s)", self.name, why)
            self._on_describe()

    async def _probe_until_healthy(self) -> None:
        while self.tripped:
            await asyncio.sleep(self.config.breaker_cooldown_ms / 1000)
            async with grpc.aio.insecure_channel(self.config.address) as channel:
                try:
                    health = await health_pb2_grpc.HealthStub(channel).Check(
                        health_pb2.HealthCheckRequest(), timeout=self._timeout)
                except grpc.aio.AioRpcError as error:
                    log.info("element %s: probe failed (%s), breaker stays open", self.name, error.code().name)
                    continue
            if health.status == health_pb2.HealthCheckResponse.SERVING:
                self._close_breaker("health probe passed")

    def _fail_all(self, why: str) -> None:
        pending, self._pending = self._pending, {}
        self._deadlines.clear()
        if pending:
            log.warning("element %s: %d events unanswered (%s), failure policy %s applied",
                        self.name, len(pending), why, self.config.failure)
        for waiter in pending.values():
            self._apply_policy(waiter, why)

    async def _run(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            channel = grpc.aio.insecure_channel(self.config.address, options=CHANNEL_OPTIONS)
            try:
                stub = pb_grpc.ElementStub(channel)
                self.description = await stub.Describe(pb.DescribeRequest(), timeout=DESCRIBE_TIMEOUT)
                self.name = self.config.name or self.description.name or self.config.address
                self._observer = self.description.mode == pb.MODE_OBSERVE
                call = open_session(channel)
                self.up = True
                backoff = BACKOFF_FIRST
                log.info("element %s session up at %s", self.name, self.config.address)
                self._close_breaker("session up")
                self._on_describe()
                await self._stream(call)
                log.warning("element %s ended its session", self.name)
            except grpc.aio.AioRpcError as error:
                log.log(logging.WARNING if backoff == BACKOFF_FIRST else logging.DEBUG,
                        "element %s at %s unavailable, retrying: %s %s", self.name, self.config.address,
                        error.code().name, error.details())
            except Exception:
                # a bug of ours must not leave the element unused until restart: log it, redial
                log.exception("element %s session failed; redialing", self.name)
            finally:
                was_up, self.up = self.up, False
                self._outbox.clear()
                self._outbox_bytes = 0
                self._fail_all("session_down")
                await channel.close(None)
                if was_up:
                    self._on_describe()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_CAP)

    async def _stream(self, call: grpc.aio.StreamStreamCall) -> None:
        """Runs writer, reader and timeout watch until one of them ends the stream."""
        tasks = [asyncio.create_task(self._write_loop(call)), asyncio.create_task(self._read_loop(call)),
                 asyncio.create_task(self._watch_timeouts())]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
        finally:
            call.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _write_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            if not self._outbox:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            if self._observer and len(self._outbox) < OBSERVE_FLUSH_EVENTS:
                await asyncio.sleep(OBSERVE_FLUSH_DELAY)
            elif self._outbox_bytes < COALESCE_BELOW_BYTES and len(self._pending) > len(self._outbox):
                # Verdicts are on their way, so more small events are about to follow: one more
                # turn of the loop lets them share this message. Alone (a lone request) or big
                # (bulk, where the write is the bottleneck), events go at once.
                await asyncio.sleep(0)
            batch = self._take_batch()
            self.stats.batches += 1
            try:
                await call.write(session_request(batch))
            except asyncio.InvalidStateError:
                return  # the RPC already ended (the element died mid-write); the session redials

    def _take_batch(self) -> list[EncodedEvent]:
        """Takes events from the front of the outbox up to BATCH_BYTES, so no message nears the
        gRPC size limit; only the events taken are looked at, however long the outbox is, and
        none when the whole outbox fits (its size is kept as events are queued)."""
        outbox = self._outbox
        if self._outbox_bytes <= BATCH_BYTES:
            self._outbox, self._outbox_bytes = [], 0
            return outbox
        size = count = 0
        for event in outbox:
            weight = encoded_size(event)
            if count and size + weight > BATCH_BYTES:
                break
            size += weight
            count += 1
        self._outbox_bytes -= size
        if count == len(outbox):
            self._outbox = []
            return outbox
        batch = outbox[:count]
        del outbox[:count]
        return batch

    async def _read_loop(self, call: grpc.aio.StreamStreamCall) -> None:
        pending = self._pending
        stats = self.stats
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return
            now = time.monotonic()
            for verdict in response.verdicts:
                waiter = pending.pop((verdict.connection_id, verdict.sequence), None)
                if waiter is None:
                    self.unknown_verdicts += 1
                    log.debug("element %s: verdict for unknown connection %s sequence %d ignored",
                              self.name, verdict.connection_id, verdict.sequence)
                    continue
                target, pos, seq, sent_at = waiter
                action = verdict.action
                key = _VERDICT_KEYS.get((seq == 0, action))
                data = verdict.data if verdict.HasField("data") else None
                if key is None or data is not None and len(data) > self._max_replacement:
                    log.warning("element %s: invalid verdict for connection %s (%s), failure policy %s applied",
                                self.name, verdict.connection_id,
                                f"action {action}" if key is None else
                                f"{len(data or b'')} replacement bytes, over max_replacement_bytes",
                                self.config.failure)
                    self._apply_policy(waiter, "invalid_verdict")
                    continue
                self._consecutive_failures = 0
                stats.verdict(key, now - sent_at)
                metadata = verdict.metadata
                target.on_verdict(pos, seq, action, data, dict(metadata) if metadata else None)

    async def _watch_timeouts(self) -> None:
        """Fails events older than timeout_ms; one sweep per quarter timeout keeps it cheap."""
        deadlines, pending = self._deadlines, self._pending
        while True:
            await asyncio.sleep(max(self._timeout / 4, 0.005))
            now = time.monotonic()
            while deadlines and deadlines[0][0] <= now:
                _, key = deadlines.popleft()
                waiter = pending.pop(key, None)
                if waiter is not None:
                    log.warning("element %s: no verdict for connection %s sequence %d within %d ms, "
                                "failure policy %s applied", self.name, key[0], key[1],
                                self.config.timeout_ms, self.config.failure)
                    self._apply_policy(waiter, "timeout")
