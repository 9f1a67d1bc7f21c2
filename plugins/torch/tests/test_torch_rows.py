"""The torch backend trains on the core's token rows: gradients per aggregation mode, masks, temperature."""

from __future__ import annotations

import asyncio

import pytest
from torch_test_helpers import backend

from rllm_core.protocol import TrainerState
from rllm_core.rows import ROW_BREAK_KEY, build_rows
from rllm_core.types import Episode, Step, TerminationReason, TokenInput, Trajectory, TrajectoryGroup

torch = pytest.importorskip("torch")

PROMPT = [{"role": "user", "content": "3+4="}]
NO_CLIP = {"algorithm.optim.grad_clip": "null"}


def rollouts(b, n: int = 6, temperature: float = 1.0) -> list[Trajectory]:
    """``n`` two-turn trajectories sampled token-in/token-out: turn 2's prompt extends turn 1's."""
    engine = b.rollout_engine

    async def one(i: int) -> Trajectory:
        first = await engine.get_model_response(PROMPT, max_tokens=3, temperature=temperature)
        tool_output = [3 + i % 4, 4]  # observation tokens, never trained on
        prompt = first.prompt_ids + first.completion_ids + tool_output
        second = await engine.get_token_response(TokenInput(prompt_ids=prompt), max_tokens=2, temperature=temperature)
        steps = [Step.from_model_output(first), Step.from_model_output(second)]
        return Trajectory(steps=steps, reward=float(i % 2))

    async def run():
        return await asyncio.gather(*(one(i) for i in range(n)))

    return asyncio.run(run())


def as_group(trajs, reasons=None) -> TrajectoryGroup:
    reasons = reasons or [TerminationReason.ENV_DONE] * len(trajs)
    mean = sum(t.reward for t in trajs) / len(trajs)
    for t in trajs:
        for s in t.steps:
            s.advantage = t.reward - mean
    episodes = [
        Episode(task_id="t", rollout_idx=i, trajectories=[t], termination_reason=r)
        for i, (t, r) in enumerate(zip(trajs, reasons, strict=True))
    ]
    return TrajectoryGroup(task_id="t", role="default", trajectories=list(trajs), episodes=episodes)


def gradients(b, groups, mask_reasons=()) -> dict[str, torch.Tensor]:
    """One update through the trainer's stages; returns the (unclipped) gradient it applied."""

    async def run():
        state = TrainerState(groups=groups, rows=build_rows(groups, mask_reasons=mask_reasons))
        await b.transform_to_backend_batch(state)
        await b.process_backend_batch(state)
        state.rows.fill_advantages()
        await b.update_policy(state)
        return state

    state = asyncio.run(run())
    grads = {n: p.grad.detach().clone() for n, p in b.policy.named_parameters() if p.grad is not None}
    return grads, {**state.rows.metrics, **state.metrics}


