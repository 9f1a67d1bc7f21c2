"""How well the fully-async loop overlaps generation and training, and what the loop itself costs.

Part 1: the simulated backend at several generation/training latency ratios. For each, the wall
time of a sync and an async run (``max_staleness: 1``), and their ratio to the ideal
``steps * max(T_gen, T_train)`` (target for async: <= 1.10; sync's own floor is
``(T_gen + T_train) / max(T_gen, T_train)``). The pipeline must fill once, so async's floor is
``1 + min/max / steps``.

Part 2: orchestration overhead at 1,000 episodes per step (125 tasks x 8 rollouts): the sync
trainer with latencies ``T_gen = T_train = T``; overhead is ``(step - 2T) / step`` (target < 5%),
and the zero-latency time per step (pure orchestration: workflow engine, rewards, grouping,
advantages, metrics, hooks, plus the simulated workflow and model calls themselves). ``step`` is
the steady-state step: the time between the ends of the first and the last step over the steps
between (run set-up, the first step's warm-up and the final checkpoint excluded); the whole run's
wall time per step is printed beside it.

    python benchmarks/async_overlap.py [--steps 30] [--quick]

Prints numbers; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
import warnings
from pathlib import Path

# Steady state: numpy (imported by the advantage code on the first step, ~0.25 s here) is loaded
# up front so that a one-off import is not spread over the steps being timed.
import numpy  # noqa: F401

from rllm_core.hookspecs import hookimpl
from rllm_core.plugins import registered
from rllm_core.testing import simulated_config, simulated_tasks
from rllm_core.trainer import UnifiedTrainer

STEP_ENDS: list[float] = []


class StepClock:
    """Hook plugin ``step_clock``: records when each step ended."""

    def __init__(self, settings: dict | None = None) -> None:
        STEP_ENDS.clear()

    @hookimpl
    def on_batch_end(self, trainer, metrics) -> None:
        STEP_ENDS.append(time.perf_counter())


class _Plugin:
    @hookimpl
    def register_hooks(self, register) -> None:
        register("step_clock", StepClock)


def steady_step() -> float:
    """Seconds per step between the end of the first and the end of the last step of the last run."""
    return (STEP_ENDS[-1] - STEP_ENDS[0]) / (len(STEP_ENDS) - 1)


def run(mode: str, t_gen: float, t_train: float, steps: int, *, batch: int = 4, n: int = 4, **extra) -> float:
    with tempfile.TemporaryDirectory() as run_dir:
        data = Path(run_dir) / "tasks.jsonl"
        data.write_text("".join(json.dumps(t) + "\n" for t in simulated_tasks(batch * steps)))
        cfg = simulated_config(
            run_dir,
            data={"train": str(data), "train_batch_size": batch},
            rollout={"n": n},
            trainer={"mode": mode, "run_dir": run_dir},
            async_={"max_staleness": 1, "sync_every": 1},
            simulated={"gen_latency": t_gen, "train_latency": t_train},
            workflow={"name": "simulated", "max_concurrency": max(64, batch * n)},
            hooks={"step_clock": {}},
            **extra,
        )
        with registered(_Plugin(), name="async_overlap"):
            trainer = UnifiedTrainer(cfg)
            start = time.perf_counter()
            trainer.fit()
            wall = time.perf_counter() - start
        assert trainer.step == steps, trainer.step
        return wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="fewer configurations (CI smoke run)")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    steps = args.steps

    print("== overlap: wall time / (steps * max(T_gen, T_train)), max_staleness=1 ==")
    print(
        f"{'T_gen':>6} {'T_train':>7} {'steps':>5} {'sync s':>7} {'async s':>7} {'sync/ideal':>10} "
        f"{'async/ideal':>11} {'floor':>6} {'speedup':>7}"
    )
    ratios = [(0.05, 0.05), (0.05, 0.025), (0.025, 0.05), (0.05, 0.01)]
    if args.quick:
        ratios = ratios[:2]
    for t_gen, t_train in ratios:
        ideal = steps * max(t_gen, t_train)
        sync_s = run("sync", t_gen, t_train, steps)
        async_s = run("async", t_gen, t_train, steps)
        floor = 1 + min(t_gen, t_train) / max(t_gen, t_train) / steps
        print(
            f"{t_gen:>6.3f} {t_train:>7.3f} {steps:>5} {sync_s:>7.2f} {async_s:>7.2f} {sync_s / ideal:>10.3f} "
            f"{async_s / ideal:>11.3f} {floor:>6.3f} {sync_s / async_s:>6.2f}x"
        )

    print("\n== orchestration overhead at 1,000 episodes per step (125 tasks x 8 rollouts, sync) ==")
    o_steps = 4
    zero = run("sync", 0.0, 0.0, o_steps, batch=125, n=8)
    per_step = steady_step()
    print(
        f"zero-latency step: {per_step * 1e3:.1f} ms per step ({per_step / 1000 * 1e6:.0f} us per episode); "
        f"whole run {zero / o_steps * 1e3:.1f} ms per step"
    )
    for t in (0.5, 1.0) if args.quick else (0.5, 1.0, 2.0):
        wall = run("sync", t, t, o_steps, batch=125, n=8)
        step = steady_step()
        print(
            f"T_gen = T_train = {t:.1f}s: step {step:.3f}s, ideal {2 * t:.3f}s, "
            f"overhead {(step - 2 * t) / step * 100:.1f}% of the step (target < 5%); "
            f"whole run {(wall - o_steps * 2 * t) / wall * 100:.1f}%"
        )


if __name__ == "__main__":
    main()
