"""``TorchRolloutEngine``: the local sampler behind ``engine.get_model_response``.

Dynamic batching: every request is queued; one dispatcher task per event loop waits
``gen_batch_window_ms`` for company (or until ``gen_max_batch`` requests wait), then runs the whole
batch as one :func:`~rllm_torch.sampling.generate` call on the sampler's worker thread, so the event
loop (and the trainer in async mode) keeps running while tokens are produced. Requests that
arrive while a batch runs form the next batch.

The engine reads the sampler's weights through a :class:`SamplerRuntime`, which the backend owns; a
weight sync and a generation batch never interleave (both run on the same worker thread), so
every output is stamped with the one version that produced all of its tokens.

Text work stays off the event loop too: the chat template and tokenisation of a prompt the encode
cache does not hold, and the decoding of a finished batch, run on the runtime's text thread (one,
so the tokenizer is never used by two of them at once and the sampler thread keeps generating).

Agents: ``get_model_response(messages, tools=[...])`` renders the tools with the chat template and
the completion is parsed by the configured tool and reasoning parsers (``rllm_core.parsers``). A
request that continues a conversation this engine answered is continued from the sampled tokens
(:mod:`rllm_core.multiturn`); the decoding step remembers each answered conversation for that.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import json
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from rllm_core.engine import PromptCache, RolloutEngine
from rllm_core.multiturn import Sampled, TurnCache, bridge, last_reply, template_messages
from rllm_core.parsers import Parser
from rllm_core.types import ModelOutput, TokenInput
from rllm_torch.sampling import GenParams, GenResult, generate, mix_seed, score

__all__ = ["BaseSamplerRuntime", "SamplerRuntime", "TorchRolloutEngine", "eos_ids_of", "torch_threads_executor"]

_SAMPLING_KEYS = {"max_tokens", "max_new_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids", "seed"}
# Accepted and ignored: OpenAI-style knobs that have no meaning for a local sampler.
_IGNORED_KEYS = {"n", "logprobs", "model", "frequency_penalty", "presence_penalty"}


def torch_threads_executor(name: str) -> concurrent.futures.ThreadPoolExecutor:
    """A one-thread executor whose thread uses ``torch.get_num_threads()`` CPU threads, as set now.

    ``torch.set_num_threads`` sets the OpenMP thread count of the calling thread only: a thread
    started later runs its OpenMP/MKL kernels on every core whatever was set, and
    ``torch.get_num_threads()`` there still reports the setting."""
    return concurrent.futures.ThreadPoolExecutor(
        1, thread_name_prefix=name, initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),)
    )


def eos_ids_of(tokenizer: Any, generation_config: Any = None) -> set[int]:
    """The ids generation stops at: the tokenizer's end-of-sequence token and the model's
    ``generation_config.eos_token_id`` (an int or a list)."""
    eos = tokenizer.eos_token_id
    ids = {eos} if eos is not None else set()
    extra = getattr(generation_config, "eos_token_id", None)
    if isinstance(extra, int):
        ids.add(extra)
    elif isinstance(extra, list):
        ids.update(extra)
    return ids


class BaseSamplerRuntime:
    """The text side of a sampler (tokenizer, chat template, encode cache, threads) with the model
    left to subclasses: :meth:`generate` and :meth:`score` run on :attr:`executor`, under
    :attr:`lock`. :class:`SamplerRuntime` holds the model in this process; a backend whose model
    lives elsewhere (another process, a server) implements them as calls to it and reuses
    :class:`TorchRolloutEngine` as its engine."""

    seeds_each_call = False
    """Whether the engine gives every request without a ``seed`` one of :meth:`call_seed` (the
    sampler honours per-row seeds), so what a call samples depends on the run's seed and the
    call's place in call order, never on how requests were batched."""

    def __init__(self, tokenizer: Any, *, eos_ids: set[int], max_new_tokens: int, seed: int = 0) -> None:
        self.tokenizer = tokenizer
        self.seed = seed
        self.calls = 0
        """Requests seeded by :meth:`call_seed` so far (checkpointed with the weights)."""
        self.reference: Any = None
        self.version = 0
        self.max_new_tokens = max_new_tokens
        self.pad_id = tokenizer.pad_token_id
        self.eos_ids = set(eos_ids)
        self.executor = torch_threads_executor("rllm-sampler")
        self.text_executor = torch_threads_executor("rllm-sampler-text")
        """Chat templates, tokenisation and decoding, off the event loop and off the sampler thread."""
        self.lock = threading.Lock()
        """Held while the sampler's weights are read (generation, scoring) or replaced."""
        self.batches = 0
        self.batch_sizes: list[int] = []
        self._encode_cache = PromptCache()

    def call_seed(self) -> int:
        """The seed of the next request (the ``calls``-th of this runtime's seed)."""
        self.calls += 1
        return mix_seed(self.seed, self.calls - 1)

    @staticmethod
    def _cache_key(
        messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, tools: Any = None
    ) -> tuple | None:
        tools_key = None if tools is None else json.dumps(tools, sort_keys=True, default=str)
        return PromptCache.key(messages, add_generation_prompt, tools_key)

    def cached(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, tools: Any = None
    ) -> list[int] | None:
        """The prompt's ids if the encode cache holds them (a dict lookup: fine on the event loop)."""
        hit = self._encode_cache.get(self._cache_key(messages, add_generation_prompt, tools))
        return list(hit) if hit is not None else None

    def render(self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool, tools: Any = None) -> str:
        """The chat template's text for ``messages`` (and ``tools``)."""
        return self.tokenizer.apply_chat_template(
            template_messages(messages), tools=tools, add_generation_prompt=add_generation_prompt, tokenize=False
        )

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def encode(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, tools: Any = None
    ) -> list[int]:
        # Group rollouts send the same prompt n times: plain-text conversations are cached.
        key = self._cache_key(messages, add_generation_prompt, tools)
        hit = self._encode_cache.get(key)
        if hit is not None:
            return list(hit)
        ids = self.tokenize(self.render(messages, add_generation_prompt, tools))
        self._encode_cache.put(key, tuple(ids))
        return ids

    def generate(self, prompts: list[list[int]], params: list[GenParams]) -> tuple[list[GenResult], int]:
        """Sample a completion for each prompt; also the policy version that produced all of them."""
        raise NotImplementedError

    def score(self, rows: list[tuple[list[int], list[int]]], which: str, temperature: float = 1.0) -> list[list[float]]:
        """Logprobs of each ``(prompt, response)`` row's response under ``which`` (policy, reference),
        at ``temperature``."""
        raise NotImplementedError

    def copy_reference(self) -> None:
        """Make the current policy the reference model (``refresh_reference``)."""
        raise NotImplementedError(f"{type(self).__name__} has no reference model")

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)
        self.text_executor.shutdown(wait=True)


