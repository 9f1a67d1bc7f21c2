"""Advantage estimators and the stage that writes ``step.advantage``.

What each estimator reduces to, for trajectory rewards ``r`` of one group ``g`` (size ``n``,
mean ``mean_g``, std ``std_g``: unbiased, ``ddof = 1``, by default as in verl and TRL; population
std with ``algorithm.std_unbiased: false``):

* ``grpo``: ``(r - mean_g) / (std_g + eps)``; with ``norm_adv_by_std=False`` just ``r - mean_g``.
* ``drgrpo`` (Dr.GRPO): ``r - mean_g`` (never divided by the std).
* ``rloo``: ``r - mean of the other n-1 rewards`` = ``n/(n-1) * (r - mean_g)``; 0 when ``n == 1``.
* ``reinforce``: ``r`` (no baseline).
* ``reinforce_plus_plus_baseline`` (verl's): ``a = r - mean_g`` on every action token of the
  trajectory, then whitened over all action tokens of the batch: ``(a - mu) / sqrt(var + 1e-8)``,
  ``mu`` and ``var`` (unbiased) over tokens, i.e. each trajectory weighted by its token count.

A group of one (``n == 1``) has nothing to compare with: ``grpo``, ``drgrpo`` and
``reinforce_plus_plus_baseline`` use baseline 0 (and std 1), so it gets its raw reward;
``rloo`` gives it 0.

The estimator contract (what a plugin implements, see :class:`AdvantageEstimator`)::

    fn(rewards, group_ids, n_groups, *, norm_adv_by_std: bool, eps: float, std_ddof: int,
       **kwargs) -> advantages

``rewards`` is a float64 array of shape ``(N,)``, one trajectory reward per row for every
trajectory of every group of one role; ``group_ids`` an int64 array ``(N,)`` with values in
``0..n_groups-1`` (non-decreasing in practice; estimators must not rely on it); an estimator that
names ``token_counts`` in its signature also gets the number of action (response) tokens of each
trajectory; the result is one advantage per trajectory, shape ``(N,)``. All groups arrive at once,
so an estimator is a handful of vectorised numpy calls (``np.bincount`` per-group sums), never a
Python loop per group.

:func:`compute_advantages` runs one estimator per role (``algorithm.estimator_map[role]``, else
``algorithm.adv_estimator``), broadcasts each trajectory's advantage onto every step
(``stepwise_mode: broadcast``), applies ``filter.mask_termination_reasons`` (those trajectories get
advantage 0) and the precomputed-advantage rules, and returns metrics.
:func:`filter_groups` drops groups before that. numpy is imported inside the functions that use
it, so importing this module stays cheap.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from rllm_core.types import Episode, Step, TrajectoryGroup

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from rllm_core.config import AlgorithmConfig, FilterConfig

__all__ = [
    "EPS",
    "AdvantageEstimator",
    "compute_advantages",
    "drgrpo",
    "filter_groups",
    "grpo",
    "is_collapsed",
    "is_informative",
    "reinforce",
    "reinforce_plus_plus",
    "reinforce_plus_plus_baseline",
    "rloo",
]

EPS = 1e-6
"""Added to standard deviations before dividing."""

# Two rewards this close count as equal for ``drop_uniform_rewards`` (sums of step rewards may
# differ in the last bits depending on order).
_UNIFORM_TOL = 1e-9
_MAX_LISTED = 5


class AdvantageEstimator(Protocol):
    """What ``register_advantage_estimators`` expects: ``register("name", fn)``."""

    def __call__(
        self,
        rewards: np.ndarray,
        group_ids: np.ndarray,
        n_groups: int,
        *,
        norm_adv_by_std: bool,
        eps: float,
        **kwargs: Any,
    ) -> np.ndarray: ...


# ---------------------------------------------------------------------------------------------
# Estimators


def _group_mean(np: Any, rewards: np.ndarray, group_ids: np.ndarray, n_groups: int) -> tuple:
    """Per-group baseline and sizes; a group of one has no one to compare with: its baseline is 0."""
    counts = np.bincount(group_ids, minlength=n_groups)
    sums = np.bincount(group_ids, weights=rewards, minlength=n_groups)
    return np.where(counts > 1, sums / np.maximum(counts, 1), 0.0), counts


def drgrpo(
    rewards: np.ndarray,
    group_ids: np.ndarray,
    n_groups: int,
    *,
    norm_adv_by_std: bool = False,
    eps: float = EPS,
    **_: Any,
) -> np.ndarray:
    """Dr.GRPO: ``r - mean_g`` (``norm_adv_by_std`` is ignored: never divided by the std).

    A group of one has baseline 0 (its advantage is its reward), as in :func:`grpo`.
    """
    import numpy as np

    mean, _counts = _group_mean(np, rewards, group_ids, n_groups)
    return rewards - mean[group_ids]


def grpo(
    rewards: np.ndarray,
    group_ids: np.ndarray,
    n_groups: int,
    *,
    norm_adv_by_std: bool = True,
    eps: float = EPS,
    std_ddof: int = 1,
    **_: Any,
) -> np.ndarray:
    """GRPO: ``(r - mean_g) / (std_g + eps)``, or ``r - mean_g`` without ``norm_adv_by_std``.

    ``std_g`` has ``std_ddof`` degrees of freedom removed: 1 (unbiased, verl's and TRL's
    ``torch.std``) by default; 0 is the population std, which makes advantages ``sqrt(n/(n-1))``
    larger. A group of one uses mean 0 and std 1, so its advantage is its raw reward (the verl
    convention; it keeps ``rollout.n: 1`` from training on zeros).
    """
    import numpy as np

    mean, counts = _group_mean(np, rewards, group_ids, n_groups)
    centred = rewards - mean[group_ids]
    if not norm_adv_by_std:
        return centred
    sq = np.bincount(group_ids, weights=centred * centred, minlength=n_groups)
    var = sq / np.maximum(counts - std_ddof, 1)
    std = np.where(counts > 1, np.sqrt(var), 1.0)
    return centred / (std[group_ids] + eps)


def rloo(
    rewards: np.ndarray,
    group_ids: np.ndarray,
    n_groups: int,
    *,
    norm_adv_by_std: bool = False,
    eps: float = EPS,
    **_: Any,
) -> np.ndarray:
    """RLOO: ``r_i - mean(r_j, j != i)`` = ``n/(n-1) (r_i - mean_g)``; 0 for a group of one."""
    import numpy as np

    mean, counts = _group_mean(np, rewards, group_ids, n_groups)
    scale = np.where(counts > 1, counts / np.maximum(counts - 1, 1), 0.0)
    return (rewards - mean[group_ids]) * scale[group_ids]


def reinforce(
    rewards: np.ndarray,
    group_ids: np.ndarray,
    n_groups: int,
    *,
    norm_adv_by_std: bool = False,
    eps: float = EPS,
    **_: Any,
) -> np.ndarray:
    """REINFORCE: the reward itself, no baseline."""
    import numpy as np

    return np.array(rewards, dtype=np.float64, copy=True)


def reinforce_plus_plus_baseline(
    rewards: np.ndarray,
    group_ids: np.ndarray,
    n_groups: int,
    *,
    norm_adv_by_std: bool = True,
    eps: float = EPS,
    std_ddof: int = 1,
    token_counts: np.ndarray | None = None,
    **_: Any,
) -> np.ndarray:
    """REINFORCE++-baseline as verl defines it: group-centred, then whitened over the batch's tokens.

    ``a = r - mean_g`` is put on each of the trajectory's ``token_counts`` action tokens, and the
    token values of the whole batch (every trajectory of the role handed in) are whitened:
    ``(a - mu) / sqrt(var + 1e-8)`` with ``mu = sum(n a) / sum(n)`` and
    ``var = sum(n (a - mu)^2) / (sum(n) - std_ddof)``. Without ``token_counts`` every trajectory
    counts as one token. ``norm_adv_by_std`` is ignored: the whitening defines the method. A group
    of one has baseline 0.
    """
    import numpy as np

    mean, _counts = _group_mean(np, rewards, group_ids, n_groups)
    return _whiten_tokens(np, rewards - mean[group_ids], token_counts, std_ddof)


def reinforce_plus_plus(
    rewards: np.ndarray,
    group_ids: np.ndarray,
    n_groups: int,
    *,
    norm_adv_by_std: bool = True,
    eps: float = EPS,
    std_ddof: int = 1,
    token_counts: np.ndarray | None = None,
    **_: Any,
) -> np.ndarray:
    """REINFORCE++ as verl defines it: the reward on every action token, whitened over the batch's tokens.

    No group baseline: a group whose rewards are all equal still gets a signal, its reward against
    the batch's (failures below the batch mean are pushed down, which keeps a policy exploring
    where it fails everywhere). Weighted by ``token_counts`` like :func:`reinforce_plus_plus_baseline`.
    """
    import numpy as np

    return _whiten_tokens(np, np.asarray(rewards, dtype=np.float64), token_counts, std_ddof)


def _whiten_tokens(np: Any, values: np.ndarray, token_counts: np.ndarray | None, std_ddof: int) -> np.ndarray:
    """``(v - mu) / sqrt(var + 1e-8)`` with ``mu``, ``var`` over tokens (each value counted per token)."""
    if values.size == 0:
        return values
    n = np.ones_like(values) if token_counts is None else np.asarray(token_counts, dtype=np.float64)
    total = n.sum()
    if total <= 0:
        return np.zeros_like(values)
    mu = (n * values).sum() / total
    var = (n * (values - mu) ** 2).sum() / max(total - std_ddof, 1.0)
    return (values - mu) / np.sqrt(var + 1e-8)


BUILTIN_ESTIMATORS = {
    "grpo": grpo,
    "drgrpo": drgrpo,
    "rloo": rloo,
    "reinforce": reinforce,
    "reinforce_plus_plus": reinforce_plus_plus,
    "reinforce_plus_plus_baseline": reinforce_plus_plus_baseline,
}


# ---------------------------------------------------------------------------------------------
# Helpers


def _episode_label(group: TrajectoryGroup, index: int) -> str:
    episodes = group.episodes
    if index < len(episodes):
        ep = episodes[index]
        return f"(task_id={ep.task_id!r}, rollout_idx={ep.rollout_idx})"
    return f"(task_id={group.task_id!r}, trajectory {index})"


def _rewards(group: TrajectoryGroup) -> list[float]:
    return [t.total_reward for t in group.trajectories]


def _correct(group: TrajectoryGroup) -> list[bool]:
    """Per-trajectory correctness: the episode's ``is_correct``; reward > 0 without episodes."""
    episodes = group.episodes
    if len(episodes) == len(group.trajectories):
        return [ep.is_correct for ep in episodes]
    return [t.total_reward > 0 for t in group.trajectories]


