"""Token rows: hand-computed cases, loss weights per aggregation mode, and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rllm_core.rows import ROW_BREAK_KEY, build_rows
from rllm_core.types import Episode, Step, TerminationReason, Trajectory, TrajectoryGroup

S, U, A1, A2, T1, T2, B1 = 1, 2, 10, 11, 20, 21, 12  # the two-turn example of DESIGN.md section 4


def group(*trajectories: Trajectory, reasons=None, task_id: str = "t", role: str = "default") -> TrajectoryGroup:
    reasons = reasons or [TerminationReason.ENV_DONE] * len(trajectories)
    episodes = [
        Episode(task_id=task_id, rollout_idx=i, trajectories=[t], termination_reason=r)
        for i, (t, r) in enumerate(zip(trajectories, reasons, strict=True))
    ]
    for t in trajectories:
        t.name = role
    return TrajectoryGroup(task_id=task_id, role=role, trajectories=list(trajectories), episodes=episodes)


def two_turn(advantage=None, v1: int = 3, v2: int = 4, **step2) -> Trajectory:
    s1 = Step(prompt_ids=[S, U], response_ids=[A1, A2], logprobs=[-0.1, -0.2], weight_version=v1, advantage=advantage)
    s2 = Step(
        prompt_ids=[S, U, A1, A2, T1, T2],
        response_ids=[B1],
        logprobs=[-0.3],
        weight_version=v2,
        advantage=advantage,
        **step2,
    )
    return Trajectory(steps=[s1, s2])


def test_single_turn_row():
    step = Step(prompt_ids=[5, 6, 7], response_ids=[8, 9], logprobs=[-1.0, -2.0], advantage=0.5)
    rows = build_rows([group(Trajectory(steps=[step]))])
    rows.fill_advantages()
    assert rows.tokens == [[5, 6, 7, 8, 9]]
    assert rows.loss_mask.tolist() == [False, False, False, True, True]
    assert rows.logprobs.tolist() == [0, 0, 0, -1.0, -2.0]
    assert rows.advantages.tolist() == [0, 0, 0, 0.5, 0.5]
    assert rows.prompt_lens.tolist() == [3]
    assert rows.metrics["rows/count"] == 1 and rows.metrics["rows/per_trajectory"] == 1


def test_two_turns_that_extend_each_other_merge_into_one_row():
    rows = build_rows([group(two_turn(advantage=0.7))])
    rows.fill_advantages()
    assert rows.tokens == [[S, U, A1, A2, T1, T2, B1]]
    assert rows.loss_mask.astype(int).tolist() == [0, 0, 1, 1, 0, 0, 1]  # tool output T1 T2 masked
    assert rows.logprobs.tolist() == [0, 0, -0.1, -0.2, 0, 0, -0.3]
    assert rows.advantages.tolist() == [0, 0, 0.7, 0.7, 0, 0, 0.7]
    assert rows.step_start.tolist() == [2, 6] and rows.step_end.tolist() == [4, 7]
    assert (rows.version_min.tolist(), rows.version_max.tolist()) == ([3], [4])
    assert rows.metrics["rows/breaks"] == 0


def test_a_step_that_does_not_extend_the_row_starts_a_new_one_and_counts_the_break():
    traj = two_turn()
    traj.steps[1].prompt_ids = [S, U, A1, 99, T1, T2]  # turn 1 re-rendered differently
    rows = build_rows([group(traj)])
    assert rows.tokens == [[S, U, A1, A2], [S, U, A1, 99, T1, T2, B1]]
    assert rows.prompt_lens.tolist() == [2, 6]
    assert rows.metrics["rows/breaks/not_prefix"] == 1 and rows.metrics["rows/per_trajectory"] == 2
    assert rows.member_index.tolist() == [0, 0]  # both rows belong to the same trajectory


def test_a_workflow_can_force_a_break_and_name_its_reason():
    traj = two_turn()
    traj.steps[1].info[ROW_BREAK_KEY] = "compaction"
    rows = build_rows([group(traj)])
    assert len(rows) == 2 and rows.metrics["rows/breaks/compaction"] == 1


def test_a_row_takes_its_steps_sampling_temperature_and_breaks_where_it_changes():
    rows = build_rows([group(two_turn(temperature=2.0))])  # turn 1 unknown, turn 2 at 2.0: two rows
    assert len(rows) == 2 and rows.metrics["rows/breaks/temperature"] == 1
    assert math.isnan(rows.temperature[0]) and rows.temperature[1] == 2.0
    same = two_turn(temperature=2.0)
    same.steps[0].temperature = 2.0
    rows = build_rows([group(same)])
    assert len(rows) == 1 and rows.temperature.tolist() == [2.0]
    unknown = build_rows([group(two_turn())])  # no step says: the episode's mark, else NaN (the run's)
    assert len(unknown) == 1 and math.isnan(unknown.temperature[0])


def test_a_step_temperature_wins_over_the_episodes_mark():
    from rllm_core.rows import TEMPERATURE_KEY

    g = group(two_turn(), two_turn(temperature=0.5))
    for e in g.episodes:
        e.info[TEMPERATURE_KEY] = 2.0
    rows = build_rows([g])
    assert rows.temperature.tolist() == [2.0, 2.0, 0.5]  # the second trajectory breaks at its 0.5 turn


def test_per_token_advantages_are_placed_token_by_token():
    traj = two_turn()
    traj.steps[0].advantage = [1.0, 2.0]
    traj.steps[1].advantage = [3.0]
    rows = build_rows([group(traj)])
    rows.fill_advantages()
    assert rows.advantages.tolist() == [0, 0, 1.0, 2.0, 0, 0, 3.0]
    traj.steps[1].advantage = [3.0, 4.0]
    with pytest.raises(ValueError, match="2 entries for 1 response tokens"):
        rows.fill_advantages()


def test_truncated_rows_are_flagged_and_masked_as_overlong_on_request():
    cut = two_turn(finish_reason="length")
    fine = two_turn()
    rows = build_rows([group(cut, fine)])
    assert rows.truncated.tolist() == [True, False] and rows.metrics["rows/truncated"] == 1
    masked = build_rows([group(cut, fine)], mask_reasons=["max_response_length"])
    assert len(masked) == 1 and not masked.truncated.any()
    assert masked.metrics["rows/dropped_truncated"] == 1


def test_masked_termination_reasons_leave_the_trajectory_out():
    g = group(two_turn(), two_turn(), reasons=[TerminationReason.TIMEOUT, TerminationReason.ENV_DONE])
    rows = build_rows([g], mask_reasons=[TerminationReason.TIMEOUT])
    assert len(rows) == 1 and rows.member_index.tolist() == [1] and rows.termination == ["env_done"]
    assert rows.metrics["rows/masked_trajectories"] == 1
    assert rows.num_action_tokens == 3


def test_empty_trajectories_and_steps_without_tokens_are_dropped_and_counted():
    no_steps = Trajectory(steps=[])
    no_response = Trajectory(steps=[Step(prompt_ids=[1, 2], response_ids=[])])
    no_tokens = Trajectory(steps=[Step(model_response="text only")])
    rows = build_rows([group(no_steps, no_response, no_tokens, two_turn())])
    assert len(rows) == 1 and rows.member_index.tolist() == [3]
    assert rows.metrics["rows/dropped_empty"] == 1  # the prompt-only row
    assert rows.metrics["rows/steps_without_tokens"] == 1


def test_missing_sampling_logprobs_are_nan_on_the_mask():
    step = Step(prompt_ids=[1], response_ids=[2, 3])
    rows = build_rows([group(Trajectory(steps=[step]))])
    assert rows.logprobs[0] == 0 and np.isnan(rows.logprobs[1:]).all()


def test_opaque_prompt_chunks_pass_through_untouched():
    chunk = object()  # e.g. an image segment: one position, never inspected
    s1 = Step(prompt_ids=[chunk, 1], response_ids=[2])
    s2 = Step(prompt_ids=[chunk, 1, 2, 3], response_ids=[4])
    rows = build_rows([group(Trajectory(steps=[s1, s2]))])
    assert len(rows) == 1 and rows.tokens[0][0] is chunk
    assert rows.loss_mask.astype(int).tolist() == [0, 0, 1, 0, 1]


def test_group_role_and_rollout_bookkeeping():
    a = group(two_turn(), two_turn(), task_id="a", role="solver")
    b = group(two_turn(), task_id="b", role="judge")
    rows = build_rows([a, b])
    assert rows.group_keys == [("a", "solver"), ("b", "judge")]
    assert rows.group_index.tolist() == [0, 0, 1]
    assert rows.roles == ["solver", "solver", "judge"]
    assert rows.rollout_idx.tolist() == [0, 1, 0] and rows.trajectory_index.tolist() == [0, 0, 0]


# ---------------------------------------------------------------------------------------------
# Loss weights: what each aggregation mode means on rows


def weighted(rows, mode, losses, factor=None):
    return float((rows.loss_weights(mode, factor) * losses).sum())


def test_loss_weights_per_mode_by_hand():
    # row 0: a merged two-turn row, action losses 1, 2 | 3; row 1: one step, action losses 4, 5, 6
    short = two_turn()
    long = Trajectory(steps=[Step(prompt_ids=[1], response_ids=[7, 8, 9])])
    rows = build_rows([group(short, long)])
    losses = np.zeros(rows.num_tokens)
    losses[rows.loss_mask] = [1, 2, 3, 4, 5, 6]
    losses[~rows.loss_mask] = 100.0  # never counted
    assert weighted(rows, "token-mean", losses) == pytest.approx(21 / 6)
    assert weighted(rows, "seq-mean-token-mean", losses) == pytest.approx((6 / 3 + 15 / 3) / 2)
    assert weighted(rows, "seq-mean-token-sum", losses) == pytest.approx((6 + 15) / 2)
    assert weighted(rows, "seq-mean-token-sum-norm", losses, factor=10) == pytest.approx(21 / (2 * 10))


def test_sum_norm_divides_by_a_constant_not_the_batch():
    one = build_rows([group(Trajectory(steps=[Step(prompt_ids=[1], response_ids=[2])]))])
    long = build_rows([group(Trajectory(steps=[Step(prompt_ids=[1], response_ids=[2, 3, 4, 5, 6])]))])
    # the weight of a token does not depend on how long the batch's longest response is
    assert one.loss_weights("seq-mean-token-sum-norm", 8)[1] == long.loss_weights("seq-mean-token-sum-norm", 8)[1]
    with pytest.raises(ValueError, match="loss_scale_factor"):
        one.loss_weights("seq-mean-token-sum-norm", None)


def test_mini_batch_weights_cover_only_their_rows():
    short = two_turn()
    long = Trajectory(steps=[Step(prompt_ids=[1], response_ids=[7, 8, 9])])
    rows = build_rows([group(short, long)])
    first = rows.loss_weights("token-mean", rows=[0])
    second = rows.loss_weights("seq-mean-token-sum", rows=[1])
    assert first[rows.offsets[1] :].sum() == 0 and first.sum() == pytest.approx(1.0)  # 1/3 on row 0's tokens
    assert second[: rows.offsets[1]].sum() == 0 and second.sum() == pytest.approx(3.0)  # S = 1: weight 1 each


def test_unknown_mode_is_named():
    rows = build_rows([group(two_turn())])
    with pytest.raises(ValueError, match=r"algorithm\.loss\.agg_mode"):
        rows.loss_weights("sum")


def test_masked_rows_are_in_no_denominator():
    kept = two_turn()
    masked = two_turn()
    both = build_rows(
        [group(kept, masked, reasons=[TerminationReason.ENV_DONE, TerminationReason.TIMEOUT])], mask_reasons=["timeout"]
    )
    alone = build_rows([group(two_turn())])
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
        np.testing.assert_array_equal(both.loss_weights(mode, 4), alone.loss_weights(mode, 4))


# ---------------------------------------------------------------------------------------------
# Properties


@st.composite
def trajectories(draw):
    """Multi-turn trajectories whose turns sometimes extend each other and sometimes do not."""
    steps = []
    prompt = draw(st.lists(st.integers(0, 50), min_size=1, max_size=5))
    for _ in range(draw(st.integers(1, 5))):
        response = draw(st.lists(st.integers(0, 50), min_size=0, max_size=4))
        lps = [-float(i + 1) for i in range(len(response))]
        adv = draw(st.none() | st.floats(-2, 2) | st.just("list"))
        if adv == "list":
            adv = [float(i) for i in range(len(response))]
        steps.append(Step(prompt_ids=prompt, response_ids=response, logprobs=lps, advantage=adv))
        if draw(st.booleans()):
            prompt = prompt + response + draw(st.lists(st.integers(0, 50), max_size=3))
        else:
            prompt = draw(st.lists(st.integers(0, 50), min_size=1, max_size=8))
    return Trajectory(steps=steps)


@settings(max_examples=150, deadline=None)
@given(trajs=st.lists(trajectories(), min_size=1, max_size=4))
def test_row_properties(trajs):
    g = group(*trajs)
    rows = build_rows([g])
    rows.fill_advantages()
    action_tokens = sum(len(s.response_ids) for t in trajs for s in t.steps)
    # every action token is in exactly one row, and only action tokens are on the mask
    assert rows.num_action_tokens == action_tokens
    assert not rows.advantages[~rows.loss_mask].any()
    assert not rows.logprobs[~rows.loss_mask].any()
    # rows round-trip to steps: each step's prompt, response and logprobs are read back exactly
    assert len(rows.steps) == sum(1 for t in trajs for s in t.steps if s.response_ids)
    for k, step in enumerate(rows.steps):
        prompt, response, lps = rows.step_tokens(k)
        assert response == step.response_ids
        assert lps.tolist() == step.logprobs
        assert prompt[-len(step.prompt_ids) :] == step.prompt_ids and len(prompt) == len(step.prompt_ids)
    # weights of every mode sum to the number the mode averages over
    n_seqs = int((np.add.reduceat(rows.loss_mask, rows.offsets[:-1]) > 0).sum()) if len(rows) else 0
    if action_tokens:
        assert math.isclose(rows.loss_weights("token-mean").sum(), 1.0)
        assert math.isclose(rows.loss_weights("seq-mean-token-mean").sum(), 1.0)
        assert math.isclose(rows.loss_weights("seq-mean-token-sum").sum(), action_tokens / n_seqs)
