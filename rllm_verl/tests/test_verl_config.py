"""The core's algorithm config mapped onto verl's own Hydra config and loss (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rllm_verl.config import NO_CLIP, VerlConfig, actor_config, algorithm_overrides, compose_verl_config

from rllm_core.config import AlgorithmConfig, LossConfig


@pytest.fixture(scope="module")
def composed(tmp_path_factory):
    algorithm = AlgorithmConfig.model_validate(
        {
            "loss": {"name": "ppo", "clip_low": 0.1, "clip_high": 0.3, "agg_mode": "seq-mean-token-mean"},
            "optim": {"lr": 3e-4, "grad_clip": 0.5, "weight_decay": 0.0},
        }
    )
    cfg = VerlConfig(
        model_path=str(tmp_path_factory.mktemp("model")),
        device="cpu",
        overrides=["actor_rollout_ref.actor.ppo_epochs=3"],
    )
    return compose_verl_config(cfg, algorithm)


def test_composed_config_is_verls_defaults_with_the_cores_algorithm(composed):
    actor = composed.actor_rollout_ref.actor
    assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c) == (0.1, 0.3, NO_CLIP)
    assert actor.loss_agg_mode == "seq-mean-token-mean"
    assert actor.policy_loss.loss_mode == "vanilla"
    assert (actor.optim.lr, actor.optim.clip_grad, actor.optim.weight_decay) == (3e-4, 0.5, 0.0)
    assert actor.optim.lr_scheduler_type == "constant"
    assert actor.strategy == actor.fsdp_config.strategy == "fsdp2"
    assert dict(actor.fsdp_config.mixed_precision) == {
        "param_dtype": "fp32",
        "reduce_dtype": "fp32",
        "buffer_dtype": "fp32",
    }
    assert actor.fsdp_config.use_torch_compile is False
    assert composed.actor_rollout_ref.model.use_remove_padding is True
    assert actor.ppo_epochs == 3  # the raw overrides come last
    assert actor.kl_loss_type == "low_var_kl"  # untouched keys keep verl's defaults


def test_the_entropy_bonus_is_verls_entropy_coeff(tmp_path):
    composed = compose_verl_config(VerlConfig(model_path=str(tmp_path), entropy_coef=0.02), AlgorithmConfig())
    assert composed.actor_rollout_ref.actor.entropy_coeff == 0.02
    assert actor_config(composed, LossConfig()).entropy_coeff == 0.02  # a new loss keeps it


def test_a_key_verl_does_not_have_is_an_error(tmp_path):
    from hydra.errors import ConfigCompositionException

    cfg = VerlConfig(model_path=str(tmp_path), overrides=["actor_rollout_ref.actor.no_such_key=1"])
    with pytest.raises(ConfigCompositionException):
        compose_verl_config(cfg, AlgorithmConfig())


@pytest.mark.parametrize(
    ("loss", "match"),
    [
        ({"kl_coef": 0.1, "kl_estimator": "k1"}, "kl_clamp"),
        ({"kl_coef": 0.1, "kl_clamp": 5.0}, "kl_clamp"),
        ({"max_log_ratio": 10.0}, "max_log_ratio"),
        ({"forward_kl_coef": 0.05}, "forward_kl_coef"),
        ({"name": "dro"}, "algorithm.loss.name"),
    ],
)
def test_what_is_not_mapped_yet_fails_by_name(loss, match):
    with pytest.raises((NotImplementedError, ValueError), match=match):
        algorithm_overrides(AlgorithmConfig.model_validate({"loss": loss}))


@pytest.mark.parametrize(
    ("estimator", "clamp", "verl_name"), [("k1", None, "kl"), ("k2", None, "mse"), ("k3", 10.0, "low_var_kl")]
)
def test_kl_to_the_reference_is_verls_kl_loss(estimator, clamp, verl_name):
    loss = {"kl_coef": 0.05, "kl_estimator": estimator, "kl_clamp": clamp}
    overrides = algorithm_overrides(AlgorithmConfig.model_validate({"loss": loss}))
    assert "actor_rollout_ref.actor.use_kl_loss=true" in overrides
    assert "actor_rollout_ref.actor.kl_loss_coef=0.05" in overrides
    assert f"actor_rollout_ref.actor.kl_loss_type={verl_name}" in overrides


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_verls_kl_estimators_are_the_torch_backends(estimator):
    """verl's ``kl_penalty`` under the mapped name against rllm-torch's (an independent implementation)."""
    from rllm_torch.losses import kl_penalty
    from rllm_verl.config import VERL_KL_TYPES
    from verl.trainer.ppo.core_algos import kl_penalty_forward

    rng = np.random.default_rng(1)
    logp = torch.from_numpy(rng.uniform(-30, 0, size=256))
    ref = torch.from_numpy(rng.uniform(-30, 0, size=256))
    clamp = 10.0 if estimator == "k3" else None
    expected = kl_penalty(logp, ref, estimator, clamp)
    torch.testing.assert_close(kl_penalty_forward(logp, ref, VERL_KL_TYPES[estimator]), expected)


def test_per_role_losses_fail_by_name():
    with pytest.raises(NotImplementedError, match=r"algorithm\.loss_by_role"):
        algorithm_overrides(AlgorithmConfig.model_validate({"loss_by_role": {"judge": {"name": "ppo"}}}))


def test_verls_scheduler_stays_constant_whatever_the_cores_schedule():
    """The driver sets each step's lr from ``OptimConfig.lr_factor`` (test_backend checks the values)."""
    algorithm = AlgorithmConfig.model_validate({"optim": {"schedule": "cosine", "warmup_steps": 3}})
    overrides = algorithm_overrides(algorithm)
    assert "actor_rollout_ref.actor.optim.lr_scheduler_type=constant" in overrides
    assert "actor_rollout_ref.actor.optim.lr_warmup_steps=0" in overrides


