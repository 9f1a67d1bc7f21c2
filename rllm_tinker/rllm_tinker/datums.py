"""Core token rows to ``tinker.Datum``: the only place this backend turns training data into requests.

One datum per row (:mod:`rllm_core.rows`: a whole trajectory when its turns extend each other)::

    model_input    = row[:-1]              ints as EncodedTextChunks; opaque chunks (images) as they are
    target_tokens  = row[1:]               0 under a chunk (a chunk is one row position, chunk.length tokens)
    logprobs       = sampling logprobs     of each target on the loss mask, 0 elsewhere
    advantages     = w_t * A_t             w: the core's aggregation weight (0 off the mask)
    weights        = w_t                   cross_entropy only (supervised roles)

Tinker sums token losses (no mean on the server), and its policy losses are linear in ``A_t`` with a
clip test that depends only on its sign, so scaling the advantages by the weights of
``algorithm.loss.agg_mode`` makes the server's sum the core's aggregate (docs/rows.md). ``dro``'s
quadratic penalty is not scaled: it is a per-token sum as Tinker defines it.

A row longer than ``max_train_length`` tokens is dropped here (counted), never sent: a rejected
request leaves the training client unusable. The weights are computed over the rows that are kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tinker

from rllm_core.config import LossConfig
from rllm_core.rows import TokenRows

__all__ = ["POLICY_LOSSES", "TINKER_LOSSES", "loss_fn_config", "model_input", "row_length", "rows_to_datums"]

POLICY_LOSSES = ("importance_sampling", "ppo", "cispo", "dro")
TINKER_LOSSES = (*POLICY_LOSSES, "cross_entropy")


def _position_length(token: Any) -> int:
    if type(token) is int:
        return 1
    length = getattr(token, "length", None)
    if not isinstance(length, int):
        raise TypeError(f"a row holds {type(token).__name__}, which is neither a token id nor a tinker ModelInputChunk")
    return length


def row_length(tokens: Sequence[Any]) -> int:
    """Tokens in a row as the service counts them (an image chunk is ``chunk.length`` tokens)."""
    if all(type(t) is int for t in tokens):
        return len(tokens)
    return sum(_position_length(t) for t in tokens)


def model_input(tokens: Sequence[Any]) -> tinker.ModelInput:
    chunks: list[Any] = []
    run: list[int] = []
    for t in tokens:
        if type(t) is int:
            run.append(t)
            continue
        if run:
            chunks.append(tinker.EncodedTextChunk(tokens=run))
            run = []
        chunks.append(t)
    if run:
        chunks.append(tinker.EncodedTextChunk(tokens=run))
    return tinker.ModelInput(chunks=chunks)


def loss_fn_config(loss: LossConfig) -> dict[str, float | str] | None:
    """Tinker's ``loss_fn_config`` for the core's loss settings.

    The core's clip settings are distances from 1 (``clip_low = 0.2``); Tinker's ``ppo`` and
    ``cispo`` take the ratio bounds themselves (``clip_low_threshold = 0.8``). ``loss_fn_config``
    in the core config is passed on over these.
    """
    out: dict[str, float | str] = {}
    if loss.name in ("ppo", "cispo"):
        out = {"clip_low_threshold": 1.0 - loss.clip_low, "clip_high_threshold": 1.0 + loss.clip_high}
    out.update(loss.loss_fn_config)
    return out or None


def rows_to_datums(
    rows: TokenRows,
    loss: LossConfig,
    *,
    max_train_length: int,
    select: Sequence[int] | None = None,
    loss_scale_factor: float | None = None,
) -> tuple[list[tinker.Datum], list[int], dict[str, float]]:
    """Datums for ``rows`` (or the rows in ``select``), the row index of each, and metrics.

    ``loss``: the loss of these rows' role (its name picks the inputs, its ``agg_mode`` the weights).
    """
    wanted = list(range(len(rows))) if select is None else list(select)
    kept, dropped = [], 0
    for r in wanted:
        if row_length(rows.tokens[r]) > max_train_length:
            dropped += 1
        else:
            kept.append(r)
    metrics = {"tinker/dropped_rows": float(dropped)}
    if not kept:
        return [], [], metrics
    weights = rows.loss_weights(loss.agg_mode, loss_scale_factor, rows=kept)
    supervised = loss.name == "cross_entropy"
    datums = []
    for r in kept:
        a, b = int(rows.offsets[r]), int(rows.offsets[r + 1])
        tokens = rows.tokens[r]
        w = weights[a + 1 : b]
        if all(type(t) is int for t in tokens):
            targets = np.asarray(tokens[1:], dtype=np.int64)
            expand = None
        else:  # spread each chunk position over the tokens it stands for (no loss there)
            lengths = [_position_length(t) for t in tokens[1:]]
            pairs = zip(tokens[1:], lengths, strict=True)
            targets = np.concatenate([np.full(n, t if type(t) is int else 0, dtype=np.int64) for t, n in pairs])
            expand = np.asarray(lengths)
        if supervised:
            inputs = {"weights": _spread(w, expand)}
        else:
            sampler = rows.logprobs[a + 1 : b]
            on_mask = rows.loss_mask[a + 1 : b]
            if np.isnan(sampler[on_mask]).any():
                raise ValueError(
                    f"algorithm.loss.name={loss.name!r} needs the sampling logprobs of every action token, "
                    "and a step of this batch has none (its engine did not return logprobs)"
                )
            inputs = {
                "logprobs": _spread(np.where(on_mask, sampler, 0.0), expand),
                "advantages": _spread(w * rows.advantages[a + 1 : b], expand),
            }
        datums.append(
            tinker.Datum(
                model_input=model_input(tokens[:-1]),
                loss_fn_inputs={"target_tokens": targets, **{k: v.astype(np.float32) for k, v in inputs.items()}},
            )
        )
    metrics["tinker/datums"] = float(len(datums))
    return datums, kept, metrics


def _spread(values: np.ndarray, expand: np.ndarray | None) -> np.ndarray:
    """Per-position values as per-token values (0 on every token of a chunk: no loss there)."""
    if expand is None:
        return values
    out = np.zeros(int(expand.sum()), dtype=values.dtype)
    starts = np.concatenate([[0], np.cumsum(expand)[:-1]])
    singles = expand == 1
    out[starts[singles]] = values[singles]
    return out
