"""Per-step metrics with explicit reductions.

Every key says how it was reduced: counts are sums (``.../count``, ``episodes/termination/<r>``),
episode statistics are means over episodes (or trajectories) with ``_min``/``_max``/``_std`` where
named, and timings are seconds for the step. Validation adds pass@k per data source with the
unbiased estimator ``1 - C(n-c, k) / C(n, k)`` over ``n`` rollouts with ``c`` correct.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

from rllm_core.types import Episode

__all__ = ["episode_metrics", "pass_at_k", "stats", "validation_metrics"]


def stats(prefix: str, values: Sequence[float]) -> dict[str, float]:
    """``prefix/mean``, ``_std``, ``_min``, ``_max`` of ``values`` (nothing when empty)."""
    if not values:
        return {}
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / n
    return {
        f"{prefix}/mean": mean,
        f"{prefix}/std": math.sqrt(var),
        f"{prefix}/min": min(values),
        f"{prefix}/max": max(values),
    }


def episode_metrics(episodes: Iterable[Episode], prefix: str = "train") -> dict[str, float]:
    """Rewards, correctness, lengths and termination counts of a batch of episodes."""
    episodes = episodes if isinstance(episodes, list) else list(episodes)
    out: dict[str, float] = {f"{prefix}/episodes/count": float(len(episodes))}
    if not episodes:
        return out
    # One pass over episodes, trajectories and steps (a step holds ~1,000 episodes).
    rewards: list[float] = []
    response_lens: list[int] = []
    steps_per_traj: list[int] = []
    reasons: dict[str, float] = {}
    n_correct = 0
    for e in episodes:
        n_correct += e.is_correct
        reason = e.termination_reason.value
        reasons[reason] = reasons.get(reason, 0.0) + 1
        for t in e.trajectories:
            rewards.append(t.total_reward)
            steps = t.steps
            steps_per_traj.append(len(steps))
            response_lens.extend([len(s.response_ids) for s in steps])
    out.update(stats(f"{prefix}/reward", rewards))
    out[f"{prefix}/correct_frac"] = n_correct / len(episodes)
    for reason, count in reasons.items():
        out[f"{prefix}/episodes/termination/{reason}"] = count
    out[f"{prefix}/tokens/response_sum"] = float(sum(response_lens))
    if response_lens:
        out[f"{prefix}/response_length/mean"] = sum(response_lens) / len(response_lens)
        out[f"{prefix}/response_length/max"] = float(max(response_lens))
    if steps_per_traj:
        out[f"{prefix}/turns/mean"] = sum(steps_per_traj) / len(steps_per_traj)
    return out


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _ks(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def validation_metrics(episodes: Sequence[Episode], n_val: int, data_source_key: str) -> dict[str, float]:
    """pass@k for k = 1, 2, 4, ... n_val, overall and per data source, plus episode stats."""
    out = episode_metrics(episodes, prefix="val")
    by_task: dict[str, list[Episode]] = defaultdict(list)
    for e in episodes:
        by_task[e.task_id].append(e)
    per_source: dict[str, list[list[Episode]]] = defaultdict(list)
    for eps in by_task.values():
        task: Any = eps[0].task
        source = task.get(data_source_key) if isinstance(task, dict) else None
        per_source["all"].append(eps)
        if source is not None:
            per_source[str(source)].append(eps)
    for source, tasks in per_source.items():
        prefix = "val" if source == "all" else f"val/{source}"
        for k in _ks(n_val):
            scores = [pass_at_k(len(eps), sum(e.is_correct for e in eps), k) for eps in tasks if len(eps) >= k]
            if scores:
                out[f"{prefix}/pass@{k}"] = sum(scores) / len(scores)
    return out
