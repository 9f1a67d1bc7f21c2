"""Shared by the tinker tests: a scripted sampler with the SDK's response types."""

from __future__ import annotations

import numpy as np
from tinker import types


class Scripted:
    """A sampler that answers each request with the next scripted completion (and keeps the prompts)."""

    def __init__(self, *completions: tuple[list[int], str]) -> None:
        self.completions = list(completions)
        self.prompts: list[list[int]] = []

    async def sample(self, prompt, num_samples, sampling_params):
        self.prompts.append(prompt.to_ints())
        tokens, stop_reason = self.completions.pop(0)
        seq = types.SampledSequence(
            stop_reason=stop_reason,
            sequence_id=f"scripted:{len(self.prompts)}",
            tokens_np=np.asarray(tokens, dtype=np.int32),
            logprobs_np=np.full(len(tokens), -0.5, dtype=np.float32),
        )
        return types.SampleResponse(sequences=[seq])
