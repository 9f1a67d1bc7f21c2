"""Entry point of ``rllm-verl`` (group ``rllm``): registers the ``verl`` backend lazily."""

from __future__ import annotations

from typing import Any

from rllm_core.hookspecs import hookimpl
from rllm_verl.config import VerlConfig


class _LazyBackend:
    """Builds ``VerlBackend`` on call, so ``rllm plugins`` does not import verl, Ray or torch."""

    name = "verl"
    config_model = VerlConfig

    def __call__(self, config: Any) -> Any:
        from rllm_verl.backend import VerlBackend

        return VerlBackend(config)

    @staticmethod
    def export(checkpoint_dir: Any, out_dir: Any) -> Any:
        from rllm_verl.backend import VerlBackend

        return VerlBackend.export(checkpoint_dir, out_dir)


@hookimpl
def register_backends(register: Any) -> None:
    # auto=False: a Ray cluster is never started behind a user's back by ``backend: auto``.
    register("verl", _LazyBackend(), priority=20, config_model=VerlConfig, auto=False)
