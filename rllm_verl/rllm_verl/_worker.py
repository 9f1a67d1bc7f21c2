"""The engine worker class rllm-verl runs on Ray: verl's ``ActorRolloutRefWorker``, prepared for its platform.

A module of its own so that Ray workers import it by name (and with it verl's engine workers);
:func:`rllm_verl.compat.prepare_worker_process` runs before verl builds anything. The ``rllm_*``
methods are called on single workers' handles (generation, scoring) or on all of them (the lr).
"""

from __future__ import annotations

from typing import Any

from verl.workers.engine_workers import ActorRolloutRefWorker

from rllm_verl import compat

__all__ = ["RLLMActorRolloutRefWorker"]


class RLLMActorRolloutRefWorker(ActorRolloutRefWorker):
    """``ActorRolloutRefWorker`` that first makes its process ready for the platform (CPU: gloo, engines)."""

    def __init__(self, config: Any, role: str, **kwargs: Any) -> None:
        compat.prepare_worker_process()
        super().__init__(config, role, **kwargs)

    def rllm_generate(self, prompts: list[list[int]], params: list[Any], seed: int | None = None) -> Any:
        """Sample with this worker's rollout (:class:`rllm_verl.rollout.TorchRollout`): results, version."""
        if seed is not None:
            self.rollout.set_seed(seed)
        return self.rollout.generate(prompts, params)

    def rllm_score(self, rows: list[tuple[list[int], list[int]]], temperature: float = 1.0) -> list[list[float]]:
        return self.rollout.score(rows, temperature)

    def rllm_push_weights(self, sync: Any, version: int, probe: Any = None) -> Any:
        """Every rank gathers the actor's full tensors (``full_tensor`` is a collective); rank 0 pushes
        them to the servers (``ObjectStoreWeightSync.push``), the others only take part."""
        import torch

        params, _ = self.actor.engine.get_per_tensor_param()
        if torch.distributed.get_rank() == 0:
            return sync.push(params, version=version, probe=probe)
        for _ in params:
            pass
        return None

    def rllm_environ(self, names: list[str]) -> dict[str, str | None]:
        import os

        return {name: os.environ.get(name) for name in names}

    def rllm_set_lr(self, lr: float) -> None:
        """Use ``lr`` from the next optimiser step on (the core's schedule, computed by the driver).
        verl's scheduler is constant; its base lr moves too, so its step keeps this lr."""
        engine = self.actor.engine
        for group in engine.optimizer.param_groups:
            group["lr"] = lr
        scheduler = getattr(engine, "lr_scheduler", None)
        if scheduler is not None:
            scheduler.base_lrs = [lr] * len(scheduler.base_lrs)

    def rllm_rng_state(self) -> Any:
        """This rank's sampler generator state (checkpoints)."""
        return self.rollout.sampler.generator.get_state()

    def rllm_set_rng_state(self, state: Any) -> None:
        """Restore this rank's sampler generator state (the group hands worker i the i-th of a list)."""
        self.rollout.sampler.generator.set_state(state)

    # -- the reference model (OPSD's refreshed teacher) -----------------------------------------

    def _reference_pairs(self) -> list[tuple[Any, Any]]:
        """(actor tensor, reference tensor) per parameter: this rank's shards (FSDP2 shards both alike)."""
        actor = dict(self.actor.engine.module.named_parameters())
        ref = dict(self.ref.engine.module.named_parameters())
        if set(actor) != set(ref):
            raise RuntimeError(f"reference and actor parameters differ: {sorted(set(actor) ^ set(ref))[:5]}")
        return [(_local(actor[name]), _local(ref[name])) for name in sorted(actor)]

    def rllm_copy_reference(self) -> None:
        import torch

        with torch.no_grad():
            for actor, ref in self._reference_pairs():
                ref.copy_(actor)

    def rllm_save_reference(self, path: str) -> None:
        import os

        import torch

        os.makedirs(path, exist_ok=True)
        state = {name: _local(p).detach().cpu() for name, p in self.ref.engine.module.named_parameters()}
        torch.save(state, os.path.join(path, f"reference_rank_{torch.distributed.get_rank()}.pt"))

    def rllm_load_reference(self, path: str) -> None:
        import os

        import torch

        file = os.path.join(path, f"reference_rank_{torch.distributed.get_rank()}.pt")
        state = torch.load(file, map_location="cpu", weights_only=True)
        with torch.no_grad():
            for name, p in self.ref.engine.module.named_parameters():
                local = _local(p)
                local.copy_(state[name].to(local.device))


def _local(tensor: Any) -> Any:
    """This rank's shard of a (DTensor) parameter."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor
