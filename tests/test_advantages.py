"""Advantage estimators, the compute_advantages stage, filters and metrics."""

from __future__ import annotations

import math
import subprocess
import sys
import warnings
from typing import ClassVar

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ConfigDict, field_validator

from rllm_core.advantages import (
    BUILTIN_ESTIMATORS,
    compute_advantages,
    drgrpo,
    filter_groups,
    grpo,
    reinforce,
    reinforce_plus_plus,
    reinforce_plus_plus_baseline,
    rloo,
)
from rllm_core.config import AlgorithmConfig, FilterConfig, load_config
from rllm_core.grouping import group_episodes
from rllm_core.hookspecs import hookimpl
from rllm_core.plugins import UnknownPluginError, get_registry, registered
from rllm_core.types import Episode, Step, TerminationReason, Trajectory


def make_episode(
    task_id: str,
    rollout_idx: int,
    reward: float,
    *,
    role: str = "solver",
    n_steps: int = 2,
    n_tokens: int = 3,
    correct: bool | None = None,
    reason: TerminationReason = TerminationReason.ENV_DONE,
    advantage=None,
) -> Episode:
    steps = [
        Step(response_ids=list(range(n_tokens)), advantage=advantage() if callable(advantage) else advantage)
        for _ in range(n_steps)
    ]
    return Episode(
        task_id=task_id,
        rollout_idx=rollout_idx,
        trajectories=[Trajectory(name=role, steps=steps, reward=reward)],
        is_correct=reward > 0 if correct is None else correct,
        termination_reason=reason,
    )


def task_episodes(task_id: str, rewards: list[float], **kw) -> list[Episode]:
    return [make_episode(task_id, i, r, **kw) for i, r in enumerate(rewards)]


def step_advantages(episodes: list[Episode], role: str = "solver") -> list[list]:
    """Per trajectory, the advantages of its steps."""
    return [[s.advantage for s in t.steps] for ep in episodes for t in ep.trajectories if t.name == role]


# Two groups, A = [1, 2, 3] and B = [0, 4]: both means are 2.
REWARDS = np.array([1.0, 2.0, 3.0, 0.0, 4.0])
GROUP_IDS = np.array([0, 0, 0, 1, 1])


# ---------------------------------------------------------------------------------------------
# Estimators on arrays


def test_grpo_hand_computed_with_unbiased_std():
    # A = [1, 2, 3]: sample std 1; B = [0, 4]: sample std sqrt(8)
    expected = [-1.0, 0.0, 1.0, -2 / math.sqrt(8), 2 / math.sqrt(8)]
    np.testing.assert_allclose(grpo(REWARDS, GROUP_IDS, 2, norm_adv_by_std=True, eps=0.0), expected)


def test_grpo_population_std_is_selectable_and_larger_by_sqrt_n_over_n_minus_1():
    std_a = math.sqrt(2 / 3)
    expected = [-1 / std_a, 0.0, 1 / std_a, -1.0, 1.0]
    out = grpo(REWARDS, GROUP_IDS, 2, norm_adv_by_std=True, eps=0.0, std_ddof=0)
    np.testing.assert_allclose(out, expected)
    unbiased = grpo(REWARDS, GROUP_IDS, 2, norm_adv_by_std=True, eps=0.0)
    np.testing.assert_allclose(out[:3], unbiased[:3] * math.sqrt(3 / 2))  # n = 3
    np.testing.assert_allclose(out[3:], unbiased[3:] * math.sqrt(2 / 1))  # n = 2


def test_grpo_without_std_is_mean_centred():
    out = grpo(REWARDS, GROUP_IDS, 2, norm_adv_by_std=False, eps=1e-6)
    np.testing.assert_allclose(out, [-1.0, 0.0, 1.0, -2.0, 2.0])


def test_grpo_eps_is_added_to_std():
    out = grpo(np.array([0.0, 2.0]), np.array([0, 0]), 1, norm_adv_by_std=True, eps=1.0)
    np.testing.assert_allclose(out, [-1 / (math.sqrt(2) + 1), 1 / (math.sqrt(2) + 1)])  # std sqrt(2), plus eps 1


def test_drgrpo_ignores_norm_flag():
    expected = [-1.0, 0.0, 1.0, -2.0, 2.0]
    for flag in (True, False):
        np.testing.assert_allclose(drgrpo(REWARDS, GROUP_IDS, 2, norm_adv_by_std=flag, eps=1e-6), expected)


