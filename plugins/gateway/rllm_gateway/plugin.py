"""Entry point (group ``rllm``): registers the ``blackbox`` workflow."""

from __future__ import annotations

from typing import Any

from rllm_core.hookspecs import hookimpl


@hookimpl
def register_workflows(register: Any) -> None:
    from rllm_gateway.workflow import blackbox

    register("blackbox", blackbox)
