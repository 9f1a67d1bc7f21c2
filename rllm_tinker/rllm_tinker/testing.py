"""An in-process stand-in for the Tinker service, for tests: the SDK's own clients, a real tiny model.

:class:`LocalTinker` is the service: base models, training runs, samplers, and checkpoints on disk
under ``root``. Its clients subclass the SDK's (``tinker.ServiceClient``, ``TrainingClient``,
``SamplingClient``, ``RestClient``, tinker 0.38), take and return the SDK's request and response
types, and hand out the SDK's future types, so code written against the real service runs
unchanged::

    service = LocalTinker(tmp_path).service_client()
    trainer = await service.create_lora_training_client("rllm/tiny-arith", rank=8)
    sampler = await trainer.save_weights_and_get_sampling_client()

Behind them is a real torch model: ``rllm/tiny-arith`` is a tiny random qwen2 (hidden 128, 2 layers,
tied embeddings) with a word-level tokenizer whose chat markers (``<|im_start|>``, ``<|im_end|>``,
``<think>`` ...) are single tokens, so tinker-cookbook's ``qwen3_instruct`` renderer works with it.
``rllm/tiny-tools`` is the same model with a byte-level tokenizer (Qwen's kind, without merges) and
the same markers: any text round-trips exactly, so the renderer's tool prompt and JSON tool calls do.

Faithful (checked against the tinker 0.38 SDK source and Tinker's docs):

- futures: creation returns ``BackcompatTrainingClientFuture``/``BackcompatSamplingClientFuture``;
  ``sample``/``compute_logprobs`` return the SDK's dual ``concurrent.futures.Future`` + ``APIFuture``;
  the rest ``AwaitableConcurrentFuture``. A training client runs its requests one at a time, in call
  order, on its own thread, so a result exists only once its future is awaited or read;
- LoRA (peft) with ``lora_alpha = 32``; modules chosen by ``train_attn`` (q/k/v/o projections),
  ``train_mlp`` (gate/up/down) and ``train_unembed`` (``lm_head``). With tied embeddings the
  adapter on ``lm_head`` changes the output projection only; the shared embedding stays frozen;
- losses summed over tokens, never averaged, with the documented formulas and defaults (ppo
  ratio thresholds 0.8/1.2, cispo 0.0/4.0); ``loss_fn_outputs[i]["logprobs"]`` and ``loss:sum``;
  gradients accumulate over ``forward_backward`` calls until ``optim_step``, which is
  ``torch.optim.AdamW`` with the step's ``AdamParams`` (``grad_clip_norm`` 0 = off);
- sampled logprobs are the raw ``log_softmax(logits)``, whatever temperature/top-k/top-p sampled
  (tinker-feedback #148); ``stop=None`` stops at end-of-turn, ``stop=[]`` never stops early, a stop
  list (token ids or strings) adds to end-of-turn (vLLM's rule); concurrent requests are batched;
- errors: ``forward_backward([])`` raises ``ValueError("No data provided")`` at once; a bad request
  (unknown loss, a ``mask`` key, a sequence over ``max_train_length``) fails its future with
  ``RequestFailedError(..., RequestErrorCategory.User)``, after which the training client is
  poisoned (the SDK's ``RuntimeError``); a prompt plus ``max_tokens`` over the context window is a
  ``BadRequestError``, "Prompt length plus max_tokens exceeds the model's context window: ...";
  no API key makes the first ``create_*`` raise ``TinkerError`` at once;
- ``create_training_client_from_state`` loads weights and starts Adam afresh;
  ``..._with_optimizer`` restores the moments and step counts exactly.

Simplified: temperature 0 samples greedily (the service's behaviour there is disputed, cookbook
#198); ``seed=None`` LoRA init and unseeded sampling draw from ``LocalTinker(seed=...)``, so runs
repeat; ``kind="inflight"`` samplers are snapshots; TTLs are recorded, never enforced; top-k
logprobs, prompt alternatives, custom losses, gspo/stable_reinforce and Dimuon are not
implemented (they raise); a method of the SDK not overridden here fails with ``NotImplementedError``
(it would need the network). Sequences are text tokens only.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
import warnings
import weakref
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import numpy as np
import tinker
import torch
from rllm_torch.config import TinyModelSettings
from rllm_torch.model import build_tiny_model, build_tiny_tokenizer
from rllm_torch.sampling import token_logprobs
from tinker import types

# Private names of tinker 0.38 used here (and nowhere else): MISSING_API_KEY_MESSAGE, _AwaitableFutureCompatWrapper.
from tinker.lib._auth_token_provider import MISSING_API_KEY_MESSAGE
from tinker.lib.backcompat_concurrent_future import _AwaitableFutureCompatWrapper
from tinker.lib.public_interfaces.api_future import APIFuture, AwaitableConcurrentFuture
from tinker.types.optimizer import OptimParamsBase

__all__ = [
    "DEFAULT_BASE_MODEL",
    "LORA_ALPHA",
    "TOOLS_BASE_MODEL",
    "LocalRestClient",
    "LocalSamplingClient",
    "LocalServiceClient",
    "LocalTinker",
    "LocalTrainingClient",
    "TinyBaseModel",
    "default_base_models",
    "local_rest_client",
    "local_service_client",
    "shared_local_tinker",
]

T = TypeVar("T")
W = TypeVar("W")

DEFAULT_BASE_MODEL = "rllm/tiny-arith"
TOOLS_BASE_MODEL = "rllm/tiny-tools"
"""A base model whose tokenizer can write any text (tool specs, JSON tool calls): byte-level."""
LORA_ALPHA = 32
"""Tinker's LoRA alpha (tinker-cookbook's ``hyperparam_utils`` assumes 32)."""

QWEN3_SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
QWEN3_ADDED_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
_QWEN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_POISONED = "A previous request failed; this TrainingClient is poisoned and cannot accept further requests."
_NOT_LOCAL = (
    "{cls}: this SDK method talks to the Tinker service, which the in-process stand-in "
    "(rllm_tinker.testing) does not provide"
)
_TTL_RANGE = (3600, 10 * 365 * 24 * 3600)
_TRAIN_MICRO_BATCH_TOKENS = 16384
_FAILABLE = frozenset(
    {
        "create_lora_training_client",
        "create_training_client_from_state",
        "create_training_client_from_state_with_optimizer",
        "create_sampling_client",
        "forward",
        "forward_backward",
        "optim_step",
        "save_state",
        "save_weights_for_sampler",
        "save_weights_and_get_sampling_client",
        "sample",
        "compute_logprobs",
        "delete_checkpoint",
    }
)


# -- base models ---------------------------------------------------------------------------------


@dataclass
class TinyBaseModel:
    """A base model the stand-in serves: a tiny random transformers model and its tokenizer.

    ``tokenizer="words"``: word-level over ``vocab`` (``settings.vocab`` is not used); unknown words
    become ``<unk>`` and decoding joins words with single spaces. ``tokenizer="bytes"``: byte-level
    BPE without merges (``vocab`` unused), one token per byte, so every text round-trips exactly, as
    with Qwen's own tokenizer. Either way the chat markers are added as single tokens
    (``special_tokens`` are special: ``decode(skip_special_tokens=True)`` drops them); ``eos_token``
    ends a turn and is where sampling stops by default.
    """

    settings: TinyModelSettings
    vocab: list[str]
    special_tokens: tuple[str, ...] = QWEN3_SPECIAL_TOKENS
    added_tokens: tuple[str, ...] = QWEN3_ADDED_TOKENS
    eos_token: str = "<|im_end|>"
    tokenizer: Literal["words", "bytes"] = "words"

    def key(self) -> str:
        """Identifies the definition: checkpoints record it, caches are keyed by it."""
        spec: dict[str, Any] = {
            "settings": self.settings.model_dump(mode="json", exclude={"vocab"}),
            "vocab": list(self.vocab),
            "special": list(self.special_tokens),
            "added": list(self.added_tokens),
            "eos": self.eos_token,
        }
        if self.tokenizer != "words":  # the keys of word-level models stay what they were
            spec["tokenizer"] = self.tokenizer
        return json.dumps(spec, sort_keys=True)


def default_base_models() -> dict[str, TinyBaseModel]:
    """``rllm/tiny-arith``: the settings of ``examples/arith/config.yaml``'s ``torch.tiny``, plus chat
    words; ``rllm/tiny-tools``: the same model with a byte-level tokenizer (tools, JSON)."""
    vocab = [*(str(i) for i in range(10)), "+", "=", "user", "assistant", "system", "tool"]
    settings = TinyModelSettings(
        hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512, tie_word_embeddings=True, vocab=vocab
    )
    return {
        DEFAULT_BASE_MODEL: TinyBaseModel(settings=settings, vocab=vocab),
        TOOLS_BASE_MODEL: TinyBaseModel(settings=settings, vocab=[], tokenizer="bytes"),
    }


def _byte_level_tokenizer() -> Any:
    """A byte-level BPE with no merges (Qwen's and GPT-2's byte alphabet, one token per byte)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _build_tokenizer(name: str, spec: TinyBaseModel) -> Any:
    from tokenizers import AddedToken

    tok = build_tiny_tokenizer(list(spec.vocab)) if spec.tokenizer == "words" else _byte_level_tokenizer()
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in spec.special_tokens], special_tokens=True)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in spec.added_tokens])
    if tok.pad_token is None:  # Qwen pads with <|endoftext|>
        tok.pad_token = "<|endoftext|>" if "<|endoftext|>" in spec.special_tokens else spec.eos_token
    tok.eos_token = spec.eos_token
    tok.chat_template = _QWEN_CHAT_TEMPLATE
    tok.name_or_path = name
    return tok