def test_rloo_hand_computed():
    # A: 1 - (2+3)/2 = -1.5, 2 - 2 = 0, 3 - 1.5 = 1.5; B: 0 - 4 = -4, 4 - 0 = 4
    out = rloo(REWARDS, GROUP_IDS, 2, norm_adv_by_std=True, eps=1e-6)
    np.testing.assert_allclose(out, [-1.5, 0.0, 1.5, -4.0, 4.0])


def test_rloo_group_of_one_is_zero():
    out = rloo(np.array([5.0, 1.0, 3.0]), np.array([0, 1, 1]), 2, norm_adv_by_std=False, eps=1e-6)
    np.testing.assert_allclose(out, [0.0, -2.0, 2.0])


def test_reinforce_is_raw_reward_and_a_copy():
    rewards = REWARDS.copy()
    out = reinforce(rewards, GROUP_IDS, 2, norm_adv_by_std=True, eps=1e-6)
    np.testing.assert_allclose(out, REWARDS)
    out[0] = 99.0
    assert rewards[0] == 1.0


def test_reinforce_plus_plus_baseline_whitens_over_tokens():
    # centred: [-1, 0, 1, -2, 2]; with 1, 1, 1, 3, 1 tokens the token values are
    # [-1, 0, 1, -2, -2, -2, 2]: mean -4/7, unbiased variance over 7 tokens
    tokens = np.array([-1.0, 0.0, 1.0, -2.0, -2.0, -2.0, 2.0])
    mu, var = tokens.mean(), tokens.var(ddof=1)
    centred = np.array([-1.0, 0.0, 1.0, -2.0, 2.0])
    out = reinforce_plus_plus_baseline(
        REWARDS, GROUP_IDS, 2, norm_adv_by_std=True, eps=0.0, token_counts=np.array([1, 1, 1, 3, 1])
    )
    np.testing.assert_allclose(out, (centred - mu) / np.sqrt(var + 1e-8))


def test_reinforce_plus_plus_baseline_without_token_counts_whitens_trajectories():
    centred = np.array([-1.0, 0.0, 1.0, -2.0, 2.0])
    out = reinforce_plus_plus_baseline(REWARDS, GROUP_IDS, 2, norm_adv_by_std=True, eps=0.0)
    np.testing.assert_allclose(out, centred / np.sqrt(centred.var(ddof=1) + 1e-8))


def test_reinforce_plus_plus_gives_uniform_groups_a_signal_against_the_batch():
    # group A all fail, group B all succeed: GRPO gives both zeros, REINFORCE++ does not
    rewards, ids = np.array([0.0, 0.0, 1.0, 1.0]), np.array([0, 0, 1, 1])
    assert not grpo(rewards, ids, 2).any()
    out = reinforce_plus_plus(rewards, ids, 2)
    np.testing.assert_allclose(out, (rewards - 0.5) / np.sqrt(rewards.var(ddof=1) + 1e-8))


def test_group_of_one_gets_its_raw_reward_except_rloo():
    rewards, ids = np.array([7.0, -2.0, 1.0, 3.0]), np.array([0, 1, 2, 2])
    h = 1 / math.sqrt(2)  # the group [1, 3]: centred +-1 over the unbiased std sqrt(2)
    np.testing.assert_allclose(grpo(rewards, ids, 3, norm_adv_by_std=True, eps=0.0), [7.0, -2.0, -h, h])
    np.testing.assert_allclose(drgrpo(rewards, ids, 3, eps=0.0), [7.0, -2.0, -1.0, 1.0])
    np.testing.assert_allclose(rloo(rewards, ids, 3, eps=0.0), [0.0, 0.0, -2.0, 2.0])
    # whitened over the batch: centred [7, -2, -1, 1], their mean subtracted, unbiased std
    centred = np.array([7.0, -2.0, -1.0, 1.0])
    out = reinforce_plus_plus_baseline(rewards, ids, 3, eps=0.0)
    np.testing.assert_allclose(out, (centred - centred.mean()) / np.sqrt(centred.var(ddof=1) + 1e-8))


# Reference implementations written from the definitions, group by group, with no helper of the
# code under test: the vectorised estimators must agree with them on any input.


