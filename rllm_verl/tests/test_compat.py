"""The compatibility module: what it relies on in verl is still there, and what it adds works."""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
from importlib.metadata import requires

import pytest

from rllm_verl import compat


def test_verl_is_pinned_to_the_version_compat_was_written_for():
    compat.check_verl_version()
    assert f"verl=={compat.VERL_VERSION}" in requires("rllm-verl")


def _run(code: str, **env: str) -> str:
    clean = {k: v for k, v in os.environ.items() if k != "VERL_PLATFORM"}
    out = subprocess.run(
        [sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout.strip().splitlines()[-1]


def test_import_verl_registers_the_cpu_platform_through_the_entry_point_but_never_selects_it_alone():
    code = (
        "import sys, verl\n"
        "from verl.plugin.platform import PlatformRegistry, get_platform\n"
        "print('rllm_verl.compat' in sys.modules, PlatformRegistry.get('cpu').__name__, get_platform().device_name)"
    )
    assert _run(code) == "True CPUPlatform cuda"


def test_verl_platform_cpu_selects_it():
    code = "import verl\nfrom verl.plugin.platform import get_platform\nprint(type(get_platform()).__name__)"
    assert _run(code, VERL_PLATFORM="cpu") == "CPUPlatform"


def test_cpu_platform_device_module_answers_what_verl_asks():
    dev = compat.CPUPlatform().device_module
    assert compat.CPUPlatform().current_device() == dev.current_device() == "cpu"
    assert dev.max_memory_allocated() == dev.memory_reserved() == 0
    free, total = dev.mem_get_info()
    assert 0 < free <= total
    assert dev.get_device_properties(0).total_memory == total
    dev.empty_cache()
    dev.synchronize()  # torch.cpu's own
    assert dev.get_rng_state().equal(__import__("torch").get_rng_state())


# -- the premises of each workaround (these fail when verl changes under compat) ------------------


def test_verl_still_builds_a_duplicate_cpu_backend_string_unless_a_group_exists():
    from verl.utils.distributed import initialize_global_process_group_ray

    source = inspect.getsource(initialize_global_process_group_ray)
    assert 'f"cpu:gloo,{get_device_name()}:{get_nccl_backend()}"' in source
    assert "if not torch.distributed.is_initialized():" in source


def test_verl_still_pins_the_reference_offload_and_compat_unpins_it():
    from verl.workers.engine.fsdp import transformer_impl

    assert "CPUOffloadPolicy(pin_memory=True)" in inspect.getsource(transformer_impl.FSDPEngine._build_fsdp_module)
    compat._unpin_reference_offload()
    compat._unpin_reference_offload()  # idempotent: one subclass, not a chain
    policy_cls = transformer_impl.CPUOffloadPolicy
    assert policy_cls.__bases__[0].__name__ == "CPUOffloadPolicy" and policy_cls._rllm_unpinned
    assert policy_cls(pin_memory=True).pin_memory is False


def test_fsdp_engines_are_registered_for_cpu(monkeypatch):
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

    assert {"cuda", "npu"} <= set(EngineRegistry._engines["language_model"]["fsdp2"])  # devices are its keys
    compat._register_cpu_engines()
    compat._register_cpu_engines()  # idempotent (verl asserts on a second registration)
    monkeypatch.setenv("VERL_ENGINE_DEVICE", "cpu")
    assert EngineRegistry.get_engine_cls("language_model", "fsdp2") is FSDPEngineWithLMHead
    assert EngineRegistry.get_engine_cls("value_model", "fsdp") is FSDPEngineWithValueHead


@pytest.mark.parametrize("name", ["register", "get", "registered_names"])
def test_platform_registry_keeps_its_public_api(name):
    from verl.plugin.platform import PlatformRegistry

    assert callable(getattr(PlatformRegistry, name))
