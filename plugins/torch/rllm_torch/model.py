"""Model and tokenizer construction: a local Hugging Face directory, or a tiny random model.

The tiny model is what a fresh machine trains with no downloads: a transformers ``Qwen2``/``Llama``
model built from :class:`~rllm_torch.config.TinyModelSettings`, and a word-level tokenizer made with
the ``tokenizers`` library (words split on whitespace and punctuation, so ``3+4=`` is four tokens)
with a chat template. Nothing here touches the network: loading passes ``local_files_only``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rllm_torch.config import TinyModelSettings, TorchBackendConfig

__all__ = [
    "AGENT_TOKENS",
    "SPECIAL_TOKENS",
    "TINY_CHAT_TEMPLATE",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "load_model_and_tokenizer",
    "resolve_device",
    "resolve_dtype",
]

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]

AGENT_TOKENS = ["<|tool|>", "<|tools|>", "<tool_call>", "</tool_call>", "<arg>", "<think>", "</think>"]
"""Special tokens of tools, tool calls and reasoning (``torch.tiny.agent_tokens``). They come after the
vocabulary's words, so no existing id moves; a tokenizer without them keeps the model's vocabulary
(and so its random initialisation and sampling) exactly as it was."""

# Each message is "<|role|> content <eos>"; the assistant's turn ends with <eos>, which is the token
# generation stops at. With tools, a "<|tools|>" block comes first, declaring each tool in the form
# the model calls it; an assistant's tool calls follow its content in the ``tiny`` parser's format
# ("<tool_call> NAME <arg> KEY VALUE ... </tool_call>"), its reasoning (``reasoning_content``) comes
# before it as "<think> ... </think>", and a tool result is "<|tool|> content <eos>". A plain
# conversation renders exactly as it did before tools existed.
TINY_CHAT_TEMPLATE = (
    "{%- macro value(v) -%}"
    "{%- if v is sameas true -%}true{%- elif v is sameas false -%}false{%- elif v is none -%}null"
    "{%- elif v is string or v is number -%}{{ v }}{%- else -%}{{ v | tojson }}{%- endif -%}"
    "{%- endmacro -%}"
    "{%- if tools -%}<|tools|> {% for t in tools %}{% set f = t['function'] if t['function'] is defined else t %}"
    "<tool_call> {{ f['name'] }}{% for p in ((f['parameters'] or {})['properties'] or {}) %} <arg> {{ p }}{% endfor %}"
    " </tool_call> {% endfor %}<eos> {% endif -%}"
    "{% for m in messages %}<|{{ m['role'] }}|> "
    "{% if m['reasoning_content'] %}<think> {{ m['reasoning_content'] }} </think> {% endif %}"
    "{{ m['content'] if m['content'] is not none else '' }}"
    "{% for c in (m['tool_calls'] or []) %}{% set f = c['function'] if c['function'] is defined else c %}"
    "{% if f['arguments'] is not mapping %}{{ raise_exception('tool call arguments must be a dict') }}{% endif %}"
    " <tool_call> {{ f['name'] }}{% for k, v in f['arguments'].items() %} <arg> {{ k }} {{ value(v) }}{% endfor %}"
    " </tool_call>{% endfor %} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
"""The tiny tokenizer's chat template (see the comment above)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_tiny_tokenizer(vocab: list[str], agent_tokens: bool = False) -> Any:
    """A ``PreTrainedTokenizerFast`` over ``vocab`` plus special tokens, with a chat template.

    Ids: the special tokens, then the words of ``vocab``, then (``agent_tokens``) :data:`AGENT_TOKENS`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = [*SPECIAL_TOKENS, *(AGENT_TOKENS if agent_tokens else [])]
    words: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *vocab, *specials[len(SPECIAL_TOKENS) :]]:
        words.setdefault(token, len(words))
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.add_special_tokens(specials)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=specials[3:],
    )
    fast.chat_template = TINY_CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast


def build_tiny_model(settings: TinyModelSettings, vocab_size: int, pad_id: int, eos_id: int) -> Any:
    """A randomly initialised causal LM (seed torch before calling for reproducible weights)."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    cls = {"qwen2": Qwen2Config, "llama": LlamaConfig}[settings.architecture]
    cfg = cls(
        vocab_size=vocab_size,
        hidden_size=settings.hidden_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads or settings.num_heads,
        intermediate_size=settings.intermediate_size,
        max_position_embeddings=settings.max_position_embeddings,
        tie_word_embeddings=settings.tie_word_embeddings,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
    )
    return AutoModelForCausalLM.from_config(cfg)


def load_model_and_tokenizer(cfg: TorchBackendConfig, seed: int, agent_tokens: bool | None = None) -> tuple[Any, Any]:
    """The policy model (on its device, in its dtype, train mode) and its tokenizer.

    ``agent_tokens``: whether the tiny tokenizer gets :data:`AGENT_TOKENS` (None: ``cfg.tiny.agent_tokens``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device, dtype = resolve_device(cfg.device), resolve_dtype(cfg.dtype)
    if cfg.model_path:
        path = Path(cfg.model_path).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"torch.model_path: {path} is not a local Hugging Face model directory (no config.json); "
                "the torch backend never downloads models"
            )
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(
            path, local_files_only=True, dtype=dtype, attn_implementation=cfg.attn_implementation
        )
        if tokenizer.chat_template is None:
            raise ValueError(f"torch.model_path: the tokenizer in {path} has no chat template")
    else:
        agent = cfg.tiny.agent_tokens if agent_tokens is None else agent_tokens
        tokenizer = build_tiny_tokenizer(cfg.tiny.vocab, agent_tokens=bool(agent))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = build_tiny_model(cfg.tiny, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
        model.config._attn_implementation = cfg.attn_implementation
        model = model.to(dtype=dtype)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    model.config.use_cache = True
    if cfg.lora is not None:
        model = _add_lora(model, cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model.to(device), tokenizer


def _add_lora(model: Any, cfg: TorchBackendConfig) -> Any:
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise ImportError("torch.lora needs peft: pip install 'rllm-torch[peft]'") from exc
    lora = cfg.lora
    assert lora is not None
    return get_peft_model(
        model,
        LoraConfig(
            r=lora.r,
            lora_alpha=lora.alpha,
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        ),
    )


def write_meta(path: Path, cfg: TorchBackendConfig, model: Any, tokenizer: Any, extra: dict[str, Any]) -> None:
    """What :func:`rebuild_from_checkpoint` needs: the model config, the tokenizer and our settings."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base.config.to_json_file(str(path / "config.json"))
    tokenizer.save_pretrained(str(path / "tokenizer"))
    (path / "backend.json").write_text(json.dumps({"torch": cfg.model_dump(mode="json"), **extra}, indent=2))


def rebuild_from_checkpoint(path: Path) -> tuple[Any, Any, TorchBackendConfig]:
    """Model (random weights, same structure, LoRA included) and tokenizer from a checkpoint's metadata."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    meta = json.loads((path / "backend.json").read_text())
    cfg = TorchBackendConfig.model_validate(meta["torch"], context={"check_paths": False})
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path), local_files_only=True))
    if cfg.lora is not None:
        model = _add_lora(model, cfg)
    tokenizer = AutoTokenizer.from_pretrained(str(path / "tokenizer"), local_files_only=True)
    return model, tokenizer, cfg
