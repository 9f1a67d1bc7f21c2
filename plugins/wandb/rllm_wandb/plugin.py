"""Entry point ``rllm = wandb``: registers the logger named ``wandb``.

wandb itself is imported only when a run builds the logger, so listing plugins stays fast.
"""

from __future__ import annotations

from typing import Any

from rllm_core import hookimpl


@hookimpl
def register_loggers(register: Any) -> None:
    from rllm_wandb.logger import WandbLogger, WandbSettings

    register("wandb", WandbLogger, config_model=WandbSettings)
