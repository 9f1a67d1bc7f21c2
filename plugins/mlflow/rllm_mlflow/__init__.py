"""rllm-mlflow: the ``mlflow`` logger (``loggers: {mlflow: {tracking_uri: ...}}``)."""

from rllm_mlflow.logger import MlflowLogger, MlflowSettings

__all__ = ["MlflowLogger", "MlflowSettings"]
__version__ = "0.1.0"
