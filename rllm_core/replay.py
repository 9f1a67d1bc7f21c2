"""Replay of earlier successes for tasks the policy has stopped solving (``algorithm.replay``).

Self-imitation (Oh et al., 2018) in the form GRPO replay methods use (ExGRPO, RLEP): the trainer
keeps each task's latest correct episodes, and when a task's fresh group comes back with no
correct rollout, its last rollouts are replaced by copies of them. The group then has a success
to push up and failures to push down, instead of being dropped as uninformative.

A replayed copy is trained as a sample of the current policy: its steps lose their sampling
logprobs (the backend recomputes them, so the importance ratio starts at 1) and their sampling
temperature (it is trained at the run's). It is marked with ``REPLAYED_KEY`` in ``Episode.info``;
the trainer keeps marked episodes out of the ``train/`` metrics, exploration and the store itself,
so what is measured is what the policy generated.

Why it matters: a token that a family of facts needs and every other fact pushes down (the main
job's ``1 0`` for the sums of 10) may be sampled a handful of times early on and then never again;
GRPO only learns it if those few successes are pushed up more than once.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

from rllm_core.rows import TEMPERATURE_KEY
from rllm_core.types import Episode

__all__ = ["REPLAYED_KEY", "SuccessReplay", "fresh"]

REPLAYED_KEY = "replayed"
"""``Episode.info`` key marking a replayed copy of an earlier success."""


def fresh(episodes: Iterable[Episode]) -> list[Episode]:
    """The episodes that are not replayed copies."""
    return [e for e in episodes if not e.info.get(REPLAYED_KEY)]


class SuccessReplay:
    """The latest ``per_group`` correct episodes of up to ``max_tasks`` tasks (least recently
    updated dropped first), and the rule that puts them into all-wrong groups."""

    def __init__(self, per_group: int, max_tasks: int) -> None:
        if per_group < 1 or max_tasks < 1:
            raise ValueError("SuccessReplay: per_group and max_tasks must be at least 1")
        self.per_group = per_group
        self.max_tasks = max_tasks
        self._store: OrderedDict[str, list[Episode]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._store)

    def successes(self, task_id: str) -> list[Episode]:
        """The stored successes of ``task_id``, oldest first."""
        return list(self._store.get(task_id, ()))

    def observe(self, episodes: Iterable[Episode]) -> None:
        """Remember the correct episodes among ``episodes`` (replayed copies are ignored)."""
        for episode in episodes:
            if not episode.is_correct or episode.info.get(REPLAYED_KEY):
                continue
            kept = self._store.pop(episode.task_id, [])
            if not any(e is episode for e in kept):
                kept = [*kept, episode][-self.per_group :]
            self._store[episode.task_id] = kept
            while len(self._store) > self.max_tasks:
                self._store.popitem(last=False)

    def fill(self, group: list[Episode]) -> list[Episode]:
        """One task's rollouts, with its last ones replaced by replayed successes when none is correct.

        Unchanged when some rollout is correct, when the task has no stored success, or when the
        group has a single rollout (one replayed success would make it uniform again). At most
        ``len(group) - 1`` rollouts are replaced, so a failure stays to contrast with."""
        if len(group) < 2 or any(e.is_correct for e in group):
            return group
        stored = self._store.get(group[0].task_id)
        if not stored:
            return group
        k = min(len(stored), len(group) - 1)
        replaced = group[-k:]
        return group[:-k] + [_replayed(s, r) for s, r in zip(stored[-k:], replaced, strict=True)]

    def fill_all(self, episodes: list[Episode]) -> list[Episode]:
        """:meth:`fill` on each task's rollouts among ``episodes`` (grouped by task, first-seen order)."""
        by_task: dict[str, list[Episode]] = {}
        for episode in episodes:
            by_task.setdefault(episode.task_id, []).append(episode)
        filled = {task_id: self.fill(group) for task_id, group in by_task.items()}
        if all(filled[t] is group for t, group in by_task.items()):
            return episodes  # nothing replayed: the list as it came, in its order
        return [e for group in filled.values() for e in group]

    def state_dict(self) -> list[list[Any]]:
        """JSON-ready: ``[task_id, [episode dumps]]`` per task, least recently updated first."""
        return [[task_id, [e.model_dump(mode="json") for e in kept]] for task_id, kept in self._store.items()]

    def load_state_dict(self, state: list[list[Any]]) -> None:
        self._store = OrderedDict(
            (str(task_id), [Episode.model_validate(e) for e in kept][-self.per_group :]) for task_id, kept in state
        )
        while len(self._store) > self.max_tasks:
            self._store.popitem(last=False)


def _replayed(success: Episode, replaced: Episode) -> Episode:
    """A copy of ``success`` standing in for rollout ``replaced``: trained as the current policy's
    sample (no sampling logprobs or version, the run's temperature) and marked."""
    copy = success.model_copy(deep=True)
    for trajectory in copy.trajectories:
        for step in trajectory.steps:
            step.logprobs = []  # unknown: recomputed under the current weights
            step.temperature = None
            step.advantage = None  # the one it was trained with, when it was fresh
            step.weight_version = None  # a sample of no served version: not stale, and not fresh
    copy.info.pop(TEMPERATURE_KEY, None)
    copy.info[REPLAYED_KEY] = True
    copy.rollout_idx = replaced.rollout_idx
    return copy
