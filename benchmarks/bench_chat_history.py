"""Memory kept by per-step chat histories: ChatView snapshots vs a deepcopy per step.

Run: python benchmarks/bench_chat_history.py
Target (DESIGN.md section 10): the step histories of one 200-turn conversation (200-character
messages) retain <= 0.4 MB and grow linearly with the turns; deep-copying the history at each
step grows with the square of the turns. Each turn adds a user message, snapshots the history
(what ``Step.from_model_output`` stores in ``chat_completions``), then adds the assistant reply.
The messages themselves are made before measuring, so only what the snapshots keep is counted.
"""

from __future__ import annotations

import copy
import gc
import os
import sys
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rllm_core.types import ModelOutput, Step

TARGET_MB = 0.4
OUTPUT = ModelOutput(text="a" * 200)


def messages(turns: int) -> list[tuple[dict, dict]]:
    return [
        ({"role": "user", "content": f"{t:04d}" + "u" * 196}, {"role": "assistant", "content": f"{t:04d}" + "a" * 196})
        for t in range(turns)
    ]


def retained(turns: int, snapshot) -> float:
    pairs = messages(turns)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    msgs: list[dict] = []
    kept = []
    for user, assistant in pairs:
        msgs.append(user)
        kept.append(snapshot(msgs))
        msgs.append(assistant)
    gc.collect()
    size = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert len(kept) == turns
    return size / 1e6


def ours(msgs: list[dict]):
    return Step.from_model_output(OUTPUT, msgs).chat_completions


def ours_plain(msgs: list[dict]):
    """The plain constructor, as a workflow that builds steps by hand writes it."""
    return Step(chat_completions=msgs, response_ids=[1]).chat_completions


def peer(msgs: list[dict]):
    return copy.deepcopy(msgs)


def main() -> None:
    print(f"load average (1 min) at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"{'turns':>6} {'from_model_output MB':>21} {'Step(...) MB':>13} {'deepcopy MB':>12} {'ratio':>8}")
    results = {}
    for turns in (50, 100, 200):
        a, p, b = retained(turns, ours), retained(turns, ours_plain), retained(turns, peer)
        results[turns] = (a, p, b)
        print(f"{turns:>6} {a:21.3f} {p:13.3f} {b:12.3f} {b / max(a, p):7.1f}x")
    (a50, p50, b50), (a200, p200, b200) = results[50], results[200]
    print(
        f"growth 50 -> 200 turns (4x turns): from_model_output {a200 / a50:.1f}x, Step(...) {p200 / p50:.1f}x "
        f"(linear: 4x), deepcopy {b200 / b50:.1f}x"
    )
    worst = max(a200, p200)
    verdict = "ok" if worst <= TARGET_MB else "MISSED"
    print(
        f"200 turns: {worst:.3f} MB (worse of the two) vs target <= {TARGET_MB} MB -> {verdict}; "
        f"deepcopy keeps {b200 / worst:.0f}x more"
    )


if __name__ == "__main__":
    main()
