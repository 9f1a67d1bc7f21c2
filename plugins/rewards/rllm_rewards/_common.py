"""Helpers shared by the reward functions: reading the action and the task, building results.

Policy for bad input (the same in every reward):

* a malformed *model output* (None, empty, a type that is not text) is normal during RL: the
  reward is 0 and ``metadata["reason"]`` says why;
* a malformed *task* (a missing or ill-typed key) is a dataset or config bug: it raises
  :class:`RewardTaskError` naming the reward and the key, so it fails loudly and early.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rllm_core.types import RewardOutput

_MISSING = object()


class RewardTaskError(KeyError, ValueError):
    """The task dict lacks a key a reward needs, or the value has the wrong type."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


def action_text(action: Any) -> tuple[str | None, str | None]:
    """``(text, None)`` for a usable action, ``(None, reason)`` otherwise.

    Accepts a string, a number (models' actions are sometimes parsed already), or an object or
    dict with a string ``content``/``text`` (a ``ModelOutput``, a chat message).
    """
    if action is None:
        return None, "empty response (action is None)"
    if isinstance(action, bool):
        return None, "unsupported action type bool"
    if isinstance(action, int | float):
        return str(action), None
    if not isinstance(action, str):
        for attr in ("content", "text"):
            value = action.get(attr) if isinstance(action, Mapping) else getattr(action, attr, None)
            if isinstance(value, str) and value:
                action = value
                break
        else:
            return None, f"unsupported action type {type(action).__name__}"
    if not action.strip():
        return None, "empty response"
    return action, None


def task_value(task: Any, key: str, reward: str, default: Any = _MISSING) -> Any:
    """``task[key]``, or a :class:`RewardTaskError` naming the reward and the key."""
    if not isinstance(task, Mapping):
        raise RewardTaskError(f"reward {reward!r}: task must be a dict, got {type(task).__name__}")
    if key in task and task[key] is not None:
        return task[key]
    if default is not _MISSING:
        return default
    present = ", ".join(map(str, task)) or "(none)"
    raise RewardTaskError(f"reward {reward!r} needs task[{key!r}]; the task has keys: {present}")


def zero(reason: str, **metadata: Any) -> RewardOutput:
    """A 0 reward that says why."""
    return RewardOutput(reward=0.0, is_correct=False, metadata={"reason": reason, **metadata})


def clip(text: Any, limit: int = 200) -> Any:
    """Shorten long strings kept in metadata (a 10,000-digit answer must not bloat logs)."""
    if isinstance(text, str) and len(text) > limit:
        return text[: limit // 2] + f"...[{len(text) - limit} chars]..." + text[-limit // 2 :]
    return text
