"""What the proxy accepts from an element: its Description and its verdicts.

An element is trusted with the bytes it judges and nothing else. A Description the
proxy cannot honour must not leave a fail-closed element silently unused (a direction
it does not know would plan no stage at all), and a verdict must not carry enough to
harm other connections (metadata travels to later elements and is held per chunk).
Both checks are pure, so every rule here is tested without a session.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from elements.api import element_pb2 as pb
from proxy.chain import Action
from proxy.chain.verdicts import WIRE_ACTIONS

NAME_MAX = 64
_NAME = re.compile(r"[A-Za-z0-9._-]*")
_DIRECTIONS = frozenset((pb.DIRECTION_REQUEST, pb.DIRECTION_RESPONSE))
_MODES = frozenset((pb.MODE_UNSPECIFIED, pb.MODE_INLINE, pb.MODE_OBSERVE))
_ACTIONS = frozenset(WIRE_ACTIONS)
_ACTION_NAMES = ", ".join(action.name for action in WIRE_ACTIONS[:-1]) + f" or {WIRE_ACTIONS[-1].name}"
_SHOWN = 40  # characters of a bad value quoted in a log line


def _shown(text: str) -> str:
    """A bad value quoted safely: repr escapes control characters, long ones are cut."""
    return repr(text[:_SHOWN]) + (f"... ({len(text)} characters)" if len(text) > _SHOWN else "")


def description_problem(description: pb.Description) -> str | None:
    """Why the proxy cannot honour this Description (field, value, what is allowed), or None."""
    name = description.name
    if len(name) > NAME_MAX or not _NAME.fullmatch(name):
        return (f"name {_shown(name)}: at most {NAME_MAX} characters of A-Z a-z 0-9 . _ - "
                f"(it lands in every log line and metric label)")
    unknown = [d for d in description.directions if d not in _DIRECTIONS]
    if unknown:
        return (f"directions {list(description.directions)}: {unknown[0]} is neither DIRECTION_REQUEST (1) "
                f"nor DIRECTION_RESPONSE (2)")
    if description.mode not in _MODES:
        return f"mode {description.mode}: allowed are MODE_UNSPECIFIED (0), MODE_INLINE (1), MODE_OBSERVE (2)"
    return None


@dataclass(frozen=True, slots=True)
class VerdictLimits:
    """What one verdict may carry (the proxy's max_replacement_bytes and max_metadata_* settings, which
    bound reply bytes too) and what its element may hold per connection and direction (its max_held_bytes)."""

    replacement_bytes: int = 16 << 20
    metadata_entries: int = 64
    metadata_key_bytes: int = 256
    metadata_value_bytes: int = 4096
    metadata_bytes: int = 16384
    held_bytes: int = 1 << 20


# What a verdict answers, as far as checking it goes: a HOLD needs a later chunk to decide it.
OPEN, DATA, END_OF_STREAM = "an Open event", "a Data event", "an end_of_stream Data event"


def verdict_problem(action: int, data: bytes | None, metadata: Mapping[str, str], limits: VerdictLimits,
                    reply: bytes | None = None, done: bool = False, answers: str = DATA,
                    held: int = 0, read_only: bool = False) -> tuple[str, str] | None:
    """(cause, detail) when the verdict is invalid, else None. `held` is what its element would
    hold on the lane after it (only a HOLD adds to it). Cheap for the common verdict: a known
    action, no replacement or a small one, no reply, no metadata. A read-only element
    (Description.read_only) may be asked together with others, so bytes from it cannot be
    followed, nor can it hold: it promised to judge only."""
    if action not in _ACTIONS:
        return "bad_action", f"action {action} is not {_ACTION_NAMES}"
    if action == Action.HOLD:
        problem = _hold_problem(done, answers, held, limits, read_only)
        if problem is not None:
            return problem
    if data is not None or reply is not None:
        problem = _bytes_problem(data, reply, limits, read_only)
        if problem is not None:
            return problem
    if metadata:
        return _metadata_problem(metadata, limits)
    return None


def _bytes_problem(data: bytes | None, reply: bytes | None, limits: VerdictLimits,
                   read_only: bool) -> tuple[str, str] | None:
    """Replacement and reply bytes: none from a read-only element, at most max_replacement_bytes each."""
    if read_only:
        what, size = ("replacement", len(data)) if data is not None else ("reply", len(reply or b""))
        return "replacement_read_only", f"{size} {what} bytes from an element that described itself read_only"
    if data is not None and len(data) > limits.replacement_bytes:
        return "replacement_too_big", f"{len(data)} replacement bytes, over max_replacement_bytes " \
                                      f"({limits.replacement_bytes})"
    if reply is not None and len(reply) > limits.replacement_bytes:
        return "reply_too_big", f"{len(reply)} reply bytes, over max_replacement_bytes ({limits.replacement_bytes})"
    return None


def _hold_problem(done: bool, answers: str, held: int, limits: VerdictLimits,
                  read_only: bool) -> tuple[str, str] | None:
    if read_only:
        return "bad_hold", "ACTION_HOLD from an element that described itself read_only"
    if answers != DATA:
        return "bad_hold", f"ACTION_HOLD on {answers}: no later chunk could decide it"
    if done:
        return "bad_hold", "ACTION_HOLD with done: no later chunk would be sent to decide it"
    if held > limits.held_bytes:
        return "held_too_much", f"ACTION_HOLD would hold {held} bytes of this connection and direction, over " \
                                f"max_held_bytes ({limits.held_bytes})"
    return None


def _utf8_size(text: str, limit: int) -> int:
    """Its UTF-8 size, or just its length when that alone is over `limit` (a character is at least
    one byte): a 10 MB value is refused without a 10 MB copy."""
    return len(text) if len(text) > limit else len(text.encode())


def _metadata_problem(metadata: Mapping[str, str], limits: VerdictLimits) -> tuple[str, str] | None:
    if len(metadata) > limits.metadata_entries:
        return "metadata_too_big", f"{len(metadata)} metadata entries, over max_metadata_entries " \
                                   f"({limits.metadata_entries})"
    total = 0
    for key, value in metadata.items():
        key_bytes, value_bytes = _utf8_size(key, limits.metadata_key_bytes), _utf8_size(value, limits.metadata_value_bytes)
        if key_bytes > limits.metadata_key_bytes:
            return "metadata_too_big", f"metadata key {_shown(key)} of {key_bytes} bytes, over " \
                                       f"max_metadata_key_bytes ({limits.metadata_key_bytes})"
        if value_bytes > limits.metadata_value_bytes:
            return "metadata_too_big", f"metadata value of {_shown(key)} of {value_bytes} bytes, over " \
                                       f"max_metadata_value_bytes ({limits.metadata_value_bytes})"
        total += key_bytes + value_bytes
    if total > limits.metadata_bytes:
        return "metadata_too_big", f"{total} bytes of metadata, over max_metadata_bytes ({limits.metadata_bytes})"
    return None
