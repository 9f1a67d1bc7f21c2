"""Policy losses and KL estimators against hand-computed values."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from rllm_torch.losses import kl_penalty, policy_loss  # noqa: E402


def test_ppo_clips_the_ratio_on_the_pessimistic_side():
    old = torch.zeros(4)
    logp = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5]))
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, stats = policy_loss(logp, old, adv, name="ppo", clip_low=0.2, clip_high=0.28)
    # A>0, r=1.5 -> clipped at 1.28; A>0, r=0.5 -> unclipped 0.5 (min of the objective);
    # A<0, r=1.5 -> unclipped 1.5; A<0, r=0.5 -> clipped at 0.8
    assert loss.tolist() == pytest.approx([-1.28, -0.5, 1.5, 0.8], abs=1e-6)
    assert stats["clipped"].tolist() == [1.0, 0.0, 0.0, 1.0]


def test_clip_higher_uses_separate_low_and_high_ranges():
    old = torch.zeros(2)
    logp = torch.log(torch.tensor([2.0, 0.1]))
    adv = torch.tensor([1.0, -1.0])
    loss, _ = policy_loss(logp, old, adv, name="ppo", clip_low=0.1, clip_high=0.5)
    assert loss.tolist() == pytest.approx([-1.5, 0.9], abs=1e-6)  # 1 + 0.5 and 1 - 0.1


def test_dual_clip_caps_the_loss_of_negative_advantages():
    old = torch.zeros(3)
    logp = torch.log(torch.tensor([10.0, 10.0, 2.0]))
    adv = torch.tensor([-1.0, 1.0, -1.0])
    loss, stats = policy_loss(logp, old, adv, name="ppo", clip_ratio_c=3.0)
    # A<0, r=10: ppo gives 10, capped at 3; A>0 untouched (clipped at 1.28); A<0, r=2 below the cap
    assert loss.tolist() == pytest.approx([3.0, -1.28, 2.0], abs=1e-5)
    assert stats["dual_clipped"].tolist() == [1.0, 0.0, 0.0]
    no_cap, _ = policy_loss(logp, old, adv, name="ppo")
    assert no_cap[0].item() == pytest.approx(10.0, rel=1e-5)


def test_huge_log_ratio_is_clamped_so_zero_advantages_stay_finite():
    # A token sampled at logprob -1000 that the trainer now gives logprob 0: exp(1000) is inf, and
    # inf * 0 is NaN, which would poison the whole gradient.
    old = torch.tensor([-1000.0, -1.0])
    logp = torch.tensor([0.0, -1.0], requires_grad=True)
    adv = torch.tensor([0.0, 1.0])
    for name in ("importance_sampling", "ppo"):
        loss, stats = policy_loss(logp, old, adv, name=name, max_log_ratio=20.0)
        assert torch.isfinite(loss).all()
        assert stats["ratio"][0].item() == pytest.approx(math.exp(20.0), rel=1e-4)
        loss.sum().backward()
        assert torch.isfinite(logp.grad).all()
        logp.grad = None


def test_importance_sampling_gradient_is_ratio_times_advantage():
    old = torch.log(torch.tensor([0.5, 0.25]))
    logp = torch.log(torch.tensor([0.25, 0.25])).requires_grad_(True)
    adv = torch.tensor([2.0, -1.0])
    loss, _ = policy_loss(logp, old, adv, name="importance_sampling")
    assert loss.tolist() == pytest.approx([-1.0, 1.0])
    loss.sum().backward()
    assert logp.grad.tolist() == pytest.approx([-1.0, 1.0])  # d(-r*A)/dlogp = -r*A


def test_truncated_importance_weight_multiplies_the_loss_and_carries_no_gradient():
    logp = torch.zeros(2, requires_grad=True)
    weight = torch.tensor([2.0, 0.5], requires_grad=True)
    loss, stats = policy_loss(logp, torch.zeros(2), torch.ones(2), tis_weight=weight.detach())
    assert loss.tolist() == pytest.approx([-2.0, -0.5])
    assert stats["tis_weight"].tolist() == [2.0, 0.5]


@pytest.mark.parametrize(
    ("estimator", "expected"),
    # d = logp - ref = [0, -1, 1]
    [
        ("k1", [0.0, -1.0, 1.0]),
        ("k2", [0.0, 0.5, 0.5]),
        ("k3", [0.0, math.exp(1.0) - 1.0 - 1.0, math.exp(-1.0) + 1.0 - 1.0]),
    ],
)
def test_kl_estimators(estimator, expected):
    logp = torch.tensor([-1.0, -2.0, -1.0])
    ref = torch.tensor([-1.0, -1.0, -2.0])
    assert kl_penalty(logp, ref, estimator, clamp=None).tolist() == pytest.approx(expected, abs=1e-6)


def test_kl_is_clamped():
    logp, ref = torch.tensor([-30.0]), torch.tensor([0.0])  # k3 = exp(30) - 31
    assert kl_penalty(logp, ref, "k3", clamp=10.0).item() == 10.0
    assert kl_penalty(logp, ref, "k1", clamp=10.0).item() == -10.0


def test_unknown_loss_and_estimator_are_named():
    with pytest.raises(ValueError, match=r"algorithm\.loss\.name"):
        policy_loss(torch.zeros(1), torch.zeros(1), torch.zeros(1), name="dpo")
    with pytest.raises(ValueError, match=r"algorithm\.loss\.kl_estimator"):
        kl_penalty(torch.zeros(1), torch.zeros(1), "k4")
