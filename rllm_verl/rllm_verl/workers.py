"""verl's engine workers on Ray, driven from the trainer's process with token rows.

:class:`VerlWorkers` starts (or joins) a Ray cluster, places ``world_size`` workers (verl's
``ActorRolloutRefWorker`` in role ``actor``: FSDP over all ranks, AdamW, verl's PPO loss) and
talks to them the way verl's own trainer does: ``DataProto.to_tensordict()`` →
``left_right_2_no_padding`` → worker → ``no_padding_2_padding``. Every call is blocking; call
them from a thread when an event loop must keep running.

* :meth:`VerlWorkers.compute_log_prob`: the current policy's log-probs of the rows' tokens.
* :meth:`VerlWorkers.update_actor`: one training step: ``epochs`` passes over the rows shuffled
  into mini-batches by ``TokenRows.mini_batches`` (``algorithm.optim.mini_batch_size`` or
  ``mini_batches``, seeded by the step: every backend's rule), one optimiser step each. Each
  mini-batch is one ``update_actor`` call, so its ``global_batch_size`` (the seq-mean normaliser)
  counts that mini-batch's rows exactly, as the core's ``TokenRows.loss_weights(rows=...)`` does.
* :meth:`VerlWorkers.evaluate_loss`: verl's loss on the rows with the current weights, no update.
* :meth:`VerlWorkers.set_loss`: a new loss (clip ranges, aggregation) for the following calls.
* :meth:`VerlWorkers.set_lr`: the learning rate of the following optimiser steps.

With ``rollout=True`` the workers take verl's role ``actor_rollout``: each also holds a sampling copy
of the policy (:class:`rllm_verl.rollout.TorchRollout`), which :meth:`VerlWorkers.generate` spreads
requests over and :meth:`VerlWorkers.sync_weights` refreshes through verl's own weight sync.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from rllm_core.config import AlgorithmConfig, LossConfig
from rllm_verl import compat
from rllm_verl.config import VerlConfig, actor_config, compose_verl_config
from rllm_verl.dataproto import response_values_to_rows, rows_to_dataproto

if TYPE_CHECKING:  # pragma: no cover
    from rllm_core.rows import TokenRows

__all__ = ["FORWARDED_ENV", "VerlWorkers", "forwarded_env"]

FORWARDED_ENV = ("PYTHONPATH", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS", "PYTORCH_CUDA_ALLOC_CONF")
"""Variables of the driver's environment that every worker gets (with any ``HF_*``, ``TRANSFORMERS_*``,
``RLLM_*``, ``VERL_*`` and ``NCCL_*``): imports, Hugging Face offline/cache settings, rllm's plugin
allow/block lists and verl's platform reach workers on every node of the cluster. The GPUs a worker
sees (``CUDA_VISIBLE_DEVICES``) are Ray's to set, per worker, and are not forwarded."""

_FORWARDED_PREFIXES = ("HF_", "TRANSFORMERS_", "RLLM_", "VERL_", "NCCL_")


