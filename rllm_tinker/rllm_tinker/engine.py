"""``TinkerRolloutEngine``: workflows' model calls, sampled by a Tinker ``SamplingClient``.

Prompts are rendered by a tinker-cookbook renderer and responses parsed by it (content, reasoning,
tool calls, converted to and from the core's OpenAI-format dicts). The engine exists before any
client does (the trainer builds it first); the backend attaches a sampling client in
``on_train_start`` and swaps it at every weight sync, and each output carries the version of the
client that produced it.

Sampling parameters (``rollout.train_sampling`` / ``val_sampling``, per-call arguments on top) map
onto ``tinker.SamplingParams``: ``max_tokens`` (or ``max_new_tokens``), ``temperature``, ``top_p``,
``top_k``, ``stop`` (strings or token ids; default: the renderer's stop sequences), ``seed``.
Temperature 0 means greedy and is sent as ``top_k = 1`` (the service treats temperature 0 like 1).
A key the service has no counterpart for (``min_p``, ``repetition_penalty``...) is an error, not
silently dropped. ``max_tokens`` is clamped to what the context window leaves after the prompt; a
prompt that leaves no room is not sent, and the output says ``finish_reason: prompt_too_long``.

The service returns logprobs of the untempered distribution whatever the temperature; the backend
warns when training samples at a temperature other than 1 (docs/tinker.md).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import tinker

from rllm_core.engine import PROMPT_TOO_LONG, PromptCache, RolloutEngine
from rllm_core.types import ModelOutput, TokenInput

__all__ = ["TinkerRolloutEngine", "sampling_params", "to_openai_tool_calls", "to_renderer_messages"]

_PASS = {"max_tokens", "max_new_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids", "seed"}
_IGNORED = {"logprobs", "model"}  # OpenAI-style knobs with nothing to do here


def sampling_params(
    params: Mapping[str, Any], prompt_len: int, context_window: int, default_stop: Sequence[Any]
) -> tinker.SamplingParams | None:
    """``tinker.SamplingParams`` for the core's sampling dict; None when the prompt leaves no room."""
    unknown = sorted(set(params) - _PASS - _IGNORED - {"n"})
    if unknown:
        raise ValueError(
            f"rollout sampling key(s) {', '.join(unknown)}: Tinker's sampler has no such parameter "
            f"(it takes {', '.join(sorted(_PASS))})"
        )
    if params.get("n", 1) != 1:
        raise ValueError("rollout sampling n: one sample per call (rollout.n sets the group size)")
    room = context_window - prompt_len
    if room < 1:
        return None
    max_tokens = params.get("max_tokens", params.get("max_new_tokens"))
    max_tokens = room if max_tokens is None else min(int(max_tokens), room)
    stop = params.get("stop")
    ids = params.get("stop_token_ids")
    if isinstance(stop, str):
        stop = [stop]
    if ids:
        if stop and any(isinstance(s, str) for s in stop):
            raise ValueError("rollout sampling: Tinker takes stop strings or stop token ids, not both")
        stop = [*(stop or []), *ids]
    if stop is None:
        stop = list(default_stop)
    temperature = float(params.get("temperature", 1.0))
    top_k = int(params.get("top_k") or -1)
    if temperature <= 0:  # greedy
        temperature, top_k = 1.0, 1
    return tinker.SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=float(params.get("top_p", 1.0)),
        top_k=top_k if top_k > 0 else -1,
        stop=list(stop),
        seed=params.get("seed"),
    )


def to_renderer_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-format messages as tinker-cookbook ``Message`` dicts (tool calls as ``ToolCall``)."""
    from tinker_cookbook.renderers import ToolCall

    out = []
    for m in messages:
        msg: dict[str, Any] = {"role": m["role"], "content": m.get("content") or ""}
        calls = m.get("tool_calls")
        if calls:
            msg["tool_calls"] = [
                call
                if isinstance(call, ToolCall)
                else ToolCall(
                    id=call.get("id"),
                    function=ToolCall.FunctionBody(
                        name=call["function"]["name"],
                        arguments=_arguments_text(call["function"].get("arguments", "")),
                    ),
                )
                for call in calls
            ]
        for key in ("tool_call_id", "name"):
            if m.get(key) is not None:
                msg[key] = m[key]
        out.append(msg)
    return out


def _arguments_text(arguments: Any) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def to_openai_tool_calls(calls: Sequence[Any]) -> list[dict[str, Any]]:
    """Cookbook ``ToolCall`` objects as OpenAI-format dicts."""
    return [
        {
            "id": c.id,
            "type": "function",
            "function": {"name": c.function.name, "arguments": c.function.arguments},
        }
        for c in calls
    ]


def _split_content(content: Any) -> tuple[str, str | None]:
    """(text, reasoning) of a parsed message's content (a string or a list of parts)."""
    if isinstance(content, str):
        return content, None
    text, thinking = [], []
    for part in content or []:
        if part.get("type") == "thinking":
            thinking.append(part.get("thinking", ""))
        elif part.get("type") == "text":
            text.append(part.get("text", ""))
    return "".join(text), ("".join(thinking) if thinking else None)


