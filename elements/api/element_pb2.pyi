from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Direction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DIRECTION_UNSPECIFIED: _ClassVar[Direction]
    DIRECTION_REQUEST: _ClassVar[Direction]
    DIRECTION_RESPONSE: _ClassVar[Direction]

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    ACTION_PASS: _ClassVar[Action]
    ACTION_DROP: _ClassVar[Action]
    ACTION_CLOSE: _ClassVar[Action]
    ACTION_RESET: _ClassVar[Action]
    ACTION_HOLD: _ClassVar[Action]

class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODE_UNSPECIFIED: _ClassVar[Mode]
    MODE_INLINE: _ClassVar[Mode]
    MODE_OBSERVE: _ClassVar[Mode]

class CloseReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CLOSE_REASON_UNSPECIFIED: _ClassVar[CloseReason]
    CLOSE_REASON_COMPLETED: _ClassVar[CloseReason]
    CLOSE_REASON_CLOSED_BY_ELEMENT: _ClassVar[CloseReason]
    CLOSE_REASON_RESET_BY_ELEMENT: _ClassVar[CloseReason]
    CLOSE_REASON_PEER_RESET: _ClassVar[CloseReason]
    CLOSE_REASON_UPSTREAM_UNREACHABLE: _ClassVar[CloseReason]
    CLOSE_REASON_FAILURE: _ClassVar[CloseReason]
    CLOSE_REASON_IDLE_TIMEOUT: _ClassVar[CloseReason]
    CLOSE_REASON_MAX_DURATION: _ClassVar[CloseReason]
    CLOSE_REASON_PROXY_STOPPING: _ClassVar[CloseReason]
DIRECTION_UNSPECIFIED: Direction
DIRECTION_REQUEST: Direction
DIRECTION_RESPONSE: Direction
ACTION_UNSPECIFIED: Action
ACTION_PASS: Action
ACTION_DROP: Action
ACTION_CLOSE: Action
ACTION_RESET: Action
ACTION_HOLD: Action
MODE_UNSPECIFIED: Mode
MODE_INLINE: Mode
MODE_OBSERVE: Mode
CLOSE_REASON_UNSPECIFIED: CloseReason
CLOSE_REASON_COMPLETED: CloseReason
CLOSE_REASON_CLOSED_BY_ELEMENT: CloseReason
CLOSE_REASON_RESET_BY_ELEMENT: CloseReason
CLOSE_REASON_PEER_RESET: CloseReason
CLOSE_REASON_UPSTREAM_UNREACHABLE: CloseReason
CLOSE_REASON_FAILURE: CloseReason
CLOSE_REASON_IDLE_TIMEOUT: CloseReason
CLOSE_REASON_MAX_DURATION: CloseReason
CLOSE_REASON_PROXY_STOPPING: CloseReason

class Address(_message.Message):
    __slots__ = ("ip", "port")
    IP_FIELD_NUMBER: _ClassVar[int]
    PORT_FIELD_NUMBER: _ClassVar[int]
    ip: str
    port: int
    def __init__(self, ip: _Optional[str] = ..., port: _Optional[int] = ...) -> None: ...

