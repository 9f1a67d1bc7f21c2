"""Token rows: the one form in which trajectory groups reach every backend's loss.

:func:`build_rows` turns the filtered groups into rows, one pure pass::

    for each trajectory of each group:
        row = first step's prompt + response
        for each later step:
            if its prompt begins with the row so far:  row += new prompt tokens (mask 0) + response (mask 1)
            else:                                       close the row, start a new one (a "break")

so a multi-turn trajectory whose turns extend each other (token-exact multi-turn) is one row, and
the observation / tool-output tokens between two responses are in the row with loss mask 0. Aligned
token by token, flat over all rows (row ``r`` is ``offsets[r]:offsets[r + 1]``):

* ``loss_mask``: 1 exactly on sampled action tokens (each step's ``response_ids``);
* ``logprobs``: the sampling logprobs on those tokens (``NaN`` where the engine gave none), 0 elsewhere;
* ``advantages``: 0 until :meth:`TokenRows.fill_advantages` copies each step's advantage onto its
  span (a float is broadcast over the span, a per-token list is placed token by token).

Per row: ``tokens`` (ints, or opaque prompt chunks passed through untouched: each is one position),
``prompt_lens`` (positions before the first action token), group, role, rollout and trajectory
index, weight versions (min/max over its steps), the episode's termination reason, whether a
step of it was cut by the length limit (``truncated``), and the temperature it was sampled at
(``temperature``: its first step's ``Step.temperature``, else the episode's ``TEMPERATURE_KEY``;
a step sampled at another temperature than its row's starts a new row). Per step: the row it is in
and its span.

Trajectories whose episode ended for a reason in ``mask_reasons`` are left out (they stay in their
group's baseline; they are simply not trained on), and so are rows with a truncated step when
``max_response_length`` is among those reasons (overlong masking). Rows with no action token are
dropped. Every such decision is counted in :attr:`TokenRows.metrics`.

:meth:`TokenRows.loss_weights` defines what each ``algorithm.loss.agg_mode`` means on rows: the
per-token weight ``w`` with ``loss = sum_t w_t * loss_t``; docs/rows.md says how each backend
realises it.
"""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from rllm_core.types import Step, TerminationReason, TrajectoryGroup

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from rllm_core.config import OptimConfig

__all__ = ["AGG_MODES", "ROW_BREAK_KEY", "TEMPERATURE_KEY", "RowView", "TokenRows", "build_rows", "mini_batches"]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

ROW_BREAK_KEY = "row_break"
"""``step.info[ROW_BREAK_KEY] = "reason"`` starts a new row at that step (a workflow that edited its
history, e.g. compaction); the break is counted under that reason."""

TEMPERATURE_KEY = "sampling_temperature"
"""``episode.info[TEMPERATURE_KEY] = T``: the episode's rollouts were sampled at temperature ``T``
rather than the run's training temperature (``rollout.explore`` marks its episodes so); its rows
are trained at ``T`` unless their steps record a temperature of their own (``Step.temperature``)."""


@dataclass(frozen=True)
class RowView:
    """One row, sliced out of :class:`TokenRows` (numpy views, not copies)."""

    tokens: list[Any]
    loss_mask: np.ndarray
    logprobs: np.ndarray
    advantages: np.ndarray
    prompt_len: int
    group_index: int
    role: str
    steps: list[tuple[Step, int, int]]
    """``(step, start, end)``: the step's response occupies ``tokens[start:end]``."""


