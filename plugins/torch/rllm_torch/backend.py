"""``TorchBackend``: the local backend (transformers + torch in one process, CPU or one GPU).

What one training step reduces to, on the core's token rows (:mod:`rllm_core.rows`)::

    row       = prompt (before the first action token) + the rest (actions, and observations between them)
    logp      = log softmax(logits / T)[token] on the action tokens (T: the training temperature)
    old       = the sampler's logprobs (or recomputed: algorithm.loss.old_logprobs)
    loss      = sum_t w_t * policy_loss(logp_t, old_t, A_t) [+ KL] [- entropy bonus]
                (losses.py; w_t: the core's aggregation weights, 0 off the loss mask)
    AdamW step on the policy (grad clipped), lr from the schedule

Sync mode shares one model between sampler and trainer. Async mode (or ``separate_sampler``)
gives the sampler its own copy, which ``on_policy_updated`` refreshes at sync points, so
generation (sampler thread) and training (trainer thread) run at the same time; torch releases
the GIL inside its kernels, so the two threads really overlap.

Checkpoints hold the policy as safetensors, optimiser and scheduler state, every RNG, the version,
plus the model config and tokenizer so that :meth:`TorchBackend.export` can write a Hugging Face
directory from a checkpoint alone.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import json
import os
import random
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rllm_core.config import ConfigError, RLLMConfig
from rllm_core.protocol import Backend, TrainerState
from rllm_torch.config import TorchBackendConfig
from rllm_torch.engine import SamplerRuntime, TorchRolloutEngine, _copy_weights, torch_threads_executor
from rllm_torch.losses import LOSSES, kl_penalty, policy_loss
from rllm_torch.model import load_model_and_tokenizer, rebuild_from_checkpoint, write_meta
from rllm_torch.sampling import distinct_rows, response_logits, score, temperature_divisor, token_logprobs

__all__ = ["TorchBackend", "TrainBatch"]


@dataclass
class TrainBatch:
    """The token rows as the trainer feeds them: each row split into prompt and the rest.

    Per row, aligned with ``responses[i]`` (the rest of the row): the loss mask, the old logprobs,
    the aggregation weights and (after the advantage stage) the advantages, all float arrays.
    """

    prompts: list[list[int]] = field(default_factory=list)
    responses: list[list[int]] = field(default_factory=list)
    masks: list[np.ndarray] = field(default_factory=list)
    old_logprobs: list[np.ndarray] = field(default_factory=list)
    sampler_logprobs: list[np.ndarray] = field(default_factory=list)
    weights: list[np.ndarray] = field(default_factory=list)
    advantages: list[np.ndarray] = field(default_factory=list)
    temperatures: list[float] = field(default_factory=list)
    """Per row: the temperature its logprobs are taken at (the one it was sampled at)."""

    def __len__(self) -> int:
        return len(self.prompts)


class TorchBackend(Backend):
    """The ``torch`` backend; see the module docstring."""

    name = "torch"
    config_model = TorchBackendConfig
    trains_row_temperature = True
    recomputes_old_logprobs = True  # process_backend_batch scores the rows that lack them

    def __init__(self, config: RLLMConfig) -> None:
        super().__init__(config)
        cfg = self.backend_config
        if not isinstance(cfg, TorchBackendConfig):
            from rllm_core.config import _validate_section

            cfg = _validate_section(TorchBackendConfig, cfg, self.name)
        self.cfg: TorchBackendConfig = cfg
        self.backend_config = cfg
        self.seed = cfg.seed if cfg.seed is not None else config.trainer.seed
        async_mode = config.trainer.mode == "async"
        self.separate_sampler = cfg.separate_sampler if cfg.separate_sampler is not None else async_mode
        torch.manual_seed(self.seed)
        random.seed(self.seed)

        temperature = config.rollout.train_sampling.get("temperature", 1.0)
        # Logprobs are those of softmax(logits / T) for the training temperature T, in the sampler and
        # here alike (verl does the same); greedy (T = 0) rows are scored at T = 1.
        self.temperature = float(temperature) if isinstance(temperature, int | float) and temperature > 0 else 1.0
        rollout = config.rollout
        # The tiny tokenizer's agent tokens come with the agent features that need them (see TinyModelSettings).
        agent_tokens = cfg.tiny.agent_tokens
        if agent_tokens is None:
            agent_tokens = rollout.tool_parser is not None or rollout.reasoning_parser is not None
        self.policy, self.tokenizer = load_model_and_tokenizer(cfg, self.seed, agent_tokens=agent_tokens)
        self.policy.eval()  # dropout off: the sampler's and the trainer's logprobs must agree
        torch.set_num_threads(cfg.num_threads or _default_threads(self.policy, self.separate_sampler))
        self.device = next(self.policy.parameters()).device
        sampler_model = copy.deepcopy(self.policy).requires_grad_(False) if self.separate_sampler else self.policy
        self.runtime = SamplerRuntime(
            sampler_model, self.tokenizer, seed=self.seed + 1, max_new_tokens=cfg.max_new_tokens
        )
        if config.algorithm.loss.uses_reference:
            self.runtime.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)

        optim = config.algorithm.optim
        params = [p for p in self.policy.parameters() if p.requires_grad]
        # foreach: each update op runs once over all parameters, not once per tensor (torch's default
        # only on CUDA); on CPU, 0.67 ms against 0.79 ms a step for the main job's model
        self.optimizer = torch.optim.AdamW(
            params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, foreach=True
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_lambda)
        self.updates = 0
        self._train_executor = torch_threads_executor("rllm-torch-train")
        self._reference_executor = torch_threads_executor("rllm-torch-reference")
        """The reference's passes of a training step, one micro-batch ahead of the policy's."""
        self._train_lock = threading.Lock()
        if cfg.gc_freeze:
            # torch + transformers leave ~10^6 long-lived objects behind; every full collection
            # (every other step with ~1,000 episodes per step) would walk them all, 0.1-0.2 s each
            # time on the 2-core dev box. Frozen objects are skipped by the collector from now on.
            gc.collect()
            gc.freeze()

    # -- setup ----------------------------------------------------------------------------------

    def _lr_lambda(self, step: int) -> float:
        return self.config.algorithm.optim.lr_factor(step, self.config.trainer.total_steps)

    def validate_config(self, config: RLLMConfig) -> None:
        loss = config.algorithm.loss
        if any(config.algorithm.loss_for(role) != loss for role in config.algorithm.loss_by_role):
            raise ConfigError(
                "algorithm.loss_by_role: the torch backend trains every role with algorithm.loss; "
                "per-role losses are supported by the tinker backend"
            )
        if loss.name not in LOSSES:
            raise ConfigError(f"algorithm.loss.name: the torch backend supports {', '.join(LOSSES)}; got {loss.name!r}")
        sampling = config.rollout.train_sampling
        if (sampling.get("top_p") or 1.0) < 1.0 or (sampling.get("top_k") or 0) > 0:
            warnings.warn(
                "rollout.train_sampling: top_p < 1 or top_k > 0 samples from a truncated distribution, but "
                "logprobs (sampler and trainer) are those of the full tempered one: the importance ratio "
                "reads 1 while tokens outside the truncation had probability 0, a small bias in the gradient",
                UserWarning,
                stacklevel=2,
            )
        if config.trainer.mode == "async" and loss.old_logprobs == "recompute" and loss.tis_cap is None:
            warnings.warn(
                "algorithm.loss.old_logprobs: recompute in async mode divides by the current weights' "
                "logprobs, which erases the staleness correction; set algorithm.loss.tis_cap (e.g. 2.0) to "
                "weight each token by min(pi_current / pi_sampler, tis_cap), or use old_logprobs: sampler",
                UserWarning,
                stacklevel=2,
            )
        if config.algorithm.optim.schedule != "constant" and not config.trainer.total_steps:
            raise ConfigError(
                f"algorithm.optim.schedule: {config.algorithm.optim.schedule!r} decays to 0 over "
                "trainer.total_steps, which is not set"
            )

    def init_rollout_engine(self, **kwargs: Any) -> TorchRolloutEngine:
        if self.rollout_engine is None:
            self.rollout_engine = TorchRolloutEngine.for_run(self.runtime, self.config.rollout, self.cfg)
        return self.rollout_engine  # type: ignore[return-value]

    # -- stages ---------------------------------------------------------------------------------

    async def transform_to_backend_batch(self, state: TrainerState) -> TrainBatch:
        rows = state.rows
        if rows is None:
            from rllm_core.rows import build_rows

            rows = state.rows = build_rows(state.groups)
        batch = TrainBatch()
        recompute = self.config.algorithm.loss.old_logprobs == "recompute"
        offsets = rows.offsets.tolist()
        batch.temperatures = np.where(np.isnan(rows.temperature), self.temperature, rows.temperature).tolist()
        for r, tokens in enumerate(rows.tokens):
            if not all(type(t) is int for t in tokens):
                raise TypeError("the torch backend trains on text only: Step.prompt_ids must be ints")
            cut = int(rows.prompt_lens[r])
            a, b = offsets[r] + cut, offsets[r + 1]
            batch.prompts.append(tokens[:cut])
            batch.responses.append(tokens[cut:])
            mask = rows.loss_mask[a:b].astype(np.float32)
            batch.masks.append(mask)
            sampler = rows.logprobs[a:b].astype(np.float32)
            batch.sampler_logprobs.append(sampler)
            batch.old_logprobs.append(np.full_like(sampler, np.nan) if recompute else sampler)
        state.backend_batch = batch
        return batch

    async def process_backend_batch(self, state: TrainerState) -> None:
        batch: TrainBatch = state.backend_batch
        if batch is None or not len(batch):
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._train_executor, self._fill_logprobs, batch)

    def _fill_logprobs(self, batch: TrainBatch) -> None:
        """Old logprobs where unknown (or all of them with ``old_logprobs: recompute``).

        The reference's logprobs (KL terms) are not computed here: the training step runs the
        reference one micro-batch ahead of the policy, on the other core (:meth:`_train_step`)."""
        with self._train_lock:
            need = [i for i, (lp, m) in enumerate(zip(batch.old_logprobs, batch.masks, strict=True)) if _unknown(lp, m)]
            for idx in self._chunks(need, batch):
                rows = [(batch.prompts[i], batch.responses[i]) for i in idx]
                lps = score(
                    self.policy,
                    rows,
                    pad_id=self._pad,
                    share_prompts=self._share_prompts,
                    share_rows=self._share_rows,
                    temperature=[batch.temperatures[i] for i in idx],
                )
                for i, lp in zip(idx, lps, strict=True):
                    batch.old_logprobs[i] = np.asarray(lp, dtype=np.float32) * batch.masks[i]

    @property
    def _pad(self) -> int:
        return self.tokenizer.pad_token_id

    @property
    def _overlap_reference(self) -> bool:
        # On CPU only where a second team of threads finds idle cores (the small-model default of
        # one thread each); an accelerator queues both threads' kernels anyway.
        cores = os.cpu_count() or 1
        return self.device.type != "cpu" or 2 * torch.get_num_threads() <= cores

    @property
    def _share_rows(self) -> bool:
        return self._share_prompts and self.cfg.share_identical_rows

    @property
    def _share_prompts(self) -> bool:
        # gradient checkpointing turns the KV cache off in training, which prompt sharing relies on
        return self.cfg.share_prompt_prefix and not self.cfg.gradient_checkpointing

    def _chunks(self, idx: list[int], batch: TrainBatch) -> list[list[int]]:
        """Split row indices into micro-batches whose padded size stays under the token budget.

        With prompt sharing, rows are ordered by prompt (a group stays in one micro-batch where it
        fits) and a micro-batch costs ``distinct_prompts * prompt_width + rows * response_width``;
        without, rows are ordered by length (less padding) and cost ``rows * sequence_width``.
        """
        share = self._share_prompts
        if share:
            first: dict[tuple[int, ...], int] = {}
            keys = {i: first.setdefault(tuple(batch.prompts[i]), len(first)) for i in idx}
            idx = sorted(idx, key=keys.__getitem__)
        else:
            idx = sorted(idx, key=lambda i: len(batch.prompts[i]) + len(batch.responses[i]))
        out: list[list[int]] = []
        cur: list[int] = []
        seen: set[tuple[int, ...]] = set()
        p_w = r_w = 0
        for i in idx:
            p, r = batch.prompts[i], batch.responses[i]
            if share:
                key = tuple(p)
                new_p = max(p_w, len(p))
                cost = (len(seen) + (key not in seen)) * new_p + (len(cur) + 1) * max(r_w, len(r))
            else:
                cost = (len(cur) + 1) * max(p_w + r_w, len(p) + len(r))
            if cur and cost > self.cfg.micro_batch_tokens:
                out.append(cur)
                cur, p_w, r_w = [], 0, 0
                seen = set()
            cur.append(i)
            if share:
                seen.add(tuple(p))
                p_w, r_w = max(p_w, len(p)), max(r_w, len(r))
            else:
                p_w, r_w = 0, max(p_w + r_w, len(p) + len(r))
        if cur:
            out.append(cur)
        return out

    async def update_policy(self, state: TrainerState) -> None:
        batch: TrainBatch = state.backend_batch
        if batch is None:
            batch = await self.transform_to_backend_batch(state)
        if not len(batch):
            state.metrics["actor/num_seqs"] = 0.0
            return
        if any(_unknown(lp, m) for lp, m in zip(batch.old_logprobs, batch.masks, strict=True)):
            await self.process_backend_batch(state)
        rows = state.rows
        offsets = rows.offsets.tolist()
        batch.advantages = [
            rows.advantages[offsets[r] + int(rows.prompt_lens[r]) : offsets[r + 1]].astype(np.float32)
            for r in range(len(batch))
        ]
        loop = asyncio.get_running_loop()
        metrics = await loop.run_in_executor(self._train_executor, self._train_step, batch, rows, state.step)
        state.metrics.update(metrics)

    def _train_step(self, batch: TrainBatch, rows: Any, step: int) -> dict[str, float]:
        loss_cfg = self.config.algorithm.loss
        start = time.perf_counter()
        factor = self.config.loss_scale_factor()
        offsets = rows.offsets.tolist()
        cuts = [offsets[r] + int(rows.prompt_lens[r]) for r in range(len(batch))]
        sums: dict[str, float] = {}
        n_tokens = fed = fed_real = trained = 0
        norms: list[float] = []
        with self._train_lock, self.runtime.lock if not self.separate_sampler else _NULL_LOCK:
            self.policy.train()
            lr = self.scheduler.get_last_lr()[0]
            has_reference = self.runtime.reference is not None
            forward_on = loss_cfg.forward_kl_coef > 0 and has_reference
            kl_on = loss_cfg.kl_coef > 0 and has_reference
            parts = rows.mini_batches(step, self.seed, self.config.algorithm.optim)
            plans = [self._plan(batch, part, every_row=kl_on or forward_on) for part in parts]
            reference = None
            if kl_on or forward_on:
                # The reference's passes run on their own thread (the other core), one micro-batch
                # ahead: each beside the policy's backward of the micro-batch before and forward of
                # its own. With the forward KL on, k3 takes its logprobs from the same pass.
                chunks = [idx for _, part_chunks in plans for idx in part_chunks]
                executor = self._reference_executor if self._overlap_reference else None
                fn = self._reference_log_softmax if forward_on else self._reference_logprobs
                reference = _Prefetched(executor, partial(fn, batch), chunks)
            for part, (kept, part_chunks) in zip(parts, plans, strict=True):
                weights = rows.loss_weights(loss_cfg.agg_mode, factor, rows=part)
                batch.weights = [weights[cuts[r] : offsets[r + 1]].astype(np.float32) for r in range(len(batch))]
                n, f, fr, t, norm = self._optimizer_step(batch, kept, part_chunks, sums, kl_on, reference, forward_on)
                n_tokens, fed, fed_real, trained = n_tokens + n, fed + f, fed_real + fr, trained + t
                norms.append(norm)
            self.scheduler.step()  # once per training step, however many optimiser steps it took
            self.updates += 1
            self.policy.eval()
        elapsed = time.perf_counter() - start
        real_tokens = sum(len(p) + len(r) for p, r in zip(batch.prompts, batch.responses, strict=True))
        renamed = {"clipped": "clip_frac", "dual_clipped": "dual_clip_frac", "ratio": "ratio_mean"}
        metrics = {f"actor/{renamed.get(k, k)}": v / max(1, n_tokens) for k, v in sums.items()}
        metrics.setdefault("actor/ratio_mean", 1.0)
        metrics.update(
            {
                "actor/grad_norm": sum(norms) / len(norms),
                "actor/lr": lr,
                "actor/optimizer_steps": float(len(norms)),
                "actor/num_seqs": float(len(batch)),
                "actor/trained_seqs": float(trained),
                "actor/num_tokens": float(n_tokens),
                "actor/forward_tokens": float(fed),
                "actor/pad_frac": 1.0 - fed_real / max(1, fed),
                "actor/tokens_per_s": real_tokens * len(norms) / elapsed,
                "actor/update_s": elapsed,
            }
        )
        return metrics

    def _plan(self, batch: TrainBatch, part: list[int], every_row: bool) -> tuple[list[int], list[list[int]]]:
        """The rows of mini-batch ``part`` that take part in its forward passes, and their
        micro-batches. ``every_row``: a KL term acts on rows without advantage too."""
        rows = [i for i in part if batch.masks[i].any()]
        # A row whose every advantage is 0 adds exactly 0 to the gradient of both losses; it only
        # matters through the entropy bonus or the KL term. Its weight stays in the aggregation.
        if self.cfg.skip_zero_advantage and self.cfg.entropy_coef == 0 and not every_row:
            rows = [i for i in rows if batch.advantages[i].any()]
        return rows, self._chunks(rows, batch)

    def _optimizer_step(
        self,
        batch: TrainBatch,
        rows: list[int],
        chunks: list[list[int]],
        sums: dict[str, float],
        kl_on: bool,
        reference: Iterator[torch.Tensor] | None = None,
        forward_on: bool = False,
    ) -> tuple[int, int, int, int, float]:
        """Forward/backward over ``rows`` in micro-batches ``chunks`` (see :meth:`_plan`), then one
        clipped AdamW step. ``kl_on``: the sampled KL term is on; ``reference`` yields each
        micro-batch's reference result, in order: its log-softmax at the action tokens when the
        forward KL is on (``forward_on``), else its logprobs of them.

        Adds per-token diagnostics to ``sums``; returns (tokens, fed, fed_real, trained rows, grad norm).
        """
        loss_cfg = self.config.algorithm.loss
        share, share_rows = self._share_prompts, self._share_rows
        tis = loss_cfg.tis_cap if loss_cfg.old_logprobs == "recompute" else None
        self.optimizer.zero_grad(set_to_none=True)
        n_tokens = fed = fed_real = 0
        for idx in chunks:

            def flat(values: list[np.ndarray], idx: list[int] = idx) -> torch.Tensor:
                return torch.from_numpy(np.concatenate([values[i] for i in idx])).to(self.device)

            on = flat(batch.masks) > 0  # the loss mask: only sampled action tokens
            old, adv, w = flat(batch.old_logprobs)[on], flat(batch.advantages)[on], flat(batch.weights)[on]
            sel, targets = response_logits(
                self.policy,
                [(batch.prompts[i], batch.responses[i]) for i in idx],
                pad_id=self._pad,
                share_prompts=share,
                share_rows=share_rows,
            )
            sel, targets = sel[on], targets[on]
            # After the policy's forward, which ran beside this micro-batch's reference pass; this
            # sends the next one's off, to run beside the backward.
            ref_out = next(reference) if reference is not None else None
            ref_logsm = ref_out if forward_on else None
            temperature = self._temperature(batch, idx, on)
            if not isinstance(temperature, float) or temperature != 1.0:
                sel = sel.float() / temperature
            padded, real = _forward_tokens(
                [batch.prompts[i] for i in idx], [batch.responses[i] for i in idx], share, share_rows
            )
            fed, fed_real = fed + padded, fed_real + real
            logp = token_logprobs(sel, targets)
            tis_weight = None
            if tis is not None:
                behaviour = flat(batch.sampler_logprobs)[on]
                tis_weight = torch.clamp(torch.exp(torch.clamp(old - behaviour, max=20.0)), max=tis)
            loss_t, stats = policy_loss(
                logp,
                old,
                adv,
                name=loss_cfg.name,
                clip_low=loss_cfg.clip_low,
                clip_high=loss_cfg.clip_high,
                clip_ratio_c=loss_cfg.clip_ratio_c,
                max_log_ratio=loss_cfg.max_log_ratio,
                tis_weight=tis_weight,
            )
            if kl_on:
                if ref_logsm is not None:
                    ref = ref_logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
                else:
                    ref = ref_out
                kl = kl_penalty(logp, ref, loss_cfg.kl_estimator, loss_cfg.kl_clamp)
                loss_t = loss_t + loss_cfg.kl_coef * kl
                stats["kl"] = kl.detach()
            grad_logsm = self.cfg.entropy_coef > 0 or forward_on
            with torch.set_grad_enabled(grad_logsm):
                logsm = torch.log_softmax(sel.float(), dim=-1)  # no graph unless a term needs one
            if ref_logsm is not None:
                forward_kl = (ref_logsm.exp() * (ref_logsm - logsm)).sum(-1)
                if loss_cfg.forward_kl_rows == "no_signal":  # only where the policy gradient is silent
                    forward_kl = forward_kl * (adv == 0)
                loss_t = loss_t + loss_cfg.forward_kl_coef * forward_kl
                stats["forward_kl"] = forward_kl.detach()
            entropy = -(logsm.exp() * logsm).sum(-1)
            if self.cfg.entropy_coef > 0:
                loss_t = loss_t - self.cfg.entropy_coef * entropy
            (loss_t * w).sum().backward()
            with torch.no_grad():
                stats["entropy"] = entropy.detach()
                stats["loss"] = loss_t.detach()
                stats["approx_kl_old"] = (old - logp.detach()) ** 2 * 0.5
                for key, val in stats.items():
                    sums[key] = sums.get(key, 0.0) + float(val.float().sum())
            n_tokens += int(targets.numel())
            del sel, ref_out, ref_logsm  # the next micro-batch's reference result is already on its way
        params = [p for p in self.policy.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:  # every row skipped: a zero gradient, so AdamW still does its step
                p.grad = torch.zeros_like(p)
        clip = self.config.algorithm.optim.grad_clip
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip if clip is not None else float("inf"))
        self.optimizer.step()
        return n_tokens, fed, fed_real, len(rows), float(grad_norm)

    def _reference_logits(self, batch: TrainBatch, idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's tempered logits at the action tokens of rows ``idx``, and those tokens (flat).

        Computed one micro-batch at a time, on the reference thread one ahead of the policy, for the
        KL terms. Without a separate sampler the training step holds the runtime's lock, so nothing
        replaces the reference meanwhile."""
        on = torch.from_numpy(np.concatenate([batch.masks[i] for i in idx]) > 0).to(self.device)
        with torch.no_grad(), self.runtime.lock if self.separate_sampler else _NULL_LOCK:
            sel, targets = response_logits(
                self.runtime.reference,
                [(batch.prompts[i], batch.responses[i]) for i in idx],
                pad_id=self._pad,
                share_prompts=self._share_prompts,
                share_rows=self._share_rows,
            )
            return sel[on].float() / self._temperature(batch, idx, on), targets[on]

    def _reference_logprobs(self, batch: TrainBatch, idx: list[int]) -> torch.Tensor:
        """The reference's logprobs of the action tokens of rows ``idx``, flat (the k3 KL term)."""
        logits, targets = self._reference_logits(batch, idx)
        return token_logprobs(logits, targets)

    def _reference_log_softmax(self, batch: TrainBatch, idx: list[int]) -> torch.Tensor:
        """The reference's tempered log-softmax at the action tokens of rows ``idx`` (``forward_kl_coef``):
        a full distribution per token is vocabulary-sized, so it is never stored, only computed ahead."""
        logits, _ = self._reference_logits(batch, idx)
        return torch.log_softmax(logits, dim=-1)

    def _temperature(self, batch: TrainBatch, idx: list[int], on: torch.Tensor) -> float | torch.Tensor:
        """What micro-batch ``idx``'s logits at its action tokens (``on``) are divided by: one float, or
        a column of per-token temperatures when its rows were sampled at different ones."""
        divisor = temperature_divisor(
            [batch.temperatures[i] for i in idx], [len(batch.masks[i]) for i in idx], self.device
        )
        return divisor if isinstance(divisor, float) else divisor[on]

    async def on_policy_updated(self, state: TrainerState, version: int) -> None:
        if self.separate_sampler:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self.runtime.executor, self._sync_sampler, version)
        else:
            self.runtime.version = version
        if self.rollout_engine is not None:
            self.rollout_engine.set_weight_version(version)

    def _sync_sampler(self, version: int) -> None:
        with self._train_lock, self.runtime.lock:
            _copy_weights(self.runtime.model, self.policy)
            self.runtime.version = version

    # -- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self, path: Path) -> None:
        from safetensors.torch import save_model

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with self._train_lock:
            # With its own copy of the weights the sampler keeps generating while this writes; it
            # is held only for the moment its random state and version are read.
            with self.runtime.lock:
                rng, version = _rng_state(self.runtime.generator), self.runtime.version
                rng["sampler_seed"], rng["sampler_calls"] = self.runtime.seed, self.runtime.calls
            with self.runtime.lock if not self.separate_sampler else _NULL_LOCK:
                save_model(self.policy, str(path / "model.safetensors"))
            # The reference changes only in refresh_reference, which runs inside a training step, and
            # the trainer never saves during one.
            if self.runtime.reference is not None:
                save_model(self.runtime.reference, str(path / "reference.safetensors"))
            state = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "updates": self.updates,
                "version": version,
            }
            torch.save(state, path / "optimizer.pt")
            torch.save(rng, path / "rng.pt")
        write_meta(path, self.cfg, self.policy, self.tokenizer, {"updates": self.updates})

    def load_checkpoint(self, path: Path) -> None:
        from safetensors.torch import load_model

        path = Path(path)
        if not (path / "model.safetensors").is_file():
            raise FileNotFoundError(f"torch backend: {path} is not a checkpoint (no model.safetensors)")
        with self._train_lock, self.runtime.lock:
            load_model(self.policy, str(path / "model.safetensors"), device=str(self.device))
            if self.separate_sampler:
                _copy_weights(self.runtime.model, self.policy)
            if (path / "reference.safetensors").is_file():
                if self.runtime.reference is None:
                    self.runtime.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
                load_model(self.runtime.reference, str(path / "reference.safetensors"), device=str(self.device))
            state = torch.load(path / "optimizer.pt", map_location=self.device, weights_only=False)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.updates = state["updates"]
            self.runtime.version = state["version"]
            rng = torch.load(path / "rng.pt", weights_only=False)
            _set_rng_state(rng, self.runtime.generator)
            self.runtime.seed = int(rng.get("sampler_seed", self.runtime.seed))
            self.runtime.calls = int(rng.get("sampler_calls", 0))
        if self.rollout_engine is not None:
            self.rollout_engine.set_weight_version(self.runtime.version)

    @classmethod
    def export(cls, checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
        """Write a Hugging Face model directory (config, safetensors weights, tokenizer) from a checkpoint.

        ``checkpoint_dir`` is what :meth:`save_checkpoint` wrote, or a trainer checkpoint holding it
        under ``backend/``. LoRA adapters are merged into the base weights.
        """
        from safetensors.torch import load_model

        checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
        if not (checkpoint_dir / "backend.json").is_file() and (checkpoint_dir / "backend" / "backend.json").is_file():
            checkpoint_dir = checkpoint_dir / "backend"  # a trainer checkpoint: the backend's part
        if not (checkpoint_dir / "backend.json").is_file():
            raise FileNotFoundError(f"{checkpoint_dir} is not a torch-backend checkpoint (no backend.json)")
        model, tokenizer, cfg = rebuild_from_checkpoint(checkpoint_dir)
        load_model(model, str(checkpoint_dir / "model.safetensors"))
        if cfg.lora is not None:
            model = model.merge_and_unload()
        out_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(out_dir), safe_serialization=True)
        tokenizer.save_pretrained(str(out_dir))
        (out_dir / "rllm_export.json").write_text(json.dumps({"from_checkpoint": str(checkpoint_dir)}))
        return out_dir

    async def shutdown(self) -> None:
        self.runtime.shutdown()
        self._train_executor.shutdown(wait=True)
        self._reference_executor.shutdown(wait=True)


