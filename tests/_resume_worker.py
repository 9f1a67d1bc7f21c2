"""Subprocess for the kill-and-resume test: train the simulated backend with a checkpoint every step.

Usage: python _resume_worker.py RUN_DIR TRACE_FILE MODE
"""

from __future__ import annotations

import sys

from rllm_core.testing import simulated_config
from rllm_core.trainer import UnifiedTrainer


def make_config(run_dir: str, trace: str, mode: str = "sync"):
    return simulated_config(
        run_dir,
        trainer={"run_dir": run_dir, "resume": "auto", "save_every": 1, "epochs": 2, "mode": mode, "seed": 7},
        simulated={"gen_latency": 0.03, "trace_file": trace},
        loggers={"jsonl": {}},
    )


if __name__ == "__main__":
    UnifiedTrainer(make_config(sys.argv[1], sys.argv[2], sys.argv[3])).fit()
