"""Cost of building Steps with ``Step.from_model_output``, against a deepcopy-per-step peer.

Run: python benchmarks/bench_steps.py
Target (DESIGN.md section 10): <= 6 us per step for 96,000 steps (1,000 tasks x 8 rollouts x 12
turns). The peer builds the same steps the way rLLM does: a plain dataclass holding
``copy.deepcopy(messages)`` of the chat history at each step. Both loops also grow the
conversation (append the assistant reply and the next user turn); engine outputs are made beforehand.

Two token shapes are timed: ``short`` (16 prompt and 16 response tokens: the cost of the Step
itself) and ``long`` (prompt of 256 + 300 tokens per turn, 64 response tokens: what a multi-turn
agent sends). Token lists are validated (so copied) by pydantic in ours and kept by reference in the
peer, so the long shape shows that cost. Pass ``short`` or ``long`` to run one.
"""

from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rllm_core.types import ModelOutput, Step

TARGET_US = 6.0
TASKS, ROLLOUTS, TURNS = 1000, 8, 12
PROMPT_TOKENS, RESPONSE_TOKENS = 256, 64


@dataclass
class PeerStep:
    prompt_ids: list = field(default_factory=list)
    response_ids: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    chat_completions: list = field(default_factory=list)
    model_response: str = ""
    reasoning: str | None = None
    action: Any = None
    reward: float = 0.0
    done: bool = False
    info: dict = field(default_factory=dict)
    advantage: Any = None


def make_outputs(shape: str) -> list[ModelOutput]:
    """One output per turn, shared by all trajectories."""
    long = shape == "long"
    n_resp = RESPONSE_TOKENS if long else 16
    return [
        ModelOutput(
            text=f"answer {t} " + "x" * 180,
            content=f"answer {t} " + "x" * 180,
            prompt_ids=list(range(PROMPT_TOKENS + 300 * t if long else 16)),
            completion_ids=list(range(n_resp)),
            logprobs=[-0.5] * n_resp,
            finish_reason="stop",
            weight_version=1,
        )
        for t in range(TURNS)
    ]


def run_ours(n_traj: int, outputs: list[ModelOutput]) -> list[Step]:
    steps = []
    append = steps.append
    for i in range(n_traj):
        msgs: list[dict] = [{"role": "system", "content": "s" * 200}, {"role": "user", "content": f"task {i}"}]
        for out in outputs:
            append(Step.from_model_output(out, msgs, action=out.content))
            msgs.append({"role": "assistant", "content": out.content})
            msgs.append({"role": "user", "content": "observation " + "o" * 188})
    return steps


def run_peer(n_traj: int, outputs: list[ModelOutput]) -> list[PeerStep]:
    steps = []
    append = steps.append
    for i in range(n_traj):
        msgs: list[dict] = [{"role": "system", "content": "s" * 200}, {"role": "user", "content": f"task {i}"}]
        for out in outputs:
            append(
                PeerStep(
                    prompt_ids=out.prompt_ids,
                    response_ids=out.completion_ids,
                    logprobs=out.logprobs or [],
                    chat_completions=copy.deepcopy(msgs),
                    model_response=out.content or out.text,
                    reasoning=out.reasoning,
                    action=out.content,
                )
            )
            msgs.append({"role": "assistant", "content": out.content})
            msgs.append({"role": "user", "content": "observation " + "o" * 188})
    return steps


def timed(fn, *args) -> float:
    start = time.perf_counter()
    result = fn(*args)
    elapsed = time.perf_counter() - start
    del result
    return elapsed


def main() -> None:
    print(f"load average (1 min) at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    shapes = sys.argv[1:] or ["short", "long"]
    n_traj = TASKS * ROLLOUTS
    n_steps = n_traj * TURNS
    print(f"{n_steps:,} steps ({TASKS} tasks x {ROLLOUTS} rollouts x {TURNS} turns), best of 2")
    for shape in shapes:
        outputs = make_outputs(shape)
        run_ours(50, outputs)
        run_peer(50, outputs)
        ours = min(timed(run_ours, n_traj, outputs) for _ in range(2))
        peer = min(timed(run_peer, n_traj, outputs) for _ in range(2))
        ours_us, peer_us = ours / n_steps * 1e6, peer / n_steps * 1e6
        verdict = "ok" if ours_us <= TARGET_US else "MISSED"
        print(
            f"[{shape}] Step.from_model_output {ours_us:6.2f} us/step ({ours:.2f} s) | peer dataclass + "
            f"deepcopy(history) {peer_us:6.2f} us/step | peer/ours {peer_us / ours_us:.2f}x | "
            f"target <= {TARGET_US} us: {verdict}"
        )


if __name__ == "__main__":
    main()
