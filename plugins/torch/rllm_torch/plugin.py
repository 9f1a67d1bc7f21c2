"""Entry point of ``rllm-torch`` (group ``rllm``): the ``torch`` backend and the ``reward_curve`` logger.

Imports stay lazy: registering names costs nothing; torch and transformers load only when the
backend is built (``module:attr`` strings are not used here because the registry needs the
class for its ``config_model``, which lives in the torch-free ``config`` module).
"""

from __future__ import annotations

from typing import Any

from rllm_core.hookspecs import hookimpl
from rllm_torch.config import TorchBackendConfig


class _LazyBackend:
    """Builds ``TorchBackend`` on call, so ``rllm plugins`` does not import torch."""

    name = "torch"
    config_model = TorchBackendConfig

    def __call__(self, config: Any) -> Any:
        from rllm_torch.backend import TorchBackend

        return TorchBackend(config)

    @staticmethod
    def export(checkpoint_dir: Any, out_dir: Any) -> Any:
        from rllm_torch.backend import TorchBackend

        return TorchBackend.export(checkpoint_dir, out_dir)


@hookimpl
def register_backends(register: Any) -> None:
    register("torch", _LazyBackend(), priority=100, config_model=TorchBackendConfig)


@hookimpl
def register_loggers(register: Any) -> None:
    from rllm_torch.reward_curve import RewardCurveLogger, RewardCurveSettings

    register("reward_curve", RewardCurveLogger, config_model=RewardCurveSettings)
