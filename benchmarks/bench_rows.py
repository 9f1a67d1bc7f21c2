"""Token rows for 96,000 multi-turn steps, against the per-step transform they replaced.

Run: python benchmarks/bench_rows.py [short|long]
Target (DESIGN.md section 10): token rows for 96,000 steps (1,000 tasks x 8 rollouts x 12 turns,
each trajectory's turns extending each other, so it merges into one row) in <= 0.3 s, on the
``short`` token shape; ``long`` (15x the tokens) shows how the cost grows with them.

The peer is the torch backend's transform before token rows (commit 8312530): one row per step,
``list(prompt_ids)``, ``list(response_ids)``, ``list(logprobs)``, and later a Python loop writing
each step's advantage out per token. Ours: :func:`rllm_core.rows.build_rows` then
:meth:`TokenRows.fill_advantages`. Both timings include the advantage fill, since both stages run
every training step.

Shapes: ``short`` (16-token first prompt, 16-token responses, 8 observation tokens per turn) and
``long`` (256-token first prompt, 64-token responses, 300 observation tokens per turn: an agent
with tool output). Token ids of one trajectory are shared objects as a token-exact engine makes
them (turn k+1's prompt is turn k's prompt + response + new tokens).
"""

from __future__ import annotations

import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rllm_core.grouping import group_episodes
from rllm_core.rows import build_rows
from rllm_core.types import Episode, ModelOutput, Step, Trajectory

TARGET_S = 0.3
TASKS, ROLLOUTS, TURNS = 1000, 8, 12


def make_groups(shape: str, seed: int = 0):
    rng = random.Random(seed)
    long = shape == "long"
    first, n_resp, n_obs = (256, 64, 300) if long else (16, 16, 8)
    episodes = []
    for t in range(TASKS):
        prompt0 = [rng.randrange(32000) for _ in range(first)]
        for r in range(ROLLOUTS):
            prompt = prompt0
            steps = []
            for _ in range(TURNS):
                response = [rng.randrange(32000) for _ in range(n_resp)]
                out = ModelOutput(prompt_ids=prompt, completion_ids=response, logprobs=[-0.5] * n_resp)
                steps.append(Step.from_model_output(out))
                prompt = prompt + response + [rng.randrange(32000) for _ in range(n_obs)]
            reward = float(rng.random() < 0.5)
            episodes.append(
                Episode(task_id=f"t{t}", rollout_idx=r, trajectories=[Trajectory(steps=steps, reward=reward)])
            )
    groups = group_episodes(episodes)
    for g in groups:
        for traj in g.trajectories:
            for s in traj.steps:
                s.advantage = traj.reward - 0.5
    return groups


def peer(groups) -> int:
    """One row per step (the torch backend's transform before token rows), then per-token advantages."""
    prompts, responses, old, steps = [], [], [], []
    for group in groups:
        for traj in group.trajectories:
            for step in traj.steps:
                if not step.response_ids or not step.prompt_ids:
                    continue
                if not all(isinstance(t, int) for t in step.prompt_ids):
                    raise TypeError("prompt_ids must be ints")
                prompts.append(list(step.prompt_ids))
                responses.append(list(step.response_ids))
                old.append(list(step.logprobs) if step.logprobs else None)
                steps.append(step)
    advantages = []
    for step, response in zip(steps, responses, strict=True):
        adv = step.advantage
        advantages.append([float(adv)] * len(response))
    return len(prompts)


def ours(groups) -> int:
    rows = build_rows(groups)
    rows.fill_advantages()
    return len(rows)


def best_of(fn, groups, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn(groups)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    shapes = sys.argv[1:] or ["short", "long"]
    print(f"load average (1 min) at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    n_steps = TASKS * ROLLOUTS * TURNS
    for shape in shapes:
        groups = make_groups(shape)
        rows = build_rows(groups)
        assert len(rows) == TASKS * ROLLOUTS, "every trajectory should merge into one row"
        t_ours, t_peer = best_of(ours, groups), best_of(peer, groups)
        # The target is set on the short shape (bench_steps.py's); long shows how it scales with tokens.
        verdict = ("ok" if t_ours <= TARGET_S else "MISSED") if shape == "short" else "no target"
        print(
            f"{shape:>5}: {n_steps:,} steps -> {len(rows):,} rows, {rows.num_tokens:,} tokens "
            f"({rows.num_action_tokens:,} action): ours {t_ours:.3f} s ({n_steps / t_ours / 1e3:,.0f}k steps/s) vs "
            f"target {TARGET_S} s -> {verdict}; per-step peer {t_peer:.3f} s ({t_peer / t_ours:.2f}x ours), "
            f"which makes {n_steps:,} rows that repeat the shared history {TURNS}x"
        )


if __name__ == "__main__":
    main()