class _NullLock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


_NULL_LOCK = _NullLock()


class _Prefetched:
    """``fn(item)`` for each item, in order, computed on ``executor`` one item ahead of the consumer:
    the first item starts at construction, and each ``next()`` starts the item after the one it
    returns (so at most two results are alive at once). Without an executor, each item is computed
    in the consumer's thread when asked."""

    def __init__(self, executor: Executor | None, fn: Callable[[Any], Any], items: list[Any]) -> None:
        self._executor, self._fn, self._items = executor, fn, iter(items)
        self._ahead = self._start()

    def _start(self) -> Future | _Inline | None:
        item = next(self._items, _END)
        if item is _END:
            return None
        if self._executor is None:
            return _Inline(self._fn, item)
        return self._executor.submit(self._fn, item)

    def __iter__(self) -> _Prefetched:
        return self

    def __next__(self) -> Any:
        current = self._ahead
        if current is None:
            raise StopIteration
        self._ahead = self._start()
        return current.result()


_END = object()


class _Inline:
    """A not-yet-computed ``fn(item)``, run by ``result()`` in the caller's thread."""

    def __init__(self, fn: Callable[[Any], Any], item: Any) -> None:
        self._fn, self._item = fn, item

    def result(self) -> Any:
        return self._fn(self._item)


