"""The ``torch:`` config section of the local backend (validated by the core through the registry)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo

__all__ = ["LoraSettings", "TinyModelSettings", "TorchBackendConfig", "DEFAULT_TINY_VOCAB"]

DEFAULT_TINY_VOCAB: list[str] = [
    *[str(i) for i in range(10)],
    *"abcdefghijklmnopqrstuvwxyz",
    *"+-*/=?.,!:;()",
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)


class TinyModelSettings(_Section):
    """A randomly initialised model with a locally built word-level tokenizer (no downloads)."""

    architecture: Literal["qwen2", "llama"] = "qwen2"
    """transformers architecture the tiny model is built from."""
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    num_kv_heads: int | None = Field(None, ge=1)
    """Grouped-query heads; None: same as ``num_heads``."""
    intermediate_size: int = Field(256, ge=8)
    max_position_embeddings: int = Field(512, ge=16)
    tie_word_embeddings: bool = True
    """Share the input embedding with the output layer (transformers' default for small models)."""
    vocab: list[str] = Field(default_factory=lambda: list(DEFAULT_TINY_VOCAB))
    """Words of the tokenizer (split on whitespace and punctuation); unknown words become ``<unk>``.
    Tool names and argument names a tiny model should write must be words of it."""
    agent_tokens: bool | None = None
    """Add the special tokens of tools, tool calls and reasoning (``<|tool|> <|tools|> <tool_call>
    </tool_call> <arg> <think> </think>``) after the vocabulary's words. None: when
    ``rollout.tool_parser`` or ``rollout.reasoning_parser`` is set. Off, the model's vocabulary (so its
    initialisation and sampling) is exactly what it was before tools existed."""


class LoraSettings(_Section):
    """LoRA adapters through peft (``pip install rllm-torch[peft]``)."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | str = "all-linear"
    """Module names to adapt, or ``all-linear``."""


def _local_model_dir(value: str | None, info: ValidationInfo) -> str | None:
    """A set ``model_path`` must be a local Hugging Face model directory: checked with the config, so a
    wrong path fails before start-up with the field's name. Settings read back from a checkpoint
    (``context={"check_paths": False}``) skip it: the checkpoint holds the weights, and the original
    directory may be on another machine."""
    if value is None or (info.context or {}).get("check_paths") is False:
        return value
    path = Path(value).expanduser()
    if not path.is_dir():
        raise ValueError(
            f"{value} is not a directory; give a local Hugging Face model directory (the torch backend never "
            "downloads models), or leave model_path unset for the tiny random model"
        )
    if not (path / "config.json").is_file():
        raise ValueError(f"{value} is not a local Hugging Face model directory (no config.json)")
    return value


class TorchBackendConfig(_Section):
    """Settings of the local torch backend (section ``torch:``)."""

    model_path: Annotated[str | None, AfterValidator(_local_model_dir)] = None
    """A local Hugging Face causal-LM directory (weights, tokenizer, chat template). None: build ``tiny``."""
    tiny: TinyModelSettings = Field(default_factory=TinyModelSettings)
    """The tiny random model used when ``model_path`` is not set."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Parameter dtype (CPU: float32 is the fast and exact choice)."""
    device: str = "auto"
    """``auto`` (cuda when available, else cpu), ``cpu``, ``cuda``, ``cuda:1``..."""
    attn_implementation: str = "sdpa"
    """transformers attention implementation (``sdpa``, ``eager``, ``flash_attention_2``)."""
    seed: int | None = None
    """Seed for weights init and sampling; None: ``trainer.seed``."""
    num_threads: int | None = Field(None, ge=1)
    """torch CPU threads; None: one for a model under 5M parameters (its ops are too small to split:
    the main job's step is 13% shorter on one thread than on two), else all cores in sync mode and
    half of them in async mode (two threads work at once)."""
    micro_batch_tokens: int = Field(16384, ge=16)
    """Padded tokens per forward/backward; bigger batches are split and gradients accumulated."""
    gen_batch_window_ms: float = Field(5.0, ge=0)
    """How long the sampler waits to gather concurrent requests into one batch."""
    gen_max_batch: int = Field(256, ge=1)
    """Most sequences in one generation batch."""
    max_new_tokens: int = Field(256, ge=1)
    """Default ``max_tokens`` when a request does not set one."""
    lora: LoraSettings | None = None
    """Train LoRA adapters instead of all weights."""
    separate_sampler: bool | None = None
    """Sampler keeps its own copy of the weights; None: only in async mode (so generation and training overlap)."""
    share_prompt_prefix: bool = True
    """Run each distinct prompt of a micro-batch once and its responses against the shared KV cache
    (training and scoring): a group of ``n`` rollouts of one prompt pays for the prompt once. Exact up
    to float rounding; off with ``gradient_checkpointing``."""
    share_identical_rows: bool = False
    """With ``share_prompt_prefix``, also run identical rows once (their logits gathered per row, the
    gradient summed over the copies): a group's answers repeat as the policy sharpens, and late in
    the main job a third of the tokens went. Exact up to float rounding. Off by default: on its
    rounding the main job's recipe stopped at 89 facts of 100 on seed 0 (it lost the ten sums of 9
    and 7+7, and its answers there spread out, which the anchor's same-answer test does not see)."""
    skip_zero_advantage: bool = True
    """Leave out of the forward/backward the rows whose advantages are all 0 (e.g. GRPO groups with
    equal rewards): they add exactly 0 to the gradient. Only when ``entropy_coef`` is 0 and there is
    no KL term (where they would count)."""
    gc_freeze: bool = True
    """After building the model, ``gc.freeze()`` the objects alive so far (torch, transformers, the
    model), so Python's full garbage collections stop re-walking them every few steps."""
    entropy_coef: float = Field(0.0, ge=0)
    """Entropy bonus: subtract ``entropy_coef * entropy`` per token (aggregated like the loss); keeps exploring."""
    gradient_checkpointing: bool = False
    multiturn_cache_size: int = Field(4096, ge=0)
    """Conversations the engine remembers the sampled tokens of, to continue them token-exactly (turn
    k+1's prompt = turn k's prompt + its sampled completion + the new messages); least recently used
    first out. 0: every request is rendered in full."""
