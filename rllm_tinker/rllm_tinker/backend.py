"""``TinkerBackend``: LoRA training and sampling on the Tinker service, driven by the core trainer.

One training step::

    rows (core)  -> datums per role (datums.py: weights of agg_mode folded into the advantages)
    per mini-batch: forward_backward(datums of each role, that role's loss) ... then optim_step(Adam)
                    (submitted back to back, awaited together: the service keeps their order)
    weight sync  -> save_weights_and_get_sampling_client(); the engine serves it from the next request

Only the SDK's future-first API is used (plain method names, futures awaited on the loop). The calls
that block (creating a session and clients) run in a daemon thread with a deadline, after a TCP
probe of the service, so a missing key or an unreachable service fails in seconds.

Checkpoints: ``save_state`` (weights + Adam state) and ``save_weights_for_sampler`` under the same
name, both awaited; ``tinker.json`` in the checkpoint directory records the paths. Resume builds the
training client with ``create_training_client_from_state_with_optimizer`` and the sampler from the
saved sampler path. Checkpoints dropped by ``trainer.keep_checkpoints`` are deleted on the service.

KL to the reference (``algorithm.loss.kl_coef``) goes into the advantages, as tinker-cookbook does:
``A_t += kl_coef * (mean(d) - d_t)`` with ``d_t = logp_sampler - logp_reference`` per action token,
the reference being a sampler on the base model.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np
import tinker

from rllm_core.config import ConfigError, RLLMConfig, _validate_section
from rllm_core.protocol import Backend, TrainerState
from rllm_tinker.config import TinkerBackendConfig
from rllm_tinker.datums import TINKER_LOSSES, loss_fn_config, model_input, rows_to_datums
from rllm_tinker.engine import TinkerRolloutEngine

__all__ = ["TinkerBackend", "TinkerSetupError"]

log = logging.getLogger(__name__)

RECORD = "tinker.json"


class TinkerSetupError(RuntimeError):
    """The service cannot be used: no key, unreachable, unknown model, a create call that hangs."""


def _probe(base_url: str, timeout: float) -> None:
    """Fail fast when nothing accepts a TCP connection at ``base_url`` (the SDK retries for minutes)."""
    url = urlparse(base_url)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "localhost", port), timeout=timeout):
            pass
    except OSError as exc:
        raise TinkerSetupError(
            f"tinker.base_url: the Tinker service at {base_url} is unreachable ({exc}); "
            f"checked within tinker.connect_timeout_s={timeout:g}s"
        ) from None


async def _in_thread(fn: Callable[[], Any], what: str, timeout: float) -> Any:
    """Run a blocking SDK call in a daemon thread; give up after ``timeout`` (the thread is left)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not done.done():
            (done.set_result if ok else done.set_exception)(value)

    def run() -> None:
        try:
            value = fn()
        except BaseException as exc:
            loop.call_soon_threadsafe(settle, False, exc)
        else:
            loop.call_soon_threadsafe(settle, True, value)

    threading.Thread(target=run, name=f"rllm-tinker-{what}", daemon=True).start()
    try:
        return await asyncio.wait_for(done, timeout)
    except asyncio.TimeoutError:
        raise TinkerSetupError(f"tinker: {what} did not finish within tinker.create_timeout_s={timeout:g}s") from None


