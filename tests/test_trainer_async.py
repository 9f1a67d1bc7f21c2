"""The fully-async loop: stage order, versions, staleness bound, drain, grouping, end of data."""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time

import pytest

from rllm_core.config import ConfigError
from rllm_core.hookspecs import hookimpl
from rllm_core.plugins import registered
from rllm_core.testing import SimulatedBackend, simulated_config, simulated_workflow
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


def _sum(trainer, key):
    return sum(m.get(key, 0.0) for m in trainer.hook_plugins[REC].metrics_by_step.values())


class _LateFirstDelivery(SimulatedBackend):
    """Holds back the first rollouts of some tasks until training has moved on: they arrive stale."""

    def __init__(self, config, late):
        super().__init__(config)
        self.late = set(late)
        self.trainer = None

    async def generate_episodes(self, batch, workflow_engine, is_validation=False):
        episodes = await super().generate_episodes(batch, workflow_engine, is_validation)
        task_id = batch[0]["id"]
        if task_id in self.late:
            self.late.discard(task_id)  # a retry is delivered on time
            while self.trainer.weight_version < 3:
                await asyncio.sleep(0.005)
        return episodes


@pytest.mark.timeout(60)
def test_stale_dropped_tasks_are_requeued_and_trained(tmp_path):
    cfg = simulated_config(
        tmp_path,
        trainer={"mode": "async"},
        async_={"max_staleness": 1, "partial_rollout": True},
        simulated={"gen_latency": 0.001, "train_latency": 0.002},
        hooks={REC: {}},
    )
    backend = _LateFirstDelivery(cfg, late=())
    trainer = UnifiedTrainer(cfg, backend=backend)
    backend.trainer = trainer
    backend.late = {trainer.loader.task_at(0, pos)["id"] for pos in range(3)}  # generated with version 0
    trainer.fit()
    dropped = _sum(trainer, "async/dropped_stale")
    assert dropped == 3  # what makes this test meaningful: the late ones were too stale to train
    assert _sum(trainer, "async/requeued") == dropped and _sum(trainer, "async/given_up") == 0
    trained = [t for r in backend.trained for t in r["task_ids"]]
    assert sorted(trained) == sorted(f"t{i}" for i in range(32))  # every task, once
    for record in backend.trained:
        assert record["policy_version"] - record["min_sample_version"] <= 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("partial_rollout", [True, False], ids=["waiting-for-episodes", "waiting-for-a-drain"])
def test_request_stop_wakes_a_blocked_training_loop(tmp_path, partial_rollout):
    holder = {}

    async def hangs_on_t9(task, engine):
        if task["id"] == "t9":
            trainer = holder["trainer"]
            if partial_rollout:  # the 31 other tasks fill 7 steps; the 8th waits for this one
                while trainer.step < 7:
                    await asyncio.sleep(0.005)
            # else the first weight sync after this task started waits for it to drain
            await asyncio.sleep(0.2)
            trainer.request_stop()
            await asyncio.Event().wait()  # never finishes
        return await simulated_workflow(task, engine)

    cfg = simulated_config(
        tmp_path,
        trainer={"mode": "async"},
        async_={"partial_rollout": partial_rollout},
        workflow={"name": "simulated"},
    )
    trainer = holder["trainer"] = UnifiedTrainer(cfg, workflow=hangs_on_t9)
    trainer.fit()
    assert 0 < trainer.step < 8 and (trainer.step == 7 or not partial_rollout)
    assert trainer.last_checkpoint is not None and trainer.last_checkpoint.name == f"step_{trainer.step:08d}"
    saved = json.loads((trainer.last_checkpoint / "trainer_state.json").read_text())
    pending_ids = {trainer.loader.task_at(e, p)["id"] for e, p in saved["pending"]}
    assert "t9" in pending_ids  # generated again on resume
    assert trainer.backend.calls[-2:] == ["on_train_end", "shutdown"]


class _EpochProgress:
    """Records how many tasks had been trained on when each epoch ended."""

    def __init__(self, settings):
        self.trained = 0
        self.at_epoch_end = {}

    @hookimpl
    def on_batch_end(self, trainer, metrics):
        self.trained += len(trainer.state.batch)

    @hookimpl
    def on_epoch_end(self, trainer, epoch):
        self.at_epoch_end[epoch] = self.trained


@pytest.mark.timeout(60)
def test_on_epoch_end_fires_once_the_epochs_last_task_is_trained(tmp_path):
    class Plugin:
        @hookimpl
        def register_hooks(self, register):
            register("progress", _EpochProgress)

    with registered(Plugin()):
        trainer = _trainer(
            tmp_path,
            trainer={"epochs": 2},
            async_={"max_staleness": 2},
            simulated={"gen_latency": 0.001, "train_latency": 0.002},
            hooks={"progress": {}},
        )
        trainer.fit()
    progress = trainer.hook_plugins["progress"]
    # Epoch 0's last task is trained at the earliest in the step that reaches 32 tasks.
    assert progress.at_epoch_end[0] >= 32
    assert progress.at_epoch_end[1] == 64
    assert trainer.backend.calls.count("on_epoch_end") == 2
    assert trainer.backend.calls[-3:] == ["save_checkpoint", "on_train_end", "shutdown"]


class _SlowSave(SimulatedBackend):
    """A save that takes a while and records what ran meanwhile."""

    def __init__(self, config):
        super().__init__(config)
        self.saves = []

    def save_checkpoint(self, path):
        calls, updates = self.rollout_engine.calls, self.updates
        time.sleep(0.3)
        self.saves.append(
            {
                "on_main_thread": threading.current_thread() is threading.main_thread(),
                "model_calls": self.rollout_engine.calls - calls,
                "updates": self.updates - updates,
            }
        )
        super().save_checkpoint(path)


@pytest.mark.timeout(60)
def test_checkpoint_is_written_off_the_event_loop_while_generation_goes_on(tmp_path):
    cfg = simulated_config(
        tmp_path,
        trainer={"mode": "async", "save_every": 2},
        async_={"max_staleness": 4},
        simulated={"gen_latency": 0.03, "train_latency": 0.001},
        workflow={"name": "simulated", "max_concurrency": 4},
    )
    backend = _SlowSave(cfg)
    trainer = UnifiedTrainer(cfg, backend=backend)
    trainer.fit()
    assert len(backend.saves) == 4 and trainer.step == 8
    assert not any(s["on_main_thread"] for s in backend.saves)
    assert backend.saves[0]["model_calls"] > 0  # generation went on during the first save
    assert all(s["updates"] == 0 for s in backend.saves)  # but no update ran while saving
