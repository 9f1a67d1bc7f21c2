"""rllm-rewards: reward functions for rllm-core, registered through the ``rllm`` entry point.

Every reward is ``fn(task: dict, action) -> RewardOutput`` (``math`` and ``code`` are async).
Names: ``math``, ``countdown``, ``exact_match``, ``f1``, ``multiple_choice``, ``code``.
See docs/rewards.md for the task keys each reads and how bad input is handled.
"""

from rllm_rewards._common import RewardTaskError
from rllm_rewards.code_reward import code_reward, extract_code
from rllm_rewards.countdown import countdown_reward
from rllm_rewards.math_reward import extract_answer, math_reward, normalize_answer
from rllm_rewards.sandbox import SandboxLimits, SandboxUnavailableError, available_layers, run_python_tests
from rllm_rewards.text import exact_match_reward, f1_reward, multiple_choice_reward

__version__ = "0.1.0"
__all__ = [
    "RewardTaskError",
    "SandboxLimits",
    "SandboxUnavailableError",
    "available_layers",
    "code_reward",
    "countdown_reward",
    "exact_match_reward",
    "extract_answer",
    "extract_code",
    "f1_reward",
    "math_reward",
    "multiple_choice_reward",
    "normalize_answer",
    "run_python_tests",
]