class TinkerBackend(Backend):
    """The ``tinker`` backend; see the module docstring."""

    name = "tinker"
    config_model = TinkerBackendConfig

    def __init__(self, config: RLLMConfig) -> None:
        super().__init__(config)
        cfg = self.backend_config
        if not isinstance(cfg, TinkerBackendConfig):
            cfg = _validate_section(TinkerBackendConfig, cfg or {}, self.name)
        self.cfg: TinkerBackendConfig = cfg
        self.backend_config = cfg
        self.seed = cfg.seed if cfg.seed is not None else config.trainer.seed
        self.service: Any = None
        self.training: Any = None
        self.rest: Any = None
        self.renderer_name: str | None = cfg.renderer_name
        self.updates = 0
        """Training steps applied (``update_policy`` calls): names the checkpoints."""
        self.reference_path: str | None = None
        """Sampler weights of the KL reference when it is not the base model."""
        self._saved: dict[str, Any] | None = None

    # -- setup ----------------------------------------------------------------------------------

    def validate_config(self, config: RLLMConfig) -> None:
        algo = config.algorithm
        for where, loss in [("algorithm.loss", algo.loss)] + [
            (f"algorithm.loss_by_role.{role}", algo.loss_for(role)) for role in algo.loss_by_role
        ]:
            if loss.name not in TINKER_LOSSES:
                raise ConfigError(f"{where}.name: Tinker's losses are {', '.join(TINKER_LOSSES)}; got {loss.name!r}")
            if loss.forward_kl_coef > 0:
                raise ConfigError(
                    f"{where}.forward_kl_coef: needs the reference's full distribution at each token; "
                    "Tinker's samplers return the sampled tokens' logprobs only (use kl_coef)"
                )
            if loss.old_logprobs != "sampler":
                raise ConfigError(
                    f"{where}.old_logprobs: Tinker's losses divide by the sampling logprobs (old_logprobs: sampler)"
                )
        if algo.optim.schedule != "constant" and not config.trainer.total_steps:
            raise ConfigError(
                f"algorithm.optim.schedule: {algo.optim.schedule!r} decays to 0 over trainer.total_steps, "
                "which is not set"
            )
        for field in ("tool_parser", "reasoning_parser"):
            if getattr(config.rollout, field) is not None:
                warnings.warn(
                    f"rollout.{field}: not used by the tinker backend; the tinker-cookbook renderer "
                    "(tinker.renderer_name) renders the tools and parses tool calls and reasoning itself",
                    UserWarning,
                    stacklevel=2,
                )
        sampling = config.rollout.train_sampling
        tempered = sampling.get("temperature", 1.0) not in (None, 1, 1.0)
        if tempered or (sampling.get("top_p") or 1.0) < 1.0 or (sampling.get("top_k") or 0) > 0:
            warnings.warn(
                "rollout.train_sampling: Tinker returns logprobs of the untempered, untruncated distribution "
                "whatever temperature / top_p / top_k you sample with, so the importance ratio is biased "
                "unless these are 1 / 1 / off",
                UserWarning,
                stacklevel=2,
            )

    def init_rollout_engine(self, **kwargs: Any) -> TinkerRolloutEngine:
        if self.rollout_engine is None:
            self.rollout_engine = TinkerRolloutEngine(
                self.cfg.context_window, multiturn_cache_size=self.cfg.multiturn_cache_size
            )
        return self.rollout_engine  # type: ignore[return-value]

    @property
    def engine(self) -> TinkerRolloutEngine:
        return self.init_rollout_engine()

    def _service_client(self) -> Any:
        cfg = self.cfg
        if cfg.service_factory:
            from rllm_core.plugins import import_object

            return import_object(cfg.service_factory)(cfg)
        key = os.environ.get(cfg.api_key_env)
        if not key:
            raise TinkerSetupError(
                f"tinker: ${cfg.api_key_env} is not set; the Tinker API key is read from the environment only"
            )
        from tinker.lib.base_url import resolve_base_url

        base_url = resolve_base_url(cfg.base_url)
        _probe(base_url, cfg.connect_timeout_s)
        return tinker.ServiceClient(base_url=base_url, api_key=key)

    async def _connect(self) -> None:
        if self.service is None:
            self.service = self._service_client()

    async def _create(self, what: str, make: Callable[[], Any]) -> Any:
        """A client from a ``create_*`` call (blocking session setup + future), bounded in time."""
        return await _in_thread(lambda: make().result(), what, self.cfg.create_timeout_s)

    async def _attach_training(
        self, training: Any, sampler_path: str | None, version: int, reference_path: str | None = None
    ) -> None:
        cfg = self.cfg
        self.training = training
        self.engine.reference_factory = self._snapshot_sampler
        tokenizer = training.get_tokenizer()
        if self.renderer_name is None:
            from tinker_cookbook import model_info

            self.renderer_name = model_info.get_recommended_renderer_name(cfg.base_model)
        from tinker_cookbook import renderers

        self.engine.attach(renderers.get_renderer(self.renderer_name, tokenizer), tokenizer, self.renderer_name)
        if sampler_path is not None:
            sampler = await self._create(
                "create_sampling_client", lambda: training.create_sampling_client(sampler_path)
            )
        else:
            sampler = await training.save_weights_and_get_sampling_client()
        self.engine.set_sampling_client(sampler, version)
        if self.config.algorithm.loss.kl_coef > 0 and self.engine.reference_client is None:
            # The reference is the run's initial policy: the base model for a fresh LoRA (its adapter
            # starts at 0), else the weights the run started from (``tinker.resume_from``).
            self.reference_path = reference_path
            if reference_path is None:
                make = lambda: self.service.create_sampling_client(base_model=cfg.base_model)  # noqa: E731
            else:
                make = lambda: self.service.create_sampling_client(model_path=reference_path)  # noqa: E731
            self.engine.reference_client = await self._create("create_sampling_client", make)

    async def on_train_start(self, state: TrainerState) -> None:
        if self.training is not None:  # resumed: load_checkpoint attached everything
            return
        await self._connect()
        cfg = self.cfg
        if cfg.resume_from:
            factory = (
                self.service.create_training_client_from_state_with_optimizer
                if cfg.resume_optimizer
                else self.service.create_training_client_from_state
            )
            training = await self._create("create_training_client_from_state", lambda: factory(cfg.resume_from))
            reference = None
            if self.config.algorithm.loss.kl_coef > 0:  # KL to where this run starts, not to the base model
                reference = (await training.save_weights_for_sampler("reference")).path
            await self._attach_training(training, None, state.weight_version, reference)
            return
        training = await self._create(
            "create_lora_training_client",
            lambda: self.service.create_lora_training_client(
                base_model=cfg.base_model,
                rank=cfg.lora_rank,
                seed=self.seed,
                train_mlp=cfg.train_mlp,
                train_attn=cfg.train_attn,
                train_unembed=cfg.train_unembed,
            ),
        )
        await self._attach_training(training, None, state.weight_version)

    # -- stages ---------------------------------------------------------------------------------

    async def transform_to_backend_batch(self, state: TrainerState) -> Any:
        # Datums need the advantages, which come after compute_advantages: built in update_policy.
        return state.rows

    async def process_backend_batch(self, state: TrainerState) -> None:
        rows = state.rows
        if self.config.algorithm.loss.kl_coef <= 0 or rows is None or not len(rows):
            return
        ref = self.engine.reference_client
        outs = await asyncio.gather(*(ref.compute_logprobs(model_input(rows.tokens[r])) for r in range(len(rows))))
        ref_lp = np.asarray([0.0 if x is None else x for out in outs for x in out], dtype=np.float64)
        if len(ref_lp) != rows.num_tokens:
            raise TypeError("kl_coef with opaque prompt chunks is not supported by the tinker backend")
        # d_t = logp_sampler - logp_reference on action tokens (0 elsewhere), flat like the rows
        diff = np.where(rows.loss_mask, rows.logprobs - ref_lp, 0.0)
        on_mask = diff[rows.loss_mask]
        state.extra["tinker_kl"] = diff, float(on_mask.mean()) if on_mask.size else 0.0
        state.metrics["train/kl_sampler_ref"] = state.extra["tinker_kl"][1]

    async def compute_advantages(self, state: TrainerState, algorithm: Any) -> None:
        await super().compute_advantages(state, algorithm)
        rows = state.rows
        if "tinker_kl" not in state.extra or rows is None:
            return
        diff, mean = state.extra["tinker_kl"]
        coef = self.config.algorithm.loss.kl_coef
        for k, step in enumerate(rows.steps):
            base = int(rows.offsets[int(rows.step_row[k])])
            penalty = coef * (mean - diff[base + int(rows.step_start[k]) : base + int(rows.step_end[k])])
            adv = step.advantage
            value = np.asarray(adv, dtype=np.float64) if isinstance(adv, list | tuple) else float(adv or 0.0)
            step.advantage = (value + penalty).tolist()

    async def update_policy(self, state: TrainerState) -> None:
        rows = state.rows
        algo = self.config.algorithm
        optim = algo.optim
        self.updates += 1
        if rows is None or not len(rows):
            return
        roles = sorted(set(rows.roles))
        losses = {role: algo.loss_for(role) for role in roles}
        factor = self.config.loss_scale_factor()
        adam = tinker.AdamParams(
            learning_rate=optim.lr * optim.lr_factor(state.step, self.config.trainer.total_steps),
            beta1=optim.betas[0],
            beta2=optim.betas[1],
            eps=self.cfg.adam_eps,
            weight_decay=optim.weight_decay,
            grad_clip_norm=optim.grad_clip or 0.0,
        )
        calls: list[tuple[Any, list[int], bool]] = []
        optim_calls: list[Any] = []
        dropped = 0.0
        t0 = time.perf_counter()
        for part, chunk in enumerate(rows.mini_batches(state.step, self.seed, optim)):
            sent = False
            for role in roles:
                loss = losses[role]
                select = [r for r in chunk if rows.roles[r] == role]
                datums, kept, metrics = rows_to_datums(
                    rows, loss, max_train_length=self.cfg.max_train_length, select=select, loss_scale_factor=factor
                )
                dropped += metrics["tinker/dropped_rows"]
                if not datums:  # forward_backward([]) is an error on the service
                    continue
                fut = self.training.forward_backward(datums, loss.name, loss_fn_config(loss))
                calls.append((fut, kept, part == 0))
                sent = True
            if sent:
                optim_calls.append(self.training.optim_step(adam))
        outputs = await asyncio.gather(*(c[0] for c in calls))
        await asyncio.gather(*optim_calls)
        state.metrics.update(self._train_metrics(rows, calls, outputs))
        state.metrics["tinker/dropped_rows"] = dropped
        state.metrics["tinker/optim_steps"] = float(len(optim_calls))
        state.metrics["train/lr"] = adam.learning_rate
        state.metrics["time/tinker_update"] = time.perf_counter() - t0
        if not optim_calls:
            state.metrics["train/skipped_updates"] = 1.0

    @staticmethod
    def _train_metrics(rows: Any, calls: list[tuple[Any, list[int], bool]], outputs: list[Any]) -> dict[str, float]:
        """The service's metrics (summed / averaged by their reduction) and the sampler-trainer gap."""
        sums: dict[str, list[float]] = {}
        for out in outputs:
            for key, value in (out.metrics or {}).items():
                sums.setdefault(key, []).append(float(value))
        metrics: dict[str, float] = {}
        for key, values in sums.items():
            name, _, reduction = key.partition(":")
            if reduction == "sum":
                metrics[f"tinker/{name}"] = float(sum(values))
            elif reduction == "max":
                metrics[f"tinker/{name}"] = float(max(values))
            elif reduction == "min":
                metrics[f"tinker/{name}"] = float(min(values))
            else:
                metrics[f"tinker/{name}"] = float(np.mean(values))
        if "tinker/loss" in metrics:
            metrics["train/loss"] = metrics["tinker/loss"]
        # Trainer logprobs of the first (on-policy) mini-batch vs the sampler's: how far the two differ.
        gaps = []
        for (_, kept, first), out in zip(calls, outputs, strict=True):
            if not first:
                continue
            for r, item in zip(kept, out.loss_fn_outputs, strict=True):
                lp = item.get("logprobs") if isinstance(item, dict) else None
                if lp is None:
                    continue
                trainer = np.asarray(lp.tolist() if hasattr(lp, "tolist") else lp.data, dtype=np.float64)
                a, b = int(rows.offsets[r]), int(rows.offsets[r + 1])
                mask = rows.loss_mask[a + 1 : b]
                if len(trainer) == len(mask) and mask.any():
                    gaps.append(np.abs(trainer[mask] - rows.logprobs[a + 1 : b][mask]))
        if gaps:
            metrics["tinker/logprob_gap_mean"] = float(np.concatenate(gaps).mean())
        return metrics

    async def _snapshot_sampler(self) -> Any:
        return await self.training.save_weights_and_get_sampling_client()

    async def on_policy_updated(self, state: TrainerState, version: int) -> None:
        sampler = await self.training.save_weights_and_get_sampling_client()
        self.engine.set_sampling_client(sampler, version)

    # -- checkpoints ----------------------------------------------------------------------------

    async def save_checkpoint(self, path: Path) -> None:
        name = f"step-{self.updates:06d}"
        if self._saved is None or self._saved["name"] != name:  # never save one name twice
            ttl = self.cfg.checkpoint_ttl_seconds
            state_future = self.training.save_state(name, ttl_seconds=ttl)
            sampler_future = self.training.save_weights_for_sampler(name, ttl_seconds=ttl)
            state_path = (await state_future).path
            sampler_path = (await sampler_future).path
            self._saved = {
                "name": name,
                "state_path": state_path,
                "sampler_path": sampler_path,
                "base_model": self.cfg.base_model,
                "renderer_name": self.renderer_name,
                "lora_rank": self.cfg.lora_rank,
                "updates": self.updates,
                "version": self.engine.weight_version,
                "reference_path": self.reference_path,
            }
        await asyncio.to_thread((Path(path) / RECORD).write_text, json.dumps(self._saved, indent=1))

    async def load_checkpoint(self, path: Path) -> None:
        record = json.loads((Path(path) / RECORD).read_text())
        cfg = self.cfg
        for key, want in (("base_model", cfg.base_model), ("renderer_name", cfg.renderer_name)):
            if want is not None and record.get(key) not in (None, want):
                raise ConfigError(f"tinker.{key}: the checkpoint {path} was trained with {record[key]!r}, not {want!r}")
        self.renderer_name = record.get("renderer_name") or self.renderer_name
        await self._connect()
        training = await self._create(
            "create_training_client_from_state_with_optimizer",
            lambda: self.service.create_training_client_from_state_with_optimizer(record["state_path"]),
        )
        self.updates = int(record["updates"])
        self._saved = record
        await self._attach_training(
            training, record["sampler_path"], int(record["version"]), record.get("reference_path")
        )

    async def delete_checkpoint(self, path: Path) -> None:
        record_file = Path(path) / RECORD
        if not record_file.is_file():
            return
        record = json.loads(record_file.read_text())
        if self._saved is not None and record.get("name") == self._saved.get("name"):
            return
        rest = self._rest_client()
        for key in ("state_path", "sampler_path"):
            if record.get(key):
                await rest.delete_checkpoint_from_tinker_path(record[key])

    def _rest_client(self) -> Any:
        if self.rest is None:
            if self.cfg.rest_factory:
                from rllm_core.plugins import import_object

                self.rest = import_object(self.cfg.rest_factory)(self.cfg)
            else:
                self.rest = tinker.RestClient(base_url=self.cfg.base_url, api_key=os.environ.get(self.cfg.api_key_env))
        return self.rest

    async def shutdown(self) -> None:
        if self.service is not None:
            try:
                await self.service.close("success")
            except Exception as exc:  # closing must not hide what ended the run
                log.warning("tinker: closing the session failed: %s", exc)
