"""Element SDK, stock elements and the generated protocol.

gRPC's C core is tuned here, before any module of the project imports grpc: the core reads
GRPC_EXPERIMENTS once, at import. Since grpcio 1.6x its EventEngine does every socket read
and write on threads of its own, and grpc.aio then hands each completion to the event loop
through its poller thread; the older iomgr client and listener, still shipped, do the socket
work on the poller thread itself, one thread hop less per message. Measured here with
bench/grpc_ceiling.py: a round trip 165-200 us -> 110-145 us (p50); through the proxy with
one element, GET at 1 client p50 0.59 -> 0.42 ms. A GRPC_EXPERIMENTS set by the user wins.

glibc malloc is told to keep big buffers on the heap (allocator.py), so chunks do not fault
their memory in afresh; the proxy imports this package first, so both sides get it.
"""

import os

from elements.allocator import keep_buffers_on_heap

GRPC_EXPERIMENTS = "-event_engine_client,-event_engine_listener"

os.environ.setdefault("GRPC_EXPERIMENTS", GRPC_EXPERIMENTS)
MALLOC_TUNED = keep_buffers_on_heap()
