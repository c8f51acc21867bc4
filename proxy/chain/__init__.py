"""What happens to a chunk: the pure decisions of one proxied connection (no sockets, no gRPC).

types.py names things, verdicts.py says what every action does, lane.py carries one
direction through the stages, flow.py holds both directions, the Open phase and the end.
"""

from proxy.chain.flow import Flow, FlowState, Resumed
from proxy.chain.lane import Lane, LaneState
from proxy.chain.pending import Pending
from proxy.chain.types import (
    Action, ChainPlan, Direction, ElementPort, HoldingTarget, LaneLimits, Outcome, Payload, Peer, SocketSide, Stage,
    VerdictTarget,
)

__all__ = ["Action", "ChainPlan", "Direction", "ElementPort", "Flow", "FlowState", "HoldingTarget", "Lane", "LaneLimits",
           "LaneState", "Outcome", "Payload", "Peer", "Pending", "Resumed", "SocketSide", "Stage", "VerdictTarget"]