@dataclass(eq=False)
class TokenRows:
    """Token rows of one training batch (see the module docstring)."""

    tokens: list[list[Any]]
    offsets: np.ndarray
    """``(R + 1,)`` int64: row ``r`` is ``offsets[r]:offsets[r + 1]`` of the flat arrays."""
    loss_mask: np.ndarray
    """``(T,)`` bool."""
    logprobs: np.ndarray
    """``(T,)`` float64: sampling logprobs on the mask (NaN when unknown), 0 elsewhere."""
    advantages: np.ndarray
    """``(T,)`` float64: 0 off the mask; filled by :meth:`fill_advantages`."""
    prompt_lens: np.ndarray
    """``(R,)`` int64: positions before the row's first action token."""
    group_index: np.ndarray
    """``(R,)`` int64: index into :attr:`group_keys`."""
    group_keys: list[tuple[str, str]]
    """``(task_id, role)`` of each group, in the order the groups were given."""
    roles: list[str]
    member_index: np.ndarray
    """``(R,)``: the trajectory's index inside its group (the estimator's unit)."""
    rollout_idx: np.ndarray
    """``(R,)``: ``episode.rollout_idx`` (-1 without episodes)."""
    trajectory_index: np.ndarray
    """``(R,)``: the trajectory's index inside its episode (-1 without episodes)."""
    version_min: np.ndarray
    """``(R,)``: oldest ``weight_version`` of the row's steps (-1 when none is known)."""
    version_max: np.ndarray
    termination: list[str]
    """The episode's termination reason per row (``unknown`` without episodes)."""
    truncated: np.ndarray
    """``(R,)`` bool: a step of the row ended with ``finish_reason == "length"``."""
    temperature: np.ndarray
    """``(R,)`` float64: the temperature the row was sampled at (``Step.temperature``, else
    ``TEMPERATURE_KEY``); NaN: unknown, the run's training temperature."""
    steps: list[Step]
    """Every step that has a span, in row order."""
    step_row: np.ndarray
    step_start: np.ndarray
    """``(S,)``: where each step's response starts, relative to its row's start."""
    step_end: np.ndarray
    metrics: dict[str, float] = field(default_factory=dict)

    # -- shape ----------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    @property
    def num_action_tokens(self) -> int:
        return int(self.loss_mask.sum())

    def row_lengths(self) -> np.ndarray:
        import numpy as np

        return np.diff(self.offsets)

    def row(self, r: int) -> RowView:
        """Row ``r`` with its per-token arrays and step spans."""
        a, b = int(self.offsets[r]), int(self.offsets[r + 1])
        idx = [k for k in range(len(self.steps)) if self.step_row[k] == r]
        return RowView(
            tokens=self.tokens[r],
            loss_mask=self.loss_mask[a:b],
            logprobs=self.logprobs[a:b],
            advantages=self.advantages[a:b],
            prompt_len=int(self.prompt_lens[r]),
            group_index=int(self.group_index[r]),
            role=self.roles[r],
            steps=[(self.steps[k], int(self.step_start[k]), int(self.step_end[k])) for k in idx],
        )

    def step_tokens(self, k: int) -> tuple[list[Any], list[Any], np.ndarray]:
        """``(prompt_ids, response_ids, logprobs)`` of step ``k`` as read back from its row."""
        tokens = self.tokens[int(self.step_row[k])]
        start, end = int(self.step_start[k]), int(self.step_end[k])
        base = int(self.offsets[int(self.step_row[k])])
        return tokens[:start], tokens[start:end], self.logprobs[base + start : base + end]

    # -- advantages and loss weights --------------------------------------------------------

    def fill_advantages(self) -> None:
        """Copy each step's ``advantage`` onto its span (None counts as 0)."""
        import numpy as np

        lengths = self.step_end - self.step_start
        values: list[Any] = [s.advantage for s in self.steps]
        out = np.zeros(self.num_tokens, dtype=np.float64)
        if all(type(v) is float or type(v) is int or v is None for v in values):
            scalars = np.array([0.0 if v is None else v for v in values], dtype=np.float64)
            out[self.loss_mask] = np.repeat(scalars, lengths)
        else:
            flat: list[float] = []
            for step, n, v in zip(self.steps, lengths.tolist(), values, strict=True):
                if v is None:
                    flat.extend([0.0] * n)
                elif isinstance(v, list | tuple):
                    if len(v) != n:
                        raise ValueError(
                            f"a step's per-token advantage has {len(v)} entries for {n} response tokens "
                            f"(weight_version={step.weight_version}); they must match one to one"
                        )
                    flat.extend(v)
                else:
                    flat.extend([float(v)] * n)
            out[self.loss_mask] = np.asarray(flat, dtype=np.float64)
        self.advantages = out

    def mini_batches(self, step: int, seed: int, optim: OptimConfig) -> list[list[int]]:
        """The row indices of each optimiser step of training step ``step`` under ``optim``
        (``mini_batch_size`` or ``mini_batches``, ``epochs``, ``shuffle``): :func:`mini_batches` on these rows."""
        groups = self.group_index if optim.shuffle == "groups" else None
        return mini_batches(
            len(self), step, seed, optim.mini_batch_size, optim.epochs, groups, count=optim.mini_batches
        )

    def loss_weights(
        self, agg_mode: str, loss_scale_factor: float | None = None, rows: Sequence[int] | None = None
    ) -> np.ndarray:
        """Per-token weights ``w`` (0 off the mask) with ``loss = sum_t w_t * loss_t`` for ``agg_mode``.

        ``rows``: a mini-batch (row indices): the weights of one optimiser step on those rows only,
        0 on every other row. With ``N`` action tokens in the batch (or mini-batch), ``S`` rows that
        have at least one, ``n_r`` action tokens in row ``r`` and ``C = loss_scale_factor``:

        * ``token-mean``: ``1 / N``
        * ``seq-mean-token-mean``: ``1 / (S * n_r)``
        * ``seq-mean-token-sum``: ``1 / S``
        * ``seq-mean-token-sum-norm``: ``1 / (S * C)`` (Dr.GRPO: a constant, not the batch's longest row)

        Weights are computed once for the whole batch, so any split into micro-batches with
        gradient accumulation gives the same gradient.
        """
        import numpy as np

        if agg_mode not in AGG_MODES:
            raise ValueError(f"algorithm.loss.agg_mode: unknown mode {agg_mode!r}; one of {', '.join(AGG_MODES)}")
        mask = self.loss_mask.astype(np.float64)
        if rows is not None:
            chosen = np.zeros(len(self), dtype=np.float64)
            chosen[np.asarray(rows, dtype=np.int64)] = 1.0
            mask *= np.repeat(chosen, self.row_lengths())
        total = mask.sum()
        if total == 0:
            return mask
        per_row = np.add.reduceat(mask, self.offsets[:-1]) if len(self) else np.zeros(0)
        n_seqs = float((per_row > 0).sum())
        if agg_mode == "token-mean":
            return mask / total
        if agg_mode == "seq-mean-token-sum":
            return mask / n_seqs
        if agg_mode == "seq-mean-token-sum-norm":
            if not loss_scale_factor or loss_scale_factor <= 0:
                raise ValueError(
                    "algorithm.loss.loss_scale_factor: seq-mean-token-sum-norm needs a positive constant "
                    "(e.g. the max response length)"
                )
            return mask / (n_seqs * float(loss_scale_factor))
        row_of_token = np.repeat(np.arange(len(self)), self.row_lengths())
        return mask / (n_seqs * np.maximum(per_row, 1.0)[row_of_token])


