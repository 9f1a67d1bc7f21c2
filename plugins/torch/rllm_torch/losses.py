"""Token-level policy-gradient losses and their aggregation.

Every loss here works on flat tensors of response tokens (one entry per trained token):

* ``importance_sampling``: ``-ratio * A`` with ``ratio = exp(logp - old_logp)``. On-policy
  (ratio 1) its gradient is plain REINFORCE, ``-A * grad logp``; off-policy it is the
  importance-weighted estimate (Tinker's ``importance_sampling``).
* ``ppo``: ``max(-ratio * A, -clip(ratio, 1 - clip_low, 1 + clip_high) * A)`` (clip-higher when
  ``clip_high > clip_low``).
* KL to the reference (``kl_coef > 0``): the non-negative ``k3`` estimator
  ``exp(ref - logp) - (ref - logp) - 1`` added per token with weight ``kl_coef``.

Aggregation is a weighted sum with per-token weights computed once for the whole batch, so that
splitting it into micro-batches with gradient accumulation gives exactly the same gradient:

* ``token-mean``: ``1 / total_tokens``
* ``seq-mean-token-mean``: ``1 / (num_seqs * len(seq))``
* ``seq-mean-token-sum-norm`` (Dr.GRPO): ``1 / (num_seqs * max_response_len)``
"""

from __future__ import annotations

import torch

__all__ = ["LOSSES", "AGG_MODES", "token_weights", "policy_loss"]

LOSSES = ("importance_sampling", "ppo")
AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def token_weights(seq_lens: list[int], mode: str) -> torch.Tensor:
    """One weight per token (sequences concatenated in order) implementing ``mode``."""
    if mode not in AGG_MODES:
        raise ValueError(f"algorithm.loss.agg_mode: unknown mode {mode!r}; one of {', '.join(AGG_MODES)}")
    n_seqs = sum(1 for n in seq_lens if n > 0)
    if n_seqs == 0:
        return torch.zeros(0)
    total = sum(seq_lens)
    if mode == "token-mean":
        per_seq = [1.0 / total] * len(seq_lens)
    elif mode == "seq-mean-token-mean":
        per_seq = [1.0 / (n_seqs * n) if n else 0.0 for n in seq_lens]
    else:
        norm = max(seq_lens)
        per_seq = [1.0 / (n_seqs * norm)] * len(seq_lens)
    return torch.cat([torch.full((n,), w, dtype=torch.float32) for n, w in zip(seq_lens, per_seq, strict=False)])


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    adv: torch.Tensor,
    *,
    name: str = "importance_sampling",
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss (flat, same shape as ``logp``) and per-token diagnostics (detached)."""
    log_ratio = logp - old_logp
    ratio = torch.exp(log_ratio)
    stats: dict[str, torch.Tensor] = {"ratio": ratio.detach()}
    if name == "importance_sampling":
        loss = -ratio * adv
    elif name == "ppo":
        unclipped = -ratio * adv
        clipped = -torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
        loss = torch.maximum(unclipped, clipped)
        stats["clipped"] = (clipped > unclipped).float().detach()
    else:
        raise ValueError(
            f"algorithm.loss.name: unknown loss {name!r} for the torch backend; one of {', '.join(LOSSES)}"
        )
    stats["pg_loss"] = loss.detach()
    if kl_coef > 0 and ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1.0
        loss = loss + kl_coef * kl
        stats["kl"] = kl.detach()
    return loss, stats
