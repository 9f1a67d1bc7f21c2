"""``TinkerRolloutEngine``: workflows' model calls, sampled by a Tinker ``SamplingClient``.

Prompts are rendered by a tinker-cookbook renderer and responses parsed by it (content, reasoning,
tool calls, converted to and from the core's OpenAI-format dicts). The engine exists before any
client does (the trainer builds it first); the backend attaches a sampling client in
``on_train_start`` and swaps it at every weight sync, and each output carries the version of the
client that produced it.

Tools: ``get_model_response(messages, tools=[...])`` renders OpenAI-format tools with the renderer's
own ``create_conversation_prefix_with_tools`` (a leading system message becomes its system prompt)
and the renderer's ``parse_response`` reads the tool calls back, so ``rollout.tool_parser`` and
``rollout.reasoning_parser`` do not apply here. Finish reasons follow ``rllm_core.parsers``: a
completion that stopped by itself is ``tool_calls`` with parsed calls and no malformed one,
``malformed_tool_call`` with a call the renderer could not parse (its raw text stays in ``content``
and ``tool_call_errors`` says what is wrong), ``stop`` otherwise; one cut by the budget is ``length``
(parsed as if it had ended there, so its calls and errors are listed too).

Multi-turn is token-exact (``rllm_core.multiturn``): a request whose messages extend a conversation
this engine answered (its messages + the reply it sampled, as ``ModelOutput.assistant_message()``
or ``{"role": "assistant", "content": text}``, + new messages) is prompted with the earlier prompt +
the sampled tokens + the renderer's tokens for the new messages, never a re-render of the history,
which the cookbook renderers do not always write back token for token (``"text\\n<tool_call>"``
comes back with another newline, JSON arguments re-serialised). Counted per request as
``engine/multiturn/continued`` or ``engine/multiturn/rerendered/<why>`` (an unknown history; a
renderer that rewrites history, e.g. ``qwen3`` dropping earlier thinking). The last
``tinker.multiturn_cache_size`` turns are remembered.

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
from rllm_core.multiturn import Sampled, TurnCache, bridge, last_reply
from rllm_core.parsers import MALFORMED_TOOL_CALL, TOOL_CALLS, ParsedCompletion
from rllm_core.types import ModelOutput, TokenInput

__all__ = [
    "RendererParser",
    "TinkerRolloutEngine",
    "sampling_params",
    "to_openai_tool_calls",
    "to_renderer_messages",
    "to_tool_specs",
]

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


def to_tool_specs(tools: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-format tools (``{"type": "function", "function": {name, description, parameters}}``) as
    tinker-cookbook ``ToolSpec`` dicts; a bare ``{name, description, parameters}`` is taken as it is.

    The function's own keys are kept in their order (Qwen's renderer writes the spec as JSON, as
    Hugging Face's template does); a missing ``description`` or ``parameters`` is filled in, since some
    renderers read both.
    """
    specs = []
    for i, tool in enumerate(tools):
        fn = tool.get("function", tool)
        if tool.get("type", "function") != "function" or not isinstance(fn, Mapping) or not fn.get("name"):
            raise ValueError(
                f"tools[{i}]: expected an OpenAI function tool {{'type': 'function', 'function': "
                f"{{'name': ..., 'description': ..., 'parameters': {{...}}}}}}, got {dict(tool)!r}"
            )
        spec = {k: v for k, v in fn.items() if fn is not tool or k != "type"}
        spec.setdefault("description", "")
        spec.setdefault("parameters", {"type": "object", "properties": {}})
        specs.append(spec)
    return specs


