"""The fully-async loop: stage order, versions, staleness bound, drain, grouping, end of data."""

from __future__ import annotations

import random

import pytest

from rllm_core.config import ConfigError
from rllm_core.hookspecs import hookimpl
from rllm_core.plugins import registered
from rllm_core.testing import simulated_config
from rllm_core.trainer import UnifiedTrainer

REC = "rllm_core.testing:RecordingHooks"
TRAIN_STAGES = [
    "on_batch_start",
    "transform_to_backend_batch",
    "process_backend_batch",
    "compute_advantages",
    "update_policy",
]


def _trainer(tmp_path, async_=None, **sections):
    sections.setdefault("hooks", {REC: {}})
    trainer = sections.pop("trainer", {})
    return UnifiedTrainer(
        simulated_config(tmp_path, trainer={"mode": "async", **trainer}, async_=async_ or {}, **sections)
    )


def _train_side(calls):
    # Generation-side events (per-task generation, epoch boundaries) interleave with training.
    return [c for c in calls if c not in ("generate_episodes", "on_epoch_start", "on_epoch_end")]


def test_async_stage_order_per_step(tmp_path):
    trainer = _trainer(tmp_path, simulated={"gen_latency": 0.002, "train_latency": 0.002})
    trainer.fit()
    calls = _train_side(trainer.backend.calls)
    assert calls[0] == "on_train_start"
    assert [c for c in trainer.backend.calls if c.startswith("on_epoch")] == ["on_epoch_start", "on_epoch_end"]
    i, steps = 1, 0
    while calls[i] == "on_batch_start":
        assert calls[i : i + 5] == TRAIN_STAGES
        i += 5
        if calls[i] == "on_policy_updated":
            i += 1
        if calls[i] == "on_epoch_end":  # generation finishes the epoch while training goes on
            i += 1
        assert calls[i] == "on_batch_end"
        i += 1
        steps += 1
    assert steps == 8 and trainer.step == 8
    assert calls[i:] == ["save_checkpoint", "on_train_end", "shutdown"]
    assert trainer.backend.calls.count("generate_episodes") == 32  # one call per task


@pytest.mark.parametrize("sync_every", [1, 2, 3])
def test_async_on_policy_updated_once_per_version(tmp_path, sync_every):
    trainer = _trainer(tmp_path, async_={"sync_every": sync_every, "max_staleness": sync_every}, trainer={"epochs": 2})
    trainer.fit()
    versions = trainer.backend.policy_versions
    expected = list(range(sync_every, 16 + 1, sync_every))
    if expected[-1] != 16:
        expected.append(16)  # the last updates are pushed at the end
    assert versions == expected
    rec = trainer.hook_plugins[REC]
    assert [v for name, v in rec.calls if name == "on_policy_updated"] == expected
    assert trainer.engine.weight_version == 16


def test_sync_every_above_staleness_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match=r"async\.max_staleness"):
        _trainer(tmp_path, async_={"sync_every": 3, "max_staleness": 1})


@pytest.mark.parametrize("seed", range(12))
def test_staleness_bound_holds_under_random_latencies(tmp_path, seed):
    rng = random.Random(seed)
    max_staleness = rng.choice([0, 1, 2])
    sync_every = rng.randint(1, max_staleness + 1)
    trainer = _trainer(
        tmp_path,
        async_={"max_staleness": max_staleness, "sync_every": sync_every, "partial_rollout": rng.random() < 0.5},
        simulated={
            "gen_latency": rng.uniform(0.0005, 0.003),
            "train_latency": rng.uniform(0.0005, 0.004),
            "jitter": rng.uniform(0, 1),
            "seed": seed,
        },
        workflow={
            "name": "simulated",
            "args": {"turns": rng.choice([1, 2])},
            "max_concurrency": rng.choice([2, 8, 64]),
        },
        data={"train_batch_size": rng.choice([2, 4, 5])},
        hooks={},
    )
    trainer.fit()
    assert trainer.backend.trained
    for record in trainer.backend.trained:
        assert record["policy_version"] - record["min_sample_version"] <= max_staleness, (record, max_staleness)
    seen = [t for r in trainer.backend.trained for t in r["task_ids"]]
    assert len(seen) == len(set(seen))  # no task trained twice


def test_async_overlaps_generation_and_training(tmp_path):
    lat = 0.02
    trainer = _trainer(
        tmp_path,
        simulated={"gen_latency": lat, "train_latency": lat},
        loggers={"jsonl": {}},
        workflow={"name": "simulated", "max_concurrency": 64},
    )
    trainer.fit()
    # Async did more than sync could: a sync step is gen + train, so busy time must overlap.
    m = trainer.last_metrics
    assert m["async/staleness/max"] <= 1
    for key in (
        "time/generate",
        "time/train",
        "timing/gen_idle_frac",
        "timing/train_idle_frac",
        "async/dropped_stale",
        "throughput/tokens_per_s",
    ):
        assert key in m


def test_training_consumes_queue_after_generation_finished(tmp_path):
    """Fast generation, slow training: generation ends long before training, which still trains all tasks."""
    trainer = _trainer(
        tmp_path, async_={"max_staleness": 8}, simulated={"gen_latency": 0.0, "train_latency": 0.01}, hooks={}
    )
    trainer.fit()
    trained = sorted(t for r in trainer.backend.trained for t in r["task_ids"])
    assert trained == sorted(f"t{i}" for i in range(32))
    assert trainer.step == 8


def test_grouping_hook_used_in_async(tmp_path):
    calls = []

    class Grouping:
        def __init__(self, settings):
            pass

        @hookimpl
        def trajectory_grouping_hook(self, episodes, config):
            from rllm_core.grouping import group_episodes

            calls.append(len(episodes))
            return group_episodes(episodes)

    class Plugin:
        @hookimpl
        def register_hooks(self, register):
            register("g", Grouping)

    with registered(Plugin()):
        trainer = _trainer(tmp_path, hooks={"g": {}})
        trainer.fit()
    assert calls == [16] * 8


def test_drain_keeps_episodes_on_one_version(tmp_path):
    trainer = _trainer(
        tmp_path,
        async_={"partial_rollout": False},
        workflow={"name": "simulated", "args": {"turns": 3}},
        simulated={"gen_latency": 0.002, "train_latency": 0.003, "jitter": 0.9},
    )
    trainer.fit()
    for record in trainer.backend.trained:
        assert record["episode_versions_mixed"] == 0, record


def test_async_total_steps_stops_and_cancels_generation(tmp_path):
    trainer = _trainer(
        tmp_path, trainer={"epochs": 10, "total_steps": 3}, simulated={"gen_latency": 0.01, "train_latency": 0.001}
    )
    trainer.fit()
    assert trainer.step == 3 and trainer.backend.updates == 3
    assert trainer.backend.policy_versions[-1] == 3
