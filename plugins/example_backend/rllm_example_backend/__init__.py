"""rllm-example-backend: a complete, tiny rllm backend to copy when writing your own.

See ``backend.py`` (the backend, its config model and its engine) and ``plugin.py`` (the entry
point). ``tasks.py`` holds a small task family it learns, used by its tests and the docs.
"""

from rllm_example_backend.backend import ExampleBackend, ExampleBackendConfig, TabularEngine

__all__ = ["ExampleBackend", "ExampleBackendConfig", "TabularEngine"]
__version__ = "0.1.0"