def to_renderer_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI-format messages as tinker-cookbook ``Message`` dicts.

    Tool calls become ``ToolCall`` objects (arguments given as a dict are serialised to the JSON
    string the cookbook expects); ``tool_call_id`` and ``name`` of tool results are kept; an
    assistant's ``reasoning_content`` becomes a thinking part before its text, so the renderer
    keeps or strips it from history as its chat template does.
    """
    from tinker_cookbook.renderers import ToolCall

    out = []
    for m in messages:
        content = m.get("content") or ""
        reasoning = m.get("reasoning_content")
        if reasoning and isinstance(content, str):
            parts: list[dict[str, Any]] = [{"type": "thinking", "thinking": reasoning}]
            content = [*parts, {"type": "text", "text": content}] if content else parts
        msg: dict[str, Any] = {"role": m["role"], "content": content}
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
    if arguments is None or arguments == "":
        return "{}"
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def to_openai_tool_calls(calls: Sequence[Any]) -> list[dict[str, Any]]:
    """Cookbook ``ToolCall`` objects as OpenAI-format dicts; a call without an id gets ``call_<n>``."""
    return [
        {
            "id": c.id if c.id is not None else f"call_{i}",
            "type": "function",
            "function": {"name": c.function.name, "arguments": c.function.arguments},
        }
        for i, c in enumerate(calls)
    ]


def _split_content(content: Any) -> tuple[list[str], str | None]:
    """(text pieces, reasoning) of a parsed message's content (a string or a list of parts)."""
    if isinstance(content, str):
        return [content], None
    text, thinking = [], []
    for part in content or []:
        if part.get("type") == "thinking":
            thinking.append(part.get("thinking", ""))
        elif part.get("type") == "text":
            text.append(part.get("text", ""))
    return text, ("".join(thinking) if thinking else None)


def _with_raw_calls(pieces: list[str], raws: list[str], source: str) -> str:
    """The content with each malformed call's raw text back where the model wrote it in ``source``.

    Renderers move a malformed call out of the content into ``unparsed_tool_calls``; the core keeps
    it in the content. A raw text already in the content (an unterminated block) is not added twice;
    one not found in ``source`` goes at the end.
    """
    text = "".join(pieces)
    placed: list[tuple[int, int, str]] = []  # (position in source, order, text)
    spans: list[tuple[int, int]] = []
    cursor = 0
    for raw in raws:
        if raw in text:
            continue
        i = source.find(raw, cursor)
        if i < 0:
            placed.append((len(source), len(placed), raw))
            continue
        spans.append((i, i + len(raw)))
        placed.append((i, len(placed), raw))
        cursor = i + len(raw)
    if not placed:
        return text
    cursor = 0
    for piece in pieces:
        i = source.find(piece, cursor)
        while i >= 0 and any(a <= i < b for a, b in spans):  # not inside a malformed call's text
            i = source.find(piece, i + 1)
        i = cursor if i < 0 else i
        placed.append((i, len(placed), piece))
        cursor = i + len(piece)
    return "".join(piece for _, _, piece in sorted(placed))


class RendererParser:
    """The engine's tool parser: the renderer reads tool calls and reasoning (see the module docstring).

    The engine parses sampled tokens directly; :meth:`parse` serves callers that hold text only
    (``engine.parse(out)``), by encoding it and parsing it as a completed turn.
    """

    def __init__(self, engine: TinkerRolloutEngine) -> None:
        self.engine = engine

    def parse(self, text: str) -> ParsedCompletion:
        engine = self.engine
        engine._require_client()
        return engine._parse_tokens(engine.tokenizer.encode(text, add_special_tokens=False))[0]


