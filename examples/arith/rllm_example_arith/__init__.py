"""Single-digit addition: the task a tiny randomly initialised model learns by RL from scratch.

The prompt is ``a+b=`` (``0 <= a, b <= 9``); the answer is the sum as one token of the tiny
tokenizer (the numbers 0-18 are words of its vocabulary), followed by end-of-turn.
"""

from rllm_example_arith.data import train_tasks, val_tasks
from rllm_example_arith.workflow import arith_reward, arith_workflow

__all__ = ["arith_reward", "arith_workflow", "train_tasks", "val_tasks"]