_RNG_LOCK = threading.Lock()
"""Held while a global-RNG seed is forked (model init, LoRA init), so two inits never interleave."""
_TEMPLATES: dict[tuple[str, int, str, int], Any] = {}
_TEMPLATES_LOCK = threading.Lock()


def _derived_seed(*parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _base_template(name: str, spec: TinyBaseModel, tokenizer: Any, seed: int, min_positions: int) -> Any:
    """The base model's weights (float32, CPU, eval mode), built once per process per definition."""
    positions = max(spec.settings.max_position_embeddings, min_positions)
    key = (name, seed, spec.key(), positions)
    with _TEMPLATES_LOCK:
        if key not in _TEMPLATES:
            settings = spec.settings.model_copy(update={"max_position_embeddings": positions})
            with _RNG_LOCK, torch.random.fork_rng(devices=[]):
                torch.manual_seed(_derived_seed(seed, name))
                model = build_tiny_model(settings, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
            model = model.to(dtype=torch.float32).eval().requires_grad_(False)
            model.config.use_cache = True
            _TEMPLATES[key] = model
        return _TEMPLATES[key]


@dataclass(frozen=True)
class _LoraSpec:
    rank: int
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True

    def target_modules(self) -> list[str]:
        names = []
        if self.train_attn:
            names += ["q_proj", "k_proj", "v_proj", "o_proj"]
        if self.train_mlp:
            names += ["gate_proj", "up_proj", "down_proj"]
        if self.train_unembed:
            names.append("lm_head")
        return names


def _lora_model(template: Any, spec: _LoraSpec, init_seed: int) -> Any:
    """A fresh copy of the base with LoRA adapters (B = 0, so it computes exactly what the base does)."""
    from peft import LoraConfig, get_peft_model

    model = copy.deepcopy(template)
    config = LoraConfig(
        r=spec.rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=spec.target_modules(), bias="none"
    )
    with _RNG_LOCK, torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft warns that the tied lm_head is adapted; that matters only when merging, which never happens.
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        torch.manual_seed(init_seed)
        model = get_peft_model(model, config)
    return model.eval()


def _trainable(model: Any) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _adapter(model: Any) -> dict[str, torch.nn.Parameter]:
    """The LoRA weights of a model, trainable or frozen (a sampler's), by parameter name."""
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def _frozen_copy(model: Any) -> Any:
    """A sampler's snapshot of a model: same weights, no gradients, never trained."""
    grads = {name: p.grad for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = None
    try:
        snap = copy.deepcopy(model)
    finally:
        for name, p in model.named_parameters():
            p.grad = grads[name]
    return snap.requires_grad_(False).eval()


# -- futures and errors --------------------------------------------------------------------------


def _done(value: T) -> concurrent.futures.Future[T]:
    fut: concurrent.futures.Future[T] = concurrent.futures.Future()
    fut.set_result(value)
    return fut


def _failed(error: BaseException) -> concurrent.futures.Future[Any]:
    fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
    fut.set_exception(error)
    return fut


_REQUEST_IDS = itertools.count(1)


def _user_error(message: str) -> tinker.RequestFailedError:
    """What a request the server accepted and then refused resolves to (``category=User``)."""
    return tinker.RequestFailedError(message, f"local-req-{next(_REQUEST_IDS)}", types.RequestErrorCategory.User)


def _status_error(cls: type[tinker.APIStatusError], status: int, endpoint: str, message: str) -> tinker.APIStatusError:
    """An HTTP error as the SDK raises it when the server refuses a request outright."""
    request = httpx.Request("POST", f"http://local-tinker/api/v1/{endpoint}")
    return cls(message, response=httpx.Response(status, request=request), body={"detail": message})


def _bad_request(endpoint: str, message: str) -> tinker.APIStatusError:
    return _status_error(tinker.BadRequestError, 400, endpoint, message)


def _not_found(endpoint: str, message: str) -> tinker.APIStatusError:
    return _status_error(tinker.NotFoundError, 404, endpoint, message)


# -- checkpoints on disk --------------------------------------------------------------------------


_SEGMENTS = {"training": "weights", "sampler": "sampler_weights"}


@dataclass
class _Checkpoint:
    meta: dict[str, Any]
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None


class _CheckpointStore:
    """``<root>/runs/<run id>/{weights,sampler_weights}/<name>/``: ``adapter.safetensors`` (the LoRA
    weights), ``optimizer.pt`` (AdamW's state, training checkpoints only) and ``meta.json``."""

    def __init__(self, root: Path) -> None:
        self.runs = root / "runs"
        self.ephemeral = root / "ephemeral"

    def path_of(self, tinker_path: str) -> Path:
        parsed = types.ParsedCheckpointTinkerPath.from_tinker_path(tinker_path)
        if parsed.checkpoint_type not in _SEGMENTS:
            raise ValueError(f"{tinker_path}: the stand-in stores training and sampler checkpoints only")
        return self.runs / parsed.training_run_id / parsed.checkpoint_id

    def write(
        self, directory: Path, model: Any, optimizer: torch.optim.Optimizer | None, meta: Mapping[str, Any]
    ) -> None:
        from safetensors.torch import save_file

        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = directory.parent / f".tmp-{directory.name}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        save_file({k: v.detach().contiguous() for k, v in _adapter(model).items()}, tmp / "adapter.safetensors")
        if optimizer is not None:
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "meta.json").write_text(json.dumps(dict(meta), indent=2))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)

    def read(self, directory: Path, *, with_optimizer: bool) -> _Checkpoint:
        from safetensors.torch import load_file

        meta = json.loads((directory / "meta.json").read_text())
        optimizer = None
        if with_optimizer:
            optimizer = torch.load(directory / "optimizer.pt", weights_only=True)
        return _Checkpoint(meta, load_file(directory / "adapter.safetensors"), optimizer)

    def checkpoints(self, run_id: str | None = None) -> list[types.Checkpoint]:
        out = []
        runs = [self.runs / run_id] if run_id is not None else sorted(self.runs.glob("*"))
        for run in runs:
            for kind, segment in _SEGMENTS.items():
                for directory in sorted((run / segment).glob("*")):
                    if directory.name.startswith(".") or not (directory / "meta.json").is_file():
                        continue
                    meta = json.loads((directory / "meta.json").read_text())
                    out.append(
                        types.Checkpoint(
                            checkpoint_id=f"{segment}/{directory.name}",
                            checkpoint_type=kind,  # type: ignore[arg-type]
                            time=datetime.fromisoformat(meta["created"]),
                            tinker_path=f"tinker://{run.name}/{segment}/{directory.name}",
                            size_bytes=sum(f.stat().st_size for f in directory.iterdir()),
                            user_metadata=meta.get("user_metadata"),
                            expires_at=datetime.fromisoformat(meta["expires_at"]) if meta.get("expires_at") else None,
                        )
                    )
        return out


# -- losses -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _LossSpec:
    required: frozenset[str]
    optional: frozenset[str] = frozenset()
    config: Mapping[str, float] = field(default_factory=dict)
    """``loss_fn_config`` keys with their defaults."""


_RL_INPUTS = frozenset({"target_tokens", "logprobs", "advantages"})
_CLIP_INPUTS = frozenset({"clip_low_threshold", "clip_high_threshold"})
_LOSSES: dict[str, _LossSpec] = {
    "cross_entropy": _LossSpec(frozenset({"target_tokens"}), frozenset({"weights"})),
    "importance_sampling": _LossSpec(_RL_INPUTS),
    "ppo": _LossSpec(_RL_INPUTS, _CLIP_INPUTS, {"clip_low_threshold": 0.8, "clip_high_threshold": 1.2}),
    "cispo": _LossSpec(_RL_INPUTS, _CLIP_INPUTS, {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}),
    "dro": _LossSpec(_RL_INPUTS, config={"beta": 0.1}),
}
_NOT_IMPLEMENTED_LOSSES = frozenset({"gspo", "stable_reinforce", "custom"})


@dataclass
class _Row:
    tokens: list[int]
    inputs: dict[str, torch.Tensor]


def _rows(
    data: Sequence[types.Datum], loss_fn: str, config: Mapping[str, Any], vocab_size: int, max_len: int
) -> tuple[list[_Row], dict[str, float]]:
    """Validate a request as the service does and turn it into token rows; every failure is a User error."""
    if loss_fn in _NOT_IMPLEMENTED_LOSSES:
        raise _user_error(f"loss_fn {loss_fn!r} is not implemented by the local Tinker stand-in")
    spec = _LOSSES.get(loss_fn)
    if spec is None:
        raise _user_error(f"Unknown loss function {loss_fn!r}; one of {', '.join(sorted(_LOSSES))}")
    unknown = set(config) - set(spec.config)
    if unknown:
        raise _user_error(
            f"loss_fn_config for {loss_fn} has unknown key(s) {sorted(unknown)}; it takes {sorted(spec.config)}"
        )
    try:
        cfg = {key: float(config.get(key, default)) for key, default in spec.config.items()}
    except (TypeError, ValueError) as exc:
        raise _user_error(f"loss_fn_config for {loss_fn}: values must be numbers ({exc})") from None
    rows = []
    for i, datum in enumerate(data):
        try:
            tokens = datum.model_input.to_ints()
        except ValueError:
            raise _user_error(f"datum {i}: the local Tinker stand-in takes text tokens only") from None
        n = len(tokens)
        if n == 0:
            raise _user_error(f"datum {i}: empty model_input")
        if n > max_len:
            raise _user_error(f"sequence length {n} exceeds max sequence length {max_len} for field target_tokens[{i}]")
        keys = set(datum.loss_fn_inputs)
        missing, extra = spec.required - keys, keys - spec.required - spec.optional
        if missing:
            raise _user_error(f"datum {i}: {loss_fn} requires loss_fn_inputs {sorted(missing)}")
        if extra:
            raise _user_error(
                f"datum {i}: {loss_fn} does not take loss_fn_inputs {sorted(extra)}; "
                f"it takes {sorted(spec.required | spec.optional)}"
            )
        inputs = {}
        for key, td in datum.loss_fn_inputs.items():
            array = td.to_numpy()
            if array.shape != (n,):
                raise _user_error(
                    f"datum {i}: loss_fn_inputs[{key!r}] has shape {list(array.shape)}; "
                    f"expected [{n}] (the model_input length)"
                )
            inputs[key] = torch.tensor(array)
        targets = inputs["target_tokens"]
        if targets.is_floating_point() or bool(((targets < 0) | (targets >= vocab_size)).any()):
            raise _user_error(f"datum {i}: target_tokens must be token ids in [0, {vocab_size})")
        inputs = {k: (v.long() if k == "target_tokens" else v.float()) for k, v in inputs.items()}
        rows.append(_Row(tokens, inputs))
    return rows, cfg


def _loss(loss_fn: str, lp: torch.Tensor, inputs: Mapping[str, torch.Tensor], cfg: Mapping[str, float]) -> torch.Tensor:
    """The documented formulas, summed over tokens (``lp``: the trainer's logprobs of the targets)."""
    if loss_fn == "cross_entropy":
        weights = inputs.get("weights")
        return -(lp if weights is None else lp * weights).sum()
    old, adv = inputs["logprobs"], inputs["advantages"]
    ratio = torch.exp(lp - old)
    if loss_fn == "importance_sampling":
        return -(ratio * adv).sum()
    if loss_fn == "dro":
        return -(lp * adv - 0.5 * cfg["beta"] * (lp - old) ** 2).sum()
    # Per-token thresholds (loss_fn_inputs) override the request's (loss_fn_config).
    low = torch.as_tensor(inputs.get("clip_low_threshold", cfg.get("clip_low_threshold")))
    high = torch.as_tensor(inputs.get("clip_high_threshold", cfg.get("clip_high_threshold")))
    if loss_fn == "ppo":
        return -torch.minimum(ratio * adv, torch.clamp(ratio, low, high) * adv).sum()
    if loss_fn == "cispo":
        return -(torch.clamp(ratio, low, high).detach() * lp * adv).sum()
    raise AssertionError(loss_fn)


# -- sampling -----------------------------------------------------------------------------------


@dataclass
class _SampleJob:
    model: Any
    tokens: list[int]
    num_samples: int
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    stop_ids: set[int]
    stop_strings: list[str]
    seed: int | None
    prompt_logprobs: bool
    last_n: int | None
    sequence_prefix: str
    tokenizer: Any
    pad_id: int
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class _SamplerEngine:
    """Batches every pending sample request: a drain task on one worker thread waits while requests
    keep arriving (``window_s`` at a time, a burst at most ``20 * window_s``), then runs each sampler
    model's share as one batched, KV-cached generation, and goes on until nothing is pending.

    A ``ThreadPoolExecutor`` rather than a daemon thread: the interpreter joins its worker at exit,
    while a daemon thread that last ran torch can abort the process as it shuts down."""

    def __init__(self, *, window_s: float, max_rows: int, seed: int, batch_sizes: list[int]) -> None:
        self.window_s, self.max_rows = window_s, max_rows
        self.batch_sizes = batch_sizes
        self.generator = torch.Generator().manual_seed(seed)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="local-tinker-sampler")
        self._lock = threading.Lock()
        self._pending: deque[_SampleJob] = deque()
        self._pending_rows = 0
        self._draining = False
        self._stopped = False

    def submit(self, job: _SampleJob) -> None:
        with self._lock:
            if self._stopped:
                job.future.set_exception(RuntimeError("this LocalTinker is closed"))
                return
            self._pending.append(job)
            self._pending_rows += job.num_samples
            if self._draining:
                return
            self._draining = True
        self._executor.submit(self._drain)

    def stop(self) -> None:
        with self._lock:
            self._stopped = True
        self._executor.shutdown(wait=False)

    def _drain(self) -> None:
        while True:
            self._gather()
            with self._lock:
                batch: list[_SampleJob] = []
                rows = 0
                while self._pending and (not batch or rows + self._pending[0].num_samples <= self.max_rows):
                    job = self._pending.popleft()
                    batch.append(job)
                    rows += job.num_samples
                self._pending_rows -= rows
                if not batch:
                    self._draining = False
                    return
            self._run(batch)

    def _gather(self) -> None:
        """Wait while requests keep arriving: a burst of concurrent requests becomes one batch."""
        deadline = time.monotonic() + 20 * self.window_s
        seen = -1
        while True:
            with self._lock:
                rows = self._pending_rows
            if rows == seen or rows >= self.max_rows or time.monotonic() >= deadline:
                return
            seen = rows
            time.sleep(self.window_s)

    def _run(self, batch: list[_SampleJob]) -> None:
        groups: dict[int, list[_SampleJob]] = {}
        for j in batch:
            if j.future.set_running_or_notify_cancel():  # False: cancelled by its caller
                groups.setdefault(id(j.model), []).append(j)
        for jobs in groups.values():
            try:
                self.batch_sizes.append(sum(j.num_samples for j in jobs))
                results = _generate(jobs, self.generator)
            except BaseException as exc:
                for j in jobs:
                    j.future.set_exception(exc)
            else:
                for j, result in zip(jobs, results, strict=True):
                    j.future.set_result(result)


