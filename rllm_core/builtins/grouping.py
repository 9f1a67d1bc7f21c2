"""Built-in plugin ``rllm.grouping``: the default ``trajectory_grouping_hook``.

Runs last (``trylast``), so any grouping hook a user switches on answers first; this one groups
by ``(task_id, trajectory.name)`` (see :func:`rllm_core.grouping.group_episodes`).
"""

from __future__ import annotations

from typing import Any

from rllm_core.grouping import group_episodes
from rllm_core.hookspecs import hookimpl


@hookimpl(trylast=True)
def trajectory_grouping_hook(episodes: list, config: Any) -> list:
    """Group ``episodes`` by ``(task_id, role)``; ``config`` is unused."""
    return group_episodes(episodes)
