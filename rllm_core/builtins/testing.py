"""Built-in plugin ``rllm.testing``: the simulated backend, workflow and reward (see ``rllm_core.testing``).

The backend is test support: ``backend: auto`` never picks it (``auto=False``); name it
(``backend: simulated``) to use it.
"""

from __future__ import annotations

from typing import Any

from rllm_core.hookspecs import hookimpl


@hookimpl
def register_backends(register: Any) -> None:
    from rllm_core.testing import SimulatedBackend

    register("simulated", SimulatedBackend, priority=-100, auto=False)


@hookimpl
def register_workflows(register: Any) -> None:
    from rllm_core.testing import simulated_workflow

    register("simulated", simulated_workflow)


@hookimpl
def register_rewards(register: Any) -> None:
    from rllm_core.testing import simulated_reward

    register("simulated", simulated_reward)