def _sample_tokens(
    logits: torch.Tensor, temps: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor:
    """Inverse-CDF sampling from ``softmax(logits / T)`` truncated by top-k/top-p, one uniform per row."""
    scaled = logits / temps.clamp(min=1e-6).unsqueeze(-1)
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        vocab = logits.shape[-1]
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab).unsqueeze(0)
        drop = ranks >= torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop |= (probs.cumsum(-1) - probs) >= top_p.unsqueeze(-1)  # the top token always survives
        scaled = scaled.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    cdf = torch.softmax(scaled, dim=-1).cumsum(-1)
    picked = torch.searchsorted(cdf, (uniform.unsqueeze(-1) * cdf[:, -1:]).contiguous()).squeeze(-1)
    picked = picked.clamp(max=logits.shape[-1] - 1)
    return torch.where(temps <= 0, logits.argmax(-1), picked)


@torch.inference_mode()
def _generate(jobs: list[_SampleJob], generator: torch.Generator) -> list[types.SampleResponse]:
    """Sample every job (same model) in one batch: each distinct prompt is prefilled once, its KV cache
    gathered per row, then one token per step for all rows. Logprobs are raw ``log_softmax(logits)``."""
    from transformers import DynamicCache

    model, pad_id = jobs[0].model, jobs[0].pad_id
    row_job = [j for j, job in enumerate(jobs) for _ in range(job.num_samples)]
    uniq: dict[tuple[int, ...], int] = {}
    job_prompt = [uniq.setdefault(tuple(job.tokens), len(uniq)) for job in jobs]
    width = max(len(p) for p in uniq)
    ids = torch.full((len(uniq), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(uniq), width), dtype=torch.long)
    for u, prompt in enumerate(uniq):
        ids[u, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attn[u, width - len(prompt) :] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=attn, position_ids=pos, past_key_values=cache, use_cache=True)
    prompt_logits = out.logits.float()

    prompt_lps: list[np.ndarray | None] = []
    for j, job in enumerate(jobs):
        if not job.prompt_logprobs:
            prompt_lps.append(None)
            continue
        n = len(job.tokens)
        arr = np.full(n, np.nan, dtype=np.float32)
        if n > 1:
            lg = prompt_logits[job_prompt[j], width - n : width - 1]
            arr[1:] = token_logprobs(lg, torch.tensor(job.tokens[1:], dtype=torch.long)).numpy()
        if job.last_n is not None:
            arr[: n - job.last_n] = np.nan
        prompt_lps.append(arr)

    owner = torch.tensor([job_prompt[j] for j in row_job], dtype=torch.long)
    logits = prompt_logits[:, -1].index_select(0, owner)
    attn, last_pos = attn.index_select(0, owner), pos[:, -1].index_select(0, owner)
    cache.reorder_cache(owner)
    rows = len(row_job)
    temps = torch.tensor([jobs[j].temperature for j in row_job], dtype=torch.float32)
    top_k = torch.tensor([max(jobs[j].top_k, 0) for j in row_job], dtype=torch.long)
    top_p = torch.tensor([jobs[j].top_p for j in row_job], dtype=torch.float32)
    seeded = [(j, torch.Generator().manual_seed(job.seed)) for j, job in enumerate(jobs) if job.seed is not None]
    job_rows: dict[int, list[int]] = {}
    for r, j in enumerate(row_job):
        job_rows.setdefault(j, []).append(r)
    unseeded = torch.tensor([r for r, j in enumerate(row_job) if jobs[j].seed is None], dtype=torch.long)
    tokens_out: list[list[int]] = [[] for _ in range(rows)]
    lps_out: list[list[float]] = [[] for _ in range(rows)]
    reasons = ["length"] * rows
    done = [False] * rows
    for _ in range(max(job.max_tokens for job in jobs)):
        # One uniform per row and step; a seeded request draws from its own generator, so its
        # samples do not depend on what else is in the batch.
        uniform = torch.empty(rows)
        for j, gen in seeded:
            uniform[job_rows[j]] = torch.rand(len(job_rows[j]), generator=gen)
        if len(unseeded):
            uniform[unseeded] = torch.rand(len(unseeded), generator=generator)
        logits = logits.float()
        picked = _sample_tokens(logits, temps, top_k, top_p, 1.0 - uniform)
        raw = token_logprobs(logits, picked).tolist()
        picked_list = picked.tolist()
        for r in range(rows):
            if done[r]:
                continue
            job = jobs[row_job[r]]
            tokens_out[r].append(picked_list[r])
            lps_out[r].append(raw[r])
            if picked_list[r] in job.stop_ids:
                reasons[r], done[r] = "stop", True
            elif job.stop_strings:
                text = job.tokenizer.decode(tokens_out[r], skip_special_tokens=False)
                if any(s in text for s in job.stop_strings):
                    reasons[r], done[r] = "stop", True
            if len(tokens_out[r]) >= job.max_tokens:
                done[r] = True
        if all(done):
            break
        # Finished rows keep decoding (their tokens are dropped) so the batch stays rectangular.
        attn = torch.cat([attn, attn.new_ones((rows, 1))], dim=1)
        last_pos = last_pos + 1
        out = model(
            input_ids=picked.unsqueeze(-1),
            attention_mask=attn,
            position_ids=last_pos.unsqueeze(-1),
            past_key_values=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1]

    responses = []
    for j, job in enumerate(jobs):
        sequences = [
            types.SampledSequence(
                stop_reason=reasons[r],  # type: ignore[arg-type]
                sequence_id=f"{job.sequence_prefix}:{k}",
                tokens_np=np.asarray(tokens_out[r], dtype=np.int32),
                logprobs_np=np.asarray(lps_out[r], dtype=np.float32),
            )
            for k, r in enumerate(job_rows[j])
        ]
        responses.append(types.SampleResponse(sequences=sequences, prompt_logprobs_np=prompt_lps[j]))
    return responses


