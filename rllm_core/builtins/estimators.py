"""Built-in plugin ``rllm.estimators``: registers the advantage estimators of ``rllm_core.advantages``.

Names: ``grpo``, ``drgrpo``, ``rloo``, ``reinforce``, ``reinforce_plus_plus``,
``reinforce_plus_plus_baseline``.
"""

from __future__ import annotations

from typing import Any

from rllm_core.advantages import BUILTIN_ESTIMATORS
from rllm_core.hookspecs import hookimpl


@hookimpl
def register_advantage_estimators(register: Any) -> None:
    for name, fn in BUILTIN_ESTIMATORS.items():
        register(name, fn)