ANCHOR_KEY = "anchor_collapsed"
"""``Trajectory.info`` key marking a collapsed task kept by ``filter.anchor_collapsed``."""


def _anchored(group: TrajectoryGroup) -> bool:
    return bool(group.trajectories) and all(t.info.get(ANCHOR_KEY) for t in group.trajectories)


def _says_precomputed(group: TrajectoryGroup) -> bool:
    """True when every step of the group carries a per-token list advantage (and there is a step)."""
    seen = False
    for trajectory in group.trajectories:
        for step in trajectory.steps:
            if not isinstance(step.advantage, list):
                return False
            seen = True
    return seen


def _stats(np: Any, values: np.ndarray, prefix: str, out: dict[str, float]) -> None:
    if values.size:
        out[f"{prefix}/mean"] = float(values.mean())
        out[f"{prefix}/std"] = float(values.std())
        out[f"{prefix}/min"] = float(values.min())
        out[f"{prefix}/max"] = float(values.max())
    else:
        out[f"{prefix}/mean"] = out[f"{prefix}/std"] = out[f"{prefix}/min"] = out[f"{prefix}/max"] = 0.0


def _plain_setattr(cls: type) -> bool:
    """True when assigning a field of ``cls`` is a plain store (what pydantic does without validation)."""
    config = cls.model_config
    return not config.get("validate_assignment") and not config.get("frozen")


