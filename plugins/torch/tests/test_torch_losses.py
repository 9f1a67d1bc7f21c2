"""Losses and aggregation against hand-computed values."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from rllm_torch.losses import policy_loss, token_weights  # noqa: E402


def test_ppo_clips_the_ratio_on_the_pessimistic_side():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, stats = policy_loss(logp, old, adv, name="ppo", clip_low=0.2, clip_high=0.28)
    # A>0, r=1.5 -> clipped at 1.28; A>0, r=0.5 -> unclipped 0.5 (min of the objective);
    # A<0, r=1.5 -> unclipped 1.5; A<0, r=0.5 -> clipped at 0.8
    assert loss.tolist() == pytest.approx([-1.28, -0.5, 1.5, 0.8], abs=1e-6)
    assert stats["clipped"].tolist() == [1.0, 0.0, 0.0, 1.0]


def test_importance_sampling_gradient_is_ratio_times_advantage():
    old = torch.log(torch.tensor([0.5, 0.25]))
    logp = torch.log(torch.tensor([0.25, 0.25])).requires_grad_(True)
    adv = torch.tensor([2.0, -1.0])
    loss, _ = policy_loss(logp, old, adv, name="importance_sampling")
    assert loss.tolist() == pytest.approx([-1.0, 1.0])
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([-1.0, 1.0])  # d(-r*A)/dlogp = -r*A


def test_kl_penalty_is_k3_and_zero_at_the_reference():
    logp = torch.tensor([-1.0, -2.0])
    ref = torch.tensor([-1.0, -1.0])
    loss, stats = policy_loss(logp, logp.clone(), torch.zeros(2), ref_logp=ref, kl_coef=0.5)
    k3 = math.exp(1.0) - 1.0 - 1.0
    assert stats["kl"].tolist() == pytest.approx([0.0, k3])
    assert loss.tolist() == pytest.approx([0.0, 0.5 * k3])


def test_unknown_loss_is_named():
    with pytest.raises(ValueError, match=r"algorithm\.loss\.name"):
        policy_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), name="dpo")


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        # two sequences, lengths 1 and 3, per-token losses [4] and [1, 2, 3]
        ("token-mean", (4 + 1 + 2 + 3) / 4),
        ("seq-mean-token-mean", (4 / 1 + (1 + 2 + 3) / 3) / 2),
        ("seq-mean-token-sum-norm", (4 + 1 + 2 + 3) / (2 * 3)),
    ],
)
def test_aggregation_modes(mode, expected):
    w = token_weights([1, 3], mode)
    assert float((w * torch.tensor([4.0, 1.0, 2.0, 3.0])).sum()) == pytest.approx(expected)
