"""Batched sampling with a KV cache, and teacher-forced scoring, for a transformers causal LM.

``generate(model, prompts, params)`` left-pads the prompts into one batch, runs the prompt once, then
one token per step with ``past_key_values``; rows that finish leave the batch (and the cache), so
a batch whose answers end early stops paying for them. Each row has its own temperature, top-k, top-p,
token budget and stop conditions. The logprob returned for a sampled token is its log-probability
under the *tempered* distribution ``softmax(logits / T)`` (T = 1 for greedy rows), without the
top-k/top-p truncation: the same quantity :func:`score` and the trainer compute at that
temperature, so importance ratios start at exactly 1 for on-policy data and the policy gradient is
that of the distribution that sampled. (Top-k/top-p < full sample from a truncated distribution the
logprobs do not describe: tokens outside it have probability 0 there, which the ratio cannot see.)

Random numbers are per row, not per batch: a row draws its ``t``-th token by inverting the CDF at a
uniform that is a hash of its key and ``t`` (SplitMix64), and its key comes from its
``GenParams.seed`` (or, for a row without one, from ``generator``). A seeded row therefore samples
the same completion whichever batch it lands in, at whatever position, beside whichever rows: how
requests happen to be batched (timing, machine load) cannot change what a run samples.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["GenParams", "GenResult", "generate", "mix_seed", "response_logits", "score", "token_logprobs"]


@dataclass
class GenParams:
    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    """0: no top-k."""
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    """This row's random numbers come from this seed alone (vLLM's per-request ``seed``): the same
    seed, prompt and weights give the same completion in any batch. None: a key from ``generator``."""

    @property
    def logprob_temperature(self) -> float:
        """The temperature this row's logprobs are taken at: its sampling temperature, 1.0 when greedy."""
        return self.temperature if self.temperature > 0 else 1.0


@dataclass
class GenResult:
    completion_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    """``stop`` (end-of-sequence token or stop string/token) or ``length``."""
    stop_text: str | None = None
    """The stop string that ended generation, if any."""


_GOLDEN = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1


_COMPACT_FRACTION = 8
"""Finished rows leave the decoding batch once they are at least 1/8 of it."""


def _splitmix(z: Any) -> Any:
    """SplitMix64's output function on an advanced state: a Python int or a uint64 array (one code
    path for both, so run keys and per-token uniforms cannot drift apart)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
    return z ^ (z >> 31)


def mix_seed(*parts: int) -> int:
    """A 64-bit key from integers (SplitMix64 over each in turn): ``mix_seed(run_seed, i)`` gives
    well-spread, distinct keys for consecutive ``i``; ``mix_seed(0)`` is SplitMix64's first output."""
    z = 0
    for part in parts:
        z = _splitmix((z + (part & _MASK) + _GOLDEN) & _MASK)
    return z


def _uniforms(keys: np.ndarray, step: int) -> np.ndarray:
    """One float64 uniform in [0, 1) per key for token ``step``: the top 53 bits of SplitMix64 at
    state ``key + (step + 1) * golden`` (for key 0, the stream's ``step + 1``-th output)."""
    z = _splitmix(keys + np.uint64(((step + 1) * _GOLDEN) & _MASK))  # uint64 arrays wrap, as the hash needs
    return (z >> 11).astype(np.float64) * (1.0 / (1 << 53))


def _row_keys(params: list[GenParams], generator: torch.Generator | None) -> np.ndarray:
    """Each row's key: from its seed, else drawn from ``generator`` (one draw per unseeded row)."""
    keys = np.zeros(len(params), dtype=np.uint64)
    unseeded = [i for i, p in enumerate(params) if p.seed is None]
    if unseeded:
        device = generator.device if generator is not None else "cpu"
        drawn = torch.randint(-(2**63), 2**63 - 1, (len(unseeded),), generator=generator, device=device)
        keys[unseeded] = drawn.cpu().numpy().view(np.uint64)
    for i, p in enumerate(params):
        if p.seed is not None:
            keys[i] = mix_seed(p.seed)
    return keys