def reference_grpo(groups, norm, ddof):
    out = []
    for g in groups:
        g = np.array(g)
        if len(g) == 1:
            out.extend(g / (1 + 1e-6) if norm else g)  # nothing to compare with: mean 0, std 1
            continue
        centred = g - g.mean()
        out.extend(centred / (g.std(ddof=ddof) + 1e-6) if norm else centred)
    return np.array(out)


def reference_rloo(groups):
    out = []
    for g in groups:
        for i, r in enumerate(g):
            others = g[:i] + g[i + 1 :]
            out.append(r - sum(others) / len(others) if others else 0.0)
    return np.array(out)


def reference_rpp(groups, counts):
    centred = []
    for g in groups:
        g = np.array(g)
        centred.extend(g - g.mean() if len(g) > 1 else g)
    centred = np.array(centred)
    tokens = np.repeat(centred, counts)  # each trajectory's value on each of its tokens
    return (centred - tokens.mean()) / np.sqrt(tokens.var(ddof=1) + 1e-8)


@settings(max_examples=60, deadline=None)
@given(
    groups=st.lists(st.lists(st.integers(-5, 5).map(float), min_size=1, max_size=6), min_size=1, max_size=6),
    norm=st.booleans(),
    ddof=st.sampled_from([0, 1]),
    data=st.data(),
)
def test_estimators_match_independent_references(groups, norm, ddof, data):
    rewards, ids = flatten(groups)
    n = len(groups)
    np.testing.assert_allclose(
        grpo(rewards, ids, n, norm_adv_by_std=norm, eps=1e-6, std_ddof=ddof),
        reference_grpo(groups, norm, ddof),
        atol=1e-9,
    )
    np.testing.assert_allclose(drgrpo(rewards, ids, n), reference_grpo(groups, False, ddof), atol=1e-9)
    np.testing.assert_allclose(rloo(rewards, ids, n), reference_rloo(groups), atol=1e-9)
    np.testing.assert_allclose(reinforce(rewards, ids, n), rewards)
    counts = np.array(data.draw(st.lists(st.integers(1, 4), min_size=len(rewards), max_size=len(rewards))))
    if counts.sum() > 1:
        np.testing.assert_allclose(
            reinforce_plus_plus_baseline(rewards, ids, n, token_counts=counts),
            reference_rpp(groups, counts),
            atol=1e-6,
        )
        tokens = np.repeat(rewards, counts)  # REINFORCE++: no group baseline at all
        np.testing.assert_allclose(
            reinforce_plus_plus(rewards, ids, n, token_counts=counts),
            (rewards - tokens.mean()) / np.sqrt(tokens.var(ddof=1) + 1e-8),
            atol=1e-6,
        )


groups_strategy = st.lists(
    st.lists(st.floats(-100, 100, allow_nan=False), min_size=1, max_size=8), min_size=1, max_size=12
)


def flatten(groups: list[list[float]]):
    rewards = np.array([r for g in groups for r in g], dtype=np.float64)
    ids = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    return rewards, ids


@settings(max_examples=60, deadline=None)
@given(groups=groups_strategy, norm=st.booleans())
def test_every_estimator_is_finite_and_shape_preserving(groups, norm):
    rewards, ids = flatten(groups)
    for name, fn in BUILTIN_ESTIMATORS.items():
        out = fn(rewards, ids, len(groups), norm_adv_by_std=norm, eps=1e-6)
        assert out.shape == rewards.shape, name
        assert np.isfinite(out).all(), name


@settings(max_examples=60, deadline=None)
@given(groups=groups_strategy, norm=st.booleans())
def test_group_baselines_are_zero_mean_per_group(groups, norm):
    rewards, ids = flatten(groups)
    sizes = np.array([len(g) for g in groups])
    for fn in (grpo, drgrpo, rloo):
        out = fn(rewards, ids, len(groups), norm_adv_by_std=norm, eps=1e-6)
        sums = np.bincount(ids, weights=out, minlength=len(groups))
        assert np.allclose(sums[sizes > 1], 0.0, atol=1e-6), fn.__name__


@settings(max_examples=40, deadline=None)
@given(groups=groups_strategy)
def test_estimators_do_not_depend_on_group_order(groups):
    rewards, ids = flatten(groups)
    perm = np.random.default_rng(0).permutation(len(rewards))
    for name, fn in BUILTIN_ESTIMATORS.items():
        out = fn(rewards, ids, len(groups), norm_adv_by_std=True, eps=1e-6)
        out_perm = fn(rewards[perm], ids[perm], len(groups), norm_adv_by_std=True, eps=1e-6)
        np.testing.assert_allclose(out_perm, out[perm], atol=1e-9, err_msg=name)


