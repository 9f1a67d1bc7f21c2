"""``VerlBackend``: the ``verl`` backend: verl's engine workers on Ray train, their rollouts sample.

One training step, as the trainer drives it::

    generate   the workflow engine's requests -> TorchRolloutEngine (batching, chat template,
               token-exact multi-turn) -> the batch split over the workers' rollouts (Ray calls)
    rows       the core's token rows (no second transform) -> DataProto per call (dataproto.py)
    old logp   verl's compute_log_prob on the actor (reported against the sampler's logprobs;
               the ratio's denominator with ``algorithm.loss.old_logprobs: recompute``); with a
               KL term, compute_ref_log_prob on the reference (the initial policy, in each worker)
    update     lr from the core's schedule, then verl's update_actor per mini-batch (FSDP, AdamW,
               verl's PPO loss driven by ``algorithm``)
    sync       on_policy_updated: verl's update_weights (naive checkpoint engine): every rank's
               rollout receives the actor's full weights; the engine stamps the new version

With ``rollout: vllm_http`` vLLM servers outside verl sample instead (token in, token out over
HTTP), and the sync is rank 0 pushing the actor's full tensors through Ray's object store to an
agent on each server's host, which reloads them (``weight_sync.py``); parity of the servers'
log-probs with the actor's is checked on a probe after every sync and at start-up.

Sync and async modes differ only in when the trainer calls ``on_policy_updated``; a generation
batch and a weight sync never interleave (the runtime's lock), so each output carries the one
version that produced all of its tokens. Checkpoints are verl's (per-rank model, optimiser, extra
state under ``verl/``) plus ``rllm_verl.json`` (updates, version); loading one also syncs the
rollouts, so a resumed run samples from the restored policy.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from rllm_torch.engine import BaseSamplerRuntime, TorchRolloutEngine, eos_ids_of

from rllm_core.config import ConfigError, RLLMConfig
from rllm_core.protocol import Backend, TrainerState
from rllm_verl.config import VerlConfig, actor_loss_settings

__all__ = ["HttpSamplerRuntime", "VerlBackend", "WorkerSamplerRuntime", "needs_reference"]


def needs_reference(config: RLLMConfig) -> bool:
    """Whether the workers get a reference model when ``verl.reference`` is not set: for a KL loss, and
    for the ``opsd`` hook (its teacher is scored with ``model="reference"`` unless it is ``current``)."""
    opsd = config.hooks.get("opsd")
    return config.algorithm.loss.kl_coef > 0 or (opsd is not None and (opsd or {}).get("teacher") != "current")


class _WorkersRuntime(BaseSamplerRuntime):
    """A sampler runtime beside verl workers: the reference model lives in the workers (``verl.reference``
    or a KL loss), so reference scoring and ``refresh_reference`` go there whatever samples."""

    workers: Any
    reference_refreshed = False
    """The reference is no longer the initial policy (checkpoints then carry it)."""

    def score(self, rows: list[tuple[list[int], list[int]]], which: str, temperature: float = 1.0) -> list[list[float]]:
        if which not in ("policy", "reference"):
            raise ValueError(f"score: which must be 'policy' or 'reference', got {which!r}")
        with self.lock:
            if which == "reference":
                return self.workers.score_rows(rows, reference=True, temperature=temperature)
            return self._score_policy(rows, temperature)

    def _score_policy(self, rows: list[tuple[list[int], list[int]]], temperature: float) -> list[list[float]]:
        return self.workers.score_rows(rows, temperature=temperature)  # the actor: what is served once synced

    def copy_reference(self) -> None:
        with self.lock:
            self.workers.copy_reference()
            self.reference_refreshed = True


class WorkerSamplerRuntime(_WorkersRuntime):
    """The engine's sampler: generation and scoring on the verl workers' rollouts (blocking Ray calls
    on the runtime's executor thread, under its lock)."""

    def __init__(self, workers: Any, tokenizer: Any, *, eos_ids: set[int], max_new_tokens: int, seed: int) -> None:
        super().__init__(tokenizer, eos_ids=eos_ids, max_new_tokens=max_new_tokens)
        self.workers = workers
        self._seed: int | None = seed  # sent with the first batch: each rank's sampler gets seed + rank

    def generate(self, prompts: list[list[int]], params: list[Any]) -> tuple[list[Any], int]:
        with self.lock:
            self.batches += 1
            self.batch_sizes.append(len(prompts))
            seed, self._seed = self._seed, None
            results, _ = self.workers.generate(prompts, params, seed=seed)
            return results, self.version

    def _score_policy(self, rows: list[tuple[list[int], list[int]]], temperature: float) -> list[list[float]]:
        return self.workers.score(rows, temperature)  # the sampler's own copy (rank 0's rollout)


class HttpSamplerRuntime(_WorkersRuntime):
    """The engine's sampler with ``rollout: vllm_http``: token-in/token-out requests to vLLM servers
    (:class:`rllm_verl.http_rollout.VLLMHttpRollout`), under the runtime's lock, so a weight push
    (which takes the lock) never lands in the middle of a batch."""

    def __init__(
        self, client: Any, tokenizer: Any, *, eos_ids: set[int], max_new_tokens: int, workers: Any = None
    ) -> None:
        super().__init__(tokenizer, eos_ids=eos_ids, max_new_tokens=max_new_tokens)
        self.client = client
        self.workers = workers

    def generate(self, prompts: list[list[int]], params: list[Any]) -> tuple[list[Any], int]:
        with self.lock:
            self.batches += 1
            self.batch_sizes.append(len(prompts))
            return self.client.generate(prompts, params), self.version

    def shutdown(self) -> None:
        super().shutdown()
        self.client.close()


class VerlBackend(Backend):
    """The ``verl`` backend; see the module docstring."""

    name = "verl"
    config_model = VerlConfig
    recomputes_old_logprobs = True  # the workers recompute them when some row lacks them

    def __init__(self, config: RLLMConfig) -> None:
        super().__init__(config)
        cfg = self.backend_config
        if not isinstance(cfg, VerlConfig):
            from rllm_core.config import _validate_section

            cfg = _validate_section(VerlConfig, cfg or {}, self.name)
        self.validate_config(config)
        if cfg.reference is False and config.algorithm.loss.kl_coef > 0:
            raise ConfigError("verl.reference: false, but algorithm.loss.kl_coef > 0 needs the reference model")
        if cfg.reference is None:
            cfg = cfg.model_copy(update={"reference": needs_reference(config)})
        self.seed = config.trainer.seed
        temperature = config.rollout.train_sampling.get("temperature", 1.0)
        # logprobs of softmax(logits / T) at the training temperature, in the sampler and in verl alike
        self.temperature = float(temperature) if isinstance(temperature, int | float) and temperature > 0 else 1.0
        self._check_rollout(cfg)
        self._tiny_dir: Path | None = None
        if cfg.model_path is None:
            rollout = config.rollout
            agent_tokens = cfg.tiny.agent_tokens
            if agent_tokens is None:
                agent_tokens = rollout.tool_parser is not None or rollout.reasoning_parser is not None
            self._tiny_dir = _write_tiny_model(cfg, self.seed, bool(agent_tokens))
            cfg = cfg.model_copy(update={"model_path": str(self._tiny_dir)})
        self.cfg: VerlConfig = cfg
        self.backend_config = cfg

        from transformers import AutoTokenizer

        from rllm_verl.workers import VerlWorkers

        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model_path, local_files_only=True)
        if self.tokenizer.chat_template is None:
            raise ConfigError(f"verl.model_path: the tokenizer in {cfg.model_path} has no chat template")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        in_workers = cfg.rollout == "torch"
        self.workers = VerlWorkers(
            cfg,
            config.algorithm,
            loss_scale_factor=config.loss_scale_factor(),
            temperature=self.temperature,
            rollout=in_workers,
        )
        eos_ids = eos_ids_of(self.tokenizer, _generation_config(cfg.model_path))
        self._servers: list[Any] = []
        self._weight_sync: Any = None
        self._probe: list[int] = []
        try:
            if in_workers:
                self.runtime: BaseSamplerRuntime = WorkerSamplerRuntime(
                    self.workers, self.tokenizer, eos_ids=eos_ids, max_new_tokens=cfg.max_new_tokens, seed=self.seed
                )
            else:
                self.runtime = self._start_http_rollout(cfg, eos_ids)
        except BaseException:
            self._stop_servers()
            self.workers.shutdown()
            raise
        self.updates = 0
        self._sync_s: float | None = None
        self._push_metrics: dict[str, float] = {}

    # -- setup ----------------------------------------------------------------------------------

    @staticmethod
    def _check_rollout(cfg: VerlConfig) -> None:
        """vLLM's ``reload_weights`` updates an input embedding but not an output head tied to it, so
        ``rollout: vllm_http`` would sample from stale weights after the first sync: untied models only."""
        if cfg.rollout != "vllm_http":
            return
        if cfg.model_path is None:
            field, tied = "verl.tiny.tie_word_embeddings", cfg.tiny.tie_word_embeddings
        else:
            config_file = Path(cfg.model_path) / "config.json"
            field = "verl.model_path"
            tied = config_file.is_file() and json.loads(config_file.read_text()).get("tie_word_embeddings", False)
        if tied:
            raise ConfigError(
                f"{field}: the model ties its output head to its input embedding, which vLLM's weight reload "
                "leaves stale (rollout: vllm_http); use an untied model (tiny: tie_word_embeddings: false)"
            )

    def _start_http_rollout(self, cfg: VerlConfig, eos_ids: set[int]) -> HttpSamplerRuntime:
        """The vLLM servers (launched here unless given), the client, the weight sync and its parity
        probe; the servers must start out serving the actor's weights (checked)."""
        from rllm_verl.http_rollout import VLLMHttpRollout
        from rllm_verl.vllm_server import start_vllm_server, wait_healthy
        from rllm_verl.weight_sync import PARITY_TOLERANCE, ObjectStoreWeightSync

        settings = cfg.vllm
        urls = list(settings.servers)
        if urls:
            wait_healthy(urls, timeout_s=settings.startup_timeout_s)
        else:
            for _ in range(settings.launch):
                server = start_vllm_server(
                    str(cfg.model_path),
                    venv=settings.venv,
                    dtype=settings.dtype,
                    kv_cache_bytes=settings.kv_cache_bytes,
                    startup_timeout_s=settings.startup_timeout_s,
                )
                self._servers.append(server)
                urls.append(server.base_url)
        tolerance = settings.parity_tolerance or PARITY_TOLERANCE.get(settings.dtype, PARITY_TOLERANCE["bfloat16"])
        self._weight_sync = ObjectStoreWeightSync(
            urls, bucket_bytes=settings.bucket_mb << 20, pause_mode=settings.pause_mode, tolerance=tolerance
        )
        tokens = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": "1 2 3 4 5 6 7 8 9 0"}], add_generation_prompt=True, tokenize=True
        )
        tokens = list(tokens["input_ids"] if isinstance(tokens, Mapping) else tokens)
        self._probe = tokens
        self._weight_sync.check_parity(self._parity_probe())  # the servers hold the model the actor trains
        client = VLLMHttpRollout(urls)
        return HttpSamplerRuntime(
            client, self.tokenizer, eos_ids=eos_ids, max_new_tokens=cfg.max_new_tokens, workers=self.workers
        )

    def _parity_probe(self) -> Any:
        """The probe's tokens with the actor's current log-probs of them (temperature 1, as vLLM's
        prompt log-probs)."""
        from rllm_verl.weight_sync import ParityProbe

        return ParityProbe(self._probe, self.workers.score_tokens(self._probe))

    def _stop_servers(self) -> None:
        if self._weight_sync is not None:
            self._weight_sync.close()
            self._weight_sync = None
        for server in self._servers:
            server.stop()
        self._servers = []

    def validate_config(self, config: RLLMConfig) -> None:
        algorithm = config.algorithm
        if any(algorithm.loss_for(role) != algorithm.loss for role in algorithm.loss_by_role):
            raise ConfigError("algorithm.loss_by_role: the verl backend trains every role with algorithm.loss")
        try:
            actor_loss_settings(algorithm.loss, config.loss_scale_factor())
        except (NotImplementedError, ValueError) as exc:
            raise ConfigError(str(exc)) from None
        if algorithm.optim.schedule != "constant" and not config.trainer.total_steps:
            raise ConfigError(
                f"algorithm.optim.schedule: {algorithm.optim.schedule!r} decays to 0 over trainer.total_steps, "
                "which is not set"
            )
        if config.trainer.mode == "async" and algorithm.loss.old_logprobs == "recompute" and not algorithm.loss.tis_cap:
            warnings.warn(
                "algorithm.loss.old_logprobs: recompute in async mode divides by the current weights' "
                "logprobs, which erases the staleness correction; set algorithm.loss.tis_cap (e.g. 2.0) "
                "to weight each token by min(pi_current / pi_sampler, tis_cap), or use old_logprobs: sampler",
                UserWarning,
                stacklevel=2,
            )

    def init_rollout_engine(self, **kwargs: Any) -> TorchRolloutEngine:
        if self.rollout_engine is None:
            self.rollout_engine = TorchRolloutEngine.for_run(self.runtime, self.config.rollout, self.cfg)
        return self.rollout_engine  # type: ignore[return-value]

    # -- stages ---------------------------------------------------------------------------------

    async def transform_to_backend_batch(self, state: TrainerState) -> Any:
        rows = state.rows
        if rows is None:
            from rllm_core.rows import build_rows

            rows = state.rows = build_rows(state.groups)
        if not all(type(t) is int for tokens in rows.tokens for t in tokens):
            raise TypeError("the verl backend trains on text only: Step.prompt_ids must be ints")
        state.backend_batch = rows
        return rows

    async def process_backend_batch(self, state: TrainerState) -> None:
        """The actor's logprobs of the sampled tokens (verl's ``compute_log_prob``), compared with the
        sampler's; they are the old logprobs with ``old_logprobs: recompute``."""
        rows = state.rows
        if rows is None or not len(rows):
            return
        trainer_lp = await asyncio.to_thread(self.workers.compute_log_prob, rows)
        on = rows.loss_mask
        sampler_lp = rows.logprobs[on]
        known = ~np.isnan(sampler_lp)
        if known.any():
            diff = np.abs(trainer_lp[on][known] - sampler_lp[known])
            state.metrics["actor/logprob_diff_max"] = float(diff.max())
            state.metrics["actor/logprob_diff_mean"] = float(diff.mean())
        loss = self.config.algorithm.loss
        if loss.old_logprobs == "recompute" or not known.all():
            state.extra["verl_old_logprobs"] = trainer_lp
        if loss.old_logprobs == "recompute" and loss.tis_cap is not None:
            # truncated importance sampling: the sampler's tokens reweighted towards the trainer's
            # policy, min(pi_trainer / pi_sampler, tis_cap); 1 where the sampler's logprob is unknown
            log_ratio = np.minimum(trainer_lp - np.nan_to_num(rows.logprobs, nan=0.0), 20.0)
            weights = np.minimum(np.exp(log_ratio), loss.tis_cap)
            weights[np.isnan(rows.logprobs)] = 1.0
            state.extra["verl_is_weights"] = weights
            state.metrics["actor/tis_weight_mean"] = float(weights[on].mean())
        if self.workers.has_ref:
            state.extra["verl_ref_logprobs"] = await asyncio.to_thread(self.workers.compute_ref_log_prob, rows)

    async def update_policy(self, state: TrainerState) -> None:
        rows = state.rows
        if rows is None:
            rows = await self.transform_to_backend_batch(state)
        if not len(rows):
            state.metrics["actor/num_seqs"] = 0.0
            return
        optim = self.config.algorithm.optim
        lr = optim.lr * optim.lr_factor(self.updates, self.config.trainer.total_steps)
        old = state.extra.pop("verl_old_logprobs", None)
        ref = state.extra.pop("verl_ref_logprobs", None)
        tis = state.extra.pop("verl_is_weights", None)
        metrics = await asyncio.to_thread(self._update, rows, state.step, lr, old, ref, tis)
        state.metrics.update(metrics)

    def _update(self, rows: Any, step: int, lr: float, *logprobs: np.ndarray | None) -> dict[str, float]:
        old, ref, tis = logprobs
        self.workers.set_lr(lr)
        metrics = self.workers.update_actor(rows, step=step, old_logprobs=old, ref_logprobs=ref, is_weights=tis)
        self.updates += 1
        metrics["actor/lr"] = lr
        if self._sync_s is not None:  # the last sync, which ran after the previous step was logged
            metrics["rollout/weight_sync_s"] = self._sync_s
            metrics.update(self._push_metrics)
        return metrics

    async def on_policy_updated(self, state: TrainerState, version: int) -> None:
        self._sync_s = await asyncio.to_thread(self._sync, version)
        if self.rollout_engine is not None:
            self.rollout_engine.set_weight_version(version)

    def _sync(self, version: int) -> float:
        with self.runtime.lock:  # no generation batch straddles the new weights
            if self._weight_sync is None:
                seconds = self.workers.sync_weights(version)
            else:
                report = self.workers.push_weights(self._weight_sync, version, self._parity_probe())
                seconds = report.total_s
                self._push_metrics = {
                    "rollout/weight_sync_mb": report.bytes / 2**20,
                    "rollout/weight_sync_reload_s": report.reload_s,
                    "rollout/parity_max_diff": report.max_parity_diff or 0.0,
                }
            self.runtime.version = version
        return seconds

    # -- checkpoints ----------------------------------------------------------------------------

    def save_checkpoint(self, path: Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        self.workers.save_checkpoint(str(path / "verl"), step=self.updates)
        meta = {"updates": self.updates, "version": self.runtime.version}
        if self.workers.has_rollout:  # the samplers' random state: a resumed run draws what this one would
            import torch

            with self.runtime.lock:
                torch.save(self.workers.rollout_rng_state(), path / "rollout_rng.pt")
        if self.runtime.reference_refreshed:  # the initial policy needs no copy: the model files are it
            self.workers.save_reference(str(path / "reference"))
            meta["reference"] = "refreshed"
        meta["save_s"] = time.perf_counter() - start
        (path / "rllm_verl.json").write_text(json.dumps(meta, indent=2))

    def load_checkpoint(self, path: Path) -> None:
        path = Path(path)
        meta_file = path / "rllm_verl.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"verl backend: {path} is not a checkpoint of it (no rllm_verl.json)")
        meta = json.loads(meta_file.read_text())
        self.workers.load_checkpoint(str(path / "verl"))
        rng_file = path / "rollout_rng.pt"
        if self.workers.has_rollout and rng_file.is_file():
            import torch

            with self.runtime.lock:
                self.workers.set_rollout_rng_state(torch.load(rng_file, weights_only=False))
                self.runtime._seed = None  # the restored state, not a fresh seed, draws the next batch
        if meta.get("reference") == "refreshed":
            self.workers.load_reference(str(path / "reference"))
            self.runtime.reference_refreshed = True
        self.updates = int(meta["updates"])
        self._sync(int(meta["version"]))
        if self.rollout_engine is not None:
            self.rollout_engine.set_weight_version(self.runtime.version)

    @classmethod
    def export(cls, checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
        """A Hugging Face model directory (config, safetensors weights, tokenizer) from a checkpoint:
        verl's FSDP model merger joins the per-rank shards under ``backend/verl/``. No Ray, no GPU.

        ``checkpoint_dir``: a trainer checkpoint (``<run>/checkpoints/step_*``), its ``backend/``
        part, or the verl folder itself."""
        from verl.model_merger.base_model_merger import ModelMergerConfig
        from verl.model_merger.fsdp_model_merger import FSDPModelMerger

        checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
        for verl_dir in (checkpoint_dir / "backend" / "verl", checkpoint_dir / "verl", checkpoint_dir):
            if (verl_dir / "huggingface").is_dir() and any(verl_dir.glob("model_world_size_*_rank_0.pt")):
                break
        else:
            raise FileNotFoundError(f"{checkpoint_dir} is not a verl-backend checkpoint (no backend/verl/ shards)")
        merger = FSDPModelMerger(
            ModelMergerConfig(
                operation="merge",
                backend="fsdp",
                local_dir=str(verl_dir),
                target_dir=str(out_dir),
                hf_model_config_path=str(verl_dir / "huggingface"),
            )
        )
        merger.merge_and_save()
        merger.cleanup()
        (out_dir / "rllm_export.json").write_text(json.dumps({"from_checkpoint": str(checkpoint_dir)}))
        return out_dir

    async def shutdown(self) -> None:
        self.runtime.shutdown()
        await asyncio.to_thread(self._stop_servers)
        await asyncio.to_thread(self.workers.shutdown)
        if self._tiny_dir is not None:
            shutil.rmtree(self._tiny_dir, ignore_errors=True)


def _generation_config(model_path: str) -> Any:
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path, local_files_only=True)
    except OSError:  # no generation_config.json: the tokenizer's end-of-sequence token alone
        return None


def _write_tiny_model(cfg: VerlConfig, seed: int, agent_tokens: bool) -> Path:
    """The torch backend's tiny model (same settings and seed: the same weights) as a Hugging Face
    directory verl can load in its workers."""
    from rllm_torch.config import TorchBackendConfig
    from rllm_torch.model import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(
        TorchBackendConfig(tiny=cfg.tiny, device="cpu"), seed, agent_tokens=agent_tokens
    )
    path = Path(tempfile.mkdtemp(prefix="rllm-verl-tiny-"))
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path
