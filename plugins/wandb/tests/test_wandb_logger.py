"""The wandb logger writes a real offline run; the tests read its ``.wandb`` file back.

The reader below decodes the run file's record log (wandb's LevelDB-style framing of
``wandb_internal_pb2.Record`` protos) with wandb's own proto classes.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path
from typing import Any

import pytest
from rllm_wandb import WandbLogger

from rllm_core.config import ConfigError, load_config, validate_plugin_sections
from rllm_core.plugins import get_registry
from rllm_core.types import Episode, ModelOutput, Step, Trajectory

_BLOCK = 32 * 1024
_HEADER = 7  # ':W&B' + magic (2 bytes) + version (1 byte)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    payloads, pending, pos = [], b"", _HEADER
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if pos + 7 + length > len(data):  # still being written
            break
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == _FULL:
            payloads.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            payloads.append(pending + chunk)
    records = []
    for raw in payloads:
        record = pb.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def run_records(run_path: Path, timeout: float = 20.0) -> list[Any]:
    """The run's records once wandb-core has written them all (its writer may finish just after
    ``run.finish()`` returns; the ``exit`` record comes last)."""
    deadline = time.monotonic() + timeout
    while True:
        files = list(run_path.glob("run-*.wandb"))
        records = read_records(files[0]) if files else []
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.05)


def history(records: list[Any]) -> list[dict[str, Any]]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item})
    return rows


def run_config(records: list[Any]) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        updates = r.run.config.update if kind == "run" else r.config.update if kind == "config" else []
        for item in updates:
            config["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return config


def episode(task_id: str, rollout: int, answer: str, reward: float) -> Episode:
    messages = [{"role": "user", "content": f"question {task_id}"}]
    step = Step.from_model_output(ModelOutput(text=answer, content=answer, completion_ids=[1]), messages)
    return Episode(
        task_id=task_id,
        rollout_idx=rollout,
        is_correct=reward > 0,
        trajectories=[Trajectory(name="solver", steps=[step], reward=reward)],
    )


def offline_logger(tmp_path: Path, **settings: Any) -> WandbLogger:
    config = load_config({"trainer": {"project": "rllm-test", "name": "wb"}})
    return WandbLogger({"mode": "offline", **settings}, run_dir=tmp_path, config=config)


def test_offline_run_holds_config_metrics_and_episode_table(tmp_path):
    logger = offline_logger(tmp_path, tags=["ci"])
    logger.log_config({"algorithm": {"adv_estimator": "grpo"}, "trainer": {"seed": 7}})
    logger.log_metrics(1, {"train/reward/mean": 0.25, "train/loss": 1.5})
    logger.log_metrics(2, {"train/reward/mean": 0.75, "train/loss": 0.5})
    logger.log_episodes(2, [episode("t/1", 0, "42", 1.0), episode("t/1", 1, "41", 0.0)])
    run_path = logger.run_path
    logger.close()

    assert run_path.name.startswith("offline-run-") and run_path.parent == tmp_path / "wandb"
    records = run_records(run_path)
    rows = history(records)
    by_step = {row["_step"]: row for row in rows}
    assert by_step[1]["train/reward/mean"] == 0.25 and by_step[1]["train/loss"] == 1.5
    assert by_step[2]["train/reward/mean"] == 0.75 and by_step[2]["train/loss"] == 0.5
    assert by_step[2]["episodes/_type"] == "table-file"

    config = run_config(records)
    assert config["algorithm"] == {"adv_estimator": "grpo"}
    assert config["trainer"] == {"seed": 7}

    table = json.loads((run_path / "files" / by_step[2]["episodes/path"]).read_text())
    assert table["columns"] == ["step", "task_id", "rollout", "role", "prompt", "response", "reward", "is_correct"]
    assert table["data"] == [
        [2, "t/1", 0, "solver", "user: question t/1", "42", 1.0, True],
        [2, "t/1", 1, "solver", "user: question t/1", "41", 0.0, False],
    ]


def test_project_and_name_default_to_the_trainer_section(tmp_path):
    logger = offline_logger(tmp_path)
    run_path = logger.run_path
    logger.close()
    run = next(r.run for r in run_records(run_path) if r.WhichOneof("record_type") == "run")
    assert run.project == "rllm-test"
    assert run.display_name == "wb"


def test_episode_table_respects_its_size(tmp_path):
    logger = offline_logger(tmp_path, episodes_table_size=3, max_text_chars=5)
    logger.log_episodes(1, [episode(str(i), 0, "a long answer", 1.0) for i in range(10)])
    run_path = logger.run_path
    logger.close()
    row = history(run_records(run_path))[-1]
    table = json.loads((run_path / "files" / row["episodes/path"]).read_text())
    assert len(table["data"]) == 3
    assert table["data"][0][5] == "a lo…"


def test_disabled_mode_writes_no_run(tmp_path):
    logger = WandbLogger({"mode": "disabled"}, run_dir=tmp_path)
    logger.log_metrics(1, {"x": 1.0})
    logger.close()
    assert not (tmp_path / "wandb").exists()


def test_registered_through_its_entry_point_with_validated_settings():
    reg = get_registry().get("logger", "wandb")
    assert reg.obj is WandbLogger
    assert reg.plugin == "wandb"
    config = load_config({"backend": "example", "loggers": {"wandb": {"mode": "sometimes"}}})
    with pytest.raises(ConfigError, match=r"loggers\.wandb\.mode"):
        validate_plugin_sections(config)


def test_training_run_writes_its_metrics_to_the_offline_run(tmp_path):
    from rllm_core.testing import RecordingHooks, simulated_config
    from rllm_core.trainer import UnifiedTrainer

    config = simulated_config(
        tmp_path, loggers={"wandb": {"mode": "offline", "project": "sim"}}, trainer={"total_steps": 3}
    )
    trainer = UnifiedTrainer(config)
    recorder = RecordingHooks()
    trainer.runner.add("recorder", recorder)
    trainer.fit()

    (run_path,) = (tmp_path / "wandb").glob("offline-run-*")
    records = run_records(run_path)
    rows = {}
    for row in history(records):
        rows.setdefault(row["_step"], {}).update(row)
    assert sorted(recorder.metrics_by_step) == [1, 2, 3]
    for step, metrics in recorder.metrics_by_step.items():
        logged = {k: rows[step][k] for k in metrics}  # every metric of the step is in the run
        assert logged == pytest.approx(metrics)
        assert "train/reward/mean" in logged
    assert rows[3]["episodes/_type"] == "table-file"
    assert run_config(records)["backend"] == "simulated"
