"""On a GPU machine: verl's engine workers on CUDA (NCCL, FSDP2) with a vLLM server as the rollout.

Marked ``gpu``: skipped (and reported as skipped) where CUDA is absent. Needs a CUDA build of vLLM
in a venv of its own (``RLLM_VLLM_VENV``; verl's own matrix: ``pip install vllm==0.24.0`` or
``'verl[vllm]==0.9.1'``). The same say-seven task as the CPU runs, on every GPU of the machine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(900)]


def test_verl_on_cuda_with_a_vllm_rollout_raises_the_reward_with_parity_after_every_sync(tmp_path):
    import torch
    from verl_run_helpers import Recorder, rewards, verl_config

    from rllm_core import UnifiedTrainer

    venv = os.environ.get("RLLM_VLLM_VENV")
    if not venv or not (Path(venv) / "bin" / "python").exists():
        pytest.fail("set RLLM_VLLM_VENV to a venv with a CUDA build of vLLM (see the module docstring)")
    gpus = torch.cuda.device_count()
    overrides = {
        "verl.device": "cuda",
        "verl.world_size": max(1, gpus - 1),  # one GPU left to the vLLM server
        "verl.ray_num_cpus": 8,
        "verl.env": "{}",
        "verl.rollout": "vllm_http",
        "verl.vllm.venv": venv,
        "verl.vllm.kv_cache_bytes": "1G",
        "verl.tiny.hidden_size": 128,
        "verl.tiny.num_heads": 2,
        "verl.tiny.tie_word_embeddings": False,
    }
    UnifiedTrainer(verl_config(str(tmp_path / "run"), **overrides)).fit()
    got = rewards()
    steps = [m for _, m in Recorder.history if "train/reward/mean" in m]
    assert sum(got[-3:]) / 3 > sum(got[:3]) / 3 + 0.3, got
    assert max(m.get("rollout/parity_max_diff", 0.0) for m in steps) < 1e-3
