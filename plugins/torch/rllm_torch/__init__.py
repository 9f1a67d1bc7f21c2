"""rllm-torch: the local backend for rllm-core (transformers + torch, CPU or one GPU).

``from rllm_torch import TorchBackend`` loads torch; importing the package alone does not.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["TorchBackend", "TorchBackendConfig", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "TorchBackend":
        from rllm_torch.backend import TorchBackend

        return TorchBackend
    if name == "TorchBackendConfig":
        from rllm_torch.config import TorchBackendConfig

        return TorchBackendConfig
    raise AttributeError(f"module 'rllm_torch' has no attribute {name!r}")