def _masked(group: TrajectoryGroup, reasons: set[Any]) -> list[bool]:
    episodes = group.episodes
    if not reasons or len(episodes) != len(group.trajectories):
        return [False] * len(group.trajectories)
    return [ep.termination_reason in reasons for ep in episodes]


# ---------------------------------------------------------------------------------------------
# Filters


def filter_groups(
    groups: Iterable[TrajectoryGroup], filter_config: FilterConfig
) -> tuple[list[TrajectoryGroup], dict[str, float]]:
    """Drop groups smaller than ``min_group_size`` and, with ``drop_uniform_rewards``, groups whose
    trajectory rewards are all equal.

    Groups whose steps all carry precomputed per-token advantages are never dropped for uniform
    rewards: their signal is not the reward; nor are the collapsed tasks dynamic sampling kept for
    ``anchor_collapsed``. ``mask_termination_reasons`` is applied later, by
    :func:`compute_advantages`. Metrics: ``filter/groups_in``, ``filter/groups_kept``,
    ``filter/dropped_small``, ``filter/dropped_uniform``.
    """
    kept: list[TrajectoryGroup] = []
    small = uniform = total = 0
    min_size = filter_config.min_group_size
    drop_uniform = filter_config.drop_uniform_rewards or filter_config.dynamic_sampling
    for group in groups:
        total += 1
        if len(group.trajectories) < min_size:
            small += 1
            continue
        if drop_uniform:
            rewards = _rewards(group)
            uniform_rewards = not rewards or max(rewards) - min(rewards) <= _UNIFORM_TOL
            if uniform_rewards and not _says_precomputed(group) and not _anchored(group):
                uniform += 1
                continue
        kept.append(group)
    metrics = {
        "filter/groups_in": float(total),
        "filter/groups_kept": float(len(kept)),
        "filter/dropped_small": float(small),
        "filter/dropped_uniform": float(uniform),
    }
    return kept, metrics