def forwarded_env(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The part of ``environ`` (default: this process's) that workers inherit (:data:`FORWARDED_ENV`)."""
    import os

    environ = dict(os.environ if environ is None else environ)
    return {k: v for k, v in environ.items() if k in FORWARDED_ENV or k.startswith(_FORWARDED_PREFIXES)}


def _mean(value: Any) -> float:
    from verl.utils.metric import Metric

    if isinstance(value, list) and value and isinstance(value[0], Metric):
        return float(Metric.aggregate_dp(value))
    if isinstance(value, Metric):
        return float(value.aggregate())
    if isinstance(value, list):
        return float(np.mean([_mean(v) for v in value]))
    return float(value)


class VerlWorkers:
    """The actor's engine workers (see the module docstring); :meth:`shutdown` releases them."""

    def __init__(
        self,
        cfg: VerlConfig,
        algorithm: AlgorithmConfig | None = None,
        *,
        loss_scale_factor: float | None = None,
        temperature: float = 1.0,
        rollout: bool = False,
    ) -> None:
        import ray
        from transformers import AutoTokenizer
        from verl.single_controller.ray import RayClassWithInitArgs, RayResourcePool, RayWorkerGroup

        from rllm_verl._worker import RLLMActorRolloutRefWorker

        compat.check_verl_version()
        self.cfg = cfg
        self.algorithm = algorithm or AlgorithmConfig()
        self.loss = self.algorithm.loss
        """The loss the workers apply (the algorithm's, until :meth:`set_loss`)."""
        self.temperature = float(temperature)
        self.loss_scale_factor = loss_scale_factor
        self.has_rollout = rollout
        self.has_ref = cfg.reference if cfg.reference is not None else self.algorithm.loss.kl_coef > 0
        # verl has no actor+ref role without a rollout: a run with a reference always carries the torch rollout
        self.role = "actor_rollout_ref" if self.has_ref else "actor_rollout" if rollout else "actor"
        self.verl_config = compose_verl_config(cfg, self.algorithm, loss_scale_factor, rollout="rollout" in self.role)
        tokenizer = AutoTokenizer.from_pretrained(cfg.model_path, local_files_only=True)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.timings: dict[str, float] = {}

        env = {"TOKENIZERS_PARALLELISM": "false", **forwarded_env(), **cfg.env}
        if cfg.device == "cpu":
            compat.use_cpu_platform()
            env["VERL_PLATFORM"] = compat.CPU_PLATFORM
        start = time.perf_counter()
        self._closed = False
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            local = cfg.ray_address is None
            ray.init(
                address=cfg.ray_address,
                num_cpus=cfg.ray_num_cpus if local else None,
                include_dashboard=False,
                runtime_env={"env_vars": env},
            )
        self.timings["ray_start_s"] = time.perf_counter() - start

        start = time.perf_counter()
        self._pool: Any = None
        self.group: Any = None
        try:
            # one process per bundle; max_colocate_count=1, else each bundle asks for 10 CPUs
            per_node = [cfg.world_size // cfg.nnodes] * cfg.nnodes  # one placement group per node
            self._pool = RayResourcePool(per_node, use_gpu=cfg.device != "cpu", max_colocate_count=1)
            worker = RayClassWithInitArgs(
                cls=ray.remote(RLLMActorRolloutRefWorker),
                config=self.verl_config.actor_rollout_ref,
                role=self.role,
            )
            self.group = RayWorkerGroup(
                resource_pool=self._pool, ray_cls_with_init=worker, device_name=cfg.device, worker_env=env
            )
            self.group.init_model()
        except BaseException:
            self.shutdown()
            raise
        self.timings["init_model_s"] = time.perf_counter() - start

    @property
    def world_size(self) -> int:
        return self.group.world_size

    # -- loss ----------------------------------------------------------------------------------

    def set_loss(self, loss: LossConfig, loss_scale_factor: float | None = None) -> None:
        """Use ``loss`` (clip ranges, aggregation) in the following updates: verl's ``ppo_loss``
        with :func:`~rllm_verl.config.actor_config`."""
        from verl.workers.utils.losses import ppo_loss

        actor = actor_config(self.verl_config, loss, loss_scale_factor)
        self.group.set_loss_fn(partial(ppo_loss, config=actor))
        self.loss = loss
        self.loss_scale_factor = loss_scale_factor

    # -- calls ---------------------------------------------------------------------------------

    def _batch(
        self,
        rows: TokenRows,
        indices: Sequence[int] | None,
        old_logprobs: np.ndarray | None,
        ref_logprobs: np.ndarray | None = None,
        is_weights: np.ndarray | None = None,
        temperature: float | None = None,
    ) -> Any:
        from verl.workers.utils.padding import left_right_2_no_padding

        proto = rows_to_dataproto(
            rows,
            pad_id=self.pad_id,
            dp_size=self.world_size,
            old_logprobs=old_logprobs,
            indices=indices,
            temperature=self.temperature if temperature is None else temperature,
            ref_logprobs=ref_logprobs,
            is_weights=is_weights,
        )
        return proto, left_right_2_no_padding(proto.to_tensordict())

    def compute_log_prob(self, rows: TokenRows, indices: Sequence[int] | None = None) -> np.ndarray:
        """The current policy's log-probs (at the sampling temperature), ``(T,)`` like
        ``rows.logprobs``: set on every response position (actions and observations), 0 elsewhere."""
        return self._infer(rows, indices, reference=False)

    def compute_ref_log_prob(self, rows: TokenRows, indices: Sequence[int] | None = None) -> np.ndarray:
        """The reference model's log-probs (the initial policy), laid out as :meth:`compute_log_prob`'s."""
        if not self.has_ref:
            raise RuntimeError("these verl workers have no reference model (algorithm.loss.kl_coef is 0)")
        return self._infer(rows, indices, reference=True)

    def _infer(
        self, rows: TokenRows, indices: Sequence[int] | None, reference: bool, temperature: float | None = None
    ) -> np.ndarray:
        from verl.utils import tensordict_utils as tu
        from verl.workers.utils.padding import no_padding_2_padding

        proto, td = self._batch(rows, indices, None, temperature=temperature)
        tu.assign_non_tensor(td, calculate_entropy=False, compute_loss=False)
        out = (self.group.compute_ref_log_prob if reference else self.group.compute_log_prob)(td)
        log_probs = no_padding_2_padding(tu.get(out, "log_probs"), td)
        return response_values_to_rows(log_probs[: proto.meta_info["num_rows"]], rows, indices)

    def evaluate_loss(
        self,
        rows: TokenRows,
        old_logprobs: np.ndarray | None = None,
        ref_logprobs: np.ndarray | None = None,
        is_weights: np.ndarray | None = None,
    ) -> dict[str, float]:
        """verl's loss on all ``rows`` with the current weights, without updating them (forward only,
        the same loss function and global normalisers as an update on these rows)."""
        from verl.utils import tensordict_utils as tu

        old, ref = self._old(rows, old_logprobs), self._ref(rows, ref_logprobs)
        _, td = self._batch(rows, None, old, ref, is_weights)
        tu.assign_non_tensor(td, calculate_entropy=self.cfg.entropy_coef > 0, compute_loss=True)
        metrics = tu.get(self.group.compute_log_prob(td), "metrics")
        return {k: _mean(v) for k, v in metrics.items() if k.startswith("actor/") or k == "loss"}

    def _old(self, rows: TokenRows, old_logprobs: np.ndarray | None) -> np.ndarray:
        """The given old logprobs; else the sampling ones, recomputed when the loss says so or some are unknown."""
        if old_logprobs is not None:
            return np.asarray(old_logprobs, dtype=np.float64)
        if self.loss.old_logprobs == "recompute" or np.isnan(rows.logprobs[rows.loss_mask]).any():
            return self.compute_log_prob(rows)
        return rows.logprobs

    def _ref(self, rows: TokenRows, ref_logprobs: np.ndarray | None) -> np.ndarray | None:
        if not self.has_ref:
            return None
        return self.compute_ref_log_prob(rows) if ref_logprobs is None else ref_logprobs

    def update_actor(
        self,
        rows: TokenRows,
        *,
        step: int = 0,
        old_logprobs: np.ndarray | None = None,
        ref_logprobs: np.ndarray | None = None,
        is_weights: np.ndarray | None = None,
    ) -> dict[str, float]:
        """One training step on ``rows`` (module docstring); verl's metrics averaged over its optimiser
        steps. ``old_logprobs``: what the ratio divides by (not given: the sampling logprobs, or the
        current policy's when ``algorithm.loss.old_logprobs`` is ``recompute`` or some are unknown). ``ref_logprobs``:
        the reference's for the KL loss (computed here when the loss has one and they are not given).
        ``is_weights``: per-token truncated importance weights (``tis_cap``), flat like the logprobs."""
        from verl.utils import tensordict_utils as tu

        start = time.perf_counter()
        old = self._old(rows, old_logprobs)
        ref = self._ref(rows, ref_logprobs)
        sums: dict[str, list[float]] = {}
        parts = rows.mini_batches(step, self.cfg.seed, self.algorithm.optim)
        for part in parts:
            proto, td = self._batch(rows, part, old, ref, is_weights)
            tu.assign_non_tensor(
                td,
                mini_batch_size=len(proto),
                epochs=1,
                seed=self.cfg.seed,
                dataloader_kwargs={"shuffle": False},
                calculate_entropy=self.cfg.entropy_coef > 0,
                compute_loss=True,
            )
            metrics = tu.get(self.group.update_actor(td), "metrics")
            for key, value in metrics.items():
                sums.setdefault(key, []).append(_mean(value))
        out = {(k if k.startswith(("actor/", "perf/")) else f"actor/{k}"): float(np.mean(v)) for k, v in sums.items()}
        out["actor/optimizer_steps"] = float(len(parts))
        out["actor/num_seqs"] = float(len(rows))
        out["actor/num_tokens"] = float(rows.num_action_tokens)
        out["actor/update_s"] = time.perf_counter() - start
        return out

    def worker_env(self, names: Sequence[str]) -> list[dict[str, str | None]]:
        """What each worker's process environment holds for ``names`` (by rank)."""
        return self.group.execute_all_sync("rllm_environ", list(names))

    def set_lr(self, lr: float) -> None:
        """The learning rate of the following optimiser steps (on every rank)."""
        self.group.execute_all_sync("rllm_set_lr", float(lr))

    # -- rollout -------------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], params: list[Any], seed: int | None = None) -> tuple[list[Any], int]:
        """Sample a completion per prompt (``rllm_torch.sampling.GenParams`` each) on the workers'
        rollouts, the batch split evenly over them; the results in order, and the weight version
        that produced all of them. ``seed``: reseed each worker's sampler (``seed + rank``) first."""
        import ray

        self._need_rollout()
        workers = self.group.workers
        size = -(-len(prompts) // len(workers))
        calls = []
        for rank, start in enumerate(range(0, len(prompts), size)):
            part = slice(start, start + size)
            rank_seed = None if seed is None else seed + rank
            calls.append(workers[rank].rllm_generate.remote(prompts[part], params[part], rank_seed))
        results, versions = [], set()
        for out, version in ray.get(calls):
            results.extend(out)
            versions.add(version)
        if len(versions) > 1:  # never: a sync and a generation do not overlap (the caller's lock)
            raise RuntimeError(f"rollout workers serve different weight versions {sorted(versions)}")
        return results, versions.pop() if versions else -1

    def score(self, rows: list[tuple[list[int], list[int]]], temperature: float = 1.0) -> list[list[float]]:
        """Logprobs of each row's response under the rollout's weights (rank 0's copy)."""
        import ray

        self._need_rollout()
        return ray.get(self.group.workers[0].rllm_score.remote(rows, temperature))

    def sync_weights(self, version: int) -> float:
        """Copy the actor's weights into every worker's rollout (verl's ``update_weights``, naive
        checkpoint engine: all ranks gather the full tensors); returns the seconds it took."""
        import ray

        self._need_rollout()
        start = time.perf_counter()
        ray.get(self.group.update_weights(global_steps=int(version), mode="naive"))
        return time.perf_counter() - start

    def push_weights(self, sync: Any, version: int, probe: Any = None) -> Any:
        """The actor's weights to servers outside verl (``rllm_verl.weight_sync.ObjectStoreWeightSync``):
        every rank gathers the full tensors (a collective), rank 0 pushes them; its ``SyncReport``."""
        reports = self.group.execute_all_sync("rllm_push_weights", sync, int(version), probe)
        return reports[0]

    def score_tokens(self, tokens: Sequence[int], temperature: float = 1.0) -> list[float]:
        """The actor's log-probs of ``tokens[1:]``, each given the tokens before it (``len - 1`` values)."""
        tokens = [int(t) for t in tokens]
        return self.score_rows([(tokens[:1], tokens[1:])], temperature=temperature)[0]

    def score_rows(
        self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], *, reference: bool = False, temperature: float = 1.0
    ) -> list[list[float]]:
        """Log-probs of each ``(prompt, response)`` pair's response tokens under the actor, or the
        reference model (``reference``), at ``temperature``: one forward over all ranks."""
        from rllm_core.rows import build_rows
        from rllm_core.types import Step, Trajectory, TrajectoryGroup

        if reference and not self.has_ref:
            raise RuntimeError(
                "these verl workers have no reference model: set verl.reference: true (or algorithm.loss.kl_coef > 0)"
            )
        scored = [i for i, (_, r) in enumerate(pairs) if len(r)]  # an empty response has nothing to score
        out: list[list[float]] = [[] for _ in pairs]
        if not scored:
            return out
        steps = [
            Step(prompt_ids=[int(t) for t in p], response_ids=[int(t) for t in r], logprobs=[0.0] * len(r))
            for p, r in (pairs[i] for i in scored)
        ]
        group = TrajectoryGroup(task_id="score", role="score", trajectories=[Trajectory(steps=[s]) for s in steps])
        rows = build_rows([group])  # one row per pair, in order
        flat = self._infer(rows, None, reference=reference, temperature=float(temperature))
        for k, i in enumerate(scored):
            start, end = int(rows.offsets[k]), int(rows.offsets[k + 1])
            out[i] = flat[start:end][rows.loss_mask[start:end]].tolist()
        return out

    def copy_reference(self) -> None:
        """The actor's current weights become the reference model's (``refresh_reference``), shard by
        shard on every rank."""
        if not self.has_ref:
            raise RuntimeError("these verl workers have no reference model: set verl.reference: true")
        self.group.execute_all_sync("rllm_copy_reference")

    def rollout_rng_state(self) -> list[Any]:
        """Each rank's sampler generator state, in rank order."""
        self._need_rollout()
        return list(self.group.execute_all_sync("rllm_rng_state"))

    def set_rollout_rng_state(self, states: list[Any]) -> None:
        self._need_rollout()
        if len(states) != self.world_size:
            raise ValueError(f"{len(states)} sampler states for {self.world_size} ranks (another verl.world_size?)")
        self.group.execute_all_sync("rllm_set_rng_state", list(states))  # a list of world size: one each

    def save_reference(self, path: str) -> None:
        """Each rank's shards of the reference model under ``path`` (``reference_rank_<r>.pt``)."""
        self.group.execute_all_sync("rllm_save_reference", str(path))

    def load_reference(self, path: str) -> None:
        self.group.execute_all_sync("rllm_load_reference", str(path))

    def _need_rollout(self) -> None:
        if not self.has_rollout:
            raise RuntimeError("these verl workers have no rollout (VerlWorkers(..., rollout=True))")

    # -- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, path: str, step: int = 0) -> None:
        """verl's checkpoint of the actor (model, optimiser, extra: per-rank files) under ``path``."""
        self.group.save_checkpoint(local_path=str(path), global_step=step)

    def load_checkpoint(self, path: str) -> None:
        self.group.load_checkpoint(local_path=str(path))

    # -- lifecycle -----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stop the workers, free their placement group, and stop Ray if this object started it."""
        import ray

        if self._closed or not ray.is_initialized():
            return
        self._closed = True
        for handle in (self.group.workers if self.group is not None else []) or []:
            ray.kill(handle)
        for pg in (self._pool.pgs if self._pool is not None else None) or []:
            ray.util.remove_placement_group(pg)
        if self._owns_ray:
            ray.shutdown()

    def __enter__(self) -> VerlWorkers:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
