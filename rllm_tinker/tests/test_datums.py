"""Core rows to tinker.Datum, checked against hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest
import tinker
from rllm_tinker.datums import loss_fn_config, row_length, rows_to_datums

from rllm_core.config import LossConfig
from rllm_core.rows import build_rows
from rllm_core.types import Episode, Step, TerminationReason, Trajectory, TrajectoryGroup

S, U, A1, A2, T1, T2, B1 = 1, 2, 10, 11, 20, 21, 12


def group(*trajectories: Trajectory, role: str = "default") -> TrajectoryGroup:
    episodes = [
        Episode(task_id="t", rollout_idx=i, trajectories=[t], termination_reason=TerminationReason.ENV_DONE)
        for i, t in enumerate(trajectories)
    ]
    for t in trajectories:
        t.name = role
    return TrajectoryGroup(task_id="t", role=role, trajectories=list(trajectories), episodes=episodes)


def two_turn(advantage) -> Trajectory:
    s1 = Step(prompt_ids=[S, U], response_ids=[A1, A2], logprobs=[-0.1, -0.2], advantage=advantage)
    s2 = Step(prompt_ids=[S, U, A1, A2, T1, T2], response_ids=[B1], logprobs=[-0.3], advantage=advantage)
    return Trajectory(steps=[s1, s2])


def inputs(datum: tinker.Datum) -> dict[str, list]:
    return {k: v.tolist() for k, v in datum.loss_fn_inputs.items()}


def test_single_turn_datum_is_shifted_and_weighted_by_token_mean():
    step = Step(prompt_ids=[5, 6, 7], response_ids=[8, 9], logprobs=[-1.0, -2.0], advantage=0.5)
    rows = build_rows([group(Trajectory(steps=[step]))])
    rows.fill_advantages()
    datums, kept, metrics = rows_to_datums(rows, LossConfig(name="importance_sampling"), max_train_length=100)
    assert kept == [0] and metrics["tinker/dropped_rows"] == 0
    (d,) = datums
    assert d.model_input.to_ints() == [5, 6, 7, 8]
    got = inputs(d)
    assert got["target_tokens"] == [6, 7, 8, 9]
    assert got["logprobs"] == pytest.approx([0, 0, -1.0, -2.0])
    # token-mean over N = 2 action tokens: A_t / 2 on each
    assert got["advantages"] == pytest.approx([0, 0, 0.25, 0.25])
    assert set(got) == {"target_tokens", "logprobs", "advantages"}  # never "mask": the service rejects it


def test_multi_turn_merges_into_one_datum_with_observations_unweighted():
    rows = build_rows([group(two_turn(0.6))])
    rows.fill_advantages()
    (d,), _, _ = rows_to_datums(rows, LossConfig(name="ppo", agg_mode="seq-mean-token-sum"), max_train_length=100)
    assert d.model_input.to_ints() == [S, U, A1, A2, T1, T2]
    got = inputs(d)
    assert got["target_tokens"] == [U, A1, A2, T1, T2, B1]
    # seq-mean-token-sum over S = 1 row: weight 1 on each action token, 0 on tool output
    assert got["advantages"] == pytest.approx([0, 0.6, 0.6, 0, 0, 0.6])
    assert got["logprobs"] == pytest.approx([0, -0.1, -0.2, 0, 0, -0.3])


def test_per_token_advantages_and_seq_mean_token_mean():
    short = Step(prompt_ids=[1], response_ids=[2, 3], logprobs=[-1.0, -1.0], advantage=[1.0, 3.0])
    long = Step(prompt_ids=[1], response_ids=[4, 5, 6, 7], logprobs=[-1.0] * 4, advantage=[2.0] * 4)
    rows = build_rows([group(Trajectory(steps=[short]), Trajectory(steps=[long]))])
    rows.fill_advantages()
    datums, _, _ = rows_to_datums(rows, LossConfig(agg_mode="seq-mean-token-mean"), max_train_length=100)
    # w = 1 / (S * n_r): S = 2; n = 2 and 4
    assert inputs(datums[0])["advantages"] == pytest.approx([1.0 / 4, 3.0 / 4])
    assert inputs(datums[1])["advantages"] == pytest.approx([2.0 / 8] * 4)


def test_over_long_rows_are_dropped_counted_and_out_of_the_denominator():
    short = Step(prompt_ids=[1], response_ids=[2, 3], logprobs=[-1.0, -1.0], advantage=1.0)
    long = Step(prompt_ids=[1] * 10, response_ids=[4, 5], logprobs=[-1.0, -1.0], advantage=1.0)
    rows = build_rows([group(Trajectory(steps=[short]), Trajectory(steps=[long]))])
    rows.fill_advantages()
    datums, kept, metrics = rows_to_datums(rows, LossConfig(), max_train_length=8)
    assert kept == [0] and len(datums) == 1 and metrics["tinker/dropped_rows"] == 1
    assert inputs(datums[0])["advantages"] == pytest.approx([0.5, 0.5])  # N = 2, not 4


def test_truncated_rows_keep_their_tokens_and_cross_entropy_gets_weights():
    step = Step(prompt_ids=[1, 2], response_ids=[3, 4], logprobs=[-1.0, -1.0], finish_reason="length", advantage=1.0)
    rows = build_rows([group(Trajectory(steps=[step]))])
    rows.fill_advantages()
    assert rows.truncated.tolist() == [True]
    (d,), _, _ = rows_to_datums(rows, LossConfig(name="cross_entropy"), max_train_length=100)
    assert inputs(d) == {"target_tokens": [2, 3, 4], "weights": pytest.approx([0, 0.5, 0.5])}


def test_image_chunks_pass_through_and_count_their_length():
    image = tinker.types.ImageAssetPointerChunk(format="png", location="tinker://img", expected_tokens=3)
    step = Step(prompt_ids=[1, image, 2], response_ids=[7], logprobs=[-0.5], advantage=2.0)
    rows = build_rows([group(Trajectory(steps=[step]))])
    rows.fill_advantages()
    assert row_length(rows.tokens[0]) == 6
    (d,), _, _ = rows_to_datums(rows, LossConfig(), max_train_length=100)
    assert d.model_input.chunks[1] is image and d.model_input.length == 5
    got = inputs(d)
    assert got["target_tokens"] == [0, 0, 0, 2, 7]
    assert got["advantages"] == pytest.approx([0, 0, 0, 0, 2.0])


def test_missing_sampling_logprobs_are_an_error_for_policy_losses():
    step = Step(prompt_ids=[1], response_ids=[2], advantage=1.0)
    rows = build_rows([group(Trajectory(steps=[step]))])
    rows.fill_advantages()
    with pytest.raises(ValueError, match="sampling logprobs"):
        rows_to_datums(rows, LossConfig(), max_train_length=100)


def test_clip_epsilons_become_ratio_thresholds():
    assert loss_fn_config(LossConfig(name="ppo", clip_low=0.2, clip_high=0.28)) == pytest.approx(
        {"clip_low_threshold": 0.8, "clip_high_threshold": 1.28}
    )
    assert loss_fn_config(LossConfig(name="importance_sampling")) is None
    assert loss_fn_config(LossConfig(name="dro", loss_fn_config={"beta": 0.05})) == {"beta": 0.05}


def test_datum_arrays_are_float32_tensors_the_sdk_accepts():
    step = Step(prompt_ids=[1], response_ids=[2, 3], logprobs=[-1.0, -1.0], advantage=1.0)
    rows = build_rows([group(Trajectory(steps=[step]))])
    rows.fill_advantages()
    (d,), _, _ = rows_to_datums(rows, LossConfig(), max_train_length=100)
    assert d.loss_fn_inputs["advantages"].dtype == "float32"
    assert d.loss_fn_inputs["target_tokens"].dtype == "int64"
    assert np.asarray(d.loss_fn_inputs["target_tokens"].tolist()).shape == (2,)
