"""Token-level policy-gradient losses (what ``algorithm.loss`` selects) on flat tensors of action tokens.

With ``logp`` the trainer's logprobs (tempered like the sampler's), ``old`` what the ratio divides
by (``algorithm.loss.old_logprobs``) and ``A`` the advantage of each token::

    log_ratio = clamp(logp - old, -max_log_ratio, max_log_ratio)    # exp never overflows
    ratio     = exp(log_ratio)
    importance_sampling:  -ratio * A          (on-policy: the gradient is REINFORCE's, -A grad logp)
    ppo:                  max(-ratio * A, -clip(ratio, 1 - clip_low, 1 + clip_high) * A)
    dual clip (A < 0):    min(ppo, -clip_ratio_c * A)                 (when clip_ratio_c is set)
    truncated IS:         loss *= min(exp(old - sampler_logp), tis_cap)   (detached; recompute mode)
    KL (kl_coef > 0):     + kl_coef * clamp(k(logp, ref), -kl_clamp, kl_clamp)
                          k1 = d, k2 = d^2 / 2, k3 = exp(-d) + d - 1 with d = logp - ref

The aggregation weights come from the core (:meth:`rllm_core.rows.TokenRows.loss_weights`): the
loss of a batch is ``sum_t w_t * loss_t``, so splitting it into micro-batches changes nothing.
"""

from __future__ import annotations

import torch

__all__ = ["LOSSES", "kl_penalty", "policy_loss"]

LOSSES = ("importance_sampling", "ppo")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    *,
    name: str = "importance_sampling",
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    clip_ratio_c: float | None = None,
    max_log_ratio: float = 20.0,
    tis_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token policy loss (same shape as ``logp``) and per-token diagnostics (detached)."""
    log_ratio = torch.clamp(logp - old_logp, -max_log_ratio, max_log_ratio)
    ratio = torch.exp(log_ratio)
    stats: dict[str, torch.Tensor] = {"ratio": ratio.detach()}
    if name == "importance_sampling":
        loss = -ratio * adv
    elif name == "ppo":
        unclipped = -ratio * adv
        clipped = -torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
        loss = torch.maximum(unclipped, clipped)
        stats["clipped"] = (clipped > unclipped).float().detach()
        if clip_ratio_c is not None:
            capped = torch.minimum(loss, -clip_ratio_c * adv)
            stats["dual_clipped"] = ((adv < 0) & (capped < loss)).float().detach()
            loss = torch.where(adv < 0, capped, loss)
    else:
        raise ValueError(
            f"algorithm.loss.name: unknown loss {name!r} for the torch backend; one of {', '.join(LOSSES)}"
        )
    if tis_weight is not None:
        loss = loss * tis_weight
        stats["tis_weight"] = tis_weight.detach()
    stats["pg_loss"] = loss.detach()
    return loss, stats


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3", clamp: float | None = 10.0):
    """Per-token estimate of KL(policy || reference) from the sampled tokens' logprobs."""
    d = logp - ref_logp
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * d * d
    elif estimator == "k3":
        kl = torch.exp(-d) + d - 1.0
    else:
        raise ValueError(f"algorithm.loss.kl_estimator: unknown estimator {estimator!r}; one of k1, k2, k3")
    if clamp is not None:
        kl = torch.clamp(kl, -clamp, clamp)
    return kl
