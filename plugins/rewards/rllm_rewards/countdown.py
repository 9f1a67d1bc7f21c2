"""The countdown reward: combine the given numbers with + - * / to reach the target.

Reads ``task["numbers"]`` (a list of non-negative ints) and ``task["target"]`` (an int); the keys
are keyword arguments. The expression is the last ``<answer>...</answer>`` block of the response,
or else its last non-empty line; a trailing ``= ...`` is ignored (``(3+5)*2 = 16`` is read as
``(3+5)*2``).

Rules (``require_all=True``, the default, as in the TinyZero recipe): every given number is used
exactly once (a number given twice is used twice) and no other number appears. With
``require_all=False`` each given number may be used at most once and unused numbers are fine.
Only integer literals, binary ``+ - * /`` and parentheses are allowed (no unary minus, no
powers, no names). Evaluation walks the ``ast`` with exact :class:`fractions.Fraction`
arithmetic; nothing is passed to ``eval``. Division by zero gives 0 with a reason.

Reward: 1.0 when correct, ``format_reward`` (default 0.0) for a well-formed, rule-abiding
expression with the wrong value, 0.0 otherwise.
"""

from __future__ import annotations

import ast
import re
from collections import Counter
from fractions import Fraction
from typing import Any

from rllm_core.types import RewardOutput
from rllm_rewards._common import RewardTaskError, action_text, clip, task_value, zero

__all__ = ["countdown_reward", "evaluate_expression", "extract_expression"]

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_OPS = {ast.Add: Fraction.__add__, ast.Sub: Fraction.__sub__, ast.Mult: Fraction.__mul__, ast.Div: Fraction.__truediv__}
_ALLOWED_CHARS = re.compile(r"[0-9+\-*/()\s.]*")


def extract_expression(text: str) -> str | None:
    """The candidate expression: last ``<answer>`` block, else last non-empty line."""
    tags = _ANSWER_TAG.findall(text)
    if tags:
        candidate = tags[-1]
    else:
        lines = [line for line in text.splitlines() if line.strip()]
        if not lines:
            return None
        candidate = lines[-1]
    candidate = candidate.strip().strip("`$").replace("\u00d7", "*").replace("\u00f7", "/").replace("\u2212", "-")
    candidate = candidate.split("=")[0].strip()
    return candidate or None


def evaluate_expression(expr: str, max_len: int = 1000) -> tuple[Fraction, list[int]]:
    """Exact value of ``expr`` and the integer literals it uses, in order.

    Raises ``ValueError`` for anything but integer literals, binary + - * / and parentheses, and
    ``ZeroDivisionError`` for division by zero.
    """
    if len(expr) > max_len:
        raise ValueError(f"expression longer than {max_len} characters")
    if not _ALLOWED_CHARS.fullmatch(expr):
        raise ValueError("only digits, + - * /, parentheses and spaces are allowed")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise ValueError(f"not an arithmetic expression ({type(exc).__name__})") from None
    literals: list[int] = []

    def walk(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            literals.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](walk(node.left), walk(node.right))
        raise ValueError(f"{type(node).__name__} is not allowed")

    try:
        return walk(tree.body), literals
    except RecursionError:
        raise ValueError("expression nested too deeply") from None


def _show(value: Fraction) -> str:
    try:
        return clip(str(value))
    except ValueError:  # more digits than int->str allows (sys.get_int_max_str_digits)
        return f"<number of about {value.numerator.bit_length() * 3 // 10} digits>"


def _int_list(value: Any, key: str) -> list[int]:
    if not isinstance(value, list | tuple) or not all(type(v) is int and v >= 0 for v in value):
        raise RewardTaskError(f"reward 'countdown': task[{key!r}] must be a list of non-negative ints, got {value!r}")
    return list(value)


def countdown_reward(
    task: dict,
    action: Any,
    *,
    numbers_key: str = "numbers",
    target_key: str = "target",
    require_all: bool = True,
    format_reward: float = 0.0,
) -> RewardOutput:
    """1.0 when the expression follows the number rules and equals the target."""
    numbers = _int_list(task_value(task, numbers_key, "countdown"), numbers_key)
    target = task_value(task, target_key, "countdown")
    if type(target) is not int:
        raise RewardTaskError(f"reward 'countdown': task[{target_key!r}] must be an int, got {target!r}")
    text, reason = action_text(action)
    if text is None:
        return zero(reason)
    expr = extract_expression(text)
    if expr is None:
        return zero("no expression found")
    # The given numbers bound any legal answer; a longer one is malformed (and would be slow to parse).
    budget = 8 * sum(n.bit_length() // 3 + 4 for n in numbers) + 64
    try:
        value, used = evaluate_expression(expr, max_len=budget)
    except ZeroDivisionError:
        return zero("division by zero", expression=clip(expr))
    except ValueError as exc:
        return zero(f"invalid expression: {exc}", expression=clip(expr))
    given, counted = Counter(numbers), Counter(used)
    if require_all and counted != given:
        return zero("the expression must use every given number exactly once", expression=clip(expr), used=used)
    if not require_all and counted - given:
        return zero("the expression uses numbers that were not given (or too often)", expression=clip(expr), used=used)
    ok = value == target
    meta = {"expression": clip(expr), "value": _show(value)}
    if not ok:
        meta["reason"] = "wrong value"
    return RewardOutput(reward=1.0 if ok else float(format_reward), is_correct=ok, metadata=meta)
