"""Sampling-parameter mapping, length limits, and start-up that fails fast (real SDK clients)."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from rllm_tinker.backend import TinkerBackend, TinkerSetupError
from rllm_tinker.engine import sampling_params, to_openai_tool_calls, to_renderer_messages

from rllm_core.config import RLLMConfig
from rllm_core.protocol import TrainerState


def test_defaults_map_and_stop_falls_back_to_the_renderer():
    p = sampling_params({"temperature": 0.7, "max_tokens": 5, "top_p": 0.9}, 3, 100, [42])
    assert (p.temperature, p.max_tokens, p.top_p, p.top_k, p.stop) == (0.7, 5, 0.9, -1, [42])
    assert sampling_params({"stop": "END"}, 3, 100, [42]).stop == ["END"]
    assert sampling_params({"stop_token_ids": [7, 8]}, 3, 100, [42]).stop == [7, 8]
    assert sampling_params({"max_new_tokens": 3, "seed": 5}, 3, 100, [42]).seed == 5


def test_temperature_zero_is_sent_as_top_k_one():
    p = sampling_params({"temperature": 0.0, "max_tokens": 4}, 3, 100, [1])
    assert p.top_k == 1 and p.temperature == 1.0


def test_max_tokens_is_clamped_to_the_context_and_a_full_prompt_gets_nothing():
    assert sampling_params({"max_tokens": 50}, 90, 100, [1]).max_tokens == 10
    assert sampling_params({}, 90, 100, [1]).max_tokens == 10  # unset: what is left
    assert sampling_params({"max_tokens": 5}, 100, 100, [1]) is None


@pytest.mark.parametrize("key", ["min_p", "repetition_penalty", "frequency_penalty"])
def test_keys_tinker_lacks_are_errors_that_name_them(key):
    with pytest.raises(ValueError, match=key):
        sampling_params({key: 0.1}, 3, 100, [1])


def test_more_than_one_sample_per_call_is_refused():
    with pytest.raises(ValueError, match="n"):
        sampling_params({"n": 2}, 3, 100, [1])


def test_tool_calls_round_trip_between_openai_dicts_and_cookbook_objects():
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    (msg,) = to_renderer_messages([{"role": "assistant", "content": "", "tool_calls": [call]}])
    assert msg["tool_calls"][0].function.name == "add"
    assert to_openai_tool_calls(msg["tool_calls"]) == [call]
    (tool,) = to_renderer_messages([{"role": "tool", "content": "2", "tool_call_id": "c1", "name": "add"}])
    assert tool == {"role": "tool", "content": "2", "tool_call_id": "c1", "name": "add"}
    (dict_args,) = to_renderer_messages(
        [{"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {"x": 1}}}]}]
    )
    assert dict_args["tool_calls"][0].function.arguments == '{"x": 1}'


def _backend(**tinker_cfg) -> TinkerBackend:
    cfg = RLLMConfig.model_validate({"backend": "tinker", "tinker": {"base_model": "Qwen/Qwen3-8B", **tinker_cfg}})
    return TinkerBackend(cfg)


def test_a_missing_api_key_fails_at_once_and_names_the_variable(monkeypatch):
    monkeypatch.delenv("TINKER_API_KEY", raising=False)
    backend = _backend()
    start = time.perf_counter()
    with pytest.raises(TinkerSetupError, match=r"\$TINKER_API_KEY"):
        asyncio.run(backend.on_train_start(TrainerState()))
    assert time.perf_counter() - start < 5


def test_an_unreachable_service_fails_within_seconds(monkeypatch):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("TINKER_API_KEY", "tml-not-a-real-key")
    backend = _backend(base_url=f"http://127.0.0.1:{port}", connect_timeout_s=2)
    start = time.perf_counter()
    with pytest.raises(TinkerSetupError, match="unreachable"):
        asyncio.run(backend.on_train_start(TrainerState()))
    assert time.perf_counter() - start < 5


def test_the_key_never_comes_from_the_config_file():
    with pytest.raises(Exception, match="never read from a config file"):
        _backend(api_key="tml-secret")


def test_listing_plugins_does_not_import_tinker():
    import json
    import subprocess
    import sys

    probe = (
        "import sys, json\nfrom rllm_core.plugins import get_registry\nreg = get_registry()\n"
        "assert 'tinker' in reg.names('backend')\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} & {'tinker', 'tinker_cookbook', 'torch'})))"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
