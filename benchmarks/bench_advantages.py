"""Grouping + advantages throughput, against a naive per-group implementation in the same run.

Run: python benchmarks/bench_advantages.py
Target (DESIGN.md section 10): grouping + GRPO advantages for 96,000 steps (1,000 tasks x 8
rollouts x 12 steps) in <= 0.14 s on the 2-core dev machine.

The peer is the straightforward way (what rLLM's collector does): a dict of groups, then per group
``np.mean``/``np.std`` on that group's rewards and a write to each step. Both write the same
advantages onto the same pydantic ``Step`` objects; the figures are best of several repeats.
"""

from __future__ import annotations

import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from rllm_core.advantages import compute_advantages
from rllm_core.config import AlgorithmConfig
from rllm_core.grouping import group_episodes
from rllm_core.types import Episode, Step, Trajectory

TARGET_S = 0.14
ROLLOUTS, STEPS = 8, 12


def make_episodes(n_tasks: int, seed: int = 0) -> list[Episode]:
    rng = random.Random(seed)
    episodes = []
    for t in range(n_tasks):
        for r in range(ROLLOUTS):
            steps = [Step(response_ids=[1, 2, 3, 4]) for _ in range(STEPS)]
            reward = float(rng.random() < 0.5)
            episodes.append(
                Episode(
                    task_id=f"task-{t}",
                    rollout_idx=r,
                    trajectories=[Trajectory(name="solver", steps=steps, reward=reward)],
                    is_correct=reward > 0,
                )
            )
    rng.shuffle(episodes)  # rollouts come back from async workers in any order
    return episodes


def naive(episodes: list[Episode], eps: float = 1e-6) -> None:
    """Per-group numpy on a dict of groups (the peer)."""
    groups: dict[tuple[str, str], list[Trajectory]] = defaultdict(list)
    for episode in episodes:
        for trajectory in episode.trajectories:
            groups[(episode.task_id, trajectory.name)].append(trajectory)
    for trajectories in groups.values():
        rewards = np.array([t.total_reward for t in trajectories])
        if len(rewards) > 1:
            mean, std = np.mean(rewards), np.std(rewards, ddof=1)  # unbiased, as torch.std
        else:
            mean, std = 0.0, 1.0
        advantages = (rewards - mean) / (std + eps)
        for trajectory, advantage in zip(trajectories, advantages, strict=True):
            for step in trajectory.steps:
                step.advantage = float(advantage)


def ours(episodes: list[Episode], algorithm: AlgorithmConfig) -> None:
    compute_advantages(group_episodes(episodes), algorithm)


def clear(episodes: list[Episode]) -> None:
    for episode in episodes:
        for trajectory in episode.trajectories:
            for step in trajectory.steps:
                step.advantage = None


def best_of(fn, episodes: list[Episode], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        clear(episodes)  # untimed: each run starts from fresh steps
        start = time.perf_counter()
        fn(episodes)
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    print(f"load average (1 min) at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    algorithm = AlgorithmConfig()
    ours(make_episodes(2), algorithm)  # load plugins, numpy
    sizes = [("~1k", 11), ("~10k", 105), ("~100k", 1042), ("96k shape", 1000)]
    print(f"{'steps':>10} {'ours s':>9} {'steps/s':>12} {'naive s':>9} {'speed-up':>9}")
    for label, n_tasks in sizes:
        episodes = make_episodes(n_tasks)
        n_steps = n_tasks * ROLLOUTS * STEPS
        repeats = 7 if n_steps < 50_000 else 5
        t_ours = best_of(lambda e: ours(e, algorithm), episodes, repeats)
        t_naive = best_of(naive, episodes, repeats)
        print(
            f"{n_steps:>10,} {t_ours:9.4f} {n_steps / t_ours:12,.0f} {t_naive:9.4f} {t_naive / t_ours:8.2f}x  ({label})"
        )
        if n_tasks == 1000:
            # same answers as the peer (GRPO with std) on the same data
            clear(episodes)
            ours(episodes, algorithm)
            a = [s.advantage for e in episodes for s in e.trajectories[0].steps]
            clear(episodes)
            naive(episodes)
            b = [s.advantage for e in episodes for s in e.trajectories[0].steps]
            assert np.allclose(a, b), "ours and the naive peer disagree"
            verdict = "ok" if t_ours <= TARGET_S else "MISSED"
            print(
                f"\n96,000 steps (1,000 tasks x 8 rollouts x 12 steps): {t_ours:.4f} s vs target {TARGET_S} s "
                f"-> {verdict} ({t_ours / TARGET_S:.2f}x of target); naive peer {t_naive:.4f} s "
                f"({t_naive / t_ours:.2f}x slower than ours)"
            )


if __name__ == "__main__":
    main()
