"""rllm-core's verl backend: token rows to verl batches, verl's engine workers on Ray (FSDP2), rollouts.

Importing this package is light: verl itself is imported by the modules that need it. The
``cpu`` entry point of group ``verl.plugins`` is :mod:`rllm_verl.compat`.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ObjectStoreWeightSync",
    "VLLMHttpRollout",
    "VerlBackend",
    "VerlConfig",
    "VerlWorkers",
    "loss_agg_settings",
    "rows_to_dataproto",
    "start_vllm_server",
]

_EXPORTS = {
    "ObjectStoreWeightSync": "rllm_verl.weight_sync",
    "VLLMHttpRollout": "rllm_verl.http_rollout",
    "VerlBackend": "rllm_verl.backend",
    "start_vllm_server": "rllm_verl.vllm_server",
    "VerlConfig": "rllm_verl.config",
    "VerlWorkers": "rllm_verl.workers",
    "loss_agg_settings": "rllm_verl.dataproto",
    "rows_to_dataproto": "rllm_verl.dataproto",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'rllm_verl' has no attribute {name!r}")
