"""A task family the example backend can learn: answer a one-digit arithmetic question.

``make_tasks(n)`` builds tasks ``{"id", "question", "answer"}``; :func:`answer_workflow` asks the
question once and returns a one-step trajectory whose action is the answer text; :func:`exact_match`
is the reward (``reward.name: rllm_example_backend.tasks:exact_match``).
"""

from __future__ import annotations

import random
from typing import Any

from rllm_core.types import RewardOutput, Step, Trajectory


def make_tasks(n: int = 8, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` distinct questions ``a + b`` with a one-digit answer."""
    pairs = [(a, b) for a in range(10) for b in range(10) if a + b < 10]
    random.Random(seed).shuffle(pairs)
    if n > len(pairs):
        raise ValueError(f"at most {len(pairs)} distinct tasks, asked for {n}")
    return [{"id": f"add-{a}-{b}", "question": f"{a} + {b} = ?", "answer": str(a + b)} for a, b in pairs[:n]]


async def answer_workflow(task: dict[str, Any], engine: Any) -> Trajectory:
    """One turn: the question in, the answer out."""
    messages = [{"role": "user", "content": task["question"]}]
    output = await engine.get_model_response(messages)
    step = Step.from_model_output(output, messages, action=output.content.strip())
    return Trajectory(name="solver", steps=[step])


def exact_match(task: dict[str, Any], action: Any) -> RewardOutput:
    """1 when the answer text equals the task's answer."""
    correct = str(action).strip() == str(task["answer"])
    return RewardOutput(reward=float(correct), is_correct=correct)
