"""Subprocess for the kill-and-resume test: the say-seven run through the verl backend, a checkpoint
every 2 steps, far more steps than the test lets it run (it is killed). Usage: python _verl_resume_worker.py RUN_DIR"""

from __future__ import annotations

import sys

from verl_run_helpers import verl_config

from rllm_core import UnifiedTrainer

if __name__ == "__main__":
    overrides = {"trainer.save_every": 2, "trainer.total_steps": 1000, "trainer.resume": "auto"}
    config = verl_config(sys.argv[1], **overrides)
    config.loggers = {"jsonl": {}}
    UnifiedTrainer(config).fit()
