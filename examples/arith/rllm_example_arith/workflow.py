"""The workflow (one model call) and the reward (exact match of the answer)."""

from __future__ import annotations

from typing import Any

from rllm_core.types import RewardOutput, Step, Trajectory

__all__ = ["arith_reward", "arith_workflow", "digits_reward", "digits_workflow"]


async def arith_workflow(task: dict[str, Any], engine: Any) -> Trajectory:
    """Ask ``a+b=`` once; the reward function scores the reply."""
    messages = [{"role": "user", "content": task["question"]}]
    out = await engine.get_model_response(messages)
    step = Step.from_model_output(out, messages, action=out.content.strip())
    return Trajectory(name="solver", steps=[step])


async def arith_reward(task: dict[str, Any], action: Any) -> RewardOutput:
    """1 for exactly the sum; 0.5 for a reply that starts with the sum and goes on; else 0.

    The example samples one token (``max_tokens: 1``), so there the reward is 1 or 0. With a longer
    budget the half credit keeps the task learnable: the sum alone is a 1-in-27 guess for the
    random model, the sum followed by end-of-turn a 1-in-729 one. ``async`` because it is trivial:
    the workflow engine then runs it inline instead of in a thread.
    """
    words = str(action or "").split()
    answer = str(task["answer"])
    correct = words == [answer]
    reward = 1.0 if correct else (0.5 if words and words[0] == answer else 0.0)
    return RewardOutput(reward=reward, is_correct=correct)


async def digits_workflow(task: dict[str, Any], engine: Any) -> Trajectory:
    """Ask ``a+b=`` once; the answer is the sum spelled digit by digit, then end-of-turn.

    The action is the reply's digits when the model ended its turn, else None (a reply cut by
    ``max_tokens`` is wrong, whatever it said).
    """
    messages = [{"role": "user", "content": task["question"]}]
    out = await engine.get_model_response(messages)
    action = out.content.strip() if out.finish_reason == "stop" else None
    step = Step.from_model_output(out, messages, action=action, done=True)
    return Trajectory(name="solver", steps=[step])


async def digits_reward(task: dict[str, Any], action: Any, width: int = 1) -> RewardOutput:
    """1 for exactly the sum's digits followed by end-of-turn, else 0.

    ``width``: the answer is zero-padded to this many digits (``width=2``: ``0 7 <eos>`` for 7,
    ``1 8 <eos>`` for 18; ``width=1``: ``7 <eos>`` and ``1 8 <eos>``).
    """
    correct = action is not None and str(action).split() == list(f"{task['answer']:0{width}d}")
    return RewardOutput(reward=float(correct), is_correct=correct)
