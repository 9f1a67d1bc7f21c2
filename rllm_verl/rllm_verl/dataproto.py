"""Token rows (``rllm_core.rows.TokenRows``, after ``fill_advantages``) to a verl ``DataProto``. Pure.

Row ``r`` is split at its ``prompt_len`` (the position of its first action token)::

    prompt   = tokens[:prompt_len]     left-padded to P  (the longest prompt of the batch)
    response = tokens[prompt_len:]     right-padded to R (actions AND the observations between them)
    input_ids = prompt ++ response     (B, P + R)

and, on the response columns, ``response_mask`` is 1 exactly on action tokens (the row's loss
mask), ``advantages`` are the rows' per-token advantages (0 off the mask), ``old_log_probs`` the
logprobs the importance ratio divides by (the sampling logprobs unless given; NaN where unknown,
see ``VerlWorkers.update_actor``) and ``rollout_log_probs`` the sampling logprobs (0 where
unknown). ``attention_mask`` comes from the lengths, never from ``tokens != pad_id`` (a real token
may equal the pad id, e.g. pad == eos); ``position_ids`` count real tokens from 0.

**Data-parallel padding.** verl splits a batch into ``dp_size`` equal chunks, so the batch is
padded with rows that change nothing: one pad token of prompt and one of response, attended (verl
assumes every sequence has a prompt and packs sequences without padding), ``response_mask`` 0,
advantages and logprobs 0. Their tokens are in no loss and in no normaliser.

**Loss aggregation.** ``algorithm.loss.agg_mode`` has the same name in verl (``loss_agg_mode``,
see :func:`loss_agg_settings`); docs/rows.md gives the weights. verl normalises with *global*
counts: ``token-mean`` divides by ``batch_num_tokens``, which verl sums from ``response_mask``
over the data-parallel ranks (pad rows add 0, so it is ``N``, the batch's action tokens), and the
``seq-mean-*`` modes divide by ``global_batch_size``, which this module sets in ``meta_info`` to
``S``, the number of rows with at least one action token (pad rows are not counted).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from rllm_core.rows import AGG_MODES

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from verl import DataProto

    from rllm_core.rows import TokenRows

__all__ = ["loss_agg_settings", "padded_size", "response_values_to_rows", "rows_to_dataproto"]

PAD_ROW_UID = "__pad__"


def padded_size(n_rows: int, dp_size: int) -> int:
    """``n_rows`` rounded up to a multiple of ``dp_size`` (at least ``dp_size``: every rank gets a row)."""
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    return max(dp_size, -(-n_rows // dp_size) * dp_size)


def loss_agg_settings(agg_mode: str, loss_scale_factor: float | None = None) -> dict[str, Any]:
    """verl actor settings (``loss_agg_mode``, ``loss_scale_factor``) for ``algorithm.loss.agg_mode``.

    The names are the same in both; ``seq-mean-token-sum-norm`` needs the constant ``C``
    (verl would otherwise divide by the padded response width of each micro-batch, which is
    neither constant nor the core's meaning)."""
    if agg_mode not in AGG_MODES:
        raise ValueError(f"algorithm.loss.agg_mode: unknown mode {agg_mode!r}; one of {', '.join(AGG_MODES)}")
    if agg_mode == "seq-mean-token-sum-norm":
        if not loss_scale_factor or loss_scale_factor <= 0:
            raise ValueError(
                "algorithm.loss.loss_scale_factor: seq-mean-token-sum-norm needs a positive constant "
                "(e.g. the max response length)"
            )
        return {"loss_agg_mode": agg_mode, "loss_scale_factor": float(loss_scale_factor)}
    return {"loss_agg_mode": agg_mode, "loss_scale_factor": None}


def _int_tokens(row: Sequence[Any], r: int) -> list[int]:
    if not all(isinstance(t, int | np.integer) for t in row):
        raise TypeError(
            f"row {r} holds a non-integer prompt chunk; verl's DataProto carries token ids only "
            "(multimodal rows are not supported by rllm-verl yet)"
        )
    return [int(t) for t in row]


def rows_to_dataproto(
    rows: TokenRows,
    *,
    pad_id: int,
    dp_size: int = 1,
    old_logprobs: np.ndarray | None = None,
    indices: Sequence[int] | None = None,
    temperature: float = 1.0,
    ref_logprobs: np.ndarray | None = None,
    is_weights: np.ndarray | None = None,
) -> DataProto:
    """The verl batch of ``rows`` (see the module docstring), padded to a multiple of ``dp_size``.

    ``old_logprobs``: ``(T,)`` flat like ``rows.logprobs`` (e.g. from ``compute_log_prob``);
    None: the sampling logprobs. ``ref_logprobs``: the reference model's, same layout (becomes
    ``ref_log_prob``, which verl's KL loss reads). ``is_weights``: per-token truncated importance
    weights, same layout (``rollout_is_weights``: verl's policy loss multiplies each token's loss by
    it). ``indices``: a subset of the rows (a mini-batch), in that order;
    ``global_batch_size`` then counts that subset. The real rows come first; ``non_tensor_batch
    ["is_pad"]`` marks the others, and ``meta_info["num_rows"]`` counts the real ones.
    """
    import torch
    from verl import DataProto

    chosen = list(range(len(rows))) if indices is None else [int(i) for i in indices]
    if not chosen:
        raise ValueError("no rows to convert: verl cannot run an empty batch")
    offsets = rows.offsets
    old = rows.logprobs if old_logprobs is None else np.asarray(old_logprobs, dtype=np.float64)
    if old.shape != rows.logprobs.shape:
        raise ValueError(f"old_logprobs has shape {old.shape}; the rows hold {rows.logprobs.shape} tokens")
    extra = {"ref_log_prob": ref_logprobs, "rollout_is_weights": is_weights}
    for key, values in extra.items():
        if values is not None and np.shape(values) != rows.logprobs.shape:
            raise ValueError(f"{key} has shape {np.shape(values)}; the rows hold {rows.logprobs.shape} tokens")
    extra_out = {k: np.zeros((0, 0), dtype=np.float32) for k, v in extra.items() if v is not None}

    n_real = len(chosen)
    size = padded_size(n_real, dp_size)
    prompt_lens = [int(rows.prompt_lens[r]) for r in chosen] + [1] * (size - n_real)
    lengths = [int(offsets[r + 1] - offsets[r]) for r in chosen] + [2] * (size - n_real)
    resp_lens = [n - p for n, p in zip(lengths, prompt_lens, strict=True)]
    width_p, width_r = max(prompt_lens), max(resp_lens)

    prompts = np.full((size, width_p), pad_id, dtype=np.int64)
    responses = np.full((size, width_r), pad_id, dtype=np.int64)
    prompt_attn = np.zeros((size, width_p), dtype=np.int64)
    resp_attn = np.zeros((size, width_r), dtype=np.int64)
    resp_mask = np.zeros((size, width_r), dtype=np.int64)
    advantages = np.zeros((size, width_r), dtype=np.float32)
    old_lp = np.zeros((size, width_r), dtype=np.float32)
    rollout_lp = np.zeros((size, width_r), dtype=np.float32)
    extra_out = {k: np.zeros((size, width_r), dtype=np.float32) for k in extra_out}
    sampled = np.nan_to_num(rows.logprobs, nan=0.0)
    for i, r in enumerate(chosen):
        tokens = _int_tokens(rows.tokens[r], r)
        p, n, a = prompt_lens[i], resp_lens[i], int(offsets[r])
        prompts[i, width_p - p :] = tokens[:p]
        prompt_attn[i, width_p - p :] = 1
        responses[i, :n] = tokens[p:]
        resp_attn[i, :n] = 1
        resp_mask[i, :n] = rows.loss_mask[a + p : a + p + n]
        advantages[i, :n] = rows.advantages[a + p : a + p + n]
        old_lp[i, :n] = old[a + p : a + p + n]
        rollout_lp[i, :n] = sampled[a + p : a + p + n]
        for key, out in extra_out.items():
            out[i, :n] = extra[key][a + p : a + p + n]
    prompt_attn[n_real:, -1] = 1  # pad rows: one attended pad token of prompt...
    resp_attn[n_real:, 0] = 1  # ...and one of response, masked out of every loss

    attention = np.concatenate([prompt_attn, resp_attn], axis=1)
    tensors = {
        "prompts": torch.from_numpy(prompts),
        "responses": torch.from_numpy(responses),
        "input_ids": torch.from_numpy(np.concatenate([prompts, responses], axis=1)),
        "attention_mask": torch.from_numpy(attention),
        "position_ids": torch.from_numpy(np.clip(np.cumsum(attention, axis=1) - 1, 0, None)),
        "response_mask": torch.from_numpy(resp_mask),
        "advantages": torch.from_numpy(advantages),
        "old_log_probs": torch.from_numpy(old_lp),
        "rollout_log_probs": torch.from_numpy(rollout_lp),
    }
    tensors.update({key: torch.from_numpy(out) for key, out in extra_out.items()})
    n_pad = size - n_real

    def column(values: Sequence[Any], pad: Any) -> np.ndarray:
        out = np.empty(size, dtype=object)
        out[:] = [*values, *([pad] * n_pad)]
        return out

    task_ids = [rows.group_keys[int(rows.group_index[r])][0] for r in chosen]
    non_tensors = {
        "uid": column([str(int(rows.group_index[r])) for r in chosen], PAD_ROW_UID),
        "task_id": column(task_ids, ""),
        "role": column([rows.roles[r] for r in chosen], ""),
        "member_index": column([int(rows.member_index[r]) for r in chosen], -1),
        "termination": column([rows.termination[r] for r in chosen], ""),
        "is_pad": column([False] * n_real, True),
    }
    n_seqs = int((resp_mask[:n_real].sum(axis=1) > 0).sum())
    meta = {"global_batch_size": n_seqs, "temperature": float(temperature), "num_rows": n_real}
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors, meta_info=meta)


def response_values_to_rows(
    values: torch.Tensor | np.ndarray, rows: TokenRows, indices: Sequence[int] | None = None
) -> np.ndarray:
    """Per-response-token values ``(B, R)`` of a batch made by :func:`rows_to_dataproto` (e.g. the
    log-probs verl returns) back onto the rows' flat layout: ``(T,)`` float64, the value at every
    response position (actions and observations), 0 on prompt positions and rows not in ``indices``."""
    chosen = list(range(len(rows))) if indices is None else [int(i) for i in indices]
    arr = values.detach().cpu().double().numpy() if hasattr(values, "detach") else np.asarray(values, np.float64)
    out = np.zeros(rows.num_tokens, dtype=np.float64)
    offsets = rows.offsets
    for i, r in enumerate(chosen):
        a, b = int(offsets[r] + rows.prompt_lens[r]), int(offsets[r + 1])
        out[a:b] = arr[i, : b - a]
    return out