class OpenEvent(_message.Message):
    __slots__ = ("connection_id", "client", "original_destination", "listener", "metadata", "resumed", "request_bytes", "response_bytes")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_FIELD_NUMBER: _ClassVar[int]
    ORIGINAL_DESTINATION_FIELD_NUMBER: _ClassVar[int]
    LISTENER_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    RESUMED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    client: Address
    original_destination: Address
    listener: Address
    metadata: _containers.ScalarMap[str, str]
    resumed: bool
    request_bytes: int
    response_bytes: int
    def __init__(self, connection_id: _Optional[str] = ..., client: _Optional[_Union[Address, _Mapping]] = ..., original_destination: _Optional[_Union[Address, _Mapping]] = ..., listener: _Optional[_Union[Address, _Mapping]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., resumed: _Optional[bool] = ..., request_bytes: _Optional[int] = ..., response_bytes: _Optional[int] = ...) -> None: ...

class DataEvent(_message.Message):
    __slots__ = ("connection_id", "sequence", "direction", "data", "end_of_stream", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    END_OF_STREAM_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    sequence: int
    direction: Direction
    data: bytes
    end_of_stream: bool
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, connection_id: _Optional[str] = ..., sequence: _Optional[int] = ..., direction: _Optional[_Union[Direction, str]] = ..., data: _Optional[bytes] = ..., end_of_stream: _Optional[bool] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class CloseEvent(_message.Message):
    __slots__ = ("connection_id", "reason", "request_bytes", "response_bytes")
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_BYTES_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    reason: CloseReason
    request_bytes: int
    response_bytes: int
    def __init__(self, connection_id: _Optional[str] = ..., reason: _Optional[_Union[CloseReason, str]] = ..., request_bytes: _Optional[int] = ..., response_bytes: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("open", "data", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: OpenEvent
    data: DataEvent
    close: CloseEvent
    def __init__(self, open: _Optional[_Union[OpenEvent, _Mapping]] = ..., data: _Optional[_Union[DataEvent, _Mapping]] = ..., close: _Optional[_Union[CloseEvent, _Mapping]] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    def __init__(self, events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("connection_id", "sequence", "action", "data", "metadata", "reply", "done")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    REPLY_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    sequence: int
    action: Action
    data: bytes
    metadata: _containers.ScalarMap[str, str]
    reply: bytes
    done: bool
    def __init__(self, connection_id: _Optional[str] = ..., sequence: _Optional[int] = ..., action: _Optional[_Union[Action, str]] = ..., data: _Optional[bytes] = ..., metadata: _Optional[_Mapping[str, str]] = ..., reply: _Optional[bytes] = ..., done: _Optional[bool] = ...) -> None: ...

class SessionResponse(_message.Message):
    __slots__ = ("verdicts",)
    VERDICTS_FIELD_NUMBER: _ClassVar[int]
    verdicts: _containers.RepeatedCompositeFieldContainer[Verdict]
    def __init__(self, verdicts: _Optional[_Iterable[_Union[Verdict, _Mapping]]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Description(_message.Message):
    __slots__ = ("name", "directions", "wants_open", "mode", "request_bytes_limit", "response_bytes_limit", "read_only")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIRECTIONS_FIELD_NUMBER: _ClassVar[int]
    WANTS_OPEN_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_BYTES_LIMIT_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_BYTES_LIMIT_FIELD_NUMBER: _ClassVar[int]
    READ_ONLY_FIELD_NUMBER: _ClassVar[int]
    name: str
    directions: _containers.RepeatedScalarFieldContainer[Direction]
    wants_open: bool
    mode: Mode
    request_bytes_limit: int
    response_bytes_limit: int
    read_only: bool
    def __init__(self, name: _Optional[str] = ..., directions: _Optional[_Iterable[_Union[Direction, str]]] = ..., wants_open: _Optional[bool] = ..., mode: _Optional[_Union[Mode, str]] = ..., request_bytes_limit: _Optional[int] = ..., response_bytes_limit: _Optional[int] = ..., read_only: _Optional[bool] = ...) -> None: ...

class ProcessRequest(_message.Message):
    __slots__ = ("open", "data", "text", "chunks")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    open: OpenEvent
    data: DataEvent
    text: str
    chunks: _containers.RepeatedCompositeFieldContainer[ProcessChunk]
    def __init__(self, open: _Optional[_Union[OpenEvent, _Mapping]] = ..., data: _Optional[_Union[DataEvent, _Mapping]] = ..., text: _Optional[str] = ..., chunks: _Optional[_Iterable[_Union[ProcessChunk, _Mapping]]] = ...) -> None: ...

class ProcessChunk(_message.Message):
    __slots__ = ("text", "data", "direction", "end_of_stream", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    END_OF_STREAM_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    text: str
    data: bytes
    direction: Direction
    end_of_stream: bool
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, text: _Optional[str] = ..., data: _Optional[bytes] = ..., direction: _Optional[_Union[Direction, str]] = ..., end_of_stream: _Optional[bool] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class ProcessResponse(_message.Message):
    __slots__ = ("open_verdict", "verdict", "text", "chunks")
    OPEN_VERDICT_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    open_verdict: Verdict
    verdict: Verdict
    text: str
    chunks: _containers.RepeatedCompositeFieldContainer[ProcessResult]
    def __init__(self, open_verdict: _Optional[_Union[Verdict, _Mapping]] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ..., text: _Optional[str] = ..., chunks: _Optional[_Iterable[_Union[ProcessResult, _Mapping]]] = ...) -> None: ...

class ProcessResult(_message.Message):
    __slots__ = ("verdict", "data", "text")
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    verdict: Verdict
    data: bytes
    text: str
    def __init__(self, verdict: _Optional[_Union[Verdict, _Mapping]] = ..., data: _Optional[bytes] = ..., text: _Optional[str] = ...) -> None: ...
