"""The reward: a finished conversation scored against its task.

The action is the conversation (OpenAI messages, as a list or as its JSON text): the native workflow
hands it over directly, the agent script prints it. Three parts, so that a random model finds some
signal at each stage of the skill:

- **call** (0.3): the first reply should be exactly ``<tool_call> KEY </tool_call>`` (the tiny
  model's format) with the key of the question's operator (``add`` for ``+``, ``subtract`` for
  ``-``). A quarter for each of its three words in its place (read from the parsed call, or from the
  text when nothing parsed) and a quarter for the reply being that call and nothing else: partial
  credit for a well-formed call, none for the wrong key's name.
- **relay** (0.5): the last reply, after a tool result, is one number near that result:
  ``1 - |answer - result| / 5``, at least 0. Partial credit for a near miss: a number is one word
  here, which the model either copies or not, and exact copies are rare at first.
- **correct** (0.2): that number is exactly the result, and the result is the task's answer.

An answer without a tool result earns nothing but the call part: the model must call before it
answers. ``is_correct`` is the last part.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from rllm_core.types import RewardOutput

__all__ = ["KEYS", "calculator_reward", "conversation"]

KEYS = {"+": "add", "-": "subtract"}
"""The right key for each operator."""


def conversation(action: Any) -> list[dict[str, Any]]:
    """The messages of an action: a list of messages, or its JSON text (anything else: no messages)."""
    if isinstance(action, str):
        try:
            action = json.loads(action)
        except json.JSONDecodeError:
            return []
    if isinstance(action, Sequence) and not isinstance(action, str):
        return [dict(m) for m in action if isinstance(m, Mapping)]
    return []


def _call(reply: Mapping[str, Any], key: str) -> float:
    """The call part of ``reply`` for a question whose right key is ``key``, from 0 to 1."""
    calls = reply.get("tool_calls") or []
    content = str(reply.get("content") or "").split()
    words = ["<tool_call>", str((calls[0].get("function") or {}).get("name")), "</tool_call>"] if calls else content
    target = ["<tool_call>", key, "</tool_call>"]
    in_place = sum(w == t for w, t in zip(words, target, strict=False))
    alone = len(calls) == 1 and not content and words == target
    return (in_place + alone) / 4


def _number(text: Any) -> int | None:
    words = str(text or "").split()
    return int(words[0]) if len(words) == 1 and words[0].lstrip("-").isdigit() else None


async def calculator_reward(task: Mapping[str, Any], action: Any) -> RewardOutput:
    """Score the conversation ``action`` for ``task`` (see the module docstring).

    ``async`` because it is quick: the workflow engine then runs it inline instead of in a thread.
    """
    messages = conversation(action)
    replies = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if not replies:
        return RewardOutput(reward=0.0, is_correct=False)
    call = _call(messages[replies[0]], KEYS[str(task["expression"]).split()[1]])
    last = messages[replies[-1]]
    results = [m for m in messages[: replies[-1]] if m.get("role") == "tool"]
    relay = 0.0
    correct = False
    if results and not last.get("tool_calls"):
        answer, result = _number(last.get("content")), _number(results[-1].get("content"))
        if answer is not None and result is not None:
            relay = max(0.0, 1 - abs(answer - result) / 5)
            correct = answer == result == task["answer"]
    reward = 0.3 * call + 0.5 * relay + 0.2 * correct
    return RewardOutput(reward=reward, is_correct=correct)
