"""Token rows to verl's DataProto, on hand-computed cases (no Ray, no model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rllm_verl.dataproto import loss_agg_settings, padded_size, response_values_to_rows, rows_to_dataproto
from verl_test_helpers import PAD, rows_of, step


def tensor(proto, key):
    return proto.batch[key].tolist()


def test_single_turn_row_splits_at_the_first_action_token():
    rows = rows_of([step([5, 6, 7], [8, 9, PAD], advantage=0.5, logprobs=[-0.1, -0.2, -0.3])])
    proto = rows_to_dataproto(rows, pad_id=PAD)
    assert tensor(proto, "prompts") == [[5, 6, 7]]
    assert tensor(proto, "responses") == [[8, 9, PAD]]
    assert tensor(proto, "input_ids") == [[5, 6, 7, 8, 9, PAD]]
    assert tensor(proto, "response_mask") == [[1, 1, 1]]
    assert tensor(proto, "position_ids") == [[0, 1, 2, 3, 4, 5]]
    assert tensor(proto, "advantages") == [[0.5, 0.5, 0.5]]
    assert proto.batch["old_log_probs"].numpy() == pytest.approx(np.array([[-0.1, -0.2, -0.3]]))
    assert proto.batch["rollout_log_probs"].numpy() == pytest.approx(np.array([[-0.1, -0.2, -0.3]]))


def test_attention_comes_from_lengths_even_where_a_token_equals_the_pad_id():
    # the last response token is the end-of-sequence token, which is also the pad id
    rows = rows_of([step([5, 6], [8, PAD])], [step([5, 6, 7, 9], [8])])
    proto = rows_to_dataproto(rows, pad_id=PAD)
    assert tensor(proto, "prompts") == [[PAD, PAD, 5, 6], [5, 6, 7, 9]]
    assert tensor(proto, "responses") == [[8, PAD], [8, PAD]]
    assert tensor(proto, "attention_mask") == [[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]
    assert tensor(proto, "position_ids") == [[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 4]]
    assert tensor(proto, "response_mask") == [[1, 1], [1, 0]]


def test_multi_turn_row_keeps_the_observation_in_the_response_with_mask_zero():
    # DESIGN.md section 4: [s, u] -> [a1, a2]; tool output [t1, t2]; then [b1]
    s, u, a1, a2, t1, t2, b1 = 3, 4, 10, 11, 20, 21, 12
    first = step([s, u], [a1, a2], advantage=2.0, logprobs=[-0.1, -0.2])
    second = step([s, u, a1, a2, t1, t2], [b1], advantage=2.0, logprobs=[-0.3])
    proto = rows_to_dataproto(rows_of([first, second]), pad_id=PAD)
    assert tensor(proto, "prompts") == [[s, u]]
    assert tensor(proto, "responses") == [[a1, a2, t1, t2, b1]]
    assert tensor(proto, "response_mask") == [[1, 1, 0, 0, 1]]
    assert tensor(proto, "advantages") == [[2.0, 2.0, 0.0, 0.0, 2.0]]
    assert proto.batch["old_log_probs"].numpy() == pytest.approx(np.array([[-0.1, -0.2, 0, 0, -0.3]]))


def test_per_token_advantages_are_placed_token_by_token():
    first = step([3, 4], [10, 11, 12], advantage=[0.5, -0.5, 1.0])
    second = step([3, 4, 10, 11, 12, 20], [13, 14], advantage=[2.0, 3.0])
    proto = rows_to_dataproto(rows_of([first, second]), pad_id=PAD)
    assert tensor(proto, "advantages") == [[0.5, -0.5, 1.0, 0.0, 2.0, 3.0]]


def test_rows_are_padded_to_the_data_parallel_size_with_neutral_rows():
    rows = rows_of([step([5, 6], [8, 9])], [step([5], [7])], [step([6, 6, 6], [9, 9, 9])])
    proto = rows_to_dataproto(rows, pad_id=PAD, dp_size=2)
    assert len(proto) == 4
    assert proto.non_tensor_batch["is_pad"].tolist() == [False, False, False, True]
    assert proto.non_tensor_batch["uid"].tolist()[:3] == ["0", "0", "0"]
    pad_attention = proto.batch["attention_mask"][3].tolist()
    # one attended pad token of prompt (last prompt column) and one of response (first response column)
    assert pad_attention == [0, 0, 1, 1, 0, 0]
    assert tensor(proto, "response_mask")[3] == [0, 0, 0]
    assert tensor(proto, "advantages")[3] == [0, 0, 0]
    # the normalisers: N (verl sums the response mask over ranks) and S are those of the real rows
    assert int(proto.batch["response_mask"].sum()) == rows.num_action_tokens == 6
    assert proto.meta_info["global_batch_size"] == 3
    assert proto.meta_info["num_rows"] == 3


@pytest.mark.parametrize(("n", "dp", "expected"), [(1, 1, 1), (3, 2, 4), (4, 2, 4), (1, 4, 4), (5, 4, 8)])
def test_padded_size(n, dp, expected):
    assert padded_size(n, dp) == expected


def test_a_mini_batch_counts_only_its_own_rows():
    rows = rows_of([step([5], [8, 9])], [step([5], [7])], [step([6], [9, 9, 9])])
    proto = rows_to_dataproto(rows, pad_id=PAD, dp_size=2, indices=[2, 0])
    assert tensor(proto, "responses")[:2] == [[9, 9, 9], [8, 9, PAD]]
    assert proto.meta_info["global_batch_size"] == 2
    assert int(proto.batch["response_mask"].sum()) == 5


def test_given_old_logprobs_replace_the_sampling_ones_and_unknown_sampling_logprobs_become_zero():
    rows = rows_of([step([5, 6], [8, 9], logprobs=[])])  # the engine gave no logprobs
    old = np.array([0.0, 0.0, -1.5, -2.5])
    proto = rows_to_dataproto(rows, pad_id=PAD, old_logprobs=old)
    assert tensor(proto, "old_log_probs") == [[-1.5, -2.5]]
    assert tensor(proto, "rollout_log_probs") == [[0.0, 0.0]]
    assert np.isnan(rows_to_dataproto(rows, pad_id=PAD).batch["old_log_probs"].numpy()).all()


def test_non_integer_prompt_chunks_are_refused_by_name():
    rows = rows_of([step([5, 6], [8])])
    rows.tokens[0][0] = {"type": "image"}
    with pytest.raises(TypeError, match="row 0"):
        rows_to_dataproto(rows, pad_id=PAD)


def test_response_values_go_back_to_the_rows_flat_layout():
    rows = rows_of([step([5, 6], [8, 9])], [step([3, 4], [10, 11]), step([3, 4, 10, 11, 20], [12])])
    proto = rows_to_dataproto(rows, pad_id=PAD, dp_size=4)
    flat = response_values_to_rows(proto.batch["responses"].float(), rows)
    expected = [0, 0, 8, 9, 0, 0, 10, 11, 20, 12]
    assert flat.tolist() == expected
    sub = response_values_to_rows(rows_to_dataproto(rows, pad_id=PAD, indices=[1]).batch["responses"], rows, [1])
    assert sub.tolist() == [0, 0, 0, 0, *expected[4:]]


# -- through verl's own helpers ------------------------------------------------------------------


def test_round_trip_through_verls_padding_helpers():
    from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding

    rows = rows_of([step([5, 6], [8, PAD])], [step([3, 4], [10, 11]), step([3, 4, 10, 11, 20, 21], [12])])
    td = left_right_2_no_padding(rows_to_dataproto(rows, pad_id=PAD, dp_size=4).to_tensordict())
    sequences = [t.tolist() for t in td["input_ids"].unbind()]
    assert sequences == [[5, 6, 8, PAD], [3, 4, 10, 11, 20, 21, 12], [PAD, PAD], [PAD, PAD]]
    assert [t.tolist() for t in td["position_ids"].unbind()] == [list(range(len(s))) for s in sequences]
    # a model output at every packed position comes back as the output *before* each response token
    before = no_padding_2_padding(td["input_ids"].float(), td)
    assert before.tolist() == [[6, 8, 0, 0, 0], [4, 10, 11, 20, 21], [PAD, 0, 0, 0, 0], [PAD, 0, 0, 0, 0]]


@pytest.mark.parametrize(
    "agg_mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
)
def test_verls_aggregation_on_two_ranks_is_the_cores_weighted_sum(agg_mode):
    """verl's ``agg_loss`` with this batch's normalisers, on each of two data-parallel ranks (pad rows
    included), averaged as FSDP averages gradients, equals ``sum_t w_t * loss_t`` with the core's
    weights (docs/rows.md)."""
    from verl.trainer.ppo.core_algos import agg_loss

    rows = rows_of(
        [step([5, 6], [8, 9, 9])],
        [step([5], [7])],
        [step([3, 4], [10, 11]), step([3, 4, 10, 11, 20], [12, 13, 14])],
    )
    factor = 7.0 if agg_mode == "seq-mean-token-sum-norm" else None
    proto = rows_to_dataproto(rows, pad_id=PAD, dp_size=2)
    assert len(proto) == 4  # one pad row, on the second rank
    rng = np.random.default_rng(0)
    loss_mat = torch.from_numpy(rng.normal(size=tuple(proto.batch["response_mask"].shape)))
    settings = loss_agg_settings(agg_mode, factor)
    mask = proto.batch["response_mask"].bool()
    normalisers = {
        "dp_size": 2,
        "batch_num_tokens": int(mask.sum()),
        "global_batch_size": proto.meta_info["global_batch_size"],
        "loss_scale_factor": settings["loss_scale_factor"],
    }
    ranks = [agg_loss(loss_mat[i : i + 2], mask[i : i + 2], settings["loss_agg_mode"], **normalisers) for i in (0, 2)]
    verl_loss = float(sum(ranks) / 2)

    w = rows.loss_weights(agg_mode, factor)
    flat = response_values_to_rows(loss_mat[:3], rows)
    assert verl_loss == pytest.approx(float((w * flat).sum()), rel=1e-7)  # verl divides a row's sum by n_r + 1e-8


def test_loss_agg_settings_name_verls_modes():
    assert loss_agg_settings("token-mean") == {"loss_agg_mode": "token-mean", "loss_scale_factor": None}
    assert loss_agg_settings("seq-mean-token-sum-norm", 512) == {
        "loss_agg_mode": "seq-mean-token-sum-norm",
        "loss_scale_factor": 512.0,
    }
    with pytest.raises(ValueError, match="loss_scale_factor"):
        loss_agg_settings("seq-mean-token-sum-norm")
    with pytest.raises(ValueError, match="agg_mode"):
        loss_agg_settings("token-sum")
