"""Entry point (group ``rllm``): registers the ``arith`` workflow and reward."""

from __future__ import annotations

from typing import Any

from rllm_core.hookspecs import hookimpl
from rllm_example_arith.workflow import arith_reward, arith_workflow, digits_reward, digits_workflow


@hookimpl
def register_workflows(register: Any) -> None:
    register("arith", arith_workflow)
    register("arith_digits", digits_workflow)


@hookimpl
def register_rewards(register: Any) -> None:
    register("arith", arith_reward)
    register("arith_digits", digits_reward)
