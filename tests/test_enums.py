"""Every enum value of the proto has its counterpart, by name and number, in the proxy and in the SDK:
an enum mirrored by hand drifts (the SDK's CloseReason once stopped at FAILURE), this test does not."""

from __future__ import annotations

import enum

import pytest
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from elements import sdk
from elements.api import element_pb2 as pb
from proxy import chain

# proto enum, its prefix, the proxy's counterpart (None: the proxy only reads it off the wire), the SDK's
MIRRORS: list[tuple[EnumTypeWrapper, str, type[enum.IntEnum] | None, type[enum.IntEnum]]] = [
    (pb.Direction, "DIRECTION_", chain.Direction, sdk.Direction),
    (pb.Action, "ACTION_", chain.Action, sdk.Action),
    (pb.CloseReason, "CLOSE_REASON_", chain.Outcome, sdk.CloseReason),
    (pb.Mode, "MODE_", None, sdk.Mode),
]


def _mirrors_of(name: str, proxy_enum: type[enum.IntEnum] | None,
                sdk_enum: type[enum.IntEnum]) -> list[type[enum.IntEnum]]:
    """UNSPECIFIED is the proto's "not set": the proxy never sends it and treats a received one as invalid
    or as the default; only an element can be told it (a Close from an older proxy)."""
    if name == "UNSPECIFIED":
        return [sdk_enum] if sdk_enum is sdk.CloseReason else []
    return [mirror for mirror in (proxy_enum, sdk_enum) if mirror is not None]


@pytest.mark.parametrize(("proto", "prefix", "proxy_enum", "sdk_enum"), MIRRORS,
                         ids=[proto.DESCRIPTOR.name for proto, *_ in MIRRORS])
def test_every_proto_value_has_its_counterpart(proto: EnumTypeWrapper, prefix: str,
                                               proxy_enum: type[enum.IntEnum] | None,
                                               sdk_enum: type[enum.IntEnum]) -> None:
    for full_name, number in proto.items():
        name = full_name.removeprefix(prefix)
        for mirror in _mirrors_of(name, proxy_enum, sdk_enum):
            assert name in mirror.__members__, f"{mirror.__module__}.{mirror.__qualname__} lacks {name} ({number})"
            assert mirror[name] == number, f"{mirror.__qualname__}.{name} is {int(mirror[name])}, the proto says {number}"
    for mirror in (proxy_enum, sdk_enum):
        if mirror is None:
            continue
        for member in mirror:
            internal = member.value >= 100  # the proxy's own values (FAIL, NOT_REDIRECTED), never on the wire
            assert internal or f"{prefix}{member.name}" in proto.keys(), \
                f"{mirror.__qualname__}.{member.name} is not in the proto"
