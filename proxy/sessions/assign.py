"""Which replica a connection uses: rendezvous (highest random weight) hashing of its id.

A connection keeps its replica for its whole life, because its events must reach the
replica that holds its state; so assignment only ever decides for a new connection, or
for one whose replica was lost. Rendezvous rather than least-loaded, because:

- each worker process decides alone, with nothing shared, and its choices are spread
  evenly however long connections live (least-loaded, per worker, would be blind to the
  other workers and to the other proxies using the same replicas anyway);
- a replica that joins (scaled up, or back after a crash) takes its share of new
  connections from the first one on, not every new connection until it has caught up
  with the others, which is what least-loaded does to a fresh and cold replica;
- the connections of a replica that is lost go each to its second choice, so they
  spread evenly over the survivors, and no other connection moves: adding a replica
  moves none, removing one moves only its own.

Its cost is one 8-byte blake2b per replica for each new connection, and none per event.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import blake2b


def weight(connection_id: bytes, replica: bytes) -> int:
    return int.from_bytes(blake2b(connection_id, digest_size=8, key=replica[:64]).digest(), "big")


def rendezvous(connection_id: str, replicas: Sequence[bytes]) -> int:
    """The index of the replica (by its address, as bytes) with the highest weight for this
    connection. `replicas` must not be empty."""
    if len(replicas) == 1:
        return 0
    key = connection_id.encode()
    return max(range(len(replicas)), key=lambda index: weight(key, replicas[index]))
