"""The one module that depends on verl's internals (verl is pinned to :data:`VERL_VERSION` exactly).

What it does, and why each piece is needed (``tests/test_compat.py`` fails loudly if verl changes under it):

1. **A CPU platform for verl** (:class:`CPUPlatform`), registered with verl's public
   ``PlatformRegistry`` when this module is imported. This module is the ``cpu`` entry point of
   group ``verl.plugins`` (``import verl`` loads that group in every process, Ray workers
   included), so setting ``VERL_PLATFORM=cpu`` in a worker's environment is enough to select it.
   It is never selected by auto-detection (``is_platform_available`` is False): on a GPU machine,
   or on a CPU machine without ``VERL_PLATFORM=cpu``, verl behaves as if this package were absent.
   Its ``current_device()`` is ``"cpu"`` (verl passes it to ``.to(device=...)``) and its device
   module is ``torch.cpu`` plus stand-ins for the ``torch.cuda`` memory and RNG functions verl calls.

2. :func:`prepare_worker_process`, called first thing in every engine worker on the CPU platform:

   * **a plain gloo process group**: verl initialises ``f"cpu:gloo,{device}:{backend}"``, which on
     CPU is ``"cpu:gloo,cpu:gloo"`` and torch rejects as a duplicate device type; verl skips its own
     initialisation when a group already exists.
   * **the FSDP engines registered for device "cpu"**: ``FSDPEngineWithLMHead`` and
     ``FSDPEngineWithValueHead`` are registered for ``cuda`` and ``npu`` only
     (``EngineRegistry.register`` is public; whether a key is already there is read from the
     private ``EngineRegistry._engines``, because registering twice asserts).
   * **the reference engine's CPU offload without pinned memory**: the FSDP2 engine builds a
     forward-only (reference) model with a hard-coded ``CPUOffloadPolicy(pin_memory=True)``, and
     pinning needs an accelerator. There is no config knob; the name ``CPUOffloadPolicy`` in
     ``verl.workers.engine.fsdp.transformer_impl`` is replaced by a subclass that always passes
     ``pin_memory=False``. The actor (not forward-only) never builds one.

3. :func:`register_torch_rollout`: verl's rollout registry (``_ROLLOUT_REGISTRY`` in
   ``verl.workers.rollout.base``, a private dict with no public register function) gets
   :class:`rllm_verl.rollout.TorchRollout` under ``("rllm_torch", "async")``, so that
   ``actor_rollout_ref.rollout.name=rllm_torch`` builds it in each engine worker. Called in every
   engine worker (any platform) by :func:`prepare_worker_process`.

Nothing else in rllm-verl imports a private verl name.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from types import SimpleNamespace
from typing import Any

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry

__all__ = [
    "CPU_PLATFORM",
    "TORCH_ROLLOUT",
    "VERL_VERSION",
    "CPUPlatform",
    "check_verl_version",
    "prepare_worker_process",
    "register_torch_rollout",
    "use_cpu_platform",
]

VERL_VERSION = "0.9.1"
"""The verl release this module was written against (and the one ``pyproject.toml`` pins)."""

TORCH_ROLLOUT = "rllm_torch"
"""``actor_rollout_ref.rollout.name`` of :class:`rllm_verl.rollout.TorchRollout`."""

CPU_PLATFORM = "cpu"
"""``VERL_PLATFORM`` value that selects :class:`CPUPlatform`."""


def check_verl_version() -> None:
    """Fail early, naming the versions, when the installed verl is not the pinned one."""
    import verl

    if verl.__version__ != VERL_VERSION:
        raise RuntimeError(
            f"rllm-verl supports verl {VERL_VERSION} exactly (its compatibility module reaches into verl's "
            f"internals); installed: verl {verl.__version__}. pip install 'verl=={VERL_VERSION}'"
        )


# -- 1. the CPU platform ------------------------------------------------------------------------


def _nothing(*_args: Any, **_kwargs: Any) -> None:
    return None


def _zero(*_args: Any, **_kwargs: Any) -> int:
    return 0


def _mem_get_info(*_args: Any) -> tuple[int, int]:
    import psutil

    mem = psutil.virtual_memory()
    return mem.available, mem.total


class _CPUDeviceModule:
    """What verl calls on ``get_torch_device()``: ``torch.cpu``, plus stand-ins for the CUDA-only
    memory, allocator and RNG functions (memory counters read 0; the RNG is torch's CPU one)."""

    current_device = staticmethod(lambda: "cpu")
    device_count = staticmethod(lambda: 1)
    set_device = staticmethod(_nothing)
    empty_cache = staticmethod(_nothing)
    ipc_collect = staticmethod(_nothing)
    reset_peak_memory_stats = staticmethod(_nothing)
    reset_accumulated_memory_stats = staticmethod(_nothing)
    set_per_process_memory_fraction = staticmethod(_nothing)
    memory_allocated = staticmethod(_zero)
    memory_reserved = staticmethod(_zero)
    max_memory_allocated = staticmethod(_zero)
    max_memory_reserved = staticmethod(_zero)
    mem_get_info = staticmethod(_mem_get_info)
    get_rng_state = staticmethod(lambda *_a: torch.get_rng_state())
    set_rng_state = staticmethod(lambda state, *_a: torch.set_rng_state(state))
    manual_seed = staticmethod(lambda seed: torch.manual_seed(seed))
    manual_seed_all = staticmethod(lambda seed: torch.manual_seed(seed))
    get_device_name = staticmethod(lambda *_a: "cpu")

    @staticmethod
    def get_device_properties(*_args: Any) -> SimpleNamespace:
        return SimpleNamespace(name="cpu", total_memory=_mem_get_info()[1])

    def __getattr__(self, name: str) -> Any:  # synchronize, is_available, Stream, Event, stream, ...
        return getattr(torch.cpu, name)


class CPUPlatform(PlatformBase):
    """verl on CPU: gloo collectives, fp32, no accelerator (selected only by ``VERL_PLATFORM=cpu``)."""

    _device = _CPUDeviceModule()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> Any:
        return self._device

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        return False  # never auto-detected: only VERL_PLATFORM=cpu selects it

    def current_device(self) -> str:  # type: ignore[override]  # verl passes it to .to(device=...)
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        return None

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "CPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {}

    def ray_noset_envvars(self) -> list[str]:
        return []

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


if PlatformRegistry.get(CPU_PLATFORM) is None:
    PlatformRegistry.register(platform=CPU_PLATFORM)(CPUPlatform)


def use_cpu_platform() -> None:
    """Select the CPU platform in this process (the driver); workers get ``VERL_PLATFORM=cpu``."""
    from verl.plugin.platform import get_platform, set_platform

    os.environ["VERL_PLATFORM"] = CPU_PLATFORM
    if not isinstance(get_platform(), CPUPlatform):
        set_platform(CPUPlatform())


# -- 2. what an engine worker needs on the CPU platform ----------------------------------------


def prepare_worker_process() -> None:
    """In an engine worker, before verl builds anything: the torch rollout registered; on the CPU
    platform also the gloo process group, the FSDP engines for device "cpu" and the unpinned
    reference offload (module docstring)."""
    from verl.plugin.platform import get_platform

    register_torch_rollout()
    if not isinstance(get_platform(), CPUPlatform):
        return
    _init_gloo_process_group()
    _register_cpu_engines()
    _unpin_reference_offload()


def _init_gloo_process_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        # RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT are set by verl's RayWorkerGroup
        dist.init_process_group(backend="gloo", init_method="env://")


def _register_cpu_engines() -> None:
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import FSDPEngineWithLMHead, FSDPEngineWithValueHead

    for model_type, engine in (("language_model", FSDPEngineWithLMHead), ("value_model", FSDPEngineWithValueHead)):
        for backend in ("fsdp", "fsdp2"):
            if CPU_PLATFORM not in EngineRegistry._engines.get(model_type, {}).get(backend, {}):
                EngineRegistry.register(model_type=model_type, backend=backend, device=CPU_PLATFORM)(engine)


def _unpin_reference_offload() -> None:
    from verl.workers.engine.fsdp import transformer_impl

    base = transformer_impl.CPUOffloadPolicy
    if getattr(base, "_rllm_unpinned", False):
        return

    class UnpinnedCPUOffloadPolicy(base):  # type: ignore[misc, valid-type]
        """``CPUOffloadPolicy`` that never pins host memory (pinning needs an accelerator)."""

        _rllm_unpinned = True

        def __init__(self, pin_memory: bool = False) -> None:
            super().__init__(pin_memory=False)

    transformer_impl.CPUOffloadPolicy = UnpinnedCPUOffloadPolicy


def register_torch_rollout() -> None:
    """``rollout.name=rllm_torch`` builds :class:`rllm_verl.rollout.TorchRollout` (module docstring, 3)."""
    from verl.workers.rollout import base

    base._ROLLOUT_REGISTRY.setdefault((TORCH_ROLLOUT, "async"), "rllm_verl.rollout.TorchRollout")