def _forward_tokens(
    prompts: list[list[int]], responses: list[list[int]], share: bool, share_rows: bool = False
) -> tuple[int, int]:
    """Tokens one micro-batch feeds through the model (see ``response_logits``): padded, and real."""
    if share and share_rows:  # identical rows run once
        rows, _ = distinct_rows(list(zip(prompts, responses, strict=True)))
        prompts, responses = [p for p, _ in rows], [r for _, r in rows]
    n, r_w = len(prompts), max(len(r) for r in responses)
    distinct = {tuple(p) for p in prompts}
    rest = sum(len(r) - 1 for r in responses)
    if share and len(distinct) < n:
        padded = len(distinct) * max(len(p) for p in distinct) + (n * (r_w - 1) if r_w > 1 else 0)
        return padded, sum(len(p) for p in distinct) + rest
    width = max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True)) - 1
    return n * width, sum(map(len, prompts)) + rest


SMALL_MODEL_PARAMS = 5_000_000
"""Below this many parameters a model's ops are too small to split across CPU cores."""


def _default_threads(model: Any, separate_sampler: bool) -> int:
    """torch's CPU threads when ``torch.num_threads`` is not set: one for a small model (the main job's
    0.5M-parameter model: its ops are too small to split, and on two threads the idle OpenMP worker
    spins on the core the Python threads need, 13% of a step); else every core, or half of them each
    when sampler and trainer run at once (``separate_sampler``)."""
    if sum(p.numel() for p in model.parameters()) < SMALL_MODEL_PARAMS:
        return 1
    cores = os.cpu_count() or 1
    return max(1, cores // 2) if separate_sampler else cores


def _unknown(logprobs: np.ndarray, mask: np.ndarray) -> bool:
    """True when some action token of the row has no old logprob yet (NaN)."""
    return bool(np.isnan(logprobs[mask > 0]).any())


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    import numpy as np

    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "sampler": generator.get_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    generator.set_state(state["sampler"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
