"""The ``math`` reward: extract the final answer, normalise it, compare with the ground truth.

Reads ``task["ground_truth"]`` (``answer_key``): a string or number, or a list of acceptable
answers. A ground truth that itself contains ``\\boxed{}`` or ``####`` (a worked solution) is
reduced to its final answer the same way as the response.

Extraction (:func:`extract_answer`), first that applies: the last ``\\boxed{...}``/``\\fbox{...}``
(nested braces handled), the text after the last ``####``, the last "the answer is X" /
"final answer: X", the last number in the text.

Comparison, cheapest first: equal strings after :func:`normalize_answer`; exact rational
comparison when both are plain numbers or fractions (any size, digit strings compared without
conversion when huge); then sympy in a worker process with a hard timeout (the worker is killed
and replaced if it overruns; the call runs in a thread so the event loop never blocks). Sympy
sees only an allowlisted subset of syntax (see ``sympy_worker``); nothing is passed to ``eval``.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction
from typing import Any

from rllm_core.types import RewardOutput
from rllm_rewards._common import RewardTaskError, action_text, clip, task_value, zero
from rllm_rewards.sympy_worker import braced

__all__ = ["extract_answer", "math_equal", "math_reward", "normalize_answer"]

_MAX_SYMPY_LEN = 400

# --- extraction ---------------------------------------------------------------------------------


def _last_boxed(text: str) -> str | None:
    starts = [m.start() for m in re.finditer(r"\\(?:boxed|fbox)", text)]
    for start in reversed(starts):
        i = text.index("{", start) if "{" in text[start : start + 8] else -1
        if i == -1:  # "\boxed 5"
            m = re.match(r"\\(?:boxed|fbox)\s+([^\s$]+)", text[start:])
            if m:
                return m.group(1)
            continue
        try:
            return braced(text, i)[0]
        except ValueError:  # unbalanced: try an earlier \boxed
            continue
    return None


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_ANSWER_IS = re.compile(
    r"(?:the\s+(?:final\s+)?answer\s+is|final\s+answer\s*(?:is)?\s*:?)\s*:?\s*(.+?)(?:\.\s|\.?$|\n)",
    re.IGNORECASE | re.MULTILINE,
)


def extract_answer(text: str) -> tuple[str | None, str]:
    """``(answer, method)``; method is ``boxed``, ``####``, ``answer_is``, ``last_number`` or ``none``."""
    boxed = _last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip(), "boxed"
    if "####" in text:
        tail = text.rsplit("####", 1)[1].strip().splitlines()
        if tail and tail[0].strip():
            return tail[0].strip(), "####"
    found = _ANSWER_IS.findall(text)
    if found and found[-1].strip(" $*"):
        return found[-1].strip(" $*"), "answer_is"
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1], "last_number"
    return None, "none"


# --- normalisation ------------------------------------------------------------------------------

_UNITS = (
    "degrees|degree|cm|mm|km|m|meters|meter|inches|inch|in|feet|foot|ft|yards|yard|miles|mile|mph|units|unit|"
    "dollars|dollar|cents|cent|hours|hour|minutes|minute|seconds|second|sec|days|day|kg|g|grams|gram|pounds|lbs|"
    "square|sq|cubic|per|years|year|percent|points|point"
)
_TRAILING_UNITS = re.compile(rf"(?<=[\d}}])\s*(?:(?:{_UNITS})\b\.?\s*(?:\^?\d)?\s*)+$")
_TEXT_MACRO = re.compile(r"\\(?:text|textbf|textrm|mathrm|mbox|operatorname)\s*\{([^{}]*)\}")


def normalize_answer(answer: str) -> str:
    """Canonical string form: LaTeX spacing, ``$``, units, ``%``, thousands commas removed."""
    s = answer.strip()
    if len(s) > 100_000:
        return s
    for old in ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\quad", "\\qquad"):
        s = s.replace(old, "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\^\s*\{?\\circ\}?|\u00b0", "", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = _TEXT_MACRO.sub(r" \1 ", s)
    s = s.strip().rstrip(".").strip()
    s = _TRAILING_UNITS.sub("", s).strip()
    m = re.fullmatch(r"[A-Za-z]\s*=\s*(.+)", s)
    if m:
        s = m.group(1)
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt\s*(\d+|[A-Za-z])", r"\\sqrt{\1}", s)
    s = re.sub(r"\s+", "", s)
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    if m:
        s = f"{m.group(1)}{m.group(2)}/{m.group(3)}"
    if s.startswith("+"):
        s = s[1:]
    return s


_PLAIN = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+(?:\.\d*)?)?")
_INT = re.compile(r"(-?)0*(\d+)")


