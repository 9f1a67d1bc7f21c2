"""``RolloutEngine``: what workflows call to talk to the model.

A backend subclasses :class:`RolloutEngine` and implements ``_generate`` (messages in) and, when it
can, ``_generate_tokens`` (token ids in), ``compute_logprobs`` and ``encode_messages``. The base
class stamps every output with the policy version and the validation flag.

Workflows receive a :class:`SamplingEngine`: the same engine with the run's sampling defaults for
training or validation bound in. Precedence: per-call arguments > train/val defaults > engine
defaults; a per-call change never leaks into the defaults.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rllm_core.types import ModelOutput, TokenInput

__all__ = ["PROMPT_TOO_LONG", "RolloutEngine", "SamplingEngine"]

PROMPT_TOO_LONG = "prompt_too_long"
"""``ModelOutput.finish_reason`` of a request whose prompt leaves no room in the model's context: no
tokens are sampled, and the workflow engine ends the episode with ``max_prompt_length``."""

Messages = Sequence[Mapping[str, Any]]


class RolloutEngine:
    """Base class for backends' engines."""

    supports_token_in_token_out: bool = False
    supports_logprobs: bool = False
    """Whether :meth:`compute_logprobs` works (OPSD needs it)."""

    def __init__(self, default_sampling: Mapping[str, Any] | None = None) -> None:
        self.weight_version = 0
        self.default_sampling: dict[str, Any] = dict(default_sampling or {})

    def set_weight_version(self, version: int) -> None:
        """Called by the backend once the sampler serves the weights of ``version``."""
        self.weight_version = version

    async def get_model_response(
        self, messages: Messages, *, is_validation: bool = False, **sampling: Any
    ) -> ModelOutput:
        """Sample one response to a chat ``messages`` list."""
        version = self.weight_version
        params = {**self.default_sampling, **sampling}
        out = await self._generate(list(messages), **params)
        return self._stamp(out, version, is_validation)

    async def get_token_response(
        self, token_input: TokenInput, *, is_validation: bool = False, **sampling: Any
    ) -> ModelOutput:
        """Token-in/token-out sampling (when ``supports_token_in_token_out``)."""
        if not self.supports_token_in_token_out:
            raise NotImplementedError(f"{type(self).__name__} does not support token-in/token-out")
        version = self.weight_version
        out = await self._generate_tokens(token_input, **{**self.default_sampling, **sampling})
        return self._stamp(out, version, is_validation)

    @staticmethod
    def _stamp(out: ModelOutput, version: int, is_validation: bool) -> ModelOutput:
        if out.weight_version is None:
            out.weight_version = version
        out.is_validation = is_validation
        return out

    async def _generate(self, messages: list[Mapping[str, Any]], **sampling: Any) -> ModelOutput:
        raise NotImplementedError

    async def _generate_tokens(self, token_input: TokenInput, **sampling: Any) -> ModelOutput:
        raise NotImplementedError

    async def encode_messages(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        """Prompt token ids for ``messages`` (chat template applied)."""
        raise NotImplementedError(f"{type(self).__name__} cannot encode messages")

    async def compute_logprobs(
        self, prompt_ids: Sequence[int], response_ids: Sequence[int], *, model: str = "policy"
    ) -> list[float]:
        """Logprob of each of ``response_ids`` following ``prompt_ids``.

        ``model="policy"`` scores under the weights the sampler serves now; ``model="reference"``
        under the reference weights (the initial policy until :meth:`refresh_reference`).
        """
        raise NotImplementedError(f"{type(self).__name__} cannot compute logprobs")

    async def refresh_reference(self) -> None:
        """Make the reference weights a copy of the current policy (OPSD's refreshed teacher)."""
        raise NotImplementedError(f"{type(self).__name__} has no reference model")


class SamplingEngine:
    """An engine with train or validation sampling defaults bound in (what workflows receive)."""

    def __init__(self, engine: RolloutEngine, sampling: Mapping[str, Any] | None = None, is_validation: bool = False):
        self.engine = engine
        self.sampling = dict(sampling or {})
        self.is_validation = is_validation

    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    @property
    def supports_token_in_token_out(self) -> bool:
        return self.engine.supports_token_in_token_out

    async def get_model_response(self, messages: Messages, **sampling: Any) -> ModelOutput:
        return await self.engine.get_model_response(
            messages, is_validation=self.is_validation, **{**self.sampling, **sampling}
        )

    async def get_token_response(self, token_input: TokenInput, **sampling: Any) -> ModelOutput:
        return await self.engine.get_token_response(
            token_input, is_validation=self.is_validation, **{**self.sampling, **sampling}
        )

    async def encode_messages(self, messages: Messages, add_generation_prompt: bool = True) -> list[int]:
        return await self.engine.encode_messages(messages, add_generation_prompt)

    async def compute_logprobs(
        self, prompt_ids: Sequence[int], response_ids: Sequence[int], *, model: str = "policy"
    ) -> list[float]:
        return await self.engine.compute_logprobs(prompt_ids, response_ids, model=model)

    async def refresh_reference(self) -> None:
        await self.engine.refresh_reference()