# ---------------------------------------------------------------------------------------------
# compute_advantages


def test_builtin_estimators_are_registered_by_name():
    names = get_registry().names("estimator")
    for name in ("grpo", "drgrpo", "rloo", "reinforce", "reinforce_plus_plus", "reinforce_plus_plus_baseline"):
        assert name in names


def test_broadcast_puts_trajectory_advantage_on_every_step():
    episodes = task_episodes("a", [1.0, 0.0], n_steps=3) + task_episodes("b", [0.0, 2.0, 4.0], n_steps=2)
    compute_advantages(group_episodes(episodes), AlgorithmConfig(norm_adv_by_std=False))
    assert step_advantages(episodes) == [[0.5] * 3, [-0.5] * 3, [-2.0] * 2, [0.0] * 2, [2.0] * 2]
    assert all(type(a) is float for traj in step_advantages(episodes) for a in traj)


def test_norm_adv_by_std_and_std_unbiased_switches():
    # rewards [0, 4]: centred [-2, 2], unbiased std sqrt(8), population std 2
    on, off, population = (task_episodes("a", [0.0, 4.0]) for _ in range(3))
    compute_advantages(group_episodes(on), AlgorithmConfig(norm_adv_by_std=True))
    compute_advantages(group_episodes(off), AlgorithmConfig(norm_adv_by_std=False))
    compute_advantages(group_episodes(population), AlgorithmConfig(std_unbiased=False))
    assert step_advantages(on)[1][0] == pytest.approx(2 / math.sqrt(8), abs=1e-5)
    assert step_advantages(off)[1][0] == pytest.approx(2.0)
    assert step_advantages(population)[1][0] == pytest.approx(1.0, abs=1e-5)


def test_reinforce_plus_plus_baseline_stage_weights_trajectories_by_their_tokens():
    # the stage passes each trajectory's response-token count: 2 steps x 1 token vs 2 steps x 3 tokens
    short = make_episode("a", 0, 1.0, n_steps=2, n_tokens=1)
    long = make_episode("a", 1, 0.0, n_steps=2, n_tokens=3)
    other = task_episodes("b", [0.0, 2.0], n_steps=2, n_tokens=1)
    episodes = [short, long, *other]
    compute_advantages(group_episodes(episodes), AlgorithmConfig(adv_estimator="reinforce_plus_plus_baseline"))
    tokens = np.repeat([0.5, -0.5, -1.0, 1.0], [2, 6, 2, 2])
    expected = (np.array([0.5, -0.5, -1.0, 1.0]) - tokens.mean()) / np.sqrt(tokens.var(ddof=1) + 1e-8)
    np.testing.assert_allclose([traj[0] for traj in step_advantages(episodes)], expected)


def test_trajectory_reward_none_uses_sum_of_step_rewards():
    episodes = []
    for i, step_rewards in enumerate(([1.0, 1.0], [0.0, 0.0])):
        steps = [Step(reward=r) for r in step_rewards]
        episodes.append(Episode(task_id="t", rollout_idx=i, trajectories=[Trajectory(name="solver", steps=steps)]))
    compute_advantages(group_episodes(episodes), AlgorithmConfig(adv_estimator="reinforce"))
    assert step_advantages(episodes) == [[2.0, 2.0], [0.0, 0.0]]


def test_per_role_estimator_map():
    episodes = []
    for i, (solver_r, judge_r) in enumerate([(1.0, 3.0), (0.0, 5.0)]):
        episodes.append(
            Episode(
                task_id="t",
                rollout_idx=i,
                trajectories=[
                    Trajectory(name="solver", steps=[Step()], reward=solver_r),
                    Trajectory(name="judge", steps=[Step()], reward=judge_r),
                ],
            )
        )
    algo = AlgorithmConfig(adv_estimator="drgrpo", estimator_map={"judge": "reinforce"})
    compute_advantages(group_episodes(episodes), algo)
    assert step_advantages(episodes, "solver") == [[0.5], [-0.5]]
    assert step_advantages(episodes, "judge") == [[3.0], [5.0]]


