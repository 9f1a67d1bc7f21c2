"""Entry point (group ``rllm``): registers the ``arith_opsd`` workflow."""

from __future__ import annotations

from typing import Any

from rllm_core.hookspecs import hookimpl


@hookimpl
def register_workflows(register: Any) -> None:
    from rllm_example_opsd.workflow import arith_opsd_workflow

    register("arith_opsd", arith_opsd_workflow)