class TinkerRolloutEngine(RolloutEngine):
    """Renderer in, Tinker sampler, renderer out (see the module docstring)."""

    supports_token_in_token_out = True
    supports_logprobs = True
    supports_tools = True

    def __init__(
        self,
        context_window: int,
        default_sampling: Mapping[str, Any] | None = None,
        *,
        multiturn_cache_size: int = 4096,
    ) -> None:
        super().__init__(default_sampling)
        self.tool_parser = RendererParser(self)
        self.context_window = context_window
        self.turns = TurnCache(multiturn_cache_size)
        """Sampled turns, for token-exact continuation (see the module docstring)."""
        self.sampling_client: Any = None
        self.reference_client: Any = None
        self.renderer: Any = None
        self.renderer_name: str | None = None
        self.tokenizer: Any = None
        self.stop: list[Any] = []
        self._eot_ids: list[int] = []
        self._prompt_cache = PromptCache()
        self.reference_factory: Any = None
        """Set by the backend: an async callable returning a sampler of the current weights."""

    # -- set up by the backend ---------------------------------------------------------------

    def attach(self, renderer: Any, tokenizer: Any, renderer_name: str | None = None) -> None:
        """The renderer (``tinker.renderer_name``) and tokenizer, once the training client exists."""
        self.renderer, self.tokenizer = renderer, tokenizer
        self.renderer_name = renderer_name
        self.stop = list(renderer.get_stop_sequences()) or [tokenizer.eos_token_id]
        # the renderer's stop tokens: continuation needs token stops (with stop strings every turn re-renders)
        self._eot_ids = [s for s in self.stop if isinstance(s, int)]
        self._prompt_cache.clear()
        self.turns = TurnCache(self.turns.max_size)  # turns of another renderer do not continue

    def set_sampling_client(self, client: Any, version: int) -> None:
        """Serve ``client`` (weights of ``version``) from the next request on."""
        self.sampling_client = client
        self.set_weight_version(version)

    def _require_client(self) -> Any:
        if self.sampling_client is None or self.renderer is None:
            raise RuntimeError("the tinker engine has no sampling client yet (it is attached in on_train_start)")
        return self.sampling_client

    # -- requests ------------------------------------------------------------------------------

    def _render(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None = None
    ) -> tinker.ModelInput:
        key = PromptCache.key(messages)
        if key is not None and tools:  # key order kept: renderers write the specs as JSON in the order given
            key = (json.dumps(tools, default=str), *key)
        prompt = self._prompt_cache.get(key)
        if prompt is None:
            prompt = self.renderer.build_generation_prompt(self._conversation(messages, tools))
            self._prompt_cache.put(key, prompt)
        return prompt

    def _conversation(
        self, messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None
    ) -> list[dict[str, Any]]:
        """The renderer's messages: with tools, its tool prefix replaces a leading system message."""
        msgs = to_renderer_messages(messages)
        if not tools:
            return msgs
        system = ""
        if msgs and msgs[0]["role"] == "system":
            if not isinstance(msgs[0]["content"], str):
                raise ValueError("get_model_response(tools=...): the system message's content must be a string")
            system, msgs = msgs[0]["content"], msgs[1:]
        try:
            prefix = self.renderer.create_conversation_prefix_with_tools(to_tool_specs(tools), system)
        except NotImplementedError:
            raise NotImplementedError(
                f"tinker.renderer_name: the renderer {self.renderer_name!r} ({type(self.renderer).__name__}) "
                "cannot render tools; choose a renderer with tool support (e.g. qwen3_instruct, qwen3, llama3) "
                "or call get_model_response without tools"
            ) from None
        return [*prefix, *msgs]

    async def encode_messages(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: Sequence[Mapping[str, Any]] | None = None,
    ) -> list[int]:
        self._require_client()
        if not add_generation_prompt:
            raise NotImplementedError("tinker-cookbook renderers build generation prompts only")
        return self._render(messages, tools).to_ints()

    async def _generate(
        self, messages: list[Mapping[str, Any]], tools: list[dict[str, Any]] | None = None, **sampling: Any
    ) -> ModelOutput:
        self._require_client()
        remember = self.turns.max_size > 0 and bool(self._eot_ids)
        if remember and last_reply(messages) >= 0:
            prompt, event = self._continue(messages, tools)
            self.count(event)
        else:
            prompt = self._render(messages, tools)
        out = await self._sample(prompt, sampling)
        if remember and out.completion_ids:
            self._remember(messages, tools, out)
        return out

    def _continue(self, messages: list[Mapping[str, Any]], tools: Any) -> tuple[tinker.ModelInput, str]:
        """The prompt of a request that holds an assistant reply: continued from the sampled turn when
        this engine remembers it, else rendered in full. Also says which it was."""
        reply = last_reply(messages)
        turn = self.turns.find(messages, tools, reply)
        if turn is None:  # history edited or compacted, evicted, or a reply this engine never sampled
            return self._render(messages, tools), "engine/multiturn/rerendered/unknown_history"
        ids = bridge(lambda msgs, gen: self._render_ids(msgs, gen, tools), messages, reply, turn, self._eot_ids)
        if ids is None:
            return self._render(messages, tools), "engine/multiturn/rerendered/template_rewrote_history"
        return tinker.ModelInput.from_ints([*turn.ids, *ids]), "engine/multiturn/continued"

    def _render_ids(self, messages: Sequence[Mapping[str, Any]], generation: bool, tools: Any) -> list[int]:
        """Token ids of a conversation: a generation prompt, or (``generation=False``) the conversation
        as the renderer writes it for training, ending with its last message."""
        if generation:
            return self._render(messages, tools).to_ints()
        model_input, _ = self.renderer.build_supervised_example(self._conversation(messages, tools))
        return model_input.to_ints()

    def _remember(self, messages: list[Mapping[str, Any]], tools: Any, out: ModelOutput) -> None:
        if not all(isinstance(t, int) for t in out.prompt_ids):  # image chunks: not continued
            return
        last = out.completion_ids[-1]
        self.turns.remember(Sampled.from_output(messages, tools, out, last if last in self._eot_ids else None))

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
        finish = "length" if seq.stop_reason == "length" else "stop"
        parsed, termination = self._parse_tokens(tokens)
        if finish == "stop":
            if not termination.is_clean:
                self.count("tinker/malformed_responses")
            if parsed.errors:
                self.count("tinker/malformed_tool_calls", len(parsed.errors))
                finish = MALFORMED_TOOL_CALL
            elif parsed.tool_calls:
                finish = TOOL_CALLS
        ended = finish != "length" and bool(tokens) and tokens[-1] in self._eot_ids
        return ModelOutput(
            text=self.tokenizer.decode(tokens[:-1] if ended else tokens),  # without the end-of-turn token
            content=parsed.content,
            reasoning=parsed.reasoning,
            tool_calls=parsed.tool_calls,
            tool_call_errors=parsed.errors,
            prompt_ids=prompt_ids,
            completion_ids=tokens,
            logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
            finish_reason=finish,
            weight_version=version,
            backend_data={"sequence_id": seq.sequence_id, "parse": str(termination)},
        )

    def _parse_tokens(self, tokens: list[int]) -> tuple[ParsedCompletion, Any]:
        """The renderer's reading of a completion, and its termination.

        The renderer leaves a completion without its end-of-turn token unparsed (the content is the
        raw text); such a completion (cut by the budget, ended by a stop string) is parsed again as if
        it had ended there, so the calls it completed and the one it left open are reported, as the
        core's parsers do. The termination returned is the first reading's.
        """
        message, termination = self.renderer.parse_response(tokens)
        end = self.stop[0] if self.stop else None
        if not termination.is_clean and isinstance(end, int) and end not in tokens:
            message, _ = self.renderer.parse_response([*tokens, end])
        pieces, reasoning = _split_content(message.get("content"))
        unparsed = message.get("unparsed_tool_calls") or []
        if unparsed:
            content = _with_raw_calls(pieces, [u.raw_text for u in unparsed], self.tokenizer.decode(tokens))
        else:
            content = "".join(pieces)
        errors = [f"{u.error}: {_excerpt(u.raw_text)}" for u in unparsed]
        calls = to_openai_tool_calls(message.get("tool_calls") or [])
        return ParsedCompletion(content=content, reasoning=reasoning, tool_calls=calls, errors=errors), termination

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


def _excerpt(text: str, limit: int = 120) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _prompt_positions(prompt: tinker.ModelInput) -> list[Any]:
    """A prompt as row positions: token ids, and opaque chunks (images) as they are."""
    out: list[Any] = []
    for chunk in prompt.chunks:
        if isinstance(chunk, tinker.EncodedTextChunk):
            out.extend(chunk.tokens)
        else:
            out.append(chunk)
    return out