def _episode_info(group: TrajectoryGroup, j: int) -> tuple[Any, int, int, str, float]:
    episodes = group.episodes
    if j < len(episodes):
        ep = episodes[j]
        traj = group.trajectories[j]
        t_idx = -1
        for i, t in enumerate(ep.trajectories):  # by identity: pydantic's == compares every field
            if t is traj:
                t_idx = i
                break
        temperature = ep.info.get(TEMPERATURE_KEY) if ep.info else None
        temperature = float("nan") if temperature is None else float(temperature)
        return ep.termination_reason, ep.rollout_idx, t_idx, ep.termination_reason.value, temperature
    return None, -1, -1, TerminationReason.UNKNOWN.value, float("nan")


def mini_batches(
    n_rows: int,
    step: int,
    seed: int,
    mini_batch_size: int | None,
    epochs: int,
    groups: Sequence[int] | None = None,
    *,
    count: int | None = None,
) -> list[list[int]]:
    """How a training step's rows are split into optimiser steps (every backend's rule).

    ``epochs`` passes over the rows, each shuffled (seeded by ``seed`` and ``step``) into mini-batches
    of ``mini_batch_size`` (the last may be smaller); one batch when it holds them all. ``count``
    instead of a size: each pass is cut into that many near-equal mini-batches (one a row when
    there are fewer rows), whatever the number of rows. With
    ``groups`` (each row's group index, ``TokenRows.group_index``) the groups are shuffled, not the
    rows: a group's rows stay together in row order, so a mini-batch holds whole groups (one may be
    cut at its edge), as in verl's mini-batches of prompts.
    """
    import numpy as np

    if count is not None:
        k = max(1, min(count, n_rows))
        cuts = [n_rows * i // k for i in range(k + 1)]
    else:
        size = mini_batch_size or max(1, n_rows)
        cuts = [*range(0, n_rows, size), n_rows]
    if len(cuts) <= 2 and epochs == 1:
        return [list(range(n_rows))]
    rng = np.random.default_rng([seed, step])
    members: dict[int, list[int]] = {}
    if groups is not None:
        for row, g in enumerate(groups):
            members.setdefault(int(g), []).append(row)
    keys = list(members)
    out = []
    for _ in range(epochs):
        if groups is None:
            order = rng.permutation(n_rows).tolist()
        else:
            order = [row for k in rng.permutation(len(keys)).tolist() for row in members[keys[k]]]
        out.extend(order[a:b] for a, b in itertools.pairwise(cuts))
    return out


def build_rows(
    groups: Iterable[TrajectoryGroup],
    *,
    mask_reasons: Iterable[TerminationReason | str] = (),
) -> TokenRows:
    """The token rows of ``groups`` (see the module docstring). Pure: steps are only read."""
    import numpy as np

    reasons = {TerminationReason(r) for r in mask_reasons}
    # The pass allocates a few containers per step and never a cycle: collector passes over them
    # (a third of the time at 96,000 steps) would find nothing to free.
    paused = gc.isenabled()
    gc.disable()
    try:
        return _build(groups, reasons, np)
    finally:
        if paused:
            gc.enable()


def _build(groups: Iterable[TrajectoryGroup], reasons: set[TerminationReason], np: Any) -> TokenRows:
    out = _Builder(mask_truncated=TerminationReason.MAX_RESPONSE_LENGTH in reasons)
    nan = float("nan")
    n_traj = n_masked = n_no_tokens = 0
    breaks = out.breaks
    for gi, group in enumerate(groups):
        out.group_keys.append((group.task_id, group.role))
        role = group.role
        for j, traj in enumerate(group.trajectories):
            n_traj += 1
            reason, r_idx, t_idx, reason_name, temperature = _episode_info(group, j)
            if reason is not None and reason in reasons:
                n_masked += 1
                continue
            meta = (gi, role, j, r_idx, t_idx, reason_name, temperature)
            row_meta = meta
            row: list[Any] | None = None
            spans: tuple[list[Step], list[int], list[int]] = ([], [], [])
            lps: list[float] = []
            first = vmin = vmax = -1
            cut = False
            for step in traj.steps:
                prompt = step.prompt_ids
                if not prompt:
                    n_no_tokens += 1
                    continue
                step_t = step.temperature
                if row is not None:
                    forced = step.info.get(ROW_BREAK_KEY) if step.info else None
                    n = len(row)
                    if forced:
                        breaks[str(forced)] = breaks.get(str(forced), 0) + 1
                    elif step_t is not None and step_t != row_meta[6]:  # a row trains at one temperature
                        breaks["temperature"] = breaks.get("temperature", 0) + 1
                        forced = True
                    elif len(prompt) >= n and prompt[:n] == row:
                        row.extend(prompt[n:])
                    else:
                        breaks["not_prefix"] = breaks.get("not_prefix", 0) + 1
                        forced = True
                    if forced:
                        out.close(row, spans, lps, first, vmin, vmax, cut, row_meta)
                        row = None
                if row is None:
                    row_meta = meta if step_t is None else (*meta[:6], float(step_t))
                    row = list(prompt)
                    spans, lps = ([], [], []), []
                    first = vmin = vmax = -1
                    cut = False
                response = step.response_ids
                start = len(row)
                if response:
                    row.extend(response)
                    spans[0].append(step)
                    spans[1].append(start)
                    spans[2].append(len(row))
                    if first < 0:
                        first = start
                    lps.extend(step.logprobs or [nan] * len(response))
                v = step.weight_version
                if v is not None:
                    if vmin < 0 or v < vmin:
                        vmin = v
                    if v > vmax:
                        vmax = v
                if step.finish_reason == "length":
                    cut = True
            if row is not None:
                out.close(row, spans, lps, first, vmin, vmax, cut, row_meta)
    out.count("masked_trajectories", n_masked)
    out.count("steps_without_tokens", n_no_tokens)
    return out.finish(np, n_traj - n_masked)


class _Builder:
    """Accumulates finished rows for :func:`build_rows`."""

    def __init__(self, mask_truncated: bool) -> None:
        self.mask_truncated = mask_truncated
        self.tokens: list[list[Any]] = []
        self.prompt_lens: list[int] = []
        self.meta: list[tuple[int, str, int, int, int, str, float]] = []
        self.versions: list[tuple[int, int]] = []
        self.truncated: list[bool] = []
        self.group_keys: list[tuple[str, str]] = []
        self.steps: list[Step] = []
        self.step_row: list[int] = []
        self.step_start: list[int] = []
        self.step_end: list[int] = []
        self.logprobs: list[float] = []
        self.breaks: dict[str, int] = {}
        self.counts: dict[str, int] = {"dropped_empty": 0, "dropped_truncated": 0, "truncated": 0}

    def count(self, key: str, n: int = 1) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def close(
        self,
        row: list[Any],
        spans: tuple[list[Step], list[int], list[int]],
        lps: list[float],
        first: int,
        vmin: int,
        vmax: int,
        cut: bool,
        meta: tuple,
    ) -> None:
        if first < 0:
            self.counts["dropped_empty"] += 1
            return
        if cut:
            if self.mask_truncated:
                self.counts["dropped_truncated"] += 1
                return
            self.counts["truncated"] += 1
        r = len(self.tokens)
        self.tokens.append(row)
        self.prompt_lens.append(first)
        self.meta.append(meta)
        self.versions.append((vmin, vmax))
        self.truncated.append(cut)
        steps, starts, ends = spans
        self.steps.extend(steps)
        self.step_row.extend([r] * len(steps))
        self.step_start.extend(starts)
        self.step_end.extend(ends)
        self.logprobs.extend(lps)

    def finish(self, np: Any, n_trained_traj: int) -> TokenRows:
        tokens = self.tokens
        offsets = np.zeros(len(tokens) + 1, dtype=np.int64)
        if tokens:
            np.cumsum([len(t) for t in tokens], out=offsets[1:])
        total = int(offsets[-1])
        s_row = np.asarray(self.step_row, dtype=np.int64)
        s_start = np.asarray(self.step_start, dtype=np.int64)
        s_end = np.asarray(self.step_end, dtype=np.int64)
        # the mask: +1 where a span starts, -1 where it ends, running sum
        edges = np.zeros(total + 1, dtype=np.int64)
        base = offsets[s_row]
        np.add.at(edges, base + s_start, 1)
        np.add.at(edges, base + s_end, -1)
        loss_mask = np.cumsum(edges[:-1]) > 0
        logprobs = np.zeros(total, dtype=np.float64)
        logprobs[loss_mask] = np.asarray(self.logprobs, dtype=np.float64)

        meta = self.meta
        cols = list(zip(*meta, strict=True)) if meta else [()] * 7
        versions = np.asarray(self.versions, dtype=np.int64).reshape(-1, 2)
        metrics = {f"rows/{k}": float(v) for k, v in self.counts.items()}
        metrics["rows/count"] = float(len(tokens))
        metrics["rows/per_trajectory"] = len(tokens) / max(1, n_trained_traj)
        metrics["rows/tokens"] = float(total)
        metrics["rows/action_tokens"] = float(loss_mask.sum())
        metrics["rows/breaks"] = float(sum(self.breaks.values()))
        for reason, n in self.breaks.items():
            metrics[f"rows/breaks/{reason}"] = float(n)

        def ints(values: Sequence[int]) -> np.ndarray:
            return np.asarray(values, dtype=np.int64)

        return TokenRows(
            tokens=tokens,
            offsets=offsets,
            loss_mask=loss_mask,
            logprobs=logprobs,
            advantages=np.zeros(total, dtype=np.float64),
            prompt_lens=ints(self.prompt_lens),
            group_index=ints(cols[0]),
            group_keys=self.group_keys,
            roles=list(cols[1]),
            member_index=ints(cols[2]),
            rollout_idx=ints(cols[3]),
            trajectory_index=ints(cols[4]),
            version_min=versions[:, 0],
            version_max=versions[:, 1],
            termination=list(cols[5]),
            truncated=np.asarray(self.truncated, dtype=bool),
            temperature=np.asarray(cols[6], dtype=np.float64),
            steps=self.steps,
            step_row=s_row,
            step_start=s_start,
            step_end=s_end,
            metrics=metrics,
        )
