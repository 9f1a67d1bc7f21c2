"""``RolloutEngine``: what workflows call to talk to the model.

A backend subclasses :class:`RolloutEngine` and implements ``_generate`` (messages in) and, when it
can, ``_generate_tokens`` (token ids in), ``compute_logprobs`` and ``encode_messages``. The base
class stamps every output with the policy version and the validation flag.

Tools: ``get_model_response(messages, tools=[...])`` hands OpenAI-format ``tools`` to
``_generate(messages, tools=tools, **sampling)`` of an engine that declares ``supports_tools`` (one that
does not is told so; a call without tools never passes the argument). The engine renders them with
the model's chat template and parses the completion with :attr:`RolloutEngine.tool_parser` and
:attr:`RolloutEngine.reasoning_parser` (built from ``rollout.tool_parser`` /
``rollout.reasoning_parser``; see :mod:`rllm_core.parsers`).

Counters: events of the engine (tool calls parsed, malformed ones, multi-turn requests continued from
sampled tokens or rendered again) are counted in :attr:`RolloutEngine.counters`; the workflow engine
drains them into the step's metrics.

Workflows receive a :class:`SamplingEngine`: the same engine with the run's sampling defaults for
training or validation bound in. Precedence: per-call arguments > train/val defaults > engine
defaults; a per-call change never leaks into the defaults.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rllm_core.parsers import MALFORMED_TOOL_CALL, TOOL_CALLS, Parser, parse_output
from rllm_core.types import ModelOutput, TokenInput

__all__ = ["MALFORMED_TOOL_CALL", "PROMPT_TOO_LONG", "TOOL_CALLS", "PromptCache", "RolloutEngine", "SamplingEngine"]

PROMPT_TOO_LONG = "prompt_too_long"
"""``ModelOutput.finish_reason`` of a request whose prompt leaves no room in the model's context: no
tokens are sampled, and the workflow engine ends the episode with ``max_prompt_length``."""

Messages = Sequence[Mapping[str, Any]]
Tools = Sequence[Mapping[str, Any]]


class RolloutEngine:
    """Base class for backends' engines."""

    supports_token_in_token_out: bool = False
    supports_logprobs: bool = False
    """Whether :meth:`compute_logprobs` works (OPSD needs it)."""
    supports_tools: bool = False
    """Whether ``_generate`` takes ``tools`` (renders them and parses tool calls)."""

    def __init__(
        self,
        default_sampling: Mapping[str, Any] | None = None,
        *,
        tool_parser: Parser | None = None,
        reasoning_parser: Parser | None = None,
    ) -> None:
        self.weight_version = 0
        self.default_sampling: dict[str, Any] = dict(default_sampling or {})
        self.tool_parser = tool_parser
        """Splits completions into content and tool calls (``rollout.tool_parser``); None: no parsing."""
        self.reasoning_parser = reasoning_parser
        """Splits reasoning from content (``rollout.reasoning_parser``); None: no parsing."""
        self.counters: dict[str, float] = {}
        """Event counts since the last :meth:`pop_counters` (see the module docstring)."""

    def set_weight_version(self, version: int) -> None:
        """Called by the backend once the sampler serves the weights of ``version``."""
        self.weight_version = version

    def count(self, key: str, value: float = 1.0) -> None:
        self.counters[key] = self.counters.get(key, 0.0) + value

    def pop_counters(self) -> dict[str, float]:
        """The counters since the last call (and reset them)."""
        counters, self.counters = self.counters, {}
        return counters

    def parse(self, out: ModelOutput) -> ModelOutput:
        """Fill ``content``, ``reasoning``, ``tool_calls`` and the finish reason from ``out.text``
        with the configured parsers (what a backend's engine calls on each completion)."""
        return parse_output(out, self.tool_parser, self.reasoning_parser)

    async def get_model_response(
        self, messages: Messages, *, tools: Tools | None = None, is_validation: bool = False, **sampling: Any
    ) -> ModelOutput:
        """Sample one response to a chat ``messages`` list, offering ``tools`` (OpenAI format) when given."""
        version = self.weight_version
        params = {**self.default_sampling, **sampling}
        if tools is not None:
            if not self.supports_tools:
                raise NotImplementedError(f"{type(self).__name__} does not support tools")
            if self.tool_parser is None:
                raise ValueError(
                    "get_model_response(tools=...): no tool parser is configured, so tool calls would never be "
                    "read; set rollout.tool_parser (e.g. hermes for Qwen, llama3_json, tiny for the tiny model)"
                )
            out = await self._generate(list(messages), tools=[dict(t) for t in tools], **params)
        else:
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

    def _stamp(self, out: ModelOutput, version: int, is_validation: bool) -> ModelOutput:
        if out.weight_version is None:
            out.weight_version = version
        out.is_validation = is_validation
        if out.tool_calls:
            self.count("engine/tool_calls", len(out.tool_calls))
        if out.tool_call_errors:
            self.count("engine/tool_calls/malformed", len(out.tool_call_errors))
        return out

    async def _generate(self, messages: list[Mapping[str, Any]], **sampling: Any) -> ModelOutput:
        """One response; ``sampling`` holds ``tools`` too when the engine ``supports_tools`` and tools were given."""
        raise NotImplementedError

    async def _generate_tokens(self, token_input: TokenInput, **sampling: Any) -> ModelOutput:
        raise NotImplementedError

    async def encode_messages(
        self, messages: Messages, add_generation_prompt: bool = True, *, tools: Tools | None = None
    ) -> list[int]:
        """Prompt token ids for ``messages`` (chat template applied, with ``tools`` when given)."""
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