def is_collapsed(episodes: Sequence[Episode], share: float) -> bool:
    """True when every rollout of one task failed (none correct, rewards all equal) and at least
    ``share`` of them gave the same answer (the same response tokens): a policy sure of a wrong
    answer, rather than one that has not found the right answer yet."""
    if not episodes or any(e.is_correct for e in episodes) or is_informative(episodes):
        return False
    counts: dict[tuple, int] = {}
    for e in episodes:
        answer = tuple(tuple(s.response_ids) for t in e.trajectories for s in t.steps)
        counts[answer] = counts.get(answer, 0) + 1
    return max(counts.values()) >= share * len(episodes)


def is_informative(episodes: Iterable[Episode]) -> bool:
    """True when some role's trajectories in ``episodes`` (one task's rollouts) have rewards that
    differ, or carry precomputed per-token advantages: what dynamic sampling keeps."""
    by_role: dict[str, list[float]] = {}
    for episode in episodes:
        for trajectory in episode.trajectories:
            if trajectory.steps and all(isinstance(s.advantage, list) for s in trajectory.steps):
                return True
            by_role.setdefault(trajectory.name, []).append(trajectory.total_reward)
    return any(max(r) - min(r) > _UNIFORM_TOL for r in by_role.values())


# ---------------------------------------------------------------------------------------------
# The stage


def _resolve_estimator(name: str, role: str, algorithm: AlgorithmConfig, registry: Any) -> Any:
    from rllm_core.plugins import UnknownPluginError, get_registry

    registry = registry if registry is not None else get_registry()
    try:
        return registry.get("estimator", name).obj
    except UnknownPluginError as exc:
        where = f"algorithm.estimator_map.{role}" if role in algorithm.estimator_map else "algorithm.adv_estimator"
        raise UnknownPluginError(f"{where}: {exc}") from None


def _wants(fn: Any, keyword: str) -> bool:
    """True when the estimator names ``keyword`` in its signature (not merely ``**kwargs``)."""
    import inspect

    try:
        return keyword in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _check_precomputed(groups: Sequence[TrajectoryGroup]) -> None:
    """In precomputed mode a scalar advantage is an error: name the episode and the step."""
    for group in groups:
        for j, trajectory in enumerate(group.trajectories):
            for i, step in enumerate(trajectory.steps):
                adv = step.advantage
                if adv is not None and not isinstance(adv, list):
                    raise ValueError(
                        f"algorithm.use_precomputed_advantage is on, but episode {_episode_label(group, j)} "
                        f"role {group.role!r} step {i} carries a scalar advantage ({adv!r}); precomputed "
                        "advantages must be lists with one float per response token"
                    )


