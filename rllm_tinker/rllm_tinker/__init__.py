"""rllm-tinker: the ``tinker`` backend (LoRA training and sampling on the Tinker service).

Importing this package is cheap; ``tinker`` and ``tinker_cookbook`` load only when the backend is
built. ``rllm_tinker.testing`` holds the in-process stand-in the tests train against.
"""

from rllm_tinker.config import TinkerBackendConfig

__all__ = ["TinkerBackendConfig"]
__version__ = "0.1.0"