class TinkerRolloutEngine(RolloutEngine):
    """Renderer in, Tinker sampler, renderer out (see the module docstring)."""

    supports_token_in_token_out = True
    supports_logprobs = True

    def __init__(self, context_window: int, default_sampling: Mapping[str, Any] | None = None) -> None:
        super().__init__(default_sampling)
        self.context_window = context_window
        self.sampling_client: Any = None
        self.reference_client: Any = None
        self.renderer: Any = None
        self.tokenizer: Any = None
        self.stop: list[Any] = []
        self._prompt_cache = PromptCache()
        self.reference_factory: Any = None
        """Set by the backend: an async callable returning a sampler of the current weights."""

    # -- set up by the backend ---------------------------------------------------------------

    def attach(self, renderer: Any, tokenizer: Any) -> None:
        """The renderer and tokenizer (once the training client exists)."""
        self.renderer, self.tokenizer = renderer, tokenizer
        self.stop = list(renderer.get_stop_sequences()) or [tokenizer.eos_token_id]
        self._prompt_cache.clear()

    def set_sampling_client(self, client: Any, version: int) -> None:
        """Serve ``client`` (weights of ``version``) from the next request on."""
        self.sampling_client = client
        self.set_weight_version(version)

    def _require_client(self) -> Any:
        if self.sampling_client is None or self.renderer is None:
            raise RuntimeError("the tinker engine has no sampling client yet (it is attached in on_train_start)")
        return self.sampling_client

    # -- requests ------------------------------------------------------------------------------

    def _render(self, messages: Sequence[Mapping[str, Any]]) -> tinker.ModelInput:
        key = PromptCache.key(messages)
        prompt = self._prompt_cache.get(key)
        if prompt is None:
            prompt = self.renderer.build_generation_prompt(to_renderer_messages(messages))
            self._prompt_cache.put(key, prompt)
        return prompt

    async def encode_messages(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        self._require_client()
        if not add_generation_prompt:
            raise NotImplementedError("tinker-cookbook renderers build generation prompts only")
        return self._render(messages).to_ints()

    async def _generate(self, messages: list[Mapping[str, Any]], **sampling: Any) -> ModelOutput:
        self._require_client()
        return await self._sample(self._render(messages), sampling)

    async def _generate_tokens(self, token_input: TokenInput, **sampling: Any) -> ModelOutput:
        self._require_client()
        from rllm_tinker.datums import model_input

        return await self._sample(model_input(token_input.prompt_ids), sampling)

    async def _sample(self, prompt: tinker.ModelInput, sampling: Mapping[str, Any]) -> ModelOutput:
        client = self._require_client()
        version = self.weight_version  # the client and its version are read together, before any await
        prompt_ids = _prompt_positions(prompt)
        params = sampling_params(sampling, prompt.length, self.context_window, self.stop)
        if params is None:
            self.count("tinker/prompt_too_long")
            return ModelOutput(prompt_ids=prompt_ids, finish_reason=PROMPT_TOO_LONG, weight_version=version)
        response = await client.sample(prompt, num_samples=1, sampling_params=params)
        seq = response.sequences[0]
        tokens = list(seq.tokens)
        message, termination = self.renderer.parse_response(tokens)
        content, reasoning = _split_content(message.get("content"))
        finish = "length" if seq.stop_reason == "length" else "stop"
        if finish == "stop" and not termination.is_clean:
            self.count("tinker/malformed_responses")
        unparsed = message.get("unparsed_tool_calls") or []
        if unparsed:
            self.count("tinker/malformed_tool_calls", len(unparsed))
        return ModelOutput(
            text=self.tokenizer.decode(tokens),
            content=content,
            reasoning=reasoning,
            tool_calls=to_openai_tool_calls(message.get("tool_calls") or []),
            prompt_ids=prompt_ids,
            completion_ids=tokens,
            logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
            finish_reason=finish,
            weight_version=version,
            backend_data={"sequence_id": seq.sequence_id, "parse": str(termination)},
        )

    async def compute_logprobs(
        self, prompt_ids: Sequence[Any], response_ids: Sequence[int], *, model: str = "policy"
    ) -> list[float]:
        from rllm_tinker.datums import model_input

        client = self.reference_client if model == "reference" else self._require_client()
        if client is None:
            raise RuntimeError("the tinker engine has no reference sampler (algorithm.loss.kl_coef is 0)")
        n = len(response_ids)
        if n == 0:
            return []
        out = await client.compute_logprobs(model_input([*prompt_ids, *response_ids]))
        return [float(x) for x in out[-n:]]

    async def refresh_reference(self) -> None:
        """The reference becomes a sampler of the current weights (OPSD's refreshed teacher)."""
        if self.reference_factory is None:
            raise RuntimeError("the tinker engine has no training client to snapshot yet")
        self.reference_client = await self.reference_factory()


def _prompt_positions(prompt: tinker.ModelInput) -> list[Any]:
    """A prompt as row positions: token ids, and opaque chunks (images) as they are."""
    out: list[Any] = []
    for chunk in prompt.chunks:
        if isinstance(chunk, tinker.EncodedTextChunk):
            out.extend(chunk.tokens)
        else:
            out.append(chunk)
    return out
