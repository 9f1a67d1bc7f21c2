"""Single-digit addition: the task a tiny randomly initialised model learns by RL from scratch.

The prompt is ``a+b=`` (``0 <= a, b <= 9``). The main job (``arith_digits``) answers with the sum
spelled digit by digit, zero-padded to two digits, then end-of-turn; ``arith`` answers with the
sum as one token (the numbers 0-18 are words of that config's vocabulary).
"""

from rllm_example_arith.data import train_tasks, val_tasks
from rllm_example_arith.workflow import arith_reward, arith_workflow, digits_reward, digits_workflow

__all__ = ["arith_reward", "arith_workflow", "digits_reward", "digits_workflow", "train_tasks", "val_tasks"]
