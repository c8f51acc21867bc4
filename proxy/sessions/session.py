"""One element's batched Session stream, shared by every connection of this worker.

Per-message cost dominates gRPC in Python, so events queue in an outbox and one
writer task sends everything queued as one SessionRequest while the previous write
is in flight: the busier the proxy, the bigger the batches. Events are encoded by
wire.py, which copies a chunk's bytes once, when its batch is sent. Verdicts come back keyed
by (connection id, sequence) and go to whoever waits for them. When the stream is
down, late or answers nonsense, the element's failure policy answers instead:
fail-open passes the chunk unchanged, fail-closed resets the connection.

What the element sends is checked (validate.py) and what it gets wrong stays with the
connection it concerns. Because a new session may be a new element process, it is told
about every live connection it must know of (a resumed Open) and about the connections
that ended while it was away (their Close), before anything else. A connection moved here
from a replica that was lost (fleet.py) is announced the same way. What the element held
(HOLD) when its session ended is decided by its failure policy, since no new session could
know those bytes.

A session talks to one endpoint (endpoint.py): one replica of the element, plaintext or TLS;
while it is up, drain.py watches whether that replica is draining.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from typing import cast

import grpc

from elements.api import VERDICTS_METADATA
from elements.api import element_pb2 as pb
from elements.api import element_pb2_grpc as pb_grpc
from proxy.sessions.breaker import Breaker
from proxy.chain import Action, Direction, HoldingTarget, Outcome, Payload, Peer, Resumed, VerdictTarget
from proxy.chain.verdicts import WIRE_ACTIONS
from proxy.config import ElementConfig
from proxy.sessions.drain import DrainWatch
from proxy.sessions.endpoint import Endpoint
from proxy.sessions.faultlog import FaultLog
from proxy.sessions.late import LateVerdicts
from elements.logs import fields
from proxy.operations.stats import ElementStats
from proxy.sessions.validate import DATA, END_OF_STREAM, OPEN, VerdictLimits, description_problem, verdict_problem
from proxy.sessions.wire import (
    EncodedEvent,
    close_event,
    data_event,
    encoded_size,
    message_event,
    open_session,
    session_request,
)

log = logging.getLogger("proxy.session")

BATCH_BYTES = 1024 * 1024
# Observe-mode events are never waited for, so nothing else bounds them: past this many
# queued bytes they are dropped (and counted) rather than growing the proxy's memory.
OBSERVE_BACKLOG_BYTES = 4 * 1024 * 1024
# Nobody waits for an observe-mode element, so its events may wait a little to share a
# message: per-message cost, not bytes, is what gRPC charges the proxy.
OBSERVE_FLUSH_DELAY = 0.002
OBSERVE_FLUSH_EVENTS = 512
# Close events of connections that ended while the session was down, kept for the next session;
# past this many they are counted as lost (an element down for long does not grow the proxy).
CLOSES_KEPT = 10_000
# Per-message cost, not bytes, is what gRPC charges for small events: below this many queued
# bytes, with other events already awaiting verdicts, the writer waits one loop turn to batch more
# (bench, one element: churn +25%, GET at 50 clients +8%, GET at 1 client and bulk unchanged).
COALESCE_BELOW_BYTES = 16 * 1024
BACKOFF_FIRST = 0.05
BACKOFF_CAP = 0.5
DESCRIBE_TIMEOUT = 2.0
# The stats key of a verdict by (is it Open's, action): looked up, not formatted, per verdict.
# An action missing here is one the proxy does not know.
_VERDICT_KEYS = {(is_open, int(action)): f"{'open' if is_open else 'data'}/{action.name.lower()}"
                 for is_open in (True, False) for action in WIRE_ACTIONS}
# The verdicts that need no look at their context: a HOLD does (what is held, whether it can be).
_PLAIN_KEYS = {key: name for key, name in _VERDICT_KEYS.items() if key[1] != Action.HOLD}

# What trips the breaker: failures that cost a wait or show a broken element. A session
# that is down already fails every event at once, so tripping on it would save nothing.
_BREAKER_CAUSES = frozenset(("timeout", "invalid_verdict"))
# Why an event was answered by the failure policy at once, for the rate-limited log line.
_UNANSWERED = {"session_down": "session down", "breaker_open": "circuit breaker open",
               "invalid_describe": "its Describe is invalid"}

# target, its stage position, sequence, sent at (monotonic), direction (0: Open), and the bytes a HOLD
# of the event would add to what its lane holds here (-1: it cannot be held: an Open, an end of stream)
Waiter = tuple[VerdictTarget, int, int, float, int, int]
# what an element holds on one lane: the lane, the element's stage position there, the bytes
Holding = tuple[HoldingTarget, int, int]


class InvalidDescription(Exception):
    """The element described itself in a way the proxy cannot honour; the message says how."""


class ElementSession:
    """Keeps one Session stream to one replica of an element open, reconnecting with capped backoff."""

    def __init__(self, index: int, config: ElementConfig, on_describe: Callable[[], None],
                 limits: VerdictLimits, endpoint: Endpoint) -> None:
        self.index = index
        self.config = config
        self.endpoint = endpoint
        self.name = config.name or config.address
        self.description: pb.Description | None = None
        self.problem: str | None = None  # why the last Describe could not be honoured
        self.up = False
        self._observer = False
        self.stats = ElementStats(config.mode)
        # detect and shadow: planned as never waited for, their verdicts go here (late.py)
        self._late = LateVerdicts(config.mode, index, self.name, self.stats) if config.mode != "inline" else None
        self.breaker = Breaker(config, self.name, on_describe, endpoint.channel)
        self.drain = DrainWatch(self._where, on_describe)
        self.faults = FaultLog(log, f"element {self.name}")
        self._limits = dataclasses.replace(limits, held_bytes=config.max_held_bytes)
        self._max_replacement = limits.replacement_bytes
        self._read_only = False
        self._on_describe = on_describe
        self._live: dict[str, Peer] = {}  # connections that sent this element an event, until their Close
        self._closes_while_down: deque[EncodedEvent] = deque()
        self._outbox: list[EncodedEvent] = []
        self._outbox_bytes = 0
        self._wakeup = asyncio.Event()
        self._pending: dict[tuple[str, int], Waiter] = {}
        self._holding: dict[tuple[str, int], Holding] = {}  # (connection id, direction) -> what it holds
        self._deadlines: deque[tuple[float, tuple[str, int]]] = deque()
        self._timeout = config.timeout_ms / 1000
        self._task: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()

    @property
    def tripped(self) -> bool:
        return self.breaker.tripped

    @property
    def connections(self) -> int:
        """Live connections that use this replica."""
        return len(self._live)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"session-{self.name}")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self.breaker.stop()
        self._fail_all("proxy_stopping")

    def track(self, connection: Peer) -> None:
        """The connection sends this element its first event: announce it to every later session."""
        self._live[connection.id] = connection

    def adopt(self, connection: Peer) -> None:
        """A live connection moved here from a replica that was lost: announced as resumed (at once
        when up, else when the session comes up), before any further event of it."""
        self._live[connection.id] = connection
        if self.up:
            self._announce(connection, time.monotonic())

    def hand_over(self) -> list[Peer]:
        """Gives up every live connection (they move to another replica): this session is told no
        Close for them, and a later session of it does not hear of them."""
        live, self._live = list(self._live.values()), {}
        return live

    def send_open(self, connection: Peer, metadata: Mapping[str, str], target: VerdictTarget | None,
                  pos: int) -> None:
        event = connection.open_event(metadata, False)
        self._send(message_event(pb.Event(open=event)), "open", connection.id, 0, target, pos)

    def send_data(self, connection_id: str, seq: int, direction: Direction, data: Payload, end_of_stream: bool,
                  metadata: Mapping[str, str] | None, target: HoldingTarget | None, pos: int) -> None:
        if target is None and self._outbox_bytes > OBSERVE_BACKLOG_BYTES:
            self.stats.failures["backlog_full"] += 1
            return
        self._send(data_event(connection_id, seq, direction, data, end_of_stream, metadata), "data",
                   connection_id, seq, target, pos, direction, -1 if end_of_stream else len(data))

    def send_close(self, connection: Peer, outcome: Outcome) -> None:
        self._live.pop(connection.id, None)
        if self._late is not None:
            self._late.end(connection.id, time.monotonic())
        if self._holding:
            for direction in (Direction.REQUEST, Direction.RESPONSE):
                self._holding.pop((connection.id, direction), None)
        event = close_event(connection.id, outcome, connection.request_bytes, connection.response_bytes)
        if self.up:
            self.stats.events["close"] += 1
            self._queue(event)
        elif len(self._closes_while_down) < CLOSES_KEPT:
            self._closes_while_down.append(event)
        else:
            self.stats.closes_lost += 1

    def _send(self, event: EncodedEvent, kind: str, connection_id: str, seq: int, target: VerdictTarget | None,
              pos: int, direction: int = 0, holdable: int = -1) -> None:
        if not self.up or self.tripped:
            why = "breaker_open" if self.tripped else "invalid_describe" if self.problem else "session_down"
            if target is not None:
                self._loop.call_soon(self._apply_policy, connection_id, (target, pos, seq, 0.0, direction, holdable),
                                     why)
            self.faults.warn(why, f"events answered by the failure policy ({_UNANSWERED[why]})",
                             "%s: %s event of connection %s answered by the failure policy (%s)",
                             _UNANSWERED[why], kind, connection_id,
                             "passed unfiltered" if self.config.fail_open else "fail-closed: reset")
            return
        self.stats.events[kind] += 1
        if target is not None:
            key = (connection_id, seq)
            now = time.monotonic()
            self._pending[key] = (target, pos, seq, now, direction, holdable)
            self._deadlines.append((now + self._timeout, key))
        elif self._late is not None:
            self._late.expect((connection_id, seq), time.monotonic())
        self._queue(event)

    def _queue(self, event: EncodedEvent) -> None:
        self._outbox.append(event)
        self._outbox_bytes += encoded_size(event)
        if len(self._outbox) == 1:
            self._wakeup.set()

    def _apply_policy(self, connection_id: str, waiter: Waiter, why: str) -> None:
        """Answers for an element that could not: PASS unchanged when fail-open, FAIL when fail-closed
        (which decides what it holds on that lane too)."""
        self.stats.failures[why] += 1
        if why in _BREAKER_CAUSES:
            self.breaker.failed(time.monotonic())
        target, pos, seq, _, direction, _ = waiter
        if self._holding:
            self._holding.pop((connection_id, direction), None)
        target.on_verdict(pos, seq, self._policy_action, None, None)

    @property
    def _policy_action(self) -> Action:
        return Action.PASS if self.config.fail_open else Action.FAIL

    def _fail_all(self, why: str) -> None:
        """Every event awaiting a verdict, then everything the element holds, to the failure policy."""
        pending, self._pending = self._pending, {}
        self._deadlines.clear()
        if pending:
            log.warning("element %s: %d events unanswered (%s), failure policy %s applied",
                        self.name, len(pending), why, self.config.failure)
        for (connection_id, _), waiter in pending.items():
            self._apply_policy(connection_id, waiter, why)
        holding, self._holding = self._holding, {}
        if holding:
            log.warning("element %s: held chunks of %d connection directions (%s), failure policy %s applied",
                        self.name, len(holding), why, self.config.failure)
        for lane, pos, _ in holding.values():
            self.stats.failures[why] += 1
            lane.holder_lost(pos, self._policy_action)

    async def _run(self) -> None:
        backoff = BACKOFF_FIRST
        while True:
            channel = self.endpoint.channel()
            try:
                stub = pb_grpc.ElementStub(channel)
                self._accept(await stub.Describe(pb.DescribeRequest(), timeout=DESCRIBE_TIMEOUT))
                call = open_session(channel, VERDICTS_METADATA if self._late is not None else None)
                self.drain.start(channel)
                self._come_up()
                backoff = BACKOFF_FIRST
                await self._stream(call)
                log.log(logging.INFO if self.drain.draining else logging.WARNING, "element %s ended its session%s",
                        self._where(), " (it was draining)" if self.drain.draining else "")
            except InvalidDescription:
                pass  # said once by _accept; asked again after the backoff, in case it was fixed
            except grpc.aio.AioRpcError as error:
                self._unavailable(error, backoff == BACKOFF_FIRST)
            except Exception:
                # a bug of ours must not leave the element unused until restart: log it, redial
                log.exception("element %s session failed; redialing", self._where())
            finally:
                was_up, self.up = self.up, False
                self._outbox.clear()
                self._outbox_bytes = 0
                self._fail_all("session_down")
                if was_up:
                    self._on_describe()  # before any await: the live connections move to a replica that is up
                await self.drain.stop()
                await channel.close(None)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_CAP)

    def _unavailable(self, error: grpc.aio.AioRpcError, first: bool) -> None:
        """One warning when the session breaks or the replica cannot be reached (naming the TLS reason
        when it is one), debug lines while it stays so."""
        if self.up:
            log.warning("element %s session lost, redialing: %s %s", self._where(), error.code().name,
                        error.details())
            return
        reason = self.endpoint.failure_reason(error.details())
        detail = f"{reason} ({error.details()})" if reason else f"{error.code().name} {error.details()}"
        log.log(logging.WARNING if first else logging.DEBUG, "element %s unreachable, failure policy %s applies; "
                "retrying: %s", self._where(), self.config.failure, detail)

    def _where(self) -> str:
        """The element in a log line: its name, and the replica's address when the name is not that."""
        address = self.endpoint.address
        return address if self.name == address else f"{self.name} at {address}"

    def _accept(self, description: pb.Description) -> None:
        """Takes the element's Description, or raises InvalidDescription: an element the proxy cannot
        honour is planned like an unreachable one, so its failure policy decides every event."""
        problem = description_problem(description)
        if problem is not None:
            if problem != self.problem:
                self.problem = problem
                self.description = None
                log.warning("element %s: invalid Describe, %s; treated as unreachable, failure policy %s "
                            "applies until it describes itself validly", self._where(), problem, self.config.failure)
                self._on_describe()
            raise InvalidDescription(problem)
        if self.problem is not None:
            log.info("element %s: Describe valid again", self._where())
            self.problem = None
        self.description = description
        self.name = self.config.name or description.name or self.config.address
        self.breaker.name = self.name
        self.faults.subject = f"element {self.name}"
        # detect and shadow share observe mode's no-wait path, batching included
        self._observer = description.mode == pb.MODE_OBSERVE or self._late is not None
        # a read-only element's every replacement is suspect (-1: any length goes to verdict_problem)
        self._read_only = description.read_only
        self._max_replacement = -1 if description.read_only else self._limits.replacement_bytes
        if self._late is not None:
            self._late.name = self.name

    def _come_up(self) -> None:
        """A new stream: first the Close events it missed, then a resumed Open for every live
        connection, so the element knows them all before any further event of theirs."""
        closes, self._closes_while_down = self._closes_while_down, deque()
        self.stats.events["close"] += len(closes)
        for event in closes:
            self._queue(event)
        now = time.monotonic()
        for connection in self._live.values():
            self._announce(connection, now)
        self.up = True
        log.info("element %s session up at %s", self.name, self.endpoint.address,
                 extra=fields(resumed=len(self._live) or None, closes_delivered=len(closes) or None))
        self.breaker.close("session up")
        self._on_describe()

    def _announce(self, connection: Peer, now: float) -> None:
        """A resumed Open for a connection already under way; its verdict is awaited when the element
        wants Open events inline (a RESET or CLOSE then ends the connection)."""
        description = self.description
        assert description is not None
        connection.flow.touched.add(self.index)
        self.stats.events["resumed"] += 1
        if description.wants_open and not self._observer:
            key = (connection.id, 0)
            self._pending[key] = (Resumed(connection.flow), self.index, 0, now, 0, -1)
            self._deadlines.append((now + self._timeout, key))
        elif self._late is not None:
            self._late.expect((connection.id, 0), now)
        self._queue(message_event(pb.Event(open=connection.open_event(connection.flow.open_metadata, True))))

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
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                return
            self._take_verdicts(response.verdicts)

    def _take_verdicts(self, verdicts: Iterable[pb.Verdict]) -> None:
        """Hands each verdict to whoever waits for it, once it passed validate.py's checks (only a
        verdict with metadata, a reply, done, replacement bytes near the limit, an odd action, or
        while some lane holds chunks here, is looked at)."""
        pending, holding = self._pending, self._holding
        now = time.monotonic()
        for verdict in verdicts:
            waiter = pending.pop((verdict.connection_id, verdict.sequence), None)
            if waiter is None:
                self._unawaited(verdict, now)
                continue
            target, pos, seq, sent_at, _, _ = waiter
            action = verdict.action
            key = _PLAIN_KEYS.get((seq == 0, action))
            data = verdict.data if verdict.HasField("data") else None
            metadata = verdict.metadata
            reply = verdict.reply or None
            done = verdict.done
            if key is None or metadata or reply or done or holding or \
                    data is not None and (self._read_only or len(data) > self._max_replacement):
                key = self._checked(waiter, verdict, data, reply)
                if key is None:
                    continue
            self.breaker.succeeded(now)
            self.stats.verdict(key, now - sent_at)
            target.on_verdict(pos, seq, action, data, dict(metadata) if metadata else None, reply, done)

    def _checked(self, waiter: Waiter, verdict: pb.Verdict, data: bytes | None, reply: bytes | None) -> str | None:
        """The stats key of a verdict that passed validate.py, keeping count of what its lane holds
        here; None (and the failure policy applied) when it did not pass."""
        target, _, seq, _, direction, holdable = waiter
        lane = (verdict.connection_id, direction)
        held = self._holding.get(lane)
        holds = verdict.action == Action.HOLD
        total = (held[2] if held else 0) + (holdable if holds else 0)
        answers = OPEN if seq == 0 else END_OF_STREAM if holdable < 0 else DATA
        problem = verdict_problem(verdict.action, data, verdict.metadata, self._limits, reply, verdict.done, answers,
                                  total, self._read_only)
        if problem is not None:
            self._invalid(waiter, verdict, *problem)
            return None
        if holds:  # only a Data event can be held, and a Data event's target is its lane
            self._holding[lane] = (cast(HoldingTarget, target), waiter[1], total)
        elif held:
            del self._holding[lane]
        return _VERDICT_KEYS[(seq == 0, verdict.action)]

    def _invalid(self, waiter: Waiter, verdict: pb.Verdict, cause: str, detail: str) -> None:
        """A verdict the proxy must not follow: the failure policy answers for that event alone."""
        self.stats.invalid[cause] += 1
        self.faults.warn(cause, f"invalid verdicts ({cause})", "invalid verdict (%s) for connection %s sequence %d: "
                         "%s; failure policy %s applied to it", cause, verdict.connection_id, verdict.sequence,
                         detail, self.config.failure)
        self._apply_policy(verdict.connection_id, waiter, "invalid_verdict")

    def _unawaited(self, verdict: pb.Verdict, now: float) -> None:
        """A verdict nobody waits for: a detect or shadow element's (late.py), else a stray."""
        late = self._late
        if late is not None:
            data = verdict.data if verdict.HasField("data") else None
            key = (verdict.connection_id, verdict.sequence)
            if late.take(key, self._live.get(verdict.connection_id), verdict.action, data, now):
                return
        self._stray(verdict)

    def _stray(self, verdict: pb.Verdict) -> None:
        """A verdict nobody waits for is ignored, counted and said; it harms no connection, so it
        does not count against the breaker (a late verdict after a timeout is one of these)."""
        if verdict.connection_id in self._live:
            cause, detail = "unknown_sequence", "which it is not awaiting (never sent, already answered or timed out)"
        else:
            cause, detail = "unknown_connection", "which does not use this element (or has ended)"
        self.stats.invalid[cause] += 1
        self.faults.warn(cause, f"invalid verdicts ({cause})", "invalid verdict (%s) for connection %r sequence %d, "
                         "%s; ignored", cause, verdict.connection_id[:64], verdict.sequence, detail)

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
                    self.faults.warn("timeout", "timeouts", "no verdict for connection %s sequence %d within %d ms, "
                                     "failure policy %s applied", key[0], key[1], self.config.timeout_ms,
                                     self.config.failure)
                    self._apply_policy(key[0], waiter, "timeout")
