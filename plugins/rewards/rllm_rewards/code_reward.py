"""The ``code`` reward: run the candidate program against tests in a sandboxed subprocess.

Reads ``task["tests"]`` (``tests_key``), one of:

* a list of strings, each Python source run after the candidate code (usually ``assert``s);
* a single string (one test);
* a list of ``{"input": str, "output": str}`` pairs (stdin/stdout programs);
* ``{"inputs": [...], "outputs": [...]}`` (the APPS/TACO layout).

The candidate is the last fenced ```` ```python ```` (or ```` ```py ````, or unlabeled) block of
the response, else the whole response. Reward: the fraction of tests passed, or 1/0 with
``all_or_nothing=True``; ``is_correct`` = every test passed. Limits: see
:class:`rllm_rewards.sandbox.SandboxLimits` (pass ``limits=`` or the individual keyword arguments,
e.g. ``reward.args.allow_unisolated_files`` in a config).

Where the sandbox cannot isolate the file system (and ``allow_unisolated_files`` is off), nothing
runs and the call raises :class:`~rllm_rewards.sandbox.SandboxUnavailableError`, which says why and
how to allow it. The trainer scores such a call 0 and counts it in ``reward/errors`` (with the
message in the episode's ``info["reward_error"]``), so the run goes on and the metric says that
nothing was graded; check :func:`rllm_rewards.sandbox.available_layers` before a long run.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from rllm_core.types import RewardOutput
from rllm_rewards._common import RewardTaskError, action_text, clip, task_value, zero
from rllm_rewards.sandbox import SandboxLimits, run_python_tests

__all__ = ["code_reward", "extract_code"]

_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str:
    """The last ```python block (preferred), else the last unlabeled fenced block, else the text."""
    blocks = _FENCE.findall(text)
    labeled = [body for lang, body in blocks if lang]
    if labeled:
        return labeled[-1]
    if blocks:
        return blocks[-1][1]
    return text


def _tests(task: Any, key: str) -> tuple[list, str]:
    tests = task_value(task, key, "code")
    if isinstance(tests, str):
        return [tests], "assert"
    if isinstance(tests, dict) and "inputs" in tests and "outputs" in tests:
        if len(tests["inputs"]) != len(tests["outputs"]):
            raise RewardTaskError(
                f"reward 'code': task[{key!r}] has {len(tests['inputs'])} inputs but {len(tests['outputs'])} outputs"
            )
        tests = [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"], strict=True)]
    if not isinstance(tests, list | tuple) or not tests:
        raise RewardTaskError(
            f"reward 'code': task[{key!r}] must be a non-empty list of tests, got {clip(repr(tests))}"
        )
    if all(isinstance(t, str) for t in tests):
        return list(tests), "assert"
    if all(isinstance(t, dict) and "input" in t and "output" in t for t in tests):
        return [{"input": _text(t["input"]), "output": _text(t["output"])} for t in tests], "io"
    raise RewardTaskError(
        f"reward 'code': task[{key!r}] must hold assert strings or {{'input', 'output'}} dicts, not a mix"
    )


def _text(value: Any) -> str:
    return "\n".join(map(str, value)) if isinstance(value, list) else str(value)


async def code_reward(
    task: dict,
    action: Any,
    *,
    tests_key: str = "tests",
    all_or_nothing: bool = False,
    limits: SandboxLimits | None = None,
    **limit_overrides: Any,
) -> RewardOutput:
    """Fraction of tests passed (or all-or-nothing); ``is_correct`` when all pass."""
    tests, mode = _tests(task, tests_key)
    limits = dataclasses.replace(limits or SandboxLimits(), **limit_overrides)
    text, reason = action_text(action)
    if text is None:
        return zero(reason, passed=0, total=len(tests))
    code = extract_code(text)
    if not code.strip():
        return zero("no code found", passed=0, total=len(tests))
    result = await run_python_tests(code, tests, mode, limits)  # SandboxUnavailableError: counted by the trainer
    n_pass = sum(result.passed)
    all_pass = n_pass == len(tests)
    reward = float(all_pass) if all_or_nothing else n_pass / len(tests)
    meta: dict[str, Any] = {
        "passed": n_pass,
        "total": len(tests),
        "mode": mode,
        "timed_out": result.timed_out,
        "returncode": result.returncode,
        "sandbox": result.layers,
        "elapsed": round(result.elapsed, 3),
        "failures": [
            f"test {i}: {d}" for i, (ok, d) in enumerate(zip(result.passed, result.details, strict=True)) if not ok
        ][:10],
        "stderr": clip(result.stderr, 1000),
    }
    if result.load_error:
        meta["reason"] = f"code failed to load: {result.load_error}"
    elif result.timed_out:
        meta["reason"] = "killed at the wall-time limit"
    elif not all_pass:
        meta["reason"] = f"{len(tests) - n_pass} of {len(tests)} tests failed"
    return RewardOutput(reward=reward, is_correct=all_pass, metadata=meta)
