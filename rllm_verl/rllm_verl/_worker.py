"""The engine worker class rllm-verl runs on Ray: verl's ``ActorRolloutRefWorker``, prepared for its platform.

A module of its own so that Ray workers import it by name (and with it verl's engine workers);
:func:`rllm_verl.compat.prepare_worker_process` runs before verl builds anything.
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
