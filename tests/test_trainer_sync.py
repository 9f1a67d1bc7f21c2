"""The synchronous loop: stage order, hook calls, versions, grouping, validation, metrics files."""

from __future__ import annotations

import gc
import json

import pytest

from rllm_core.hookspecs import hookimpl
from rllm_core.plugins import registered
from rllm_core.testing import RecordingHooks, simulated_config
from rllm_core.trainer import UnifiedTrainer

REC = "rllm_core.testing:RecordingHooks"
STAGES = [
    "on_batch_start",
    "generate_episodes",
    "transform_to_backend_batch",
    "process_backend_batch",
    "compute_advantages",
    "update_policy",
    "on_policy_updated",
    "on_batch_end",
]


def _trainer(tmp_path, **sections):
    sections.setdefault("hooks", {REC: {}})
    return UnifiedTrainer(simulated_config(tmp_path, **sections))


def test_sync_stage_order_per_step(tmp_path):
    trainer = _trainer(tmp_path, data={"train_batch_size": 8})  # 32 tasks -> 4 steps
    trainer.fit()
    calls = trainer.backend.calls
    assert calls[:2] == ["on_train_start", "on_epoch_start"]
    body = calls[2 : 2 + 4 * len(STAGES)]
    assert body == STAGES * 4
    assert calls[2 + 4 * len(STAGES) :] == ["on_epoch_end", "save_checkpoint", "on_train_end", "shutdown"]


def test_sync_hook_plugin_sees_lifecycle_in_order(tmp_path):
    trainer = _trainer(tmp_path, data={"train_batch_size": 16}, trainer={"epochs": 2})
    trainer.fit()
    rec: RecordingHooks = trainer.hook_plugins[REC]
    expected = [("on_train_start", 0)]
    step = 0
    for epoch in range(2):
        expected.append(("on_epoch_start", epoch))
        for _ in range(2):
            step += 1
            expected += [("on_batch_start", step - 1), ("on_policy_updated", step), ("on_batch_end", float(step))]
        expected.append(("on_epoch_end", epoch))
    expected.append(("on_train_end", 4))
    assert rec.calls == expected


def test_on_policy_updated_once_per_version(tmp_path):
    trainer = _trainer(tmp_path, trainer={"epochs": 2})
    trainer.fit()
    n_steps = 2 * 32 // 4
    assert trainer.backend.policy_versions == list(range(1, n_steps + 1))
    rec = trainer.hook_plugins[REC]
    assert [v for name, v in rec.calls if name == "on_policy_updated"] == list(range(1, n_steps + 1))
    assert trainer.engine.weight_version == n_steps


def test_sync_samples_are_never_stale(tmp_path):
    trainer = _trainer(tmp_path)
    trainer.fit()
    for record in trainer.backend.trained:
        assert record["min_sample_version"] == record["max_sample_version"] == record["policy_version"]


class _CountingGrouping:
    def __init__(self, settings):
        self.calls = 0

    @hookimpl
    def trajectory_grouping_hook(self, episodes, config):
        from rllm_core.grouping import group_episodes

        self.calls += 1
        return group_episodes(episodes)


def test_grouping_hook_plugin_is_used(tmp_path):
    class Plugin:
        @hookimpl
        def register_hooks(self, register):
            register("counting_grouping", _CountingGrouping)

    with registered(Plugin()):
        trainer = _trainer(tmp_path, hooks={"counting_grouping": {}})
        trainer.fit()
    assert trainer.hook_plugins["counting_grouping"].calls == 8


def test_grouping_hook_result_decides_what_is_trained(tmp_path):
    """A grouping hook that keeps only the first task of each batch: one group trained per step."""

    class FirstTaskOnly:
        def __init__(self, settings):
            pass

        @hookimpl
        def trajectory_grouping_hook(self, episodes, config):
            from rllm_core.grouping import group_episodes

            return group_episodes(episodes)[:1]

    class Plugin:
        @hookimpl
        def register_hooks(self, register):
            register("first_only", FirstTaskOnly)

    with registered(Plugin()):
        trainer = _trainer(tmp_path, hooks={"first_only": {}})
        trainer.fit()
    assert [len(r["task_ids"]) for r in trainer.backend.trained] == [1] * 8


def test_postprocess_opsd_runs_on_every_episode_before_grouping(tmp_path):
    seen = []

    class Post:
        def __init__(self, settings):
            pass

        @hookimpl
        async def postprocess_opsd(self, episode, engine, config):
            seen.append(episode.id)
            episode.info["post"] = True

        @hookimpl
        def trajectory_grouping_hook(self, episodes, config):
            from rllm_core.grouping import group_episodes

            assert all(e.info.get("post") for e in episodes)
            return group_episodes(episodes)

    class Plugin:
        @hookimpl
        def register_hooks(self, register):
            register("post", Post)

    with registered(Plugin()):
        trainer = _trainer(tmp_path, hooks={"post": {}})
        trainer.fit()
    assert len(seen) == 32 * 4 and len(set(seen)) == 32 * 4
    assert trainer.runner.failures == {}