def assert_same(a, b, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"])
def test_micro_batched_gradient_equals_whole_batch_in_every_mode(mode):
    settings = {
        **NO_CLIP,
        "algorithm.loss.agg_mode": mode,
        "algorithm.loss.loss_scale_factor": 5,
        "algorithm.loss.kl_coef": 0.1,
        "torch.entropy_coef": 0.01,
    }
    whole, micro = backend(**settings), backend(**settings, **{"torch.micro_batch_tokens": 16})
    trajs = rollouts(whole)
    g_whole, m_whole = gradients(whole, [as_group(trajs)])
    g_micro, _ = gradients(micro, [as_group(trajs)])
    assert m_whole["actor/num_seqs"] == 6  # six merged two-turn rows
    assert_same(g_whole, g_micro)


def test_masked_trajectories_add_nothing_to_loss_denominators_kl_or_entropy():
    settings = {
        **NO_CLIP,
        "algorithm.loss.agg_mode": "seq-mean-token-mean",
        "algorithm.loss.kl_coef": 0.5,
        "algorithm.loss.forward_kl_coef": 0.5,
        "torch.entropy_coef": 0.05,
    }
    a, b = backend(**settings), backend(**settings)
    trajs = rollouts(a)
    reasons = [TerminationReason.TIMEOUT, *[TerminationReason.ENV_DONE] * 5]
    with_masked = as_group(trajs, reasons)
    without = as_group(trajs[1:])
    for t in without.trajectories:  # the same advantages as in the full group (masked one in the baseline)
        for s, s_full in zip(t.steps, with_masked.trajectories[trajs.index(t)].steps, strict=True):
            s.advantage = s_full.advantage
    g_masked, m = gradients(a, [with_masked], mask_reasons=[TerminationReason.TIMEOUT])
    g_without, _ = gradients(b, [without])
    assert m["rows/masked_trajectories"] == 1
    assert_same(g_masked, g_without)


def test_a_merged_row_trains_like_its_steps_under_token_mean_but_is_one_sequence():
    settings = {**NO_CLIP, "torch.share_prompt_prefix": False}
    trajs = rollouts(backend(**settings))
    split = [Trajectory(steps=[s.model_copy() for s in t.steps], reward=t.reward) for t in trajs]
    for t in split:
        t.steps[1].info = {ROW_BREAK_KEY: "test"}
    merged_b, split_b = backend(**settings), backend(**settings)
    g_merged, m_merged = gradients(merged_b, [as_group(trajs)])
    g_split, m_split = gradients(split_b, [as_group(split)])
    assert (m_merged["actor/num_seqs"], m_split["actor/num_seqs"]) == (6, 12)
    assert_same(g_merged, g_split, atol=1e-6)  # same tokens, same logits, same per-token weights

    settings["algorithm.loss.agg_mode"] = "seq-mean-token-mean"
    g_merged, _ = gradients(backend(**settings), [as_group(trajs)])
    g_split, _ = gradients(backend(**settings), [as_group(split)])
    assert any(not torch.allclose(g_merged[k], g_split[k], atol=1e-6) for k in g_merged)


def test_sampling_logprobs_at_temperature_are_the_trainers_recomputed_ones():
    from rllm_torch.sampling import score

    b = backend(**{"rollout.train_sampling": "{temperature: 0.7}"})
    assert b.temperature == 0.7
    trajs = rollouts(b, n=4, temperature=0.7)
    steps = [s for t in trajs for s in t.steps]
    pairs = [(s.prompt_ids, s.response_ids) for s in steps]
    recomputed = score(b.policy, pairs, pad_id=b._pad, temperature=0.7)
    untempered = score(b.policy, pairs, pad_id=b._pad)
    for step, lp in zip(steps, recomputed, strict=True):
        assert step.logprobs == pytest.approx(lp, abs=1e-5)
    # the temperature matters (a single token's logprob can happen to be nearly the same at both)
    gaps = [abs(x - y) for lp, raw in zip(recomputed, untempered, strict=True) for x, y in zip(lp, raw, strict=True)]
    assert max(gaps) > 1e-2
    _, metrics = gradients(b, [as_group(trajs)])
    assert metrics["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-5)


def test_recomputed_old_logprobs_correct_staleness_through_the_truncated_is_weight():
    settings = {"trainer.mode": "async", "algorithm.loss.old_logprobs": "recompute", "algorithm.loss.tis_cap": 2.0}
    b = backend(**settings)
    trajs = rollouts(b)  # sampled at version 0 by the separate sampler
    gradients(b, [as_group(trajs)])  # the trainer's weights move; the sampler's do not
    _, stale = gradients(b, [as_group(trajs)])
    assert stale["actor/ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # divided by the recomputed logprobs
    assert abs(stale["actor/tis_weight"] - 1.0) > 1e-4  # ... and weighted by pi_trainer / pi_sampler
    sampler_mode = backend(**{"trainer.mode": "async"})
    trajs = rollouts(sampler_mode)
    gradients(sampler_mode, [as_group(trajs)])
    _, stale = gradients(sampler_mode, [as_group(trajs)])
    assert abs(stale["actor/ratio_mean"] - 1.0) > 1e-4 and "actor/tis_weight" not in stale


def test_mini_batches_and_epochs_take_several_optimizer_steps_off_policy():
    settings = {
        "algorithm.optim.mini_batch_size": 2,  # six rows: three mini-batches per pass
        "algorithm.optim.epochs": 2,
        "algorithm.loss.name": "ppo",
        "algorithm.optim.schedule": "linear",
        "trainer.total_steps": 10,
    }
    b = backend(**settings)
    trajs = rollouts(b)
    lr0 = b.scheduler.get_last_lr()[0]
    _, metrics = gradients(b, [as_group(trajs)])
    assert metrics["actor/optimizer_steps"] == 6
    assert abs(metrics["actor/ratio_mean"] - 1.0) > 1e-5  # later updates see a moved policy
    # the schedule advances once per training step (1/10 of the way), not once per optimiser step
    assert b.updates == 1 and b.scheduler.get_last_lr()[0] == pytest.approx(lr0 * 0.9)