def _apply_precomputed(
    group: TrajectoryGroup, masked: list[bool], wrong: list[str], per_traj: list[float]
) -> tuple[int, int]:
    """Keep each step's per-token list; fix wrong lengths to zeros. Returns (steps, masked trajectories)."""
    steps = n_masked = 0
    for j, trajectory in enumerate(group.trajectories):
        total = 0.0
        count = 0
        for i, step in enumerate(trajectory.steps):
            steps += 1
            adv = step.advantage
            n_tokens = len(step.response_ids)
            if masked[j]:
                step.advantage = [0.0] * n_tokens
                continue
            if len(adv) != n_tokens:
                wrong.append(
                    f"episode {_episode_label(group, j)} role {group.role!r} step {i} "
                    f"({len(adv)} advantages for {n_tokens} response tokens)"
                )
                step.advantage = [0.0] * n_tokens
                count += n_tokens
                continue
            total += sum(adv)
            count += n_tokens
        n_masked += masked[j]
        per_traj.append(total / count if count else 0.0)
    return steps, n_masked


def compute_advantages(
    groups: Iterable[TrajectoryGroup], algorithm: AlgorithmConfig, registry: Any = None
) -> dict[str, float]:
    """Write ``step.advantage`` on every step of ``groups``; return per-role metrics.

    Per role the estimator is ``algorithm.estimator_map[role]`` else ``algorithm.adv_estimator``,
    looked up in ``registry`` (default: the process registry; ``module:attr`` names work). Every
    step of a trajectory gets the trajectory's advantage as a float (``stepwise_mode: broadcast``).

    Trajectories of episodes that ended with a reason in ``algorithm.filter.mask_termination_reasons``
    get advantage 0 (the estimator still sees their reward as part of the group baseline).

    With ``algorithm.use_precomputed_advantage``: a group whose steps all carry per-token lists
    keeps them (a list whose length differs from ``response_ids`` becomes zeros, with a warning);
    other groups get the estimator; a scalar advantage raises ``ValueError``. Without it, steps that
    already carry an advantage are overwritten, with one warning giving the count.
    """
    import numpy as np

    groups = list(groups)
    precomputed_mode = algorithm.use_precomputed_advantage
    if precomputed_mode:
        _check_precomputed(groups)  # before anything is written
    reasons = set(algorithm.filter.mask_termination_reasons)

    roles: dict[str, tuple[list[TrajectoryGroup], list[TrajectoryGroup]]] = {}
    for group in groups:
        bucket = roles.get(group.role)
        if bucket is None:
            bucket = roles[group.role] = ([], [])
        bucket[1 if precomputed_mode and _says_precomputed(group) else 0].append(group)

    metrics: dict[str, float] = {}
    wrong_length: list[str] = []
    overwritten = 0
    for role, (est_groups, pre_groups) in roles.items():
        # Flatten every estimator group of the role into one reward array.
        rewards: list[float] = []
        trajectories: list[Any] = []
        sizes: list[int] = []
        masked: list[bool] = []
        correct_groups: list[list[bool]] = []
        for group in est_groups:
            trajs = group.trajectories
            trajectories.extend(trajs)
            rewards.extend([t.total_reward for t in trajs])
            sizes.append(len(trajs))
            if reasons:
                masked.extend(_masked(group, reasons))
            correct_groups.append(_correct(group))

        n_steps = 0
        n_masked = 0
        adv_values: Any = np.zeros(0)
        if est_groups:
            name = algorithm.estimator_map.get(role, algorithm.adv_estimator)
            fn = _resolve_estimator(name, role, algorithm, registry)
            reward_arr = np.asarray(rewards, dtype=np.float64)
            group_ids = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes)
            extra: dict[str, Any] = {}
            if _wants(fn, "token_counts"):  # a walk over every step: only for estimators that use it
                extra["token_counts"] = np.fromiter(
                    (sum(len(s.response_ids) for s in t.steps) for t in trajectories), np.float64, len(trajectories)
                )
            out = fn(
                reward_arr,
                group_ids,
                len(sizes),
                norm_adv_by_std=algorithm.norm_adv_by_std,
                eps=EPS,
                std_ddof=1 if algorithm.std_unbiased else 0,
                **extra,
            )
            adv_values = np.asarray(out, dtype=np.float64)
            if adv_values.shape != reward_arr.shape:
                raise ValueError(
                    f"advantage estimator {name!r} (role {role!r}) returned shape {adv_values.shape}; "
                    f"expected {reward_arr.shape} (one advantage per trajectory)"
                )
            if not np.isfinite(adv_values).all():
                raise ValueError(f"advantage estimator {name!r} (role {role!r}) returned non-finite advantages")
            if reasons:
                mask = np.asarray(masked, dtype=bool)
                n_masked = int(mask.sum())
                if n_masked:
                    adv_values = np.where(mask, 0.0, adv_values)
            # The one per-step loop: broadcast each trajectory's advantage onto its steps. For plain
            # ``Step``s (no assignment validation, not frozen) write what pydantic's __setattr__
            # would write, without its per-call dispatch: half the cost of this loop.
            fast_type = Step if _plain_setattr(Step) else None
            for trajectory, value in zip(trajectories, adv_values.tolist(), strict=True):
                steps = trajectory.steps
                n_steps += len(steps)
                for step in steps:
                    if type(step) is fast_type:
                        fields = step.__dict__
                        if fields["advantage"] is not None:
                            overwritten += 1
                        fields["advantage"] = value
                        step.__pydantic_fields_set__.add("advantage")
                    else:
                        if step.advantage is not None:
                            overwritten += 1
                        step.advantage = value

        pre_rewards: list[float] = []
        pre_adv: list[float] = []
        for group in pre_groups:
            pre_rewards.extend(_rewards(group))
            correct_groups.append(_correct(group))
            s, m = _apply_precomputed(group, _masked(group, reasons), wrong_length, pre_adv)
            n_steps += s
            n_masked += m

        all_rewards = np.asarray(rewards + pre_rewards, dtype=np.float64)
        all_adv = np.concatenate([adv_values, np.asarray(pre_adv, dtype=np.float64)])
        _stats(np, all_rewards, f"{role}/reward", metrics)
        _stats(np, all_adv, f"{role}/advantage", metrics)
        n_groups = len(correct_groups)
        solved_all = sum(1 for c in correct_groups if c and all(c))
        solved_none = sum(1 for c in correct_groups if not any(c))
        denom = max(n_groups, 1)
        metrics[f"{role}/solve_all_frac"] = solved_all / denom
        metrics[f"{role}/solve_none_frac"] = solved_none / denom
        metrics[f"{role}/solve_partial_frac"] = (n_groups - solved_all - solved_none) / denom if n_groups else 0.0
        metrics[f"{role}/groups"] = float(n_groups)
        metrics[f"{role}/precomputed_groups"] = float(len(pre_groups))
        metrics[f"{role}/trajectories"] = float(all_rewards.size)
        metrics[f"{role}/steps"] = float(n_steps)
        metrics[f"{role}/masked_trajectories"] = float(n_masked)

    if wrong_length:
        listed = "; ".join(wrong_length[:_MAX_LISTED])
        more = f"; and {len(wrong_length) - _MAX_LISTED} more" if len(wrong_length) > _MAX_LISTED else ""
        warnings.warn(
            f"{len(wrong_length)} precomputed per-token advantage list(s) had the wrong length and were "
            f"replaced by zeros: {listed}{more}",
            RuntimeWarning,
            stacklevel=2,
        )
    if overwritten:
        warnings.warn(
            f"{overwritten} step(s) already carried an advantage and were overwritten by the estimator; "
            "set algorithm.use_precomputed_advantage=true to keep per-token advantages",
            RuntimeWarning,
            stacklevel=2,
        )
    return metrics