# -- clients ------------------------------------------------------------------------------------


@dataclass
class _Session:
    id: str
    closed: bool = False
    train_seq: itertools.count = field(default_factory=itertools.count)
    sample_seq: itertools.count = field(default_factory=itertools.count)


class _NoHolder:
    """The SDK's clients reach the service through ``holder``; the stand-in has none, so an inherited
    method this module does not override fails with a clear message instead of a network call."""

    @property
    def holder(self) -> Any:
        raise NotImplementedError(_NOT_LOCAL.format(cls=type(self).__name__))

    def get_telemetry(self) -> None:
        return None


class LocalRestClient(_NoHolder, tinker.RestClient):
    """``tinker.RestClient`` over a :class:`LocalTinker`: capabilities, checkpoint listing and deletion."""

    def __init__(self, service: LocalTinker) -> None:
        self._service = service

    def get_server_capabilities(self) -> APIFuture[types.GetServerCapabilitiesResponse]:
        models = [
            types.SupportedModel(
                model_name=name, max_context_length=self._service.context_window, trainable=True, sampleable=True
            )
            for name in self._service.base_models
        ]
        return AwaitableConcurrentFuture(_done(types.GetServerCapabilitiesResponse(supported_models=models)))

    def list_checkpoints(self, training_run_id: types.ModelID) -> APIFuture[types.CheckpointsListResponse]:
        checkpoints = self._service._store.checkpoints(training_run_id)
        return AwaitableConcurrentFuture(_done(types.CheckpointsListResponse(checkpoints=checkpoints)))

    def delete_checkpoint(self, training_run_id: types.ModelID, checkpoint_id: str) -> APIFuture[None]:
        return self.delete_checkpoint_from_tinker_path(f"tinker://{training_run_id}/{checkpoint_id}")

    def delete_checkpoint_from_tinker_path(self, tinker_path: str) -> APIFuture[None]:
        """Delete a checkpoint from disk (``NotFoundError`` in the future when there is none)."""
        directory = self._service._store.path_of(tinker_path)  # ValueError at once, as the SDK parses first
        injected = self._service._begin("delete_checkpoint")
        if injected is not None:
            return AwaitableConcurrentFuture(_failed(injected))
        if not (directory / "meta.json").is_file():
            return AwaitableConcurrentFuture(_failed(_not_found("checkpoints", f"checkpoint {tinker_path} not found")))
        shutil.rmtree(directory)
        return AwaitableConcurrentFuture(_done(None))