class SamplerRuntime(BaseSamplerRuntime):
    """The sampler's model (in this process), tokenizer, reference model and worker thread (owned by the backend)."""

    seeds_each_call = True

    def __init__(self, model: Any, tokenizer: Any, *, seed: int, max_new_tokens: int) -> None:
        eos_ids = eos_ids_of(tokenizer, getattr(model, "generation_config", None))
        super().__init__(tokenizer, eos_ids=eos_ids, max_new_tokens=max_new_tokens, seed=seed)
        self.model = model
        device = next(model.parameters()).device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def generate(self, prompts: list[list[int]], params: list[GenParams]) -> tuple[list[GenResult], int]:
        with self.lock:
            self.batches += 1
            self.batch_sizes.append(len(prompts))
            out = generate(
                self.model,
                prompts,
                params,
                pad_id=self.pad_id,
                eos_ids=self.eos_ids,
                tokenizer=self.tokenizer,
                generator=self.generator,
            )
            return out, self.version

    def score(self, rows: list[tuple[list[int], list[int]]], which: str, temperature: float = 1.0) -> list[list[float]]:
        with self.lock:
            if which == "reference":
                if self.reference is None:
                    raise RuntimeError("the torch backend has no reference model yet")
                return score(self.reference, rows, pad_id=self.pad_id, temperature=temperature)
            return score(self.model, rows, pad_id=self.pad_id, temperature=temperature)

    def copy_reference(self) -> None:
        import copy

        with self.lock:
            if self.reference is None:
                self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)
            else:
                _copy_weights(self.reference, self.model)


