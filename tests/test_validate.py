"""What the proxy accepts from an element, rule by rule: Descriptions and verdicts (proxy/sessions/validate.py)."""

from __future__ import annotations

import pytest

from elements.api import element_pb2 as pb
from proxy.sessions.validate import DATA, END_OF_STREAM, OPEN, VerdictLimits, description_problem, verdict_problem

LIMITS = VerdictLimits(replacement_bytes=100, metadata_entries=3, metadata_key_bytes=8, metadata_value_bytes=16,
                       metadata_bytes=30, held_bytes=50)


@pytest.mark.parametrize("description", [
    pb.Description(),
    pb.Description(name="fire-wall_2.v1", directions=[pb.DIRECTION_REQUEST], mode=pb.MODE_OBSERVE),
    pb.Description(name="x" * 64, directions=[pb.DIRECTION_REQUEST, pb.DIRECTION_RESPONSE], mode=pb.MODE_INLINE,
                   request_bytes_limit=2**64 - 1),
])
def test_descriptions_the_proxy_can_honour(description: pb.Description) -> None:
    assert description_problem(description) is None


@pytest.mark.parametrize(("description", "says"), [
    (pb.Description(directions=[99]), "directions [99]: 99 is neither DIRECTION_REQUEST (1) nor DIRECTION_RESPONSE"),
    (pb.Description(directions=[pb.DIRECTION_REQUEST, pb.DIRECTION_UNSPECIFIED]), "directions [1, 0]: 0 is neither"),
    (pb.Description(mode=77), "mode 77: allowed are MODE_UNSPECIFIED (0), MODE_INLINE (1), MODE_OBSERVE (2)"),
    (pb.Description(name="n" * 50_000), "name 'nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn'... (50000 characters): at most 64"),
    (pb.Description(name="evil\nlevel=error"), r"name 'evil\nlevel=error': at most 64 characters of A-Z a-z 0-9 . _ -"),
    (pb.Description(name='a"b'), "name 'a\"b'"),
])
def test_descriptions_the_proxy_refuses_name_the_field(description: pb.Description, says: str) -> None:
    problem = description_problem(description)
    assert problem is not None and says in problem, problem


@pytest.mark.parametrize(("action", "data", "metadata"), [
    (pb.ACTION_PASS, None, {}),
    (pb.ACTION_PASS, b"x" * 100, {"a": "1", "b": "2", "c": "3"}),
    (pb.ACTION_RESET, b"ignored with a non-PASS action, still bounded", {}),
    (pb.ACTION_DROP, None, {"k" * 8: "v" * 14}),
])
def test_verdicts_within_the_limits(action: int, data: bytes | None, metadata: dict[str, str]) -> None:
    assert verdict_problem(action, data, metadata, LIMITS) is None


def test_a_read_only_element_may_not_replace_bytes() -> None:
    assert verdict_problem(pb.ACTION_PASS, None, {}, LIMITS, read_only=True) is None
    for data in (b"", b"new"):
        problem = verdict_problem(pb.ACTION_PASS, data, {}, LIMITS, read_only=True)
        assert problem is not None and problem[0] == "replacement_read_only" and "read_only" in problem[1], problem
    assert verdict_problem(pb.ACTION_PASS, b"new", {}, LIMITS) is None


@pytest.mark.parametrize(("action", "data", "metadata", "cause", "says"), [
    (0, None, {}, "bad_action", "action 0 is not PASS, DROP, CLOSE, RESET or HOLD"),
    (77, None, {}, "bad_action", "action 77"),
    (pb.ACTION_PASS, b"x" * 101, {}, "replacement_too_big", "101 replacement bytes, over max_replacement_bytes (100)"),
    (pb.ACTION_PASS, None, {str(i): "" for i in range(4)}, "metadata_too_big",
     "4 metadata entries, over max_metadata_entries (3)"),
    (pb.ACTION_PASS, None, {"k" * 9: ""}, "metadata_too_big", "of 9 bytes, over max_metadata_key_bytes (8)"),
    (pb.ACTION_PASS, None, {"k": "é" * 9}, "metadata_too_big", "of 18 bytes, over max_metadata_value_bytes (16)"),
    (pb.ACTION_PASS, None, {"a": "v" * 15, "b": "v" * 15}, "metadata_too_big",
     "32 bytes of metadata, over max_metadata_bytes (30)"),
])
def test_verdicts_over_the_limits_say_which(action: int, data: bytes | None, metadata: dict[str, str], cause: str,
                                            says: str) -> None:
    problem = verdict_problem(action, data, metadata, LIMITS)
    assert problem is not None and problem[0] == cause and says in problem[1], problem


def test_a_hold_is_valid_only_on_a_data_event_that_a_later_chunk_can_decide() -> None:
    assert verdict_problem(pb.ACTION_HOLD, None, {}, LIMITS, answers=DATA, held=50) is None
    assert verdict_problem(pb.ACTION_HOLD, None, {}, LIMITS, reply=b"+OK\r\n", answers=DATA, held=1) is None
    assert verdict_problem(pb.ACTION_PASS, None, {}, LIMITS, done=True, answers=END_OF_STREAM) is None
    for answers, says in ((OPEN, "ACTION_HOLD on an Open event"),
                          (END_OF_STREAM, "ACTION_HOLD on an end_of_stream Data event: no later chunk")):
        assert verdict_problem(pb.ACTION_HOLD, None, {}, LIMITS, answers=answers) == (
            "bad_hold", f"{says.split(':')[0]}: no later chunk could decide it")
    assert verdict_problem(pb.ACTION_HOLD, None, {}, LIMITS, done=True) == (
        "bad_hold", "ACTION_HOLD with done: no later chunk would be sent to decide it")


def test_holding_past_max_held_bytes_and_a_reply_past_the_replacement_limit_are_invalid() -> None:
    assert verdict_problem(pb.ACTION_HOLD, None, {}, LIMITS, held=51) == (
        "held_too_much", "ACTION_HOLD would hold 51 bytes of this connection and direction, over max_held_bytes (50)")
    assert verdict_problem(pb.ACTION_PASS, None, {}, LIMITS, reply=b"x" * 101) == (
        "reply_too_big", "101 reply bytes, over max_replacement_bytes (100)")