class LocalSamplingClient(_NoHolder, tinker.SamplingClient):
    """``tinker.SamplingClient`` on a frozen snapshot of a model; requests are batched by the service."""

    def __init__(
        self,
        service: LocalTinker,
        session: _Session,
        sampling_session_id: str,
        base_model: str,
        model: Any,
        source: str,
    ) -> None:
        self._service = service
        self._session = session
        self._sampling_session_id = sampling_session_id
        self._base_model = base_model
        self._model = model
        self._source = source
        """``base``, a tinker:// path, or ``snapshot`` (weights kept in memory)."""
        self._record_stability_info = False
        self._request_seq = itertools.count()

    @property
    def model(self) -> Any:
        """The torch module this sampler runs (frozen; for tests that recompute its outputs)."""
        return self._model

    def sample(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        sampling_params: types.SamplingParams,
        include_prompt_logprobs: bool = False,
        topk_prompt_logprobs: int = 0,
        topk_sample_logprobs: int = 0,
        target_prompt_logprobs: types.TensorData | None = None,
        prompt_alt_tokens_k: int = 0,
        prompt_logprobs_last_n: int | None = None,
    ) -> APIFuture[types.SampleResponse]:
        """Sample ``num_samples`` completions (the SDK's full signature; top-k and alternatives are not implemented)."""
        if prompt_alt_tokens_k < 0:
            raise ValueError(f"prompt_alt_tokens_k must be 0 or greater, got {prompt_alt_tokens_k}")
        _check_last_n(prompt_logprobs_last_n, include_prompt_logprobs)
        unsupported = {
            "topk_prompt_logprobs": topk_prompt_logprobs,
            "topk_sample_logprobs": topk_sample_logprobs,
            "target_prompt_logprobs": target_prompt_logprobs,
            "prompt_alt_tokens_k": prompt_alt_tokens_k,
        }
        asked = [k for k, v in unsupported.items() if v]
        if asked:
            raise NotImplementedError(f"the local Tinker stand-in does not implement {', '.join(asked)}")
        fut = self._submit(
            "sample", prompt, num_samples, sampling_params, include_prompt_logprobs, prompt_logprobs_last_n
        )
        return _AwaitableFutureCompatWrapper(fut)

    def compute_logprobs(
        self, prompt: types.ModelInput, prompt_logprobs_last_n: int | None = None
    ) -> APIFuture[list[float | None]]:
        """Logprob of each prompt token given the ones before it (``None`` first): one ``max_tokens=1`` sample."""
        _check_last_n(prompt_logprobs_last_n, True)
        inner = self._submit(
            "compute_logprobs", prompt, 1, types.SamplingParams(max_tokens=1), True, prompt_logprobs_last_n
        )
        fut: concurrent.futures.Future[list[float | None]] = concurrent.futures.Future()

        def _unwrap(done: concurrent.futures.Future[types.SampleResponse]) -> None:
            if done.exception() is not None:
                fut.set_exception(done.exception())  # type: ignore[arg-type]
            else:
                fut.set_result(list(done.result().prompt_logprobs or []))

        inner.add_done_callback(_unwrap)
        return _AwaitableFutureCompatWrapper(fut)

    def _submit(
        self,
        method: str,
        prompt: types.ModelInput,
        num_samples: int,
        params: types.SamplingParams,
        prompt_logprobs: bool,
        last_n: int | None,
    ) -> concurrent.futures.Future[types.SampleResponse]:
        injected = self._service._begin(method)
        if injected is not None:
            return _failed(injected)
        try:
            job = self._job(prompt, num_samples, params, prompt_logprobs, last_n)
        except Exception as exc:
            return _failed(exc)
        self._service._engine.submit(job)
        return job.future

    def _job(
        self,
        prompt: types.ModelInput,
        num_samples: int,
        params: types.SamplingParams,
        prompt_logprobs: bool,
        last_n: int | None,
    ) -> _SampleJob:
        if self._session.closed:
            raise _user_error(f"session {self._session.id} is finished; create a new ServiceClient")
        try:
            tokens = prompt.to_ints()
        except ValueError:
            raise _bad_request("asample", "the local Tinker stand-in samples from text tokens only") from None
        window = self._service.context_window
        n = len(tokens)
        if n == 0:
            raise _bad_request("asample", "prompt is empty")
        if last_n is not None and last_n > n - 1:
            raise _bad_request("asample", f"prompt_logprobs_last_n must be at most len(prompt) - 1 = {n - 1}")
        if num_samples < 1:
            raise _bad_request("asample", f"num_samples must be at least 1, got {num_samples}")
        max_tokens = params.max_tokens if params.max_tokens is not None else window - n
        if params.max_tokens is not None and max_tokens < 1:
            raise _bad_request("asample", f"max_tokens must be at least 1, got {max_tokens}")
        if n + max_tokens > window or max_tokens < 1:
            raise _bad_request(
                "asample",
                "Prompt length plus max_tokens exceeds the model's context window: "
                f"{n} prompt tokens + {max(max_tokens, 1)} max_tokens > {window}.",
            )
        if params.temperature < 0 or not 0 < params.top_p <= 1:
            raise _bad_request("asample", "temperature must be >= 0 and top_p in (0, 1]")
        tokenizer = self._service.tokenizer(self._base_model)
        stop = params.stop
        stop_ids: set[int] = set()
        stop_strings: list[str] = []
        if stop is None:
            stop_ids = {tokenizer.eos_token_id}
        elif isinstance(stop, str):
            stop_strings, stop_ids = [stop], {tokenizer.eos_token_id}
        elif len(stop):  # [] disables every stop, end-of-turn included
            stop_ids = {tokenizer.eos_token_id}
            for s in stop:
                if isinstance(s, str):
                    stop_strings.append(s)
                else:
                    stop_ids.add(int(s))
        return _SampleJob(
            model=self._model,
            tokens=list(tokens),
            num_samples=num_samples,
            max_tokens=max_tokens,
            temperature=float(params.temperature),
            top_k=int(params.top_k),
            top_p=float(params.top_p),
            stop_ids=stop_ids,
            stop_strings=stop_strings,
            seed=params.seed,
            prompt_logprobs=prompt_logprobs,
            last_n=last_n,
            sequence_prefix=f"{self._sampling_session_id}:{next(self._request_seq)}",
            tokenizer=tokenizer,
            pad_id=tokenizer.pad_token_id,
        )

    def get_tokenizer(self) -> Any:
        return self._service.tokenizer(self._base_model)

    def get_base_model(self) -> str:
        return self._base_model

    def __reduce__(self) -> tuple[Any, tuple[dict[str, Any]]]:
        """Pickles by reference to the service's root: a snapshot's weights are written there first."""
        source = self._source
        if source == "snapshot":
            directory = self._service._store.ephemeral / self._sampling_session_id
            if not (directory / "meta.json").is_file():
                self._service._store.write(directory, self._model, None, {"kind": "snapshot"})
            source = f"ephemeral:{self._sampling_session_id}"
        state = {
            "root": str(self._service.root),
            "seed": self._service.seed,
            "base_model": self._base_model,
            "sampling_session_id": self._sampling_session_id,
            "source": source,
            "lora": self._service._lora_of(self._model),
        }
        return (_unpickle_sampling_client, (state,))


def _check_last_n(last_n: int | None, include_prompt_logprobs: bool) -> None:
    if last_n is None:
        return
    if last_n < 1:
        raise ValueError(f"prompt_logprobs_last_n must be 1 or greater, got {last_n}")
    if not include_prompt_logprobs:
        raise ValueError("prompt_logprobs_last_n applies to prompt logprobs; set include_prompt_logprobs")


def _unpickle_sampling_client(state: dict[str, Any]) -> LocalSamplingClient:
    service = shared_local_tinker(state["root"], seed=state["seed"])
    return service._restore_sampler(state)


