"""The mlflow logger against real local stores (SQLite, file), read back with ``MlflowClient``,
and against a tracking server that is down (a closed port on 127.0.0.1)."""

from __future__ import annotations

import json
import socket
import warnings

import pytest
import yaml
from mlflow.tracking import MlflowClient
from rllm_mlflow import MlflowLogger
from rllm_mlflow.logger import flatten

from rllm_core.config import ConfigError, load_config, validate_plugin_sections
from rllm_core.plugins import get_registry
from rllm_core.types import Episode, ModelOutput, Step, Trajectory


def episode(task_id: str, rollout: int, answer: str, reward: float) -> Episode:
    messages = [{"role": "user", "content": f"question {task_id}"}]
    step = Step.from_model_output(ModelOutput(text=answer, content=answer, completion_ids=[1]), messages)
    return Episode(
        task_id=task_id,
        rollout_idx=rollout,
        is_correct=reward > 0,
        trajectories=[Trajectory(name="solver", steps=[step], reward=reward)],
    )


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def fast_http(monkeypatch):
    """No retries and short timeouts, so a dead server is noticed at once."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0")


def read_run(uri: str, run_id: str):
    client = MlflowClient(tracking_uri=uri)
    return client, client.get_run(run_id)


@pytest.mark.slow  # creating a SQLite tracking store runs mlflow's schema migrations (~5 s)
def test_default_sqlite_store_holds_metrics_params_config_and_episodes(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_config({"trainer": {"project": "rllm-test", "name": "ml"}, "algorithm": {"optim": {"lr": 0.003}}})
    logger = MlflowLogger({"tags": {"team": "rl"}}, run_dir=tmp_path / "run", config=config)
    logger.log_config(config.to_dict())
    logger.log_metrics(1, {"train/reward/mean": 0.25, "val/pass@4": 0.5})
    logger.log_metrics(2, {"train/reward/mean": 0.75})
    logger.log_episodes(2, [episode("t 1", 0, "42", 1.0), episode("t 1", 1, "41", 0.0)])
    logger.close()

    uri = f"sqlite:///{tmp_path / 'run'}/mlflow.db"
    assert logger.tracking_uri == uri
    assert (tmp_path / "run" / "mlflow.db").is_file()
    client, run = read_run(uri, logger.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "ml"
    assert client.get_experiment(run.info.experiment_id).name == "rllm-test"
    assert run.data.tags["team"] == "rl"
    history = [(m.step, m.value) for m in client.get_metric_history(logger.run_id, "train/reward/mean")]
    assert sorted(history) == [(1, 0.25), (2, 0.75)]
    assert [m.value for m in client.get_metric_history(logger.run_id, "val/pass_4")] == [0.5]
    assert float(run.data.params["algorithm.optim.lr"]) == 0.003
    assert run.data.params["trainer.project"] == "rllm-test"

    config_file = client.download_artifacts(logger.run_id, "config.yaml", str(tmp_path / "dl"))
    with open(config_file) as f:
        assert yaml.safe_load(f)["algorithm"]["optim"]["lr"] == 0.003
    episodes_file = client.download_artifacts(logger.run_id, "episodes/step_000002.json", str(tmp_path / "dl"))
    with open(episodes_file) as f:
        records = json.load(f)
    assert [(r["task_id"], r["rollout"], r["reward"], r["is_correct"]) for r in records] == [
        ("t 1", 0, 1.0, True),
        ("t 1", 1, 0.0, False),
    ]
    assert records[0]["prompt"] == [{"role": "user", "content": "question t 1"}]
    assert records[0]["responses"] == ["42"]


def test_file_store_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    logger = MlflowLogger({"tracking_uri": uri, "experiment": "files"}, run_dir=tmp_path)
    logger.log_metrics(3, {"loss": 1.25})
    logger.close()
    client, _ = read_run(uri, logger.run_id)
    assert [(m.step, m.value) for m in client.get_metric_history(logger.run_id, "loss")] == [(3, 1.25)]


def test_server_down_at_start_warns_and_logging_goes_on(tmp_path, fast_http):
    uri = f"http://127.0.0.1:{closed_port()}"
    with pytest.warns(RuntimeWarning, match="mlflow logger: start failed"):
        logger = MlflowLogger({"tracking_uri": uri}, run_dir=tmp_path)
    assert logger.disabled and logger.run_id is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no further warnings, no exceptions
        logger.log_config({"a": 1})
        logger.log_metrics(1, {"x": 1.0})
        logger.log_episodes(1, [episode("t", 0, "a", 1.0)])
        logger.close()


def test_server_lost_mid_run_warns_then_disables(tmp_path, fast_http, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    logger = MlflowLogger({"tracking_uri": uri, "max_failures": 2}, run_dir=tmp_path)
    logger.log_metrics(1, {"x": 1.0})
    logger.client = MlflowClient(tracking_uri=f"http://127.0.0.1:{closed_port()}")  # the server goes away
    with pytest.warns(RuntimeWarning, match="will retry"):
        logger.log_metrics(2, {"x": 2.0})
    assert not logger.disabled
    with pytest.warns(RuntimeWarning, match="logging is off"):
        logger.log_metrics(3, {"x": 3.0})
    assert logger.disabled and logger.failures == 2
    logger.log_metrics(4, {"x": 4.0})  # silently dropped
    client, _ = read_run(uri, logger.run_id)
    assert [m.value for m in client.get_metric_history(logger.run_id, "x")] == [1.0]


def test_request_settings_reach_mlflow_http_client(tmp_path, monkeypatch):
    # set first, so that monkeypatch restores what was there before the logger writes them
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "99")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "99")
    uri = f"http://127.0.0.1:{closed_port()}"
    with pytest.warns(RuntimeWarning, match="start failed"):
        MlflowLogger({"tracking_uri": uri, "request_timeout": 1.5, "max_retries": 0}, run_dir=tmp_path)
    import os

    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "2"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"


def test_flatten_gives_dotted_params():
    assert dict(flatten({"a": {"b": 1, "c": [1, 2]}, "d": "x", "e": {}})) == {
        "a.b": "1",
        "a.c": "[1, 2]",
        "d": "x",
        "e": "{}",
    }


def test_registered_through_its_entry_point_with_validated_settings():
    reg = get_registry().get("logger", "mlflow")
    assert reg.obj is MlflowLogger
    assert reg.plugin == "mlflow"
    config = load_config({"backend": "example", "loggers": {"mlflow": {"episodes_per_step": -1}}})
    with pytest.raises(ConfigError, match=r"loggers\.mlflow\.episodes_per_step"):
        validate_plugin_sections(config)


def train(config):
    from rllm_core.testing import RecordingHooks
    from rllm_core.trainer import UnifiedTrainer

    trainer = UnifiedTrainer(config)
    recorder = RecordingHooks()
    trainer.runner.add("recorder", recorder)
    trainer.fit()
    return trainer, recorder


def test_training_run_writes_its_metrics_to_the_store(tmp_path, monkeypatch):
    from rllm_core.testing import simulated_config

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    config = simulated_config(
        tmp_path, loggers={"mlflow": {"tracking_uri": uri, "experiment": "sim"}}, trainer={"total_steps": 3}
    )
    _, recorder = train(config)
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("sim").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["backend"] == "simulated"
    assert sorted(recorder.metrics_by_step) == [1, 2, 3]
    history = {(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/reward/mean")}
    assert history == {(step, m["train/reward/mean"]) for step, m in recorder.metrics_by_step.items()}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "episodes")}
    assert artifacts == {f"episodes/step_{s:06d}.json" for s in (1, 2, 3)}


def test_training_goes_on_when_the_tracking_server_is_down(tmp_path, fast_http):
    from rllm_core.testing import simulated_config

    uri = f"http://127.0.0.1:{closed_port()}"
    config = simulated_config(tmp_path, loggers={"mlflow": {"tracking_uri": uri}}, trainer={"total_steps": 2})
    with pytest.warns(RuntimeWarning, match="mlflow logger: start failed"):
        trainer, recorder = train(config)
    assert trainer.step == 2
    assert sorted(recorder.metrics_by_step) == [1, 2]
