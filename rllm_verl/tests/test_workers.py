"""verl's engine workers for real: two gloo ranks on CPU, a tiny Qwen2 in fp32, rows from the core.

The reference is the torch backend: ``rllm_torch.sampling.score`` for log-probs and
``rllm_torch.losses.policy_loss`` weighted by ``TokenRows.loss_weights`` for the loss, on the same
model weights (saved for verl, kept in this process).
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from verl_test_helpers import mixed_groups

from rllm_core.config import LossConfig
from rllm_core.rows import TokenRows, build_rows

pytestmark = pytest.mark.slow


def reference_logprobs(model, rows: TokenRows) -> np.ndarray:
    """The torch backend's log-probs of every response position, on the rows' flat layout."""
    from rllm_torch.sampling import score

    pairs = [(t[: int(p)], t[int(p) :]) for t, p in zip(rows.tokens, rows.prompt_lens, strict=True)]
    scored = score(model, pairs, pad_id=1)
    out = np.zeros(rows.num_tokens)
    for r, values in enumerate(scored):
        start = int(rows.offsets[r] + rows.prompt_lens[r])
        out[start : start + len(values)] = values
    return out


def response_positions(rows: TokenRows) -> np.ndarray:
    pos = np.arange(rows.num_tokens) - np.repeat(rows.offsets[:-1], rows.row_lengths())
    return pos >= np.repeat(rows.prompt_lens, rows.row_lengths())


def sampled_rows(model, seed: int = 1) -> TokenRows:
    """The helper's nine rows, with sampling logprobs = the model's own plus noise (ratios != 1)."""
    rows = build_rows(mixed_groups())
    rows.fill_advantages()
    noise = np.random.default_rng(seed).normal(0, 0.3, size=rows.num_tokens)
    rows.logprobs = np.where(rows.loss_mask, reference_logprobs(model, rows) + noise, 0.0)
    return rows


def reference_loss(
    model, rows: TokenRows, loss: LossConfig, grad_norm: bool = False, old: Any = None, tis: Any = None
) -> Any:
    """The torch backend's batch loss, ``sum_t w_t * policy_loss_t`` (and, with ``grad_norm``, the
    norm of its gradient, on a copy of the model). ``old``: the ratio's denominator (default: the
    sampling logprobs); ``tis``: per-token truncated importance weights (flat, like the logprobs)."""
    from rllm_torch.losses import policy_loss
    from rllm_torch.sampling import response_logits, token_logprobs

    model = copy.deepcopy(model)
    pairs = [(t[: int(p)], t[int(p) :]) for t, p in zip(rows.tokens, rows.prompt_lens, strict=True)]
    logits, targets = response_logits(model, pairs, pad_id=1, share_prompts=False)
    on = torch.from_numpy(rows.loss_mask[response_positions(rows)])  # actions among response positions
    mask = rows.loss_mask
    w = torch.from_numpy(rows.loss_weights(loss.agg_mode, loss.loss_scale_factor)[mask])
    per_token, _ = policy_loss(
        token_logprobs(logits, targets)[on].double(),
        torch.from_numpy((rows.logprobs if old is None else old)[mask]),
        torch.from_numpy(rows.advantages[mask]),
        name=loss.name,
        clip_low=loss.clip_low,
        clip_high=loss.clip_high,
        clip_ratio_c=loss.clip_ratio_c,
        tis_weight=None if tis is None else torch.from_numpy(tis[mask]),
    )
    total = (w * per_token).sum()
    if not grad_norm:
        return float(total.detach())
    total.backward()
    norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in model.parameters() if p.grad is not None))
    return float(total.detach()), float(norm)


@pytest.fixture
def restored(verl_workers, tiny_model, tmp_path):
    """Run a test that updates the weights, then put them (and Adam's state) back from a verl checkpoint."""
    rows = sampled_rows(tiny_model[1])
    verl_workers.save_checkpoint(str(tmp_path / "ckpt"))
    yield
    verl_workers.load_checkpoint(str(tmp_path / "ckpt"))
    back = verl_workers.compute_log_prob(rows)
    assert np.abs(back - reference_logprobs(tiny_model[1], rows))[response_positions(rows)].max() < 1e-5


def test_verl_log_probs_equal_the_torch_backends_scores(verl_workers, tiny_model):
    rows = sampled_rows(tiny_model[1])
    assert len(rows) % verl_workers.world_size == 1  # a pad row is added
    assert rows.metrics["rows/count"] < rows.metrics["rows/tokens"]
    got = verl_workers.compute_log_prob(rows)
    expected = reference_logprobs(tiny_model[1], rows)
    where = response_positions(rows)  # actions and the observations between them
    assert where.sum() > rows.loss_mask.sum()  # multi-turn rows are in the batch
    assert np.abs(got - expected)[where].max() <= 1e-5
    assert (got[~where] == 0).all()


LOSSES = [
    LossConfig(name=name, agg_mode=mode, loss_scale_factor=16.0 if mode.endswith("norm") else None)
    for name in ("importance_sampling", "ppo")
    for mode in ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
]


@pytest.mark.parametrize("loss", LOSSES, ids=lambda loss: f"{loss.name}-{loss.agg_mode}")
def test_verls_loss_on_the_rows_is_the_torch_backends_loss(verl_workers, tiny_model, loss):
    rows = sampled_rows(tiny_model[1])
    verl_workers.set_loss(loss, loss.loss_scale_factor)
    got = verl_workers.evaluate_loss(rows)
    assert got["actor/pg_loss"] == pytest.approx(reference_loss(tiny_model[1], rows, loss), rel=1e-5, abs=1e-7)
    if loss.name == "ppo":
        assert 0 < got["actor/pg_clipfrac"] < 1  # the clip acts on some tokens, not all


def test_truncated_importance_weights_scale_each_tokens_loss_as_in_the_torch_backend(verl_workers, tiny_model):
    """``tis_cap``: the ratio divides by old logprobs that differ from the sampler's (here: the current
    model's, shifted), and each token's loss is weighted by min(pi_old / pi_sampler, cap), as verl's
    ``rollout_is_weights``; some tokens hit the cap, the rest do not."""
    rows = sampled_rows(tiny_model[1])
    loss = LossConfig(name="ppo", old_logprobs="recompute", tis_cap=1.2)
    old = np.where(rows.loss_mask, reference_logprobs(tiny_model[1], rows) + 0.05, 0.0)
    tis = np.minimum(np.exp(np.minimum(old - rows.logprobs, 20.0)), loss.tis_cap)
    assert 0 < (tis[rows.loss_mask] == 1.2).mean() < 1
    verl_workers.set_loss(loss)
    try:
        got = verl_workers.evaluate_loss(rows, old_logprobs=old, is_weights=tis)
    finally:
        verl_workers.set_loss(verl_workers.algorithm.loss)
    expected = reference_loss(tiny_model[1], rows, loss, old=old, tis=tis)
    assert got["actor/pg_loss"] == pytest.approx(expected, rel=1e-5, abs=1e-7)
    assert got["actor/pg_loss"] != pytest.approx(reference_loss(tiny_model[1], rows, loss, old=old), rel=1e-3)


@pytest.mark.parametrize("agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_an_update_has_the_torch_backends_loss_and_gradient_norm(verl_workers, tiny_model, restored, agg_mode):
    rows = sampled_rows(tiny_model[1])
    loss = LossConfig(name="ppo", agg_mode=agg_mode)
    verl_workers.set_loss(loss)
    expected_loss, expected_norm = reference_loss(tiny_model[1], rows, loss, grad_norm=True)
    metrics = verl_workers.update_actor(rows)
    assert metrics["actor/optimizer_steps"] == 1
    assert metrics["actor/pg_loss"] == pytest.approx(expected_loss, rel=1e-5, abs=1e-7)
    # the gradient too: verl's norm (before clipping, over both ranks' shards) is the torch one
    assert metrics["actor/grad_norm"] == pytest.approx(expected_norm, rel=1e-4)


def test_an_update_moves_log_probs_in_the_advantages_direction(verl_workers, tiny_model, restored):
    rows = sampled_rows(tiny_model[1])
    verl_workers.set_loss(LossConfig(name="importance_sampling", agg_mode="token-mean"))
    before = verl_workers.compute_log_prob(rows)
    verl_workers.update_actor(rows)
    after = verl_workers.compute_log_prob(rows)
    mask = rows.loss_mask
    delta, adv = (after - before)[mask], rows.advantages[mask]
    assert np.abs(delta).max() > 1e-3  # it moved
    assert float((adv * delta).mean()) > 0  # the objective sum_t A_t logp_t went up
    assert delta[adv > 0].mean() > 0 > delta[adv < 0].mean()


def test_unknown_sampling_logprobs_are_recomputed_before_the_loss(verl_workers, tiny_model):
    rows = sampled_rows(tiny_model[1])
    rows.logprobs[rows.loss_mask] = np.nan  # the engine gave none: the ratio divides by the current policy
    verl_workers.set_loss(LossConfig(name="importance_sampling", agg_mode="seq-mean-token-mean"))
    got = verl_workers.evaluate_loss(rows)["actor/pg_loss"]
    w = rows.loss_weights("seq-mean-token-mean")
    assert got == pytest.approx(-float((w * rows.advantages).sum()), rel=1e-5)  # ratio 1: -sum_t w_t A_t


def test_mini_batches_are_separate_optimiser_steps(verl_workers, tiny_model, restored, monkeypatch):
    rows = sampled_rows(tiny_model[1])
    optim = verl_workers.algorithm.optim.model_copy(update={"mini_batch_size": 4, "epochs": 2})
    monkeypatch.setattr(verl_workers, "algorithm", verl_workers.algorithm.model_copy(update={"optim": optim}))
    verl_workers.set_loss(LossConfig(name="ppo", agg_mode="seq-mean-token-mean"))
    metrics = verl_workers.update_actor(rows, step=3)
    assert metrics["actor/optimizer_steps"] == 6  # 9 rows: 4 + 4 + 1, twice
    assert np.isfinite(metrics["actor/pg_loss"]) and metrics["actor/grad_norm"] > 0
