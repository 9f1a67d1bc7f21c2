"""The rollout in verl's rollout slot of each engine worker: a Hugging Face model sampled with rllm-torch.

verl 0.9.1 ships server rollouts only (vLLM, SGLang, TensorRT-LLM on GPU). :class:`TorchRollout` is
a :class:`verl.workers.rollout.base.BaseRollout` that holds the policy as a plain transformers model
in the worker process and samples it with :func:`rllm_torch.sampling.generate` (batched, KV cache,
logprobs of ``softmax(logits / T)``: the trainer's convention). It receives weights through verl's
own path: ``ActorRolloutRefWorker.update_weights`` → the FSDP engine's full tensors →
:meth:`TorchRollout.update_weights` (verl's ``naive`` checkpoint engine, colocated). It is how the
verl backend runs on CPU (CI) and a simple choice for small models on GPU; large models want a
server rollout.

:func:`rllm_verl.compat.register_torch_rollout` puts it in verl's rollout registry under
``rllm_torch`` (:data:`rllm_verl.compat.TORCH_ROLLOUT`).
"""

from __future__ import annotations

from typing import Any

import torch
from rllm_torch.engine import SamplerRuntime
from rllm_torch.sampling import GenParams, GenResult
from verl.workers.rollout.base import BaseRollout

__all__ = ["TorchRollout"]


class TorchRollout(BaseRollout):
    """The policy as a transformers model in this worker, updated by verl's weight sync."""

    def __init__(self, config: Any, model_config: Any, device_mesh: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, model_config, device_mesh)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = self.model_config.local_path or self.model_config.path
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        seed = int(getattr(self.config, "seed", 0) or 0) * 1000 + rank
        # the torch backend's sampler (model, generator, lock, version), used here without its threads
        self.sampler = SamplerRuntime(
            model.to(device).eval().requires_grad_(False), tokenizer, seed=seed, max_new_tokens=256
        )

    async def resume(self, tags: list[str]) -> None:
        return None  # weights and cache stay in memory

    async def release(self) -> None:
        return None

    async def update_weights(self, weights: Any, wire_format: str = "named_tensors", **kwargs: Any) -> None:
        if wire_format != "named_tensors":
            raise NotImplementedError(f"TorchRollout: wire format {wire_format!r}; only named_tensors")
        sampler = self.sampler
        state = sampler.model.state_dict()
        with sampler.lock, torch.no_grad():
            for name, tensor in weights:
                if name not in state:
                    raise KeyError(f"TorchRollout: the trainer sent {name!r}, which the rollout model does not have")
                state[name].copy_(tensor)
            sampler.version = int(kwargs.get("global_steps") or 0)

    def set_seed(self, seed: int) -> None:
        self.sampler.generator.manual_seed(seed)

    def generate(self, prompts: list[list[int]], params: list[GenParams]) -> tuple[list[GenResult], int]:
        """A completion per prompt, and the weight version that produced them."""
        return self.sampler.generate(prompts, params)

    def score(self, rows: list[tuple[list[int], list[int]]], temperature: float = 1.0) -> list[list[float]]:
        """Logprobs of each row's response tokens under ``softmax(logits / temperature)`` (teacher-forced)."""
        return self.sampler.score(rows, "policy", temperature)
