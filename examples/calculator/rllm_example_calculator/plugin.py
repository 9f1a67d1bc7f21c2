"""Entry point (group ``rllm``): registers the ``calculator`` workflow and reward."""

from __future__ import annotations

from typing import Any

from rllm_core.hookspecs import hookimpl


@hookimpl
def register_workflows(register: Any) -> None:
    from rllm_example_calculator.workflow import calculator_workflow

    register("calculator", calculator_workflow)


@hookimpl
def register_rewards(register: Any) -> None:
    from rllm_example_calculator.reward import calculator_reward

    register("calculator", calculator_reward)