class PromptCache:
    """Rendered prompts of plain-text conversations, so a group's ``n`` rollouts render once.

    Only conversations whose messages are exactly ``{role, content}`` with string content are
    cached (anything else, e.g. tool calls or multimodal parts, is rendered every time). Bounded:
    cleared when ``size`` entries are held.
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._items: dict[tuple, Any] = {}

    @staticmethod
    def key(messages: Sequence[Mapping[str, Any]], *extra: Any) -> tuple | None:
        """The cache key of ``messages`` (plus ``extra``: render options), or None when not cacheable."""
        if all(len(m) == 2 and "role" in m and type(m.get("content")) is str for m in messages):
            return (*extra, *((m["role"], m["content"]) for m in messages))
        return None

    def get(self, key: tuple | None) -> Any:
        return self._items.get(key) if key is not None else None

    def put(self, key: tuple | None, value: Any) -> None:
        if key is None:
            return
        if len(self._items) >= self.size:
            self._items.clear()
        self._items[key] = value

    def clear(self) -> None:
        self._items.clear()


class SamplingEngine:
    """An engine with train or validation sampling defaults bound in (what workflows receive)."""

    def __init__(
        self,
        engine: RolloutEngine,
        sampling: Mapping[str, Any] | None = None,
        is_validation: bool = False,
        forced: Mapping[str, Any] | None = None,
    ):
        self.engine = engine
        self.sampling = dict(sampling or {})
        self.is_validation = is_validation
        self.forced = dict(forced or {})
        """Sampling arguments that win even over a call's own (``rollout.explore``'s temperature)."""

    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    @property
    def supports_token_in_token_out(self) -> bool:
        return self.engine.supports_token_in_token_out

    @property
    def supports_tools(self) -> bool:
        return self.engine.supports_tools

    async def get_model_response(
        self, messages: Messages, *, tools: Tools | None = None, **sampling: Any
    ) -> ModelOutput:
        return await self.engine.get_model_response(
            messages, tools=tools, is_validation=self.is_validation, **{**self.sampling, **sampling, **self.forced}
        )

    async def get_token_response(self, token_input: TokenInput, **sampling: Any) -> ModelOutput:
        return await self.engine.get_token_response(
            token_input, is_validation=self.is_validation, **{**self.sampling, **sampling, **self.forced}
        )

    async def encode_messages(
        self, messages: Messages, add_generation_prompt: bool = True, *, tools: Tools | None = None
    ) -> list[int]:
        if tools is None:  # engines written before tools existed take two arguments
            return await self.engine.encode_messages(messages, add_generation_prompt)
        return await self.engine.encode_messages(messages, add_generation_prompt, tools=tools)

    async def compute_logprobs(
        self, prompt_ids: Sequence[int], response_ids: Sequence[int], *, model: str = "policy"
    ) -> list[float]:
        return await self.engine.compute_logprobs(prompt_ids, response_ids, model=model)

    async def refresh_reference(self) -> None:
        await self.engine.refresh_reference()
