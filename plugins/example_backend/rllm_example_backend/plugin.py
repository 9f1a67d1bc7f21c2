"""The entry point ``rllm = example`` points here: register the backend under the name ``example``.

A low priority keeps it from becoming the default (``backend: auto``) when a real backend is
installed next to it; a config selects it with ``backend: example``.
"""

from __future__ import annotations

from typing import Any

from rllm_core import hookimpl
from rllm_example_backend.backend import ExampleBackend


@hookimpl
def register_backends(register: Any) -> None:
    register("example", ExampleBackend, priority=-100)
