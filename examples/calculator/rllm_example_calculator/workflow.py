"""The native workflow: the agent script's loop, written against the engine instead of an HTTP client.

Ask with the calculator's keys offered; run each tool call the model makes and send its result; stop
at the first reply without a call, or after :data:`~rllm_example_calculator.agent.MAX_TURNS` model
calls. The trajectory (named ``agent``, as the gateway names the trajectories it records) has one
step per model call; the last step's action is the conversation, which the reward scores. Because
each turn continues from the sampled tokens, the trajectory is one training row, token for token
the row the same turns make when the agent script runs through the gateway.
"""

from __future__ import annotations

from typing import Any

from rllm_core.types import Step, Trajectory
from rllm_example_calculator.agent import MAX_TURNS, TOOLS, run_tool

__all__ = ["calculator_workflow"]


async def calculator_workflow(task: dict[str, Any], engine: Any, max_turns: int = MAX_TURNS) -> Trajectory:
    """One episode of ``task`` (see the module docstring)."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": task["question"]}]
    steps: list[Step] = []
    for _ in range(max_turns):
        out = await engine.get_model_response(messages, tools=TOOLS)
        steps.append(Step.from_model_output(out, messages))
        messages = [*messages, out.assistant_message()]
        if not out.tool_calls:
            break
        for call in out.tool_calls:
            result = run_tool(call["function"]["name"], task["question"])
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
    steps[-1].action = messages
    steps[-1].done = True
    return Trajectory(name="agent", steps=steps)