def _invert_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The token where each row's CDF first exceeds ``u`` (float64) of its mass; never a 0-probability one."""
    cdf = probs.double().cumsum(-1)
    total = cdf[:, -1:]
    target = torch.minimum(u.unsqueeze(-1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(-1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[targets], in float32, without materialising a float32 copy twice."""
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _sample(
    logits: torch.Tensor, temps: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, u: torch.Tensor
) -> torch.Tensor:
    """One token per row: greedy where the temperature is 0, else drawn at uniform ``u`` (float64)."""
    if bool(torch.isnan(logits).any()):  # what torch.multinomial refused too: never a silent pick
        rows = torch.isnan(logits).any(-1).nonzero().flatten().tolist()
        raise RuntimeError(f"sampler: the model's logits are NaN in batch rows {rows[:8]}")
    greedy = temps <= 0
    scaled = logits / temps.clamp(min=1e-6).unsqueeze(-1)
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        vocab = logits.shape[-1]
        ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(-1)
        drop = ranks >= k
        probs = torch.softmax(sorted_logits, dim=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always survives)
        drop |= (probs.cumsum(-1) - probs) >= top_p.unsqueeze(-1)
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        picked = _invert_cdf(torch.softmax(sorted_logits, dim=-1), u)
        sampled = order.gather(-1, picked.unsqueeze(-1)).squeeze(-1)
    else:
        sampled = _invert_cdf(torch.softmax(scaled, dim=-1), u)
    return torch.where(greedy, logits.argmax(-1), sampled)


@torch.inference_mode()
def generate(
    model: Any,
    prompts: list[list[int]],
    params: list[GenParams],
    *,
    pad_id: int,
    eos_ids: set[int],
    tokenizer: Any = None,
    generator: torch.Generator | None = None,
) -> list[GenResult]:
    """Sample a completion for each prompt in one batch (see the module docstring).

    ``generator`` draws the keys of rows without a ``seed`` (the torch default generator if None)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    b = len(prompts)
    # A group sends one prompt n times: each distinct prompt is run once, its cache gathered per row.
    uniq: dict[tuple[int, ...], int] = {}
    owner = [uniq.setdefault(tuple(p), len(uniq)) for p in prompts]
    width = max(len(p) for p in uniq)
    input_ids = torch.full((len(uniq), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(uniq), width), dtype=torch.long)
    for i, p in enumerate(uniq):
        input_ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attn[i, width - len(p) :] = 1
    input_ids, attn = input_ids.to(device), attn.to(device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    temps = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    scale = torch.tensor([p.logprob_temperature for p in params], dtype=torch.float32, device=device).unsqueeze(-1)
    top_k = torch.tensor([p.top_k for p in params], dtype=torch.long, device=device)
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    budget = [p.max_tokens for p in params]
    stops = [set(p.stop_token_ids) | eos_ids for p in params]
    results = [GenResult([], [], "length") for _ in range(b)]
    done = [budget[i] <= 0 for i in range(b)]
    keys = _row_keys(params, generator)
    cache = DynamicCache()
    out = model(input_ids=input_ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True)
    logits = out.logits[:, -1, :]
    last_pos = pos[:, -1]
    if len(uniq) < b:
        idx = torch.tensor(owner, dtype=torch.long, device=device)
        cache.reorder_cache(idx)
        logits, attn, last_pos = logits.index_select(0, idx), attn.index_select(0, idx), last_pos.index_select(0, idx)
    rows = list(range(b))  # the result each batch row feeds
    for step in range(max(budget)):
        if all(done):
            break
        u = torch.from_numpy(_uniforms(keys, step)).to(device)
        tokens = _sample(logits.float(), temps, top_k, top_p, u)
        lps = token_logprobs(logits.float() / scale, tokens).tolist()
        token_list = tokens.tolist()
        for pos, i in enumerate(rows):
            if done[i]:
                continue
            r = results[i]
            r.completion_ids.append(token_list[pos])
            r.logprobs.append(lps[pos])
            if token_list[pos] in stops[i]:
                r.finish_reason, done[i] = "stop", True
            elif params[i].stop and tokenizer is not None:
                text = tokenizer.decode(r.completion_ids, skip_special_tokens=False)
                hit = next((s for s in params[i].stop if s in text), None)
                if hit is not None:
                    r.finish_reason, r.stop_text, done[i] = "stop", hit, True
            if not done[i] and len(r.completion_ids) >= budget[i]:
                done[i] = True
        if all(done):
            break
        live = [pos for pos, i in enumerate(rows) if not done[i]]
        if len(rows) - len(live) >= max(1, len(rows) // _COMPACT_FRACTION):
            # Drop finished rows from the batch (and their cache) rather than decode tokens nobody
            # reads; a few stragglers ride along until they are worth the copy. Each row's random
            # numbers are its own, so what it samples does not change.
            keep = torch.tensor(live, dtype=torch.long, device=device)
            cache.reorder_cache(keep)
            tokens, attn, last_pos, temps, top_k, top_p, scale = (
                t.index_select(0, keep) for t in (tokens, attn, last_pos, temps, top_k, top_p, scale)
            )
            rows, keys = [rows[pos] for pos in live], keys[live]
        attn = torch.cat([attn, attn.new_ones((len(rows), 1))], dim=1)
        last_pos = last_pos + 1
        out = model(
            input_ids=tokens.unsqueeze(-1),
            attention_mask=attn,
            position_ids=last_pos.unsqueeze(-1),
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1, :]
    return results


def response_logits(
    model: Any,
    rows: list[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    share_prompts: bool = True,
    share_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits predicting every response token, and those tokens: flat, rows in order, tokens in order.

    Differentiable (call under ``no_grad``/``inference_mode`` when scoring). With ``share_prompts``
    and repeated prompts (a GRPO group sends one prompt ``n`` times), each distinct prompt runs once
    and its KV cache is gathered per row (gradients flow back through the gather), then the
    responses run against that cache: the structure of the sampler's own pass, at roughly
    ``unique_prompt_tokens + response_tokens`` instead of ``rows * (prompt + response)`` tokens.
    With ``share_rows`` as well, identical rows run once, their logits gathered per row: a group's
    answers repeat as the policy sharpens (most of the ``n`` samples of a solved prompt are the same).
    The last response token is never fed (nothing is predicted from it).
    """
    if share_prompts and share_rows:
        distinct, owner = distinct_rows(rows)
        if len(distinct) < len(rows):
            logits, targets = _response_logits(model, distinct, pad_id=pad_id, share_prompts=True)
            idx = torch.from_numpy(_row_positions([len(r) for _, r in distinct], owner)).to(logits.device)
            return logits.index_select(0, idx), targets.index_select(0, idx)
    return _response_logits(model, rows, pad_id=pad_id, share_prompts=share_prompts)


def distinct_rows(
    rows: list[tuple[list[int], list[int]]],
) -> tuple[list[tuple[list[int], list[int]]], list[int]]:
    """The distinct ``(prompt, response)`` rows in first-seen order, and for each row its index there."""
    first: dict[tuple[tuple[int, ...], tuple[int, ...]], int] = {}
    owner = [first.setdefault((tuple(p), tuple(r)), len(first)) for p, r in rows]
    return [(list(p), list(r)) for p, r in first], owner


def temperature_divisor(temperatures: Sequence[float], lengths: Sequence[int], device: Any) -> float | torch.Tensor:
    """What the logits of rows sampled at ``temperatures`` (``lengths`` positions each, flat in row
    order) are divided by: one float when the rows agree, else a ``(sum(lengths), 1)`` column."""
    if len(set(temperatures)) == 1:
        return float(temperatures[0])
    per_position = np.repeat(np.asarray(temperatures, dtype=np.float32), lengths)
    return torch.from_numpy(per_position).to(device).unsqueeze(-1)


def _row_positions(lengths: list[int], owner: list[int]) -> np.ndarray:
    """Flat positions, in the flat output of the distinct rows (``lengths`` tokens each), of the
    tokens of each row in turn (row ``i`` is distinct row ``owner[i]``)."""
    lens = np.asarray(lengths, dtype=np.int64)
    starts = np.cumsum(lens) - lens
    own = np.asarray(owner, dtype=np.int64)
    per_row = lens[own]
    first_of_row = np.cumsum(per_row) - per_row
    return np.repeat(starts[own] - first_of_row, per_row) + np.arange(int(per_row.sum()), dtype=np.int64)


def _response_logits(
    model: Any, rows: list[tuple[list[int], list[int]]], *, pad_id: int, share_prompts: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    uniq: dict[tuple[int, ...], int] = {}
    owner = [uniq.setdefault(tuple(p), len(uniq)) for p, _ in rows]
    n = len(rows)
    resp_w = max(len(r) for _, r in rows)
    targets = torch.full((n, resp_w), pad_id, dtype=torch.long)
    tmask = torch.zeros((n, resp_w), dtype=torch.bool)
    for i, (_, r) in enumerate(rows):
        targets[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        tmask[i, : len(r)] = True
    targets, tmask = targets.to(device), tmask.to(device)
    if not share_prompts or len(uniq) == n:
        width = max(len(p) + len(r) for p, r in rows) - 1
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        gather = torch.zeros((n, resp_w), dtype=torch.long)
        for i, (p, r) in enumerate(rows):
            seq = (list(p) + list(r))[:-1]
            ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            attn[i, : len(seq)] = 1
            gather[i] = torch.arange(len(p) - 1, len(p) - 1 + resp_w).clamp(max=width - 1)
        ids, attn, gather = ids.to(device), attn.to(device), gather.to(device)
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        logits = logits.gather(1, gather.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        return logits[tmask], targets[tmask]
    from transformers import DynamicCache

    prompts = list(uniq)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left-padded, as in the sampler: the last column is every prompt's end
        ids[i, width - len(p) :] = torch.tensor(p, dtype=torch.long)
        attn[i, width - len(p) :] = 1
    ids, attn = ids.to(device), attn.to(device)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True)
    idx = torch.tensor(owner, dtype=torch.long, device=device)
    first = out.logits[:, -1].index_select(0, idx).unsqueeze(1)
    if resp_w == 1:
        return first[tmask], targets[tmask]
    cache.reorder_cache(idx)
    rest = targets[:, :-1]
    rest_mask = tmask[:, :-1].long()
    out = model(
        input_ids=rest,
        attention_mask=torch.cat([attn.index_select(0, idx), rest_mask], dim=1),
        position_ids=pos[:, -1:].index_select(0, idx) + 1 + torch.arange(resp_w - 1, device=device),
        past_key_values=cache,
        use_cache=True,
    )
    logits = torch.cat([first, out.logits], dim=1)
    return logits[tmask], targets[tmask]


@torch.inference_mode()
def score(
    model: Any,
    rows: list[tuple[list[int], list[int]]],
    *,
    pad_id: int,
    share_prompts: bool = True,
    share_rows: bool = False,
    temperature: float | Sequence[float] = 1.0,
) -> list[list[float]]:
    """Teacher-forced logprobs of each response following its prompt under ``softmax(logits / temperature)``
    (``temperature``: one for all rows, or one per row)."""
    rows = [(list(p), list(r)) for p, r in rows]
    keep = [i for i, (_, r) in enumerate(rows) if r]
    out: list[list[float]] = [[] for _ in rows]
    if not keep:
        return out
    logits, targets = response_logits(
        model, [rows[i] for i in keep], pad_id=pad_id, share_prompts=share_prompts, share_rows=share_rows
    )
    if not isinstance(temperature, int | float):
        temperature = temperature_divisor(
            [temperature[i] for i in keep], [len(rows[i][1]) for i in keep], logits.device
        )
    if not isinstance(temperature, float | int) or temperature != 1.0:
        logits = logits.float() / temperature
    flat = token_logprobs(logits, targets).tolist()
    pos = 0
    for i in keep:
        n = len(rows[i][1])
        out[i] = flat[pos : pos + n]
        pos += n
    return out
