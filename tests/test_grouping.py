"""Default grouping by (task_id, role) and the built-in grouping hook."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from rllm_core.builtins import grouping as builtin_grouping
from rllm_core.grouping import group_episodes
from rllm_core.hookspecs import hookimpl
from rllm_core.plugins import HookRunner
from rllm_core.types import Episode, Step, Trajectory, TrajectoryGroup


def episode(task_id: str, rollout_idx: int, *roles: str, task=None) -> Episode:
    return Episode(
        task=task,
        task_id=task_id,
        rollout_idx=rollout_idx,
        trajectories=[
            Trajectory(name=role, steps=[Step()], reward=float(rollout_idx)) for role in roles or ("solver",)
        ],
    )


def test_same_text_different_ids_never_merge():
    episodes = [episode("q1", 0, task="What is 2+2?"), episode("q2", 0, task="What is 2+2?")]
    groups = group_episodes(episodes)
    assert [(g.task_id, len(g.trajectories)) for g in groups] == [("q1", 1), ("q2", 1)]


def test_ids_with_separators_do_not_collide():
    # A string key like f"{task_id}:{role}" would merge these two; the tuple key must not.
    episodes = [episode("a:b", 0, "c"), episode("a", 0, "b:c"), episode("a:b", 1, "c")]
    groups = group_episodes(episodes)
    assert [(g.task_id, g.role, len(g.trajectories)) for g in groups] == [("a:b", "c", 2), ("a", "b:c", 1)]


@settings(max_examples=50, deadline=None)
@given(task_ids=st.lists(st.text(), min_size=1, max_size=6), n=st.integers(1, 4))
def test_any_task_id_gets_one_group_per_id(task_ids, n):
    episodes = [episode(t, i) for i in range(n) for t in task_ids]
    groups = group_episodes(episodes)
    distinct = list(dict.fromkeys(task_ids))
    assert [g.task_id for g in groups] == distinct
    for g in groups:
        assert len(g.trajectories) == n * task_ids.count(g.task_id)
        assert all(ep.task_id == g.task_id for ep in g.episodes)


def test_roles_are_separate_groups():
    episodes = [episode("t", i, "solver", "judge") for i in range(3)]
    groups = group_episodes(episodes)
    assert [(g.task_id, g.role) for g in groups] == [("t", "solver"), ("t", "judge")]
    assert all(len(g.trajectories) == 3 for g in groups)
    assert all(t.name == g.role for g in groups for t in g.trajectories)


def test_order_is_first_seen_and_episodes_are_aligned():
    episodes = [episode("b", 0), episode("a", 0), episode("b", 2), episode("a", 1), episode("b", 1)]
    groups = group_episodes(episodes)
    assert [g.task_id for g in groups] == ["b", "a"]
    assert [ep.rollout_idx for ep in groups[0].episodes] == [0, 2, 1]
    for g in groups:
        assert len(g.episodes) == len(g.trajectories)
        for ep, traj in zip(g.episodes, g.trajectories, strict=True):
            assert any(t is traj for t in ep.trajectories)


def test_groups_share_the_episode_objects():
    ep = episode("t", 0)
    (group,) = group_episodes([ep])
    assert isinstance(group, TrajectoryGroup)
    assert group.trajectories[0] is ep.trajectories[0]
    assert group.episodes[0] is ep


def test_empty_input_and_episode_without_trajectories():
    assert group_episodes([]) == []
    assert group_episodes([Episode(task_id="x")]) == []


class UserGrouping:
    """Puts every trajectory in one group."""

    @hookimpl
    def trajectory_grouping_hook(self, episodes, config):
        trajs = [t for ep in episodes for t in ep.trajectories]
        return [TrajectoryGroup(task_id="all", role="all", trajectories=trajs)]


def test_builtin_hook_groups_by_task_and_role():
    runner = HookRunner([("rllm.grouping", builtin_grouping)])
    groups = asyncio.run(runner.call_first("trajectory_grouping_hook", episodes=[episode("a", 0)], config=None))
    assert [(g.task_id, g.role) for g in groups] == [("a", "solver")]


def test_user_grouping_hook_wins_over_builtin_whatever_the_order():
    episodes = [episode("a", 0), episode("b", 0)]
    for plugins in (
        [("rllm.grouping", builtin_grouping), ("user", UserGrouping())],
        [("user", UserGrouping()), ("rllm.grouping", builtin_grouping)],
    ):
        runner = HookRunner(plugins)
        groups = asyncio.run(runner.call_first("trajectory_grouping_hook", episodes=episodes, config=None))
        assert [g.task_id for g in groups] == ["all"]
