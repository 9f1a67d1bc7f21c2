"""Entry point ``rllm = mlflow``: registers the logger named ``mlflow``.

mlflow itself is imported only when a run builds the logger, so listing plugins stays fast.
"""

from __future__ import annotations

from typing import Any

from rllm_core import hookimpl


@hookimpl
def register_loggers(register: Any) -> None:
    from rllm_mlflow.logger import MlflowLogger, MlflowSettings

    register("mlflow", MlflowLogger, config_model=MlflowSettings)