class ConstantEstimatorPlugin:
    """A third-party estimator: advantage = 10 * reward + group index."""

    @hookimpl
    def register_advantage_estimators(self, register):
        def scaled(rewards, group_ids, n_groups, *, norm_adv_by_std, eps, **kwargs):
            return 10.0 * rewards + group_ids

        register("scaled_test", scaled)


def test_custom_estimator_from_plugin_selected_by_name_in_config():
    config = load_config({"algorithm": {"adv_estimator": "scaled_test"}})
    episodes = task_episodes("a", [1.0, 2.0]) + task_episodes("b", [3.0])
    with registered(ConstantEstimatorPlugin(), name="test-scaled") as registry:
        assert "scaled_test" in registry.names("estimator")
        compute_advantages(group_episodes(episodes), config.algorithm)
    assert [traj[0] for traj in step_advantages(episodes)] == [10.0, 20.0, 31.0]


def test_estimator_by_module_attr_path():
    episodes = task_episodes("a", [1.0, 2.0, 3.0])
    compute_advantages(group_episodes(episodes), AlgorithmConfig(adv_estimator="rllm_core.advantages:rloo"))
    assert [traj[0] for traj in step_advantages(episodes)] == [-1.5, 0.0, 1.5]


def test_unknown_estimator_names_the_config_field():
    episodes = task_episodes("a", [1.0, 2.0])
    with pytest.raises(UnknownPluginError, match=r"algorithm\.estimator_map\.judge.*'nope'"):
        compute_advantages(
            group_episodes(task_episodes("a", [1.0], role="judge")), AlgorithmConfig(estimator_map={"judge": "nope"})
        )
    with pytest.raises(UnknownPluginError, match=r"algorithm\.adv_estimator.*'grpoo'.*grpo"):
        compute_advantages(group_episodes(episodes), AlgorithmConfig(adv_estimator="grpoo"))


class BadShapePlugin:
    @hookimpl
    def register_advantage_estimators(self, register):
        register("bad_shape", lambda rewards, group_ids, n_groups, **kw: rewards[:-1])
        register("bad_nan", lambda rewards, group_ids, n_groups, **kw: rewards * np.nan)


def test_estimator_returning_wrong_shape_or_nan_is_named():
    with registered(BadShapePlugin(), name="test-bad"):
        with pytest.raises(ValueError, match=r"'bad_shape'.*shape"):
            compute_advantages(
                group_episodes(task_episodes("a", [1.0, 2.0])), AlgorithmConfig(adv_estimator="bad_shape")
            )
        with pytest.raises(ValueError, match=r"'bad_nan'.*non-finite"):
            compute_advantages(group_episodes(task_episodes("a", [1.0, 2.0])), AlgorithmConfig(adv_estimator="bad_nan"))


# ---------------------------------------------------------------------------------------------
# Precomputed advantages


