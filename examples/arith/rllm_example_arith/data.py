"""Task generator: every ``a+b=`` with single digits (100 tasks), as plain dicts.

Config names these with ``module:attr`` (``data.train: rllm_example_arith.data:train_tasks``);
``python -m rllm_example_arith.data OUT.jsonl`` writes them to a file instead.
"""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["make_tasks", "train_tasks", "val_tasks"]


def make_tasks(max_digit: int = 9) -> list[dict[str, Any]]:
    """One task per ordered pair ``(a, b)``; ``id`` is the question itself (stable across runs)."""
    return [
        {"id": f"{a}+{b}", "question": f"{a}+{b}=", "a": a, "b": b, "answer": a + b}
        for a in range(max_digit + 1)
        for b in range(max_digit + 1)
    ]


def train_tasks() -> list[dict[str, Any]]:
    return make_tasks()


def val_tasks() -> list[dict[str, Any]]:
    """The same 100 facts, scored greedily: the task is learning the addition table."""
    return make_tasks()


if __name__ == "__main__":
    out = sys.argv[1] if len(sys.argv) > 1 else "arith.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for task in make_tasks():
            f.write(json.dumps(task) + "\n")
    print(f"wrote {out}")
