"""One tiny model and, for the slow tests, one Ray cluster (and two verl workers) for the whole session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """``(path, model)``: the tiny model saved for verl, and the same weights in this process."""
    pytest.importorskip("rllm_torch", reason="the tiny model and the reference scores come from rllm-torch")
    from verl_test_helpers import save_tiny_model

    path = tmp_path_factory.mktemp("tiny-qwen2")
    return path, save_tiny_model(path)


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster shared by every test that needs one (started once; joined when already up)."""
    ray = pytest.importorskip("ray")
    from rllm_verl import compat

    compat.use_cpu_platform()
    started = not ray.is_initialized()
    if started:
        env = {"VERL_PLATFORM": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        ray.init(num_cpus=6, include_dashboard=False, runtime_env={"env_vars": env})
    yield ray
    if started:
        ray.shutdown()


@pytest.fixture(scope="session")
def verl_workers(tiny_model, ray_cluster):
    """verl's actor on two gloo ranks (CPU platform, fp32), started once; shut down at the end."""
    from rllm_verl.config import VerlConfig
    from rllm_verl.workers import VerlWorkers

    from rllm_core.config import AlgorithmConfig

    cfg = VerlConfig(
        model_path=str(tiny_model[0]),
        device="cpu",
        world_size=2,
        ray_num_cpus=4,
        max_tokens_per_micro_batch=40,  # several micro-batches per rank: accumulation is exercised
        env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )
    algorithm = AlgorithmConfig.model_validate({"optim": {"lr": 1e-3, "grad_clip": 1.0}})
    workers = VerlWorkers(cfg, algorithm)
    yield workers
    workers.shutdown()


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests need CUDA: elsewhere they are skipped (reported as skipped, never as passed)."""
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items:
        return
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU"))
