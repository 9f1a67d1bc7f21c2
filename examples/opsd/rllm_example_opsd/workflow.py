"""The arith workflow, plus a teacher context on each step for the ``opsd`` hook.

The student sees ``a+b=``; the teacher sees the same question with the answer stated first
(``answer: 7 . 3+4=``), so its logprobs on the student's reply say how a model that knows the
answer would have replied. The hook turns the gap into per-token advantages.
"""

from __future__ import annotations

from typing import Any

from rllm_core.types import Step, Trajectory

__all__ = ["arith_opsd_workflow", "teacher_messages"]


def teacher_messages(task: dict[str, Any]) -> list[dict[str, str]]:
    """The prompt plus the correct answer (words of the tiny tokenizer's vocabulary)."""
    return [{"role": "user", "content": f"{task['answer']} = {task['question']}"}]


async def arith_opsd_workflow(task: dict[str, Any], engine: Any, teacher_key: str = "teacher_messages") -> Trajectory:
    """Ask ``a+b=`` once; the step carries the teacher's messages under ``teacher_key``."""
    messages = [{"role": "user", "content": task["question"]}]
    out = await engine.get_model_response(messages)
    step = Step.from_model_output(out, messages, action=out.content.strip(), info={teacher_key: teacher_messages(task)})
    return Trajectory(name="solver", steps=[step])
