"""Tasks: ``a + b`` and ``a - b`` whose operands and result are digits (110 facts), and the vocabulary.

A task is ``{"id": "7-3", "question": "7 - 3 =", "expression": "7 - 3", "answer": 4}``. Sums are at
most 9 and differences never negative: as many facts of each operator (55), and every number the
model reads or writes is a digit. One fact in five (a fixed choice) is held out for validation, which
so shows what the model does on facts it never saw. ``python -m rllm_example_calculator.data
OUT.jsonl`` writes the training tasks to a file; ``--vocab`` prints :data:`VOCAB`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

__all__ = ["OPS", "VOCAB", "make_tasks", "train_tasks", "val_tasks"]

OPS = ("+", "-")

VOCAB: list[str] = [*map(str, range(10)), *OPS, "=", "add", "subtract", "error"]
"""Words of the tiny model (``torch.tiny.vocab`` in the configs): the digits, the operators, the
calculator's key names and its ``error``."""


def make_tasks() -> list[dict[str, Any]]:
    """One task per ``a + b <= 9`` and per ``a - b`` with ``0 <= b <= a <= 9``; ``id`` is the fact."""
    tasks = []
    for op in OPS:
        for a in range(10):
            for b in range(10 - a if op == "+" else a + 1):
                expression = f"{a} {op} {b}"
                answer = a + b if op == "+" else a - b
                question = f"{expression} ="
                tasks.append({"id": f"{a}{op}{b}", "question": question, "expression": expression, "answer": answer})
    return tasks


def _held_out(task: dict[str, Any]) -> bool:
    a, op, b = task["expression"].split()
    return (int(a) + 3 * int(b) + OPS.index(op)) % 5 == 0


def train_tasks() -> list[dict[str, Any]]:
    """The 88 facts trained on."""
    return [t for t in make_tasks() if not _held_out(t)]


def val_tasks() -> list[dict[str, Any]]:
    """The 22 facts never trained on."""
    return [t for t in make_tasks() if _held_out(t)]


if __name__ == "__main__":
    if sys.argv[1:] == ["--vocab"]:
        print(json.dumps(VOCAB))
        sys.exit()
    out = sys.argv[1] if len(sys.argv) > 1 else "calculator.jsonl"
    with open(out, "w", encoding="utf-8") as f:
        for task in train_tasks():
            f.write(json.dumps(task) + "\n")
    print(f"wrote {out}")