def test_policy_learns_with_grpo(tmp_path):
    trainer = _trainer(tmp_path, trainer={"epochs": 3}, rollout={"n": 8}, loggers={"jsonl": {}})
    trainer.fit()
    rewards = [json.loads(x)["train/reward/mean"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(rewards[:3]) / 3 < 0.5 < sum(rewards[-3:]) / 3
    assert trainer.backend.p_correct > 0.8


def test_total_steps_stops_early(tmp_path):
    trainer = _trainer(tmp_path, trainer={"epochs": 5, "total_steps": 3})
    trainer.fit()
    assert trainer.step == 3 and trainer.backend.updates == 3


def test_validation_reports_pass_at_k_per_data_source(tmp_path):
    trainer = _trainer(
        tmp_path,
        data={"val_fraction": 0.25},
        rollout={"n": 4, "n_val": 4},
        trainer={"val_every": 4, "val_before_train": True, "total_steps": 4},
    )
    trainer.fit()
    rec = trainer.hook_plugins[REC]
    val_ends = [m for name, m in rec.calls if name == "on_validation_end"]
    assert len(val_ends) == 2
    metrics = val_ends[-1]
    for k in (1, 2, 4):
        assert 0.0 <= metrics[f"val/pass@{k}"] <= 1.0
    assert metrics["val/pass@1"] <= metrics["val/pass@2"] <= metrics["val/pass@4"]
    assert any(k.startswith("val/small/pass@") or k.startswith("val/large/pass@") for k in metrics)
    assert metrics["val/episodes/count"] == len(trainer.val_tasks) * 4
    assert trainer.backend.calls.count("on_validation_start") == 2


@pytest.mark.parametrize(("val_every", "expected_steps"), [(2, [2, 4]), (3, [3, 4])])
def test_val_at_end_does_not_repeat_a_validation_of_the_final_step(tmp_path, val_every, expected_steps):
    trainer = _trainer(
        tmp_path,
        data={"val_fraction": 0.25},
        trainer={"val_every": val_every, "val_at_end": True, "total_steps": 4},
    )
    trainer.fit()
    rec = trainer.hook_plugins[REC]
    assert [step for name, step in rec.calls if name == "on_validation_start"] == expected_steps
    assert trainer.backend.calls.count("on_validation_start") == len(expected_steps)


def test_run_dir_has_config_and_metrics(tmp_path):
    trainer = _trainer(tmp_path, loggers={"jsonl": {}}, trainer={"total_steps": 3})
    trainer.fit()
    assert (tmp_path / "config.yaml").read_text().count("simulated") >= 2
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3]
    for key in (
        "train/reward/mean",
        "train/episodes/count",
        "time/generate",
        "time/train",
        "timing/gen_idle_frac",
        "throughput/tokens_per_s",
        "async/staleness/max",
        "train/episodes/termination/env_done",
    ):
        assert key in lines[-1], key
    assert lines[-1]["train/episodes/count"] == 16
    episodes = [json.loads(x) for x in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert len(episodes) == 3 * 4 and episodes[0]["task"]["question"].startswith("What is")


def test_request_stop_finishes_step_and_checkpoints(tmp_path):
    class Stopper:
        def __init__(self, settings):
            pass

        @hookimpl
        def on_batch_end(self, trainer, metrics):
            if trainer.step == 2:
                trainer.request_stop()

    class Plugin:
        @hookimpl
        def register_hooks(self, register):
            register("stopper", Stopper)

    with registered(Plugin()):
        trainer = _trainer(tmp_path, hooks={"stopper": {}}, loggers={"jsonl": {}})
        trainer.fit()
    assert trainer.step == 2
    assert trainer.last_checkpoint is not None and trainer.last_checkpoint.name == "step_00000002"
    assert trainer.backend.calls[-2:] == ["on_train_end", "shutdown"]
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2


def test_fit_inside_running_loop_points_to_fit_async(tmp_path):
    import asyncio

    trainer = _trainer(tmp_path)

    async def main():
        with pytest.raises(RuntimeError, match="fit_async"):
            trainer.fit()
        await trainer.fit_async()

    asyncio.run(main())
    assert trainer.step == 8


class _GcWatch:
    """Records, per step, whether Python's automatic collection was on, and the full collections."""

    def __init__(self):
        self.enabled: list[bool] = []
        self.collected_after: list[int] = []  # the step count when each full collection started
        self.trainer = None

    @hookimpl
    def on_batch_end(self, trainer, metrics):
        self.trainer = trainer
        self.enabled.append(gc.isenabled())

    def callback(self, phase, info):
        if phase == "start" and info["generation"] == 2 and self.trainer is not None:
            self.collected_after.append(self.trainer.step)


def _watch_gc(tmp_path, **trainer_section) -> _GcWatch:
    """Train 4 steps (32 tasks, 8 a step) with ``trainer_section``, watching the collector."""
    trainer = _trainer(tmp_path, data={"train_batch_size": 8}, trainer=trainer_section)
    watch = _GcWatch()
    trainer.runner.add("gc_watch", watch)
    gc.callbacks.append(watch.callback)
    try:
        trainer.fit()
    finally:
        gc.callbacks.remove(watch.callback)
    return watch


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_gc_every_collects_between_steps_with_automatic_collection_off(tmp_path, mode):
    assert gc.isenabled()
    watch = _watch_gc(tmp_path, gc_every=2, mode=mode)
    assert watch.enabled == [False] * 4
    assert [s for s in watch.collected_after if s in (1, 2, 3, 4)] == [2, 4]
    assert gc.isenabled()  # restored for whatever the process does next


def test_gc_every_0_leaves_automatic_collection_on(tmp_path):
    assert _watch_gc(tmp_path, gc_every=0).enabled == [True] * 4


def test_gc_is_turned_back_on_when_fit_fails(tmp_path):
    trainer = _trainer(tmp_path)

    async def broken(*args, **kwargs):
        assert not gc.isenabled()
        raise RuntimeError("backend down")

    trainer.backend.update_policy = broken
    with pytest.raises(RuntimeError, match="backend down"):
        trainer.fit()
    assert gc.isenabled()
