"""rllm-wandb: the ``wandb`` logger (``loggers: {wandb: {project: ..., mode: offline}}``)."""

from rllm_wandb.logger import WandbLogger, WandbSettings

__all__ = ["WandbLogger", "WandbSettings"]
__version__ = "0.1.0"
