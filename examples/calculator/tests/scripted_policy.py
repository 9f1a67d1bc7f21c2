"""A real tiny model whose replies a test writes as a function of the prompt (no download, no mock engine).

On each prompt pass ``script(prompt_tokens)`` returns the tokens to force, one per decoding step, for
that prompt ([] or fewer tokens: the model's own logits take over). Batching, the KV cache, sampling,
logprobs, decoding, parsing and multi-turn bookkeeping are the engine's own code. Batches of distinct
prompts only (the sampler runs identical prompts once and copies them, which this does not follow).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


class ScriptedPolicy(torch.nn.Module):
    def __init__(self, model: Any, tokenizer: Any, script: Callable[[list[str]], list[str]]) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.script = script
        self._forced: list[list[int]] = []
        self._step = 0

    @property
    def generation_config(self) -> Any:
        return getattr(self.model, "generation_config", None)

    def forward(self, input_ids: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        prompt_pass = past_key_values is None or past_key_values.get_seq_length() == 0
        out = self.model(input_ids=input_ids, past_key_values=past_key_values, **kwargs)
        if prompt_pass:
            tok, pad = self.tokenizer, self.tokenizer.pad_token_id
            prompts = [tok.convert_ids_to_tokens([t for t in row.tolist() if t != pad]) for row in input_ids]
            self._forced = [tok.convert_tokens_to_ids(self.script(p)) for p in prompts]
            self._step = 0
        for row, forced in enumerate(self._forced):
            if self._step < len(forced):
                logits = torch.full_like(out.logits[row, -1], -1e4)
                logits[forced[self._step]] = 0.0
                out.logits[row, -1] = logits
        self._step += 1
        return out