class LocalTrainingClient(_NoHolder, tinker.TrainingClient):
    """``tinker.TrainingClient`` of one LoRA training run: requests run in call order on its own thread."""

    def __init__(
        self,
        service: LocalTinker,
        session: _Session,
        model_id: str,
        base_model: str,
        lora: _LoraSpec,
        model: Any,
        optimizer: torch.optim.AdamW,
        user_metadata: dict[str, str] | None,
    ) -> None:
        self.model_id = model_id
        self._info = types.GetInfoResponse(
            model_id=model_id,
            model_data=types.ModelData(arch="qwen2", model_name=base_model, tokenizer_id=base_model),
            optimizer_config=types.AdamOptimizerConfig(),
            is_lora=True,
            lora_rank=lora.rank,
            model_name=base_model,
        )
        self._service = service
        self._session = session
        self._base_model = base_model
        self._lora = lora
        self._model = model
        self._optimizer = optimizer
        self._user_metadata = user_metadata
        self._request_error: BaseException | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="local-tinker-train")

    @property
    def model(self) -> Any:
        """The live torch module (peft LoRA); read it only while no request of this client runs."""
        return self._model

    @property
    def optimizer(self) -> torch.optim.AdamW:
        """The live AdamW (its ``state`` holds the moments); read it only while no request runs."""
        return self._optimizer

    # - requests -

    def _submit(self, method: str, fn: Callable[[], T]) -> AwaitableConcurrentFuture[T]:
        injected = self._service._begin(method)
        return AwaitableConcurrentFuture(self._executor.submit(self._run, fn, injected))

    def _run(self, fn: Callable[[], T], injected: BaseException | None) -> T:
        if self._request_error is not None:
            raise RuntimeError(_POISONED) from self._request_error
        try:
            if injected is not None:
                raise injected
            if self._session.closed:
                raise _user_error(f"session {self._session.id} is finished; create a new ServiceClient")
            return fn()
        except BaseException as exc:
            self._request_error = exc
            raise

    def forward(
        self,
        data: list[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: Mapping[str, float | str] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Loss and target logprobs without gradients."""
        if not data:
            raise ValueError("No data provided")
        return self._submit("forward", lambda: self._fwd(list(data), loss_fn, dict(loss_fn_config or {}), False))

    def forward_backward(
        self,
        data: list[types.Datum],
        loss_fn: types.LossFnType,
        loss_fn_config: Mapping[str, float | str] | None = None,
    ) -> APIFuture[types.ForwardBackwardOutput]:
        """Loss, target logprobs, and gradients added to those of earlier calls until ``optim_step``."""
        if not data:
            raise ValueError("No data provided")
        return self._submit(
            "forward_backward", lambda: self._fwd(list(data), loss_fn, dict(loss_fn_config or {}), True)
        )

    def _fwd(
        self, data: list[types.Datum], loss_fn: str, config: dict[str, Any], backward: bool
    ) -> types.ForwardBackwardOutput:
        tokenizer = self._service.tokenizer(self._base_model)
        rows, cfg = _rows(data, loss_fn, config, len(tokenizer), self._service.max_train_length)
        pad = tokenizer.pad_token_id
        outputs: list[dict[str, types.TensorData]] = []
        total = 0.0
        for chunk in _micro_batches(rows, _TRAIN_MICRO_BATCH_TOKENS):
            width = max(len(r.tokens) for r in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            targets = torch.zeros((len(chunk), width), dtype=torch.long)
            attn = torch.zeros((len(chunk), width), dtype=torch.long)
            for i, r in enumerate(chunk):
                ids[i, : len(r.tokens)] = torch.tensor(r.tokens, dtype=torch.long)
                targets[i, : len(r.tokens)] = r.inputs["target_tokens"]
                attn[i, : len(r.tokens)] = 1
            with torch.set_grad_enabled(backward):
                logits = self._model(input_ids=ids, attention_mask=attn, use_cache=False).logits
                lp = token_logprobs(logits, targets)
                flat = lp[attn.bool()]  # row-major: the rows' tokens, in order
                inputs = {k: torch.cat([r.inputs[k] for r in chunk]) for k in chunk[0].inputs if k != "target_tokens"}
                loss = _loss(loss_fn, flat, inputs, cfg)
                if backward:
                    loss.backward()
            total += float(loss.detach())
            lp = lp.detach()
            for i, r in enumerate(chunk):
                outputs.append({"logprobs": types.TensorData.from_torch(lp[i, : len(r.tokens)].contiguous())})
        return types.ForwardBackwardOutput(
            loss_fn_output_type="TorchLossReturn", loss_fn_outputs=outputs, metrics={"loss:sum": total}
        )

    def optim_step(
        self, optim_params: types.OptimParams | None = None, *, adam_params: types.AdamParams | None = None
    ) -> APIFuture[types.OptimStepResponse]:
        """One AdamW step on the accumulated gradients (then zeroed); metrics: ``grad_norm:mean`` before clipping."""
        if optim_params is not None and adam_params is not None:
            raise ValueError("Specify optim_params or legacy adam_params, not both")
        params = optim_params if optim_params is not None else adam_params
        if not isinstance(params, (types.AdamParams, OptimParamsBase)):
            raise TypeError("Expected AdamParams or OptimParamsBase")
        return self._submit("optim_step", lambda: self._step(params))

    def _step(self, params: Any) -> types.OptimStepResponse:
        if not isinstance(params, types.AdamParams):
            raise _user_error(f"this training run's optimizer is AdamW; optim_step got {type(params).__name__}")
        trainable = list(_trainable(self._model).values())
        grads = [p.grad for p in trainable if p.grad is not None]
        norm = (
            float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))) if grads else 0.0
        )
        if params.grad_clip_norm > 0 and grads:
            torch.nn.utils.clip_grad_norm_(trainable, params.grad_clip_norm)
        for group in self._optimizer.param_groups:
            group.update(
                lr=params.learning_rate,
                betas=(params.beta1, params.beta2),
                eps=params.eps,
                weight_decay=params.weight_decay,
            )
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        return types.OptimStepResponse(metrics={"grad_norm:mean": norm})

    def save_state(
        self,
        name: str,
        ttl_seconds: int | None = None,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> APIFuture[types.SaveWeightsResponse]:
        """Weights and AdamW state, at ``tinker://<run>/weights/<name>``."""
        return self._submit(
            "save_state",
            lambda: types.SaveWeightsResponse(path=self._save("weights", name, ttl_seconds, overwrite, user_metadata)),
        )

    def save_weights_for_sampler(
        self, name: str, ttl_seconds: int | None = None, user_metadata: dict[str, str] | None = None
    ) -> APIFuture[types.SaveWeightsForSamplerResponse]:
        """Weights only, at ``tinker://<run>/sampler_weights/<name>``."""
        return self._submit(
            "save_weights_for_sampler",
            lambda: types.SaveWeightsForSamplerResponse(
                path=self._save("sampler_weights", name, ttl_seconds, False, user_metadata)
            ),
        )

    def _save(
        self, segment: str, name: str, ttl_seconds: int | None, overwrite: bool, user_metadata: dict[str, str] | None
    ) -> str:
        if not name or "/" in name or name.startswith("."):
            raise _user_error(f"checkpoint name {name!r} must be non-empty, without '/' and not start with '.'")
        if ttl_seconds is not None and not _TTL_RANGE[0] <= ttl_seconds <= _TTL_RANGE[1]:
            raise _user_error(f"ttl_seconds must be between 1 hour (3600) and 10 years, got {ttl_seconds}")
        path = f"tinker://{self.model_id}/{segment}/{name}"
        directory = self._service._store.path_of(path)
        if directory.exists() and not overwrite:
            raise _user_error(f"checkpoint {path} already exists; pass overwrite=True to replace it")
        now = datetime.now(timezone.utc)
        meta = {
            "base_model": self._base_model,
            "base_key": self._service.base_models[self._base_model].key(),
            "base_seed": self._service.seed,
            "lora": dataclasses.asdict(self._lora),
            "training_run_id": self.model_id,
            "created": now.isoformat(),
            "expires_at": (now + timedelta(seconds=ttl_seconds)).isoformat() if ttl_seconds else None,
            "user_metadata": user_metadata,
        }
        self._service._store.write(directory, self._model, self._optimizer if segment == "weights" else None, meta)
        return path

    def save_weights_and_get_sampling_client(
        self,
        name: str | None = None,
        retry_config: Any = None,
        record_stability_info: bool = False,
        kind: types.SamplingClientKind = "snapshot",
    ) -> tinker.BackcompatSamplingClientFuture:
        """A sampler on a snapshot of the weights as they are after every request submitted before this one."""
        if name is not None:
            warnings.warn(
                "The 'name' parameter of save_weights_and_get_sampling_client() is deprecated and has no effect",
                DeprecationWarning,
                stacklevel=2,
            )

        def snapshot() -> tinker.SamplingClient:
            sid = f"{self._session.id}:sample:{next(self._session.sample_seq)}"
            return LocalSamplingClient(
                self._service, self._session, sid, self._base_model, _frozen_copy(self._model), "snapshot"
            )

        return tinker.BackcompatSamplingClientFuture(self._submit("save_weights_and_get_sampling_client", snapshot))

    def create_sampling_client(
        self, model_path: str, retry_config: Any = None, record_stability_info: bool = False
    ) -> tinker.BackcompatSamplingClientFuture:
        return self._service._create_sampling_client(self._session, model_path, None)

    def get_tokenizer(self) -> Any:
        return self._service.tokenizer(self._base_model)


def _micro_batches(rows: list[_Row], budget: int) -> list[list[_Row]]:
    """Consecutive rows whose padded size stays within ``budget`` tokens (one row at least)."""
    out: list[list[_Row]] = []
    chunk: list[_Row] = []
    width = 0
    for r in rows:
        if chunk and max(width, len(r.tokens)) * (len(chunk) + 1) > budget:
            out.append(chunk)
            chunk, width = [], 0
        chunk.append(r)
        width = max(width, len(r.tokens))
    if chunk:
        out.append(chunk)
    return out


class LocalServiceClient(_NoHolder, tinker.ServiceClient):
    """``tinker.ServiceClient`` of a :class:`LocalTinker`; lazy like the real one (the session starts
    with the first ``create_*``)."""

    def __init__(
        self,
        service: LocalTinker,
        *,
        api_key: str | None = "local-key",
        user_metadata: dict[str, str] | None = None,
        project_id: str | None = None,
        display_name: str | None = None,
    ) -> None:
        super().__init__(user_metadata, project_id, display_name=display_name, api_key=api_key)
        self._service = service
        self._session_state: _Session | None = None

    def _session(self) -> _Session:
        with self._lifecycle_lock:
            if self._closed:
                raise RuntimeError("ServiceClient is closed")
            if self._session_state is None:
                if not (self._api_key or os.environ.get("TINKER_API_KEY")):
                    raise tinker.TinkerError(MISSING_API_KEY_MESSAGE)
                self._session_state = _Session(self._service._new_session_id())
            return self._session_state

    def create_lora_training_client(
        self,
        base_model: str,
        rank: int = 32,
        seed: int | None = None,
        train_mlp: bool = True,
        train_attn: bool = True,
        train_unembed: bool = True,
        user_metadata: dict[str, str] | None = None,
        optimizer: types.OptimizerConfig | None = None,
    ) -> tinker.BackcompatTrainingClientFuture:
        assert any([train_mlp, train_attn, train_unembed]), (
            "At least one of train_mlp, train_attn, or train_unembed must be True"
        )
        session = self._session()
        lora = _LoraSpec(rank, train_mlp, train_attn, train_unembed)
        return self._service._control_call(
            "create_lora_training_client",
            lambda: self._service._new_training_client(session, base_model, lora, seed, user_metadata, optimizer),
            tinker.BackcompatTrainingClientFuture,
        )

    def create_training_client_from_state(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
        optimizer: types.OptimizerConfig | None = None,
    ) -> tinker.BackcompatTrainingClientFuture:
        """Weights from a training checkpoint; AdamW starts afresh."""
        session = self._session()
        return self._service._control_call(
            "create_training_client_from_state",
            lambda: self._service._load_training_client(session, path, base_model, user_metadata, optimizer, False),
            tinker.BackcompatTrainingClientFuture,
        )

    def create_training_client_from_state_with_optimizer(
        self,
        path: str,
        base_model: str | None = None,
        user_metadata: dict[str, str] | None = None,
        weights_access_token: str | None = None,
    ) -> tinker.BackcompatTrainingClientFuture:
        """Weights and AdamW state (moments and step counts) from a training checkpoint."""
        session = self._session()
        return self._service._control_call(
            "create_training_client_from_state_with_optimizer",
            lambda: self._service._load_training_client(session, path, base_model, user_metadata, None, True),
            tinker.BackcompatTrainingClientFuture,
        )

    def create_sampling_client(
        self,
        model_path: str | None = None,
        base_model: str | None = None,
        retry_config: Any = None,
        record_stability_info: bool = False,
    ) -> tinker.BackcompatSamplingClientFuture:
        if model_path is None and base_model is None:
            raise ValueError("Either model_path or base_model must be provided")
        return self._service._create_sampling_client(self._session(), model_path, base_model)

    def _rest_client(self) -> LocalRestClient:
        # The SDK's deprecated get_server_capabilities() and create_rest_client() go through this.
        return LocalRestClient(self._service)

    def close(self, status: Any, detail: str | None = None) -> AwaitableConcurrentFuture[None]:
        """Finish the session: its clients' later requests fail."""
        with self._lifecycle_lock:
            self._closed = True
            if self._session_state is not None:
                self._session_state.closed = True
        self._service._count("close")
        return AwaitableConcurrentFuture(_done(None))


# -- the service --------------------------------------------------------------------------------


class LocalTinker:
    """The in-process service: base models, training runs, samplers, checkpoints (on disk under ``root``).

    ``calls`` counts the client methods called (by name); ``sample_batch_sizes`` lists the rows of each
    generation batch; :meth:`fail_next` makes the next call of a method fail.
    """

    def __init__(
        self,
        root: str | Path | None = None,
        *,
        context_window: int = 1024,
        max_train_length: int = 32768,
        seed: int = 0,
        base_models: Mapping[str, TinyBaseModel] | None = None,
        sample_window_s: float = 0.005,
        max_sample_batch: int = 1024,
    ) -> None:
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="rllm-tinker-local-"))
        self.root.mkdir(parents=True, exist_ok=True)
        self.context_window = context_window
        self.max_train_length = max_train_length
        self.seed = seed
        self.base_models: dict[str, TinyBaseModel] = dict(
            base_models if base_models is not None else default_base_models()
        )
        self.calls: Counter[str] = Counter()
        self.sample_batch_sizes: list[int] = []
        self._store = _CheckpointStore(self.root)
        self._lock = threading.Lock()
        self._failures: dict[str, deque[BaseException]] = {}
        self._tokenizers: dict[str, Any] = {}
        self._control = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="local-tinker-control")
        self._engine = _SamplerEngine(
            window_s=sample_window_s, max_rows=max_sample_batch, seed=seed, batch_sizes=self.sample_batch_sizes
        )
        with _REGISTRY_LOCK:
            _REGISTRY.setdefault(self.root.resolve(), self)

    # - public -

    def service_client(self, api_key: str | None = "local-key", **kw: Any) -> LocalServiceClient:
        """A new ``tinker.ServiceClient`` of this service (``kw``: user_metadata, project_id, display_name)."""
        return LocalServiceClient(self, api_key=api_key, **kw)

    def rest_client(self) -> LocalRestClient:
        return LocalRestClient(self)

    def tokenizer(self, base_model: str) -> Any:
        """The base model's ``PreTrainedTokenizerFast`` (one shared instance)."""
        with self._lock:
            if base_model not in self._tokenizers:
                self._tokenizers[base_model] = _build_tokenizer(base_model, self._spec(base_model))
            return self._tokenizers[base_model]

    def checkpoint_paths(self) -> list[str]:
        """The tinker:// paths of every checkpoint on disk (training and sampler), sorted."""
        return sorted(c.tinker_path for c in self._store.checkpoints())

    def fail_next(self, method: str, error: BaseException) -> None:
        """Make the next call of ``method`` (``forward_backward``, ``sample``, ``save_state``...) resolve its
        future with ``error``; a training client counts it as a failed request (and is poisoned)."""
        if method not in _FAILABLE:
            raise ValueError(f"fail_next: unknown method {method!r}; one of {', '.join(sorted(_FAILABLE))}")
        with self._lock:
            self._failures.setdefault(method, deque()).append(error)

    def close(self) -> None:
        """Stop the worker threads: later sample and client-creation requests fail (futures handed out stay valid)."""
        self._engine.stop()
        self._control.shutdown(wait=False)

    # - internals used by the clients -

    def _count(self, method: str) -> None:
        with self._lock:
            self.calls[method] += 1

    def _begin(self, method: str) -> BaseException | None:
        """Count a call; the failure injected for it, if any."""
        with self._lock:
            self.calls[method] += 1
            pending = self._failures.get(method)
            return pending.popleft() if pending else None

    def _spec(self, base_model: str) -> TinyBaseModel:
        spec = self.base_models.get(base_model)
        if spec is None:
            raise _bad_request(
                "create_model",
                f"base model {base_model!r} is not supported; supported: {', '.join(sorted(self.base_models))}",
            )
        return spec

    def _template(self, base_model: str) -> Any:
        spec = self._spec(base_model)
        return _base_template(base_model, spec, self.tokenizer(base_model), self.seed, self.context_window)

    def _new_session_id(self) -> str:
        sessions = self.root / "sessions"
        sessions.mkdir(exist_ok=True)
        n = len(list(sessions.iterdir())) + 1
        while True:  # mkdir is atomic: two processes on one root never get the same id
            try:
                (sessions / f"local-{n}").mkdir()
                return f"local-{n}"
            except FileExistsError:
                n += 1

    def _control_call(self, method: str, fn: Callable[[], Any], wrapper: type[W]) -> W:
        """Run a client-creation request on the control thread; its result in the SDK's ``Backcompat*`` future."""
        injected = self._begin(method)
        fut = _failed(injected) if injected is not None else self._control.submit(fn)
        return wrapper(AwaitableConcurrentFuture(fut))  # type: ignore[call-arg]

    def _new_training_client(
        self,
        session: _Session,
        base_model: str,
        lora: _LoraSpec,
        seed: int | None,
        user_metadata: dict[str, str] | None,
        optimizer_config: types.OptimizerConfig | None,
    ) -> LocalTrainingClient:
        if lora.rank < 1:
            raise _bad_request("create_model", f"rank must be at least 1, got {lora.rank}")
        if optimizer_config is not None and not isinstance(optimizer_config, types.AdamOptimizerConfig):
            raise _bad_request("create_model", "the local Tinker stand-in implements the AdamW optimizer only")
        template = self._template(base_model)
        model_id = f"{session.id}:train:{next(session.train_seq)}"
        init_seed = seed if seed is not None else _derived_seed(self.seed, model_id, "lora")
        model = _lora_model(template, lora, init_seed)
        return LocalTrainingClient(self, session, model_id, base_model, lora, model, _adamw(model), user_metadata)

    def _load_training_client(
        self,
        session: _Session,
        path: str,
        base_model: str | None,
        user_metadata: dict[str, str] | None,
        optimizer_config: types.OptimizerConfig | None,
        with_optimizer: bool,
    ) -> LocalTrainingClient:
        parsed = _parse_or_user_error(path)
        if parsed.checkpoint_type != "training":
            raise _user_error(f"{path} is a {parsed.checkpoint_type} checkpoint; load a tinker://<run>/weights/<name>")
        directory = self._store.path_of(path)
        if not (directory / "meta.json").is_file():
            raise _user_error(f"checkpoint {path} not found")
        ckpt = self._store.read(directory, with_optimizer=with_optimizer)
        meta = ckpt.meta
        if base_model is not None and base_model != meta["base_model"]:
            raise _user_error(f"{path} was trained from {meta['base_model']!r}, not {base_model!r}")
        self._check_base(path, meta)
        client = self._new_training_client(
            session, meta["base_model"], _LoraSpec(**meta["lora"]), 0, user_metadata, optimizer_config
        )
        _load_adapter(client._model, ckpt.adapter, path)
        if ckpt.optimizer is not None:
            client._optimizer.load_state_dict(ckpt.optimizer)
        return client

    def _check_base(self, path: str, meta: Mapping[str, Any]) -> None:
        spec = self._spec(meta["base_model"])
        if meta.get("base_key") != spec.key() or meta.get("base_seed") != self.seed:
            raise _user_error(
                f"{path} was made from another definition (or seed) of base model {meta['base_model']!r} "
                "than this LocalTinker serves"
            )

    def _create_sampling_client(
        self, session: _Session, model_path: str | None, base_model: str | None
    ) -> tinker.BackcompatSamplingClientFuture:
        def create() -> LocalSamplingClient:
            sid = f"{session.id}:sample:{next(session.sample_seq)}"
            if model_path is None:
                assert base_model is not None
                return LocalSamplingClient(self, session, sid, base_model, self._template(base_model), "base")
            if not model_path.startswith("tinker://"):
                raise ValueError("model_path must start with 'tinker://'")
            directory = self._store.path_of(model_path)
            if not (directory / "meta.json").is_file():
                raise _not_found("create_sampling_session", f"checkpoint {model_path} not found")
            ckpt = self._store.read(directory, with_optimizer=False)
            self._check_base(model_path, ckpt.meta)
            name = ckpt.meta["base_model"]
            model = _lora_model(self._template(name), _LoraSpec(**ckpt.meta["lora"]), 0)
            _load_adapter(model, ckpt.adapter, model_path)
            return LocalSamplingClient(self, session, sid, name, model.requires_grad_(False), model_path)

        return self._control_call("create_sampling_client", create, tinker.BackcompatSamplingClientFuture)

    def _lora_of(self, model: Any) -> dict[str, Any] | None:
        """The LoRA spec of a sampler model (None for a base model), for pickling."""
        peft_config = getattr(model, "peft_config", None)
        if not peft_config:
            return None
        targets = set(peft_config["default"].target_modules)
        return dataclasses.asdict(
            _LoraSpec(
                rank=peft_config["default"].r,
                train_mlp="gate_proj" in targets,
                train_attn="q_proj" in targets,
                train_unembed="lm_head" in targets,
            )
        )

    def _restore_sampler(self, state: Mapping[str, Any]) -> LocalSamplingClient:
        session = _Session(state["sampling_session_id"].split(":")[0])
        source, name = state["source"], state["base_model"]
        if source == "base":
            model = self._template(name)
        else:
            if source.startswith("ephemeral:"):
                directory = self._store.ephemeral / source.removeprefix("ephemeral:")
            else:
                directory = self._store.path_of(source)
            ckpt = self._store.read(directory, with_optimizer=False)
            model = _lora_model(self._template(name), _LoraSpec(**state["lora"]), 0)
            _load_adapter(model, ckpt.adapter, source)
            model.requires_grad_(False)
        return LocalSamplingClient(self, session, state["sampling_session_id"], name, model, source)


