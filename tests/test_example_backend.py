"""The third-party backend template (plugins/example_backend), installed like any plugin.

It must be found through its installed ``rllm`` entry point (not imported by the core), show up
in ``rllm plugins`` with its version, and train through ``UnifiedTrainer`` from config alone.
"""

from __future__ import annotations

import json
from importlib.metadata import entry_points

import pytest

from rllm_core.config import load_config
from rllm_core.plugins import get_registry, plugin_infos

pytest.importorskip("rllm_example_backend", reason="pip install -e plugins/example_backend")


def example_config(tmp_path, **sections):
    base = {
        "backend": "example",
        "example": {"lr": 2.0, "seed": 1},
        "workflow": {"name": "rllm_example_backend.tasks:answer_workflow"},
        "reward": {"name": "rllm_example_backend.tasks:exact_match"},
        "data": {"train": "rllm_example_backend.tasks:make_tasks", "train_batch_size": 4, "shuffle": False},
        "rollout": {"n": 8},
        "trainer": {"run_dir": str(tmp_path), "total_steps": 24, "epochs": 100, "resume": "off"},
        "loggers": {},
    }
    return load_config(base, sections)


def test_found_through_its_installed_entry_point():
    (ep,) = [ep for ep in entry_points(group="rllm") if ep.name == "example"]
    assert ep.value == "rllm_example_backend.plugin"
    assert ep.dist.metadata["Name"] == "rllm-example-backend"

    from rllm_example_backend.backend import ExampleBackend

    reg = get_registry().get("backend", "example")
    assert reg.obj is ExampleBackend
    assert reg.plugin == "example"
    assert reg.options["priority"] < 0  # never the default over a real backend
    info = next(i for i in plugin_infos() if i.name == "example")
    assert (info.dist, info.version, info.errors) == ("rllm-example-backend", ep.dist.version, [])
    assert info.registers == {"backend": ["example"]}


def test_listed_by_rllm_plugins_with_its_version(capsys):
    from rllm_core.cli import main

    assert main(["plugins", "--json"]) == 0
    rows = {row["name"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows["example"]["distribution"] == "rllm-example-backend"
    assert rows["example"]["version"] == "0.1.0"
    assert rows["rllm.opsd"]["registers"] == {"hook": ["opsd"]}
    for name, dist in (("wandb", "rllm-wandb"), ("mlflow", "rllm-mlflow")):
        if name in rows:
            assert rows[name]["distribution"] == dist and rows[name]["version"] and not rows[name]["errors"]


def test_trains_through_the_unified_trainer_with_rising_reward(tmp_path):
    from rllm_core.trainer import UnifiedTrainer

    trainer = UnifiedTrainer(
        example_config(
            tmp_path,
            data={"train": [{"id": f"q{a}", "question": f"{a} + 1 = ?", "answer": str(a + 1)} for a in range(4)]},
        )
    )
    rewards: list[float] = []

    class Recorder:
        from rllm_core import hookimpl

        @hookimpl
        def on_batch_end(self, trainer, metrics):
            correct = [e.is_correct for e in trainer.state.episodes]
            rewards.append(sum(correct) / len(correct))

    trainer.runner.add("recorder", Recorder())
    trainer.fit()
    assert trainer.step == 24 and trainer.served_version == 24
    assert trainer.engine.weight_version == 24
    assert len(rewards) == 24
    assert sum(rewards[:3]) / 3 < 0.4  # chance is 1/10
    assert sum(rewards[-3:]) / 3 > 0.8
    assert trainer.runner.failures == {}


def test_checkpoint_and_resume_through_the_trainer(tmp_path):
    from rllm_core.trainer import UnifiedTrainer

    first = UnifiedTrainer(example_config(tmp_path, trainer={"total_steps": 3, "save_every": 3}))
    first.fit()
    logits = first.backend.logits
    assert logits

    resumed = UnifiedTrainer(example_config(tmp_path, trainer={"total_steps": 3, "resume": "auto"}))
    resumed.fit()  # nothing left to do: it restores and stops
    assert resumed.resumed_from is not None
    assert resumed.backend.logits == logits
    assert resumed.backend.updates == 3
    assert resumed.engine.weight_version == 3
