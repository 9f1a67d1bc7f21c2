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
    "SPECIAL_TOKENS",
    "TINY_CHAT_TEMPLATE",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "load_model_and_tokenizer",
    "resolve_device",
    "resolve_dtype",
]

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]

# Each message is "<|role|> content <eos>"; the assistant's turn ends with <eos>, which is the
# token generation stops at.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <eos> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def build_tiny_tokenizer(vocab: list[str]) -> Any:
    """A ``PreTrainedTokenizerFast`` over ``vocab`` plus special tokens, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, *vocab]:
        words.setdefault(token, len(words))
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation(behavior="isolated")]
    )
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
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


def load_model_and_tokenizer(cfg: TorchBackendConfig, seed: int) -> tuple[Any, Any]:
    """The policy model (on its device, in its dtype, train mode) and its tokenizer."""
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
        tokenizer = build_tiny_tokenizer(cfg.tiny.vocab)
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
