"""Traces to trajectories, by lineage (never by position).

Each trace knows its parent: the earlier trace whose messages + response its own messages extend
(the gateway finds it when the call arrives). A trace whose parent is the last step of a trajectory
is that trajectory's next step; any other trace (no parent, or a parent that already has a child:
the agent branched, e.g. a subagent or an edited history) starts a new trajectory. Steps are built
with ``Step.from_model_output`` on what the engine saw, so the core rows merge the turns of a
trajectory into one row when the engine continued them token-exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

from rllm_core.types import Step, Trajectory
from rllm_gateway.server import Trace

__all__ = ["trajectories_from_traces"]


def trajectories_from_traces(traces: Sequence[Trace], name: str = "agent") -> list[Trajectory]:
    """One trajectory per lineage, in the order each began; ``info["gateway_traces"]`` lists its trace indices."""
    trajectories: list[Trajectory] = []
    tail_of: dict[int, Trajectory] = {}  # trace index -> the trajectory it is the last step of
    for trace in sorted(traces, key=lambda t: t.index):
        step = Step.from_model_output(trace.output, trace.engine_messages)
        step.weight_version = trace.weight_version  # the dispatch version (see Trace.weight_version)
        traj = tail_of.pop(trace.parent, None) if trace.parent is not None else None
        if traj is None:
            traj = Trajectory(name=name, info={"gateway_traces": []})
            trajectories.append(traj)
        traj.steps.append(step)
        traj.info["gateway_traces"].append(trace.index)
        tail_of[trace.index] = traj
    return trajectories
