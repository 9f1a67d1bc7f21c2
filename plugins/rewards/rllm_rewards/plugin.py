"""Entry point of ``rllm-rewards`` (group ``rllm``): registers every reward by name."""

from __future__ import annotations

from rllm_core.hookspecs import hookimpl
from rllm_rewards.code_reward import code_reward
from rllm_rewards.countdown import countdown_reward
from rllm_rewards.math_reward import math_reward
from rllm_rewards.text import exact_match_reward, f1_reward, multiple_choice_reward

REWARDS = {
    "math": math_reward,
    "countdown": countdown_reward,
    "exact_match": exact_match_reward,
    "f1": f1_reward,
    "multiple_choice": multiple_choice_reward,
    "code": code_reward,
}


@hookimpl
def register_rewards(register) -> None:
    for name, fn in REWARDS.items():
        register(name, fn)
