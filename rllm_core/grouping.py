"""Default grouping: trajectories of one role for one task form a :class:`TrajectoryGroup`.

``group_episodes(episodes)`` keys on ``(episode.task_id, trajectory.name)``. The key is the pair
itself, never a string built from it, so task ids may contain any character (``:`` included) and
two tasks with the same text but different ids never merge. Groups come out in the order their key
first appears; inside a group, trajectories keep the order of the episodes, and
``group.episodes[i]`` is the episode ``group.trajectories[i]`` came from.

The trainer reaches this through the ``trajectory_grouping_hook`` of the built-in
``rllm.grouping`` plugin (``rllm_core.builtins.grouping``), which runs last, so a user's hook wins.
"""

from __future__ import annotations

from collections.abc import Iterable

from rllm_core.types import Episode, TrajectoryGroup

__all__ = ["group_episodes"]


def group_episodes(episodes: Iterable[Episode]) -> list[TrajectoryGroup]:
    """Group trajectories by ``(task_id, role)`` in first-seen order, episodes aligned."""
    buckets: dict[tuple[str, str], tuple[list, list]] = {}
    get = buckets.get
    for episode in episodes:
        task_id = episode.task_id
        for trajectory in episode.trajectories:
            key = (task_id, trajectory.name)
            bucket = get(key)
            if bucket is None:
                bucket = buckets[key] = ([], [])
            bucket[0].append(trajectory)
            bucket[1].append(episode)
    # The members are already validated models; model_construct skips re-validating them.
    construct = TrajectoryGroup.model_construct
    return [
        construct(task_id=task_id, role=role, trajectories=trajectories, episodes=members)
        for (task_id, role), (trajectories, members) in buckets.items()
    ]
