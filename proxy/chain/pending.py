"""The bytes a lane has read but not yet sent into the chain."""

from __future__ import annotations

from collections import deque

from proxy.chain.types import Payload


class Pending:
    """Bytes read but not yet dispatched, kept as the reads themselves.

    A read larger than chunk_size is cut into memoryview slices, not copied; only reads
    smaller than a chunk are joined (coalescing). Under bulk this was three copies of
    every byte when the queue was one bytearray.
    """

    __slots__ = ("pieces", "size")

    def __init__(self) -> None:
        self.pieces: deque[Payload] = deque()
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def __bytes__(self) -> bytes:
        return b"".join(self.pieces)

    def append(self, data: bytes) -> None:
        self.pieces.append(data)
        self.size += len(data)

    def clear(self) -> None:
        self.pieces.clear()
        self.size = 0

    def take(self, limit: int) -> Payload:
        """Up to `limit` bytes from the front."""
        pieces = self.pieces
        first = pieces.popleft()
        if len(first) >= limit or not pieces:
            if len(first) > limit:
                view = memoryview(first)
                pieces.appendleft(view[limit:])
                first = view[:limit]
            self.size -= len(first)
            return first
        taken, room = [first], limit - len(first)
        while pieces and room:
            piece = pieces.popleft()
            if len(piece) > room:
                view = memoryview(piece)
                pieces.appendleft(view[room:])
                piece = view[:room]
            taken.append(piece)
            room -= len(piece)
        self.size -= limit - room
        return b"".join(taken)
