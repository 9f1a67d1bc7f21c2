"""Entry point of ``rllm-tinker`` (group ``rllm``): registers the ``tinker`` backend lazily."""

from __future__ import annotations

from typing import Any

from rllm_core.hookspecs import hookimpl
from rllm_tinker.config import TinkerBackendConfig


class _LazyBackend:
    """Builds ``TinkerBackend`` on call, so ``rllm plugins`` does not import tinker."""

    name = "tinker"
    config_model = TinkerBackendConfig

    def __call__(self, config: Any) -> Any:
        from rllm_tinker.backend import TinkerBackend

        return TinkerBackend(config)


@hookimpl
def register_backends(register: Any) -> None:
    # auto=False: a remote, paid service is never picked by ``backend: auto``.
    register("tinker", _LazyBackend(), priority=10, config_model=TinkerBackendConfig, auto=False)