def _numeric_equal(a: str, b: str) -> bool | None:
    """Exact comparison of plain numbers/fractions; None when either is not one."""
    if not (_PLAIN.fullmatch(a) and _PLAIN.fullmatch(b)):
        return None
    ia, ib = _INT.fullmatch(a), _INT.fullmatch(b)
    if ia and ib:  # integers of any length: compare digits, no int() (str->int is quadratic/limited)
        return (ia.group(2) == ib.group(2) == "0") or (ia.groups() == ib.groups())
    if len(a) > 4000 or len(b) > 4000:
        return None

    def value(s: str) -> Fraction:
        num, _, den = s.partition("/")
        return Fraction(num) / Fraction(den) if den else Fraction(num)

    try:
        return value(a) == value(b)
    except (ValueError, ZeroDivisionError):
        return None


# --- the sympy worker pool ----------------------------------------------------------------------


class _SympyPool:
    """Reusable worker processes; one that overruns its timeout is killed and replaced."""

    def __init__(self, max_workers: int = 2, memory_bytes: int = 1 << 30) -> None:
        self.max_workers = max_workers
        self.memory_bytes = memory_bytes
        self._idle: queue.LifoQueue[subprocess.Popen] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(max_workers)
        self._all: set[subprocess.Popen] = set()
        self._lock = threading.Lock()

    def _spawn(self) -> subprocess.Popen:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rllm_rewards.sympy_worker", str(self.memory_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
        )
        with self._lock:
            self._all.add(proc)
        if proc.stdout.readline().strip() != '{"ready": true}':
            self._kill(proc)
            raise RuntimeError("sympy worker failed to start")
        return proc

    def _kill(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._all.discard(proc)
        try:
            proc.kill()
            proc.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for stream in (proc.stdin, proc.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def check(self, a: str, b: str, timeout: float) -> dict:
        """Blocking; call from a thread. ``{"equal": bool|None, "error": str|None}``."""
        with self._slots:
            try:
                proc = self._idle.get_nowait()
            except queue.Empty:
                proc = self._spawn()
            deadline = time.monotonic() + timeout
            try:
                proc.stdin.write(json.dumps({"a": a, "b": b}) + "\n")
                proc.stdin.flush()
                ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
                line = proc.stdout.readline() if ready else ""
            except (OSError, ValueError):
                line = ""
            if not line:
                self._kill(proc)
                return {"equal": None, "error": "timeout" if not ready else "worker died"}
            self._idle.put(proc)
            return json.loads(line)

    def close(self) -> None:
        with self._lock:
            procs = list(self._all)
        for proc in procs:
            self._kill(proc)


_POOL: _SympyPool | None = None
_POOL_LOCK = threading.Lock()


def _pool() -> _SympyPool:
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = _SympyPool()
            atexit.register(_POOL.close)
        return _POOL


async def math_equal(pred: str, truth: str, *, timeout: float = 5.0) -> tuple[bool, str]:
    """``(equal, method)`` for two *normalised* answers; never blocks the event loop."""
    if pred == truth:
        return True, "string"
    numeric = _numeric_equal(pred, truth)
    if numeric is not None:
        return numeric, "numeric"
    if pred.isalpha() and truth.isalpha():
        return pred.casefold() == truth.casefold(), "string"
    if len(pred) > _MAX_SYMPY_LEN or len(truth) > _MAX_SYMPY_LEN:
        return False, "too long for sympy"
    result = await asyncio.to_thread(_pool().check, pred, truth, timeout)
    if result.get("equal") is None:
        return False, f"sympy: {result.get('error')}"
    return bool(result["equal"]), "sympy"


def _truths(task: Any, key: str) -> list[str]:
    value = task_value(task, key, "math")
    values = list(value) if isinstance(value, list | tuple) else [value]
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, str | int | float):
            raise RewardTaskError(
                f"reward 'math': task[{key!r}] must be a string, a number or a list of them, got {v!r}"
            )
        v = str(v)
        if "\\boxed" in v or "\\fbox" in v or "####" in v:
            v = extract_answer(v)[0] or v
        out.append(v)
    if not out:
        raise RewardTaskError(f"reward 'math': task[{key!r}] is an empty list")
    return out


async def math_reward(
    task: dict, action: Any, *, answer_key: str = "ground_truth", timeout: float = 5.0
) -> RewardOutput:
    """1.0 when the response's final answer is equivalent to a ground truth."""
    truths = _truths(task, answer_key)
    text, reason = action_text(action)
    if text is None:
        return zero(reason)
    answer, how = extract_answer(text)
    if answer is None:
        return zero("no answer found in the response", extraction=how)
    pred = normalize_answer(answer)
    meta: dict[str, Any] = {"extracted": clip(answer), "normalized": clip(pred), "extraction": how}
    methods = []
    for truth in truths:
        ok, method = await math_equal(pred, normalize_answer(truth), timeout=timeout)
        methods.append(method)
        if ok:
            return RewardOutput(
                reward=1.0, is_correct=True, metadata={**meta, "method": method, "ground_truth": clip(truth)}
            )
    return RewardOutput(
        reward=0.0,
        is_correct=False,
        metadata={**meta, "method": methods[-1], "reason": "not equivalent to the ground truth"},
    )
