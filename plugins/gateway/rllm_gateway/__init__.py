"""rllm-gateway: an OpenAI-compatible gateway in front of a ``RolloutEngine`` and the ``blackbox``
workflow that trains agents written against the OpenAI API (see ``docs/agents.md``, "Gateway")."""

from rllm_gateway.lineage import trajectories_from_traces
from rllm_gateway.server import Gateway, SessionRecord, Trace
from rllm_gateway.workflow import blackbox, get_gateway

__all__ = ["Gateway", "SessionRecord", "Trace", "blackbox", "get_gateway", "trajectories_from_traces"]