@pytest.mark.parametrize(("name", "clip_ratio_c"), [("importance_sampling", None), ("ppo", None), ("ppo", 3.0)])
def test_verls_vanilla_loss_is_the_torch_backends_per_token_loss(composed, name, clip_ratio_c):
    """verl's policy loss with the mapped settings, token by token, against rllm-torch's
    ``policy_loss`` (an independent implementation) on ratios from 0.01 to 100 and both signs of A."""
    pytest.importorskip("rllm_torch", reason="pip install 'rllm-verl[test]'")
    from rllm_torch.losses import policy_loss
    from verl.trainer.ppo.core_algos import compute_policy_loss_vanilla

    loss = LossConfig(name=name, clip_low=0.2, clip_high=0.28, clip_ratio_c=clip_ratio_c)
    config = actor_config(composed, loss)
    rng = np.random.default_rng(0)
    logp = torch.from_numpy(rng.uniform(-4, 0, size=(1, 64)))
    old = logp + torch.from_numpy(rng.uniform(-4.6, 4.6, size=(1, 64)))
    adv = torch.from_numpy(rng.normal(size=(1, 64)))
    expected, stats = policy_loss(
        logp[0], old[0], adv[0], name=name, clip_low=0.2, clip_high=0.28, clip_ratio_c=clip_ratio_c
    )
    if name == "ppo":
        assert 0 < int(stats["clipped"].sum()) < 64  # the clip is exercised both ways
    for t in range(64):  # token by token: verl's token-mean of one token is that token's loss
        one = [x[:, t : t + 1] for x in (old, logp, adv)]
        got, _ = compute_policy_loss_vanilla(*one, response_mask=torch.ones(1, 1), config=config)
        assert float(got) == pytest.approx(float(expected[t]), rel=1e-12, abs=1e-12), t


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ({}, False),
        ({"algorithm": {"loss": {"kl_coef": 0.1}}}, True),
        ({"hooks": {"opsd": {}}}, True),  # teacher: initial (the default) is the reference
        ({"hooks": {"opsd": {"teacher": "refresh"}}}, True),
        ({"hooks": {"opsd": {"teacher": "current"}}}, False),  # scored with the policy
    ],
)
def test_the_workers_get_a_reference_for_a_kl_loss_or_an_opsd_teacher(settings, expected):
    from rllm_verl.backend import needs_reference

    from rllm_core.config import load_config

    assert needs_reference(load_config({"backend": "verl", **settings})) is expected