@dataclass
class _Conversation:
    """What a messages request asked, for remembering the turn once it is sampled."""

    messages: list[Mapping[str, Any]]
    tools: list[dict[str, Any]] | None


@dataclass
class _Request:
    seq: int
    """Order of the call: a batch runs its rows in this order, whatever order encodings came back in."""
    prompt_ids: list[int]
    params: GenParams
    future: asyncio.Future
    conversation: _Conversation | None = None


class TorchRolloutEngine(RolloutEngine):
    """Batched local generation with exact per-token logprobs (see the module docstring)."""

    supports_token_in_token_out = True
    supports_logprobs = True
    supports_tools = True

    def __init__(
        self,
        runtime: BaseSamplerRuntime,
        *,
        window_s: float = 0.005,
        max_batch: int = 256,
        default_sampling: Mapping[str, Any] | None = None,
        tool_parser: Parser | None = None,
        reasoning_parser: Parser | None = None,
        multiturn_cache_size: int = 4096,
    ) -> None:
        super().__init__(default_sampling, tool_parser=tool_parser, reasoning_parser=reasoning_parser)
        self.runtime = runtime
        self.window_s = window_s
        self.max_batch = max_batch
        self.turns = TurnCache(multiturn_cache_size)
        """Sampled turns, for token-exact continuation (used on the text thread only)."""
        tok = runtime.tokenizer
        self._eos_text = {i: tok.decode([i], skip_special_tokens=False) for i in runtime.eos_ids}
        self._eot_texts = sorted(set(self._eos_text.values()))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: list[_Request] = []
        self._seq = itertools.count()
        self._wakeup: asyncio.Event | None = None
        self._dispatcher: asyncio.Task | None = None

    @classmethod
    def for_run(cls, runtime: BaseSamplerRuntime, rollout: Any, settings: Any) -> TorchRolloutEngine:
        """The engine of a run: ``rollout`` is the run's ``rollout`` config (its tool and reasoning
        parsers); ``settings`` a backend section with ``gen_batch_window_ms``, ``gen_max_batch`` and
        ``multiturn_cache_size`` (``torch:``, ``verl:``)."""
        from rllm_core.parsers import build_parser

        engine = cls(
            runtime,
            window_s=settings.gen_batch_window_ms / 1000.0,
            max_batch=settings.gen_max_batch,
            tool_parser=build_parser("tool_parser", rollout.tool_parser),
            reasoning_parser=build_parser("reasoning_parser", rollout.reasoning_parser),
            multiturn_cache_size=settings.multiturn_cache_size,
        )
        engine.set_weight_version(runtime.version)
        return engine

    # -- requests -------------------------------------------------------------------------------

    def _params(self, sampling: Mapping[str, Any]) -> GenParams:
        unknown = set(sampling) - _SAMPLING_KEYS - _IGNORED_KEYS
        if unknown:
            raise ValueError(
                f"torch engine: unknown sampling parameter(s) {sorted(unknown)}; supported: {sorted(_SAMPLING_KEYS)}"
            )
        stop = sampling.get("stop") or []
        if isinstance(stop, str):
            stop = [stop]
        max_tokens = sampling.get("max_tokens", sampling.get("max_new_tokens"))
        return GenParams(
            max_tokens=int(max_tokens if max_tokens is not None else self.runtime.max_new_tokens),
            temperature=float(sampling.get("temperature", 1.0)),
            top_p=float(sampling.get("top_p", 1.0) or 1.0),
            top_k=int(sampling.get("top_k", 0) or 0),
            stop=list(stop),
            stop_token_ids=list(sampling.get("stop_token_ids") or []),
            seed=None if sampling.get("seed") is None else int(sampling["seed"]),
        )

    def _call_seed(self, sampling: Mapping[str, Any]) -> int | None:
        """A seed for a request that brings none (taken in call order: before the first await)."""
        if sampling.get("seed") is not None or not self.runtime.seeds_each_call:
            return None
        return self.runtime.call_seed()

    async def encode_messages(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True, *, tools: Any = None
    ) -> list[int]:
        ids = self.runtime.cached(messages, add_generation_prompt, tools)
        if ids is None:  # the chat template: CPU work for the text thread
            loop = asyncio.get_running_loop()
            ids = await loop.run_in_executor(
                self.runtime.text_executor, self.runtime.encode, messages, add_generation_prompt, tools
            )
        return ids

    async def _generate(
        self, messages: list[Mapping[str, Any]], tools: list[dict[str, Any]] | None = None, **sampling: Any
    ) -> ModelOutput:
        seq, seed = next(self._seq), self._call_seed(sampling)  # before the first await: the callers' order
        conversation = _Conversation(messages, tools) if self.turns.max_size > 0 else None
        if conversation is not None and last_reply(messages) >= 0:
            loop = asyncio.get_running_loop()
            prompt_ids, event = await loop.run_in_executor(self.runtime.text_executor, self._continue, messages, tools)
            self.count(event)
        else:
            prompt_ids = await self.encode_messages(messages, tools=tools)
        return await self._submit(seq, seed, prompt_ids, sampling, conversation)

    def _continue(self, messages: list[Mapping[str, Any]], tools: Any) -> tuple[list[int], str]:
        """The prompt of a request that holds an assistant reply: continued from the sampled turn when
        this engine remembers it, else rendered in full (text thread). Also says which it was."""
        runtime = self.runtime
        reply = last_reply(messages)
        turn = self.turns.find(messages, tools, reply)
        if turn is None:  # history edited or compacted, evicted, or a reply this engine never sampled
            return runtime.encode(messages, True, tools), "engine/multiturn/rerendered/unknown_history"
        text = bridge(lambda msgs, gen: runtime.render(msgs, gen, tools), messages, reply, turn, self._eot_texts)
        if text is None:
            return runtime.encode(messages, True, tools), "engine/multiturn/rerendered/template_rewrote_history"
        return [*turn.ids, *runtime.tokenize(text)], "engine/multiturn/continued"

    async def _generate_tokens(self, token_input: TokenInput, **sampling: Any) -> ModelOutput:
        ids = token_input.prompt_ids
        if not all(isinstance(t, int) for t in ids):
            raise TypeError("torch engine: TokenInput.prompt_ids must be a list of ints")
        return await self._submit(next(self._seq), self._call_seed(sampling), list(ids), sampling)

    async def _submit(
        self,
        seq: int,
        seed: int | None,
        prompt_ids: list[int],
        sampling: Mapping[str, Any],
        conversation: _Conversation | None = None,
    ) -> ModelOutput:
        if not prompt_ids:
            raise ValueError("torch engine: empty prompt")
        params = self._params(sampling)
        if seed is not None:
            params.seed = seed
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (e.g. a second asyncio.run): start over
            self._loop, self._pending, self._dispatcher = loop, [], None
            self._wakeup = asyncio.Event()
        req = _Request(seq, prompt_ids, params, loop.create_future(), conversation)
        self._pending.append(req)
        assert self._wakeup is not None
        self._wakeup.set()
        if self._dispatcher is None or self._dispatcher.done():
            self._dispatcher = loop.create_task(self._dispatch())
        return await req.future

    def _outputs(self, batch: list[_Request], results: list[GenResult], version: int) -> list[ModelOutput]:
        return [self._to_output(r, res, version) for r, res in zip(batch, results, strict=False)]

    def _to_output(self, req: _Request, r: GenResult, version: int) -> ModelOutput:
        tok = self.runtime.tokenizer
        ids = r.completion_ids
        if r.finish_reason == "stop" and r.stop_text is None and ids:
            ids = ids[:-1]  # the end-of-turn/stop token is not part of the text
        # special tokens elsewhere stay visible: a reward must be able to see a stray role marker
        text = tok.decode(ids, skip_special_tokens=False)
        if r.stop_text is not None:
            text = text[: text.find(r.stop_text)]
        out = self.parse(
            ModelOutput(
                text=text,
                content=text,
                prompt_ids=req.prompt_ids,
                completion_ids=r.completion_ids,
                logprobs=r.logprobs,
                finish_reason=r.finish_reason,
                weight_version=version,
                temperature=req.params.logprob_temperature,
            )
        )
        if req.conversation is not None:
            self._remember(req, r, out)
        return out

    def _remember(self, req: _Request, r: GenResult, out: ModelOutput) -> None:
        """Keep the sampled turn for a continuation of this conversation (text thread)."""
        conv = req.conversation
        assert conv is not None
        completion = r.completion_ids
        # the end-of-sequence token the completion ended with, if it did
        ended = self._eos_text.get(completion[-1]) if completion and r.stop_text is None else None
        self.turns.remember(Sampled.from_output(conv.messages, conv.tools, out, ended))

    async def _dispatch(self) -> None:
        assert self._wakeup is not None and self._loop is not None
        while True:
            if not self._pending:
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), timeout=1.0)
                except asyncio.TimeoutError:
                    if not self._pending:
                        return  # idle: let the task end; the next request starts another
                continue
            if len(self._pending) < self.max_batch and self.window_s > 0:
                await asyncio.sleep(self.window_s)
            # Rows in call order, not in the order their encodings came back from the text thread:
            # which random numbers a row draws must not depend on the machine's load.
            self._pending.sort(key=lambda r: r.seq)
            batch, self._pending = self._pending[: self.max_batch], self._pending[self.max_batch :]
            batch = [r for r in batch if not r.future.cancelled()]
            if not batch:
                continue
            try:
                results, version = await self._loop.run_in_executor(
                    self.runtime.executor,
                    self.runtime.generate,
                    [r.prompt_ids for r in batch],
                    [r.params for r in batch],
                )
            except Exception as exc:
                _deliver(batch, exc)
                continue
            # Decoding runs on the text thread while the next batch generates.
            decoded = self._loop.run_in_executor(self.runtime.text_executor, self._outputs, batch, results, version)
            decoded.add_done_callback(functools.partial(_decoded, batch))

    # -- scoring --------------------------------------------------------------------------------

    async def compute_logprobs(
        self, prompt_ids: Sequence[int], response_ids: Sequence[int], *, model: str = "policy"
    ) -> list[float]:
        if model not in ("policy", "reference"):
            raise ValueError(f"compute_logprobs: model must be 'policy' or 'reference', got {model!r}")
        if not response_ids:
            return []
        loop = asyncio.get_running_loop()
        rows = [(list(prompt_ids), list(response_ids))]
        out = await loop.run_in_executor(self.runtime.executor, self.runtime.score, rows, model)
        return out[0]

    async def refresh_reference(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.runtime.executor, self.runtime.copy_reference)


def _deliver(batch: list[_Request], outcome: list[ModelOutput] | BaseException) -> None:
    for i, r in enumerate(batch):
        if r.future.done():  # cancelled by its caller
            continue
        if isinstance(outcome, BaseException):
            r.future.set_exception(outcome)
        else:
            r.future.set_result(outcome[i])


def _decoded(batch: list[_Request], future: asyncio.Future) -> None:
    if future.cancelled():  # the event loop is shutting down
        for r in batch:
            r.future.cancel()
    else:
        _deliver(batch, future.exception() or future.result())


@torch.no_grad()
def _copy_weights(dst: Any, src: Any) -> None:
    """In-place copy of every parameter and buffer (same structure)."""
    dst_state = dst.state_dict()
    for name, tensor in src.state_dict().items():
        dst_state[name].copy_(tensor)