def _adamw(model: Any) -> torch.optim.AdamW:
    # Tinker's AdamParams defaults; every optim_step sets them from its own AdamParams anyway.
    return torch.optim.AdamW(list(_trainable(model).values()), lr=1e-4, betas=(0.9, 0.95), eps=1e-12, weight_decay=0.0)


def _load_adapter(model: Any, adapter: Mapping[str, torch.Tensor], path: str) -> None:
    expected = _adapter(model)
    if set(adapter) != set(expected):
        raise _user_error(f"{path}: its adapter weights do not match the LoRA configuration it records")
    with torch.no_grad():
        for name, tensor in adapter.items():
            expected[name].copy_(tensor)


def _parse_or_user_error(path: str) -> types.ParsedCheckpointTinkerPath:
    try:
        return types.ParsedCheckpointTinkerPath.from_tinker_path(path)
    except ValueError as exc:
        raise _user_error(str(exc)) from None


_REGISTRY: weakref.WeakValueDictionary[Path, LocalTinker] = weakref.WeakValueDictionary()
_SHARED: dict[Path, LocalTinker] = {}
_REGISTRY_LOCK = threading.Lock()
_DEFAULT_ROOT: Path | None = None


def shared_local_tinker(root: str | Path | None = None, *, seed: int = 0) -> LocalTinker:
    """The process-wide :class:`LocalTinker` of ``root`` (default: ``$RLLM_TINKER_LOCAL_ROOT``, else one
    temporary directory per process), created on first use and kept alive."""
    global _DEFAULT_ROOT
    if root is None:
        root = os.environ.get("RLLM_TINKER_LOCAL_ROOT") or None
    if root is None:
        with _REGISTRY_LOCK:
            if _DEFAULT_ROOT is None:
                _DEFAULT_ROOT = Path(tempfile.mkdtemp(prefix="rllm-tinker-local-"))
            root = _DEFAULT_ROOT
    resolved = Path(root).expanduser().resolve()
    with _REGISTRY_LOCK:
        service = _REGISTRY.get(resolved)
    if service is None:
        service = LocalTinker(resolved, seed=seed)
        with _REGISTRY_LOCK:
            service = _REGISTRY.get(resolved, service)
    _SHARED[resolved] = service
    return service


def local_service_client(cfg: Any = None) -> LocalServiceClient:
    """Factory a config can name (``tinker.service_factory: rllm_tinker.testing:local_service_client``): a
    client of the process-wide :class:`LocalTinker` whose root is ``$RLLM_TINKER_LOCAL_ROOT`` (a temporary
    directory if unset). Checkpoints live on disk, so a later trainer (or process) on the same root finds
    them. ``cfg`` (whatever the caller passes) is ignored."""
    return shared_local_tinker().service_client()


def local_rest_client(cfg: Any = None) -> LocalRestClient:
    """The REST client of the same process-wide :class:`LocalTinker` (``tinker.rest_factory``)."""
    return shared_local_tinker().rest_client()