def test_precomputed_lists_are_kept():
    episodes = task_episodes("a", [1.0, 0.0], n_tokens=3, advantage=lambda: [0.1, 0.2, 0.3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compute_advantages(group_episodes(episodes), AlgorithmConfig(use_precomputed_advantage=True))
    assert step_advantages(episodes) == [[[0.1, 0.2, 0.3]] * 2] * 2


def test_precomputed_wrong_length_becomes_zeros_with_warning():
    episodes = task_episodes("task:7", [1.0, 0.0], n_tokens=3, advantage=lambda: [0.1, 0.2, 0.3])
    episodes[1].trajectories[0].steps[1].advantage = [0.5, 0.5]
    with pytest.warns(RuntimeWarning, match=r"task_id='task:7', rollout_idx=1\).*step 1.*2 advantages for 3"):
        compute_advantages(group_episodes(episodes), AlgorithmConfig(use_precomputed_advantage=True))
    assert episodes[1].trajectories[0].steps[1].advantage == [0.0, 0.0, 0.0]
    assert episodes[1].trajectories[0].steps[0].advantage == [0.1, 0.2, 0.3]


def test_precomputed_mode_scalar_is_error_naming_episode_and_step():
    good = task_episodes("other", [1.0, 0.0])
    bad = task_episodes("t1", [1.0, 0.0], n_steps=3, advantage=lambda: [0.0, 0.0, 0.0])
    bad[1].trajectories[0].steps[2].advantage = 0.5
    with pytest.raises(ValueError, match=r"task_id='t1', rollout_idx=1\).*step 2.*scalar"):
        compute_advantages(group_episodes(good + bad), AlgorithmConfig(use_precomputed_advantage=True))
    # nothing was written before the error
    assert step_advantages(good) == [[None, None], [None, None]]


def test_normal_mode_overwrite_warns_once_with_count():
    episodes = task_episodes("a", [1.0, 0.0], n_steps=3, advantage=lambda: [1.0, 1.0, 1.0])
    episodes += task_episodes("b", [1.0, 0.0], n_steps=3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        compute_advantages(group_episodes(episodes), AlgorithmConfig(norm_adv_by_std=False))
    messages = [str(w.message) for w in caught if "overwritten" in str(w.message)]
    assert len(messages) == 1
    assert messages[0].startswith("6 step(s)")
    assert step_advantages(episodes)[0] == [0.5, 0.5, 0.5]


def test_mixed_groups_precomputed_and_estimator():
    pre = task_episodes("pre", [1.0, 1.0], n_tokens=2, advantage=lambda: [0.25, -0.25])
    est = task_episodes("est", [1.0, 0.0], n_tokens=2)
    metrics = compute_advantages(
        group_episodes(pre + est), AlgorithmConfig(use_precomputed_advantage=True, norm_adv_by_std=False)
    )
    assert step_advantages(pre) == [[[0.25, -0.25]] * 2] * 2
    assert step_advantages(est) == [[0.5, 0.5], [-0.5, -0.5]]
    assert metrics["solver/precomputed_groups"] == 1.0
    assert metrics["solver/groups"] == 2.0


def test_partly_precomputed_group_gets_the_estimator():
    episodes = task_episodes("a", [1.0, 0.0], n_tokens=2)
    episodes[0].trajectories[0].steps[0].advantage = [1.0, 1.0]
    with pytest.warns(RuntimeWarning, match="1 step"):
        compute_advantages(
            group_episodes(episodes), AlgorithmConfig(use_precomputed_advantage=True, norm_adv_by_std=False)
        )
    assert step_advantages(episodes) == [[0.5, 0.5], [-0.5, -0.5]]


# ---------------------------------------------------------------------------------------------
# Filters and masking


def test_filter_drops_uniform_reward_groups():
    groups = group_episodes(
        task_episodes("same", [1.0, 1.0, 1.0]) + task_episodes("diff", [1.0, 0.0]) + task_episodes("zero", [0.0, 0.0])
    )
    kept, metrics = filter_groups(groups, FilterConfig(drop_uniform_rewards=True))
    assert [g.task_id for g in kept] == ["diff"]
    assert metrics == {
        "filter/groups_in": 3.0,
        "filter/groups_kept": 1.0,
        "filter/dropped_small": 0.0,
        "filter/dropped_uniform": 2.0,
    }


def test_filter_keeps_uniform_groups_when_switched_off():
    groups = group_episodes(task_episodes("same", [1.0, 1.0]))
    kept, _ = filter_groups(groups, FilterConfig(drop_uniform_rewards=False))
    assert kept == groups


def test_filter_keeps_uniform_group_with_precomputed_advantages():
    groups = group_episodes(task_episodes("opsd", [0.0, 0.0], n_tokens=1, advantage=lambda: [0.3]))
    kept, _ = filter_groups(groups, FilterConfig(drop_uniform_rewards=True))
    assert len(kept) == 1


def test_filter_min_group_size():
    groups = group_episodes(task_episodes("big", [1.0, 0.0, 1.0]) + task_episodes("small", [1.0, 0.0]))
    kept, metrics = filter_groups(groups, FilterConfig(min_group_size=3))
    assert [g.task_id for g in kept] == ["big"]
    assert metrics["filter/dropped_small"] == 1.0


def test_mask_termination_reasons_zero_advantage_but_keep_baseline():
    episodes = task_episodes("a", [1.0, 0.0, 0.0, 0.0])
    episodes[0].termination_reason = TerminationReason.MAX_RESPONSE_LENGTH
    algo = AlgorithmConfig(norm_adv_by_std=False, filter=FilterConfig(mask_termination_reasons=["max_response_length"]))
    metrics = compute_advantages(group_episodes(episodes), algo)
    # the baseline is still 0.25 (masked reward counted), the masked trajectory gets 0
    assert step_advantages(episodes) == [[0.0, 0.0], [-0.25, -0.25], [-0.25, -0.25], [-0.25, -0.25]]
    assert metrics["solver/masked_trajectories"] == 1.0


def test_mask_applies_to_precomputed_groups():
    episodes = task_episodes("a", [1.0, 0.0], n_tokens=2, advantage=lambda: [0.5, 0.5])
    episodes[1].termination_reason = TerminationReason.TIMEOUT
    algo = AlgorithmConfig(use_precomputed_advantage=True, filter=FilterConfig(mask_termination_reasons=["timeout"]))
    compute_advantages(group_episodes(episodes), algo)
    assert step_advantages(episodes) == [[[0.5, 0.5]] * 2, [[0.0, 0.0]] * 2]


# ---------------------------------------------------------------------------------------------
# Metrics


METRIC_SUFFIXES = [
    "reward/mean",
    "reward/std",
    "reward/min",
    "reward/max",
    "advantage/mean",
    "advantage/std",
    "advantage/min",
    "advantage/max",
    "solve_all_frac",
    "solve_none_frac",
    "solve_partial_frac",
    "groups",
    "precomputed_groups",
    "trajectories",
    "steps",
    "masked_trajectories",
]


def test_metrics_per_role_keys_and_values():
    episodes = (
        task_episodes("all", [1.0, 1.0], n_steps=1)
        + task_episodes("none", [0.0, 0.0], n_steps=1)
        + task_episodes("part", [1.0, 0.0], n_steps=1)
        + task_episodes("part2", [0.0, 3.0], n_steps=1)
        + task_episodes("j", [2.0], role="judge", n_steps=4)
    )
    metrics = compute_advantages(group_episodes(episodes), AlgorithmConfig(adv_estimator="reinforce"))
    assert set(metrics) == {f"{role}/{s}" for role in ("solver", "judge") for s in METRIC_SUFFIXES}
    assert metrics["solver/solve_all_frac"] == 0.25
    assert metrics["solver/solve_none_frac"] == 0.25
    assert metrics["solver/solve_partial_frac"] == 0.5
    assert metrics["solver/groups"] == 4.0
    assert metrics["solver/trajectories"] == 8.0
    assert metrics["solver/steps"] == 8.0
    rewards = np.array([1, 1, 0, 0, 1, 0, 0, 3], dtype=float)
    assert metrics["solver/reward/mean"] == pytest.approx(rewards.mean())
    assert metrics["solver/reward/std"] == pytest.approx(rewards.std())
    assert metrics["solver/reward/max"] == 3.0
    assert metrics["solver/advantage/max"] == 3.0  # reinforce: advantage == reward
    assert metrics["judge/steps"] == 4.0
    assert metrics["judge/solve_all_frac"] == 1.0


def test_solve_fractions_use_is_correct_not_reward():
    episodes = task_episodes("a", [1.0, 1.0], correct=False)
    metrics = compute_advantages(group_episodes(episodes), AlgorithmConfig())
    assert metrics["solver/solve_none_frac"] == 1.0


def test_empty_input_gives_no_metrics():
    assert compute_advantages([], AlgorithmConfig()) == {}


# ---------------------------------------------------------------------------------------------
# Import cost


def test_importing_advantages_does_not_import_numpy():
    code = "import sys, rllm_core.advantages, rllm_core.grouping; print('numpy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_written_advantage_counts_as_set_field():
    episodes = task_episodes("a", [1.0, 0.0])
    compute_advantages(group_episodes(episodes), AlgorithmConfig())
    step = episodes[0].trajectories[0].steps[0]
    assert "advantage" in step.model_fields_set
    assert step.model_dump(exclude_unset=True)["advantage"] == step.advantage


class ValidatedStep(Step):
    """A Step subclass that validates assignment: the stage must go through pydantic for it."""

    model_config = ConfigDict(validate_assignment=True)
    seen: ClassVar[list] = []

    @field_validator("advantage")
    @classmethod
    def _record(cls, value):
        cls.seen.append(value)
        return value


def test_step_subclass_with_assignment_validation_is_validated():
    ValidatedStep.seen.clear()
    episodes = [
        Episode(task_id="t", rollout_idx=i, trajectories=[Trajectory(steps=[ValidatedStep(), Step()], reward=float(i))])
        for i in range(2)
    ]
    compute_advantages(group_episodes(episodes), AlgorithmConfig(adv_estimator="reinforce"))
    assert ValidatedStep.seen == [0.0, 1.0]
    assert step_advantages(episodes, "default") == [[0.0, 0.0], [1.0, 1.0]]
