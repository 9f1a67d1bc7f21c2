"""Builders for the agent tests: a model whose samples a test can script, and a Qwen-style tokenizer.

Both are made here, with no download: the Qwen-style tokenizer is a byte-level BPE trained on a few
sentences, with ``<|im_start|>``/``<|im_end|>`` special tokens, ``<tool_call>``/``<think>`` added
tokens and a chat template written after Qwen2.5's (tools in the system prompt, Hermes tool calls,
tool results grouped in one user turn).
"""

from __future__ import annotations

from typing import Any

import torch

QWEN_LIKE_TEMPLATE = (
    "{%- if tools %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    '{{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n'
    'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}'
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    '{{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments '
    'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}'
    "{%- else %}"
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    '{{- \'\\n<tool_call>\\n{"name": "\' }}{{- tool_call.name }}{{- \'", "arguments": \' }}'
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_CORPUS = [
    "You are a helpful assistant. What is 3 + 4? The answer is 7. Thanks! And 1 + 1?",
    '{"name": "add", "arguments": {"a": 3, "b": 4}} {"type": "function", "function": {"name": "add"}}',
    "Let me add the numbers. I should call the tool. The tool said 7. So the answer is 2.",
    "<tool_response>\n7\n</tool_response> # Tools You may call one or more functions",
]


def build_qwen_like_tokenizer() -> Any:
    """A byte-level BPE ``PreTrainedTokenizerFast`` with Qwen's markers and :data:`QWEN_LIKE_TEMPLATE`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS, trainer)
    # Qwen's <tool_call> and <think> are added tokens, not special ones: decoding keeps them.
    tok.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t in ("<tool_call>", "</tool_call>", "<think>", "</think>")]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = QWEN_LIKE_TEMPLATE
    fast.padding_side = "left"
    return fast


class ScriptedModel(torch.nn.Module):
    """A real causal LM whose next tokens a test dictates: after each prompt pass the ``k``-th decoding
    step's logits are replaced by a distribution on ``script[k]`` (the model's own logits once the
    script runs out). Everything else (batching, KV cache, sampling, logprobs, decoding, parsing,
    multi-turn bookkeeping) is the engine's own code path."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model
        self.script: list[int] = []
        self._step = 0

    @property
    def generation_config(self) -> Any:
        return getattr(self.model, "generation_config", None)

    def forward(self, input_ids: Any, past_key_values: Any = None, **kwargs: Any) -> Any:
        prompt_pass = past_key_values is None or past_key_values.get_seq_length() == 0
        out = self.model(input_ids=input_ids, past_key_values=past_key_values, **kwargs)
        if prompt_pass:
            self._step = 0
        if self._step < len(self.script):
            forced = torch.full_like(out.logits[:, -1, :], -1e4)
            forced[:, self.script[self._step]] = 0.0
            out.logits[:, -1, :] = forced
        self._step += 1
        return out


def qwen_like_engine(tool_parser: str = "hermes", reasoning_parser: str | None = "think", **engine_kwargs: Any):
    """A torch engine over a tiny random Qwen2 model, the Qwen-style tokenizer and a :class:`ScriptedModel`."""
    from rllm_torch.config import TinyModelSettings
    from rllm_torch.engine import SamplerRuntime, TorchRolloutEngine
    from rllm_torch.model import build_tiny_model

    from rllm_core.parsers import build_parser

    tok = build_qwen_like_tokenizer()
    torch.manual_seed(0)
    model = build_tiny_model(TinyModelSettings(hidden_size=32), len(tok), tok.pad_token_id, tok.eos_token_id).eval()
    scripted = ScriptedModel(model)
    runtime = SamplerRuntime(scripted, tok, seed=0, max_new_tokens=64)
    engine = TorchRolloutEngine(
        runtime,
        window_s=0.0,
        tool_parser=build_parser("tool_parser", tool_parser),
        reasoning_parser=build_parser("reasoning_parser", reasoning_parser),
        **engine_kwargs,
    )
    return engine, scripted, tok
