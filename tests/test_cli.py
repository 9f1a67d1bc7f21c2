"""The ``rllm`` command line, run as a real subprocess."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import rllm_core
from rllm_core.plugins import BUILTINS

_spec = importlib.util.spec_from_file_location(
    "_rllm_plugin_site", Path(__file__).parent / "fixtures" / "plugin_site.py"
)
plugin_site = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plugin_site)


@pytest.fixture(scope="session")
def site_dir(tmp_path_factory) -> Path:
    return plugin_site.build_plugin_site(tmp_path_factory.getbasetemp() / "rllm_plugin_site")


def rllm(*args: str, site: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("RLLM_")}
    if site is not None:
        full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), full_env.get("PYTHONPATH")]))
    full_env.update(env)
    cmd = [sys.executable, "-m", "rllm_core.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=full_env)


@pytest.fixture
def config_file(tmp_path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text("trainer:\n  project: demo\n  name: ${trainer.project}-run\nrollout:\n  n: 4\n")
    return path


# --------------------------------------------------------------------------------------------
# rllm plugins


def test_plugins_json_lists_builtins_and_installed_plugins_with_errors(site_dir):
    out = rllm("plugins", "--json", site=site_dir)
    assert out.returncode == 0, out.stderr
    rows = {row["name"]: row for row in json.loads(out.stdout)}
    for name in BUILTINS:
        assert rows[name]["builtin"] is True
    good = rows["good"]
    assert (good["distribution"], good["version"], good["errors"]) == ("rllm-good-plugin", "1.2.3", [])
    assert good["registers"]["backend"] == ["good", "good_export"]
    assert good["hook_plugins"] == {"good_hook": ["on_batch_end"]}
    assert "trajectory_grouping_hook" in rows["rllm.grouping"]["hooks"]
    broken = rows["broken_import"]
    assert (broken["distribution"], broken["version"]) == ("rllm-broken-plugin", "0.0.1")
    assert "boom while importing" in broken["errors"][0]
    assert "not_a_hook_argument" in rows["bad_hook"]["errors"][0]
    assert "boom inside register_rewards" in rows["raising_register"]["errors"][0]


def test_plugins_table_shows_distributions_registrations_and_errors(site_dir):
    out = rllm("plugins", site=site_dir)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "good  [rllm-good-plugin 1.2.3]  ok" in text
    assert "rewards:" in text and "good_reward" in text
    assert "hook good_hook:" in text and "on_batch_end" in text
    assert "broken_import  [rllm-broken-plugin 0.0.1]  ERROR" in text
    assert "error: rllm plugin broken_import (distribution rllm-broken-plugin 0.0.1)" in text
    assert "rllm.grouping  [built-in]" in text
    assert "with errors" in text.splitlines()[-1]


def test_plugins_without_third_party_plugins():
    out = rllm("plugins", "--json")
    assert out.returncode == 0, out.stderr
    names = {row["name"] for row in json.loads(out.stdout)}
    assert set(BUILTINS) <= names
    assert "good" not in names


def test_plugins_respects_the_block_list(site_dir):
    out = rllm("plugins", "--json", site=site_dir, RLLM_PLUGINS_BLOCK="rllm-broken-plugin,rllm.opsd")
    names = {row["name"] for row in json.loads(out.stdout)}
    assert "good" in names
    assert not {"broken_import", "bad_hook", "raising_register", "rllm.opsd"} & names


def test_plugins_in_strict_mode_fails_naming_the_plugin(site_dir):
    out = rllm("plugins", site=site_dir, RLLM_STRICT_PLUGINS="1", RLLM_PLUGINS_BLOCK=",".join(BUILTINS))
    assert out.returncode == 1
    assert "rllm-broken-plugin 0.0.1" in out.stderr


# --------------------------------------------------------------------------------------------
# rllm config show


def test_config_show_prints_the_resolved_config_with_overrides(config_file):
    out = rllm("config", "show", str(config_file), "rollout.n=2", "backend=acme", "acme.lora_rank=8")
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["rollout"]["n"] == 2
    assert shown["trainer"]["name"] == "demo-run"
    assert shown["backend"] == "acme"
    assert shown["acme"] == {"lora_rank": 8}
    assert shown["async"]["max_staleness"] == 1, "defaults are shown too, under the YAML key"
    assert rllm_core.load_config(shown).to_dict() == shown
    # no plugin registers acme: its section is shown as written, with a note
    assert "rllm: note: plugin sections that did not resolve are shown as written" in out.stderr
    assert "backend 'acme' is not registered" in out.stderr


def test_config_show_fills_in_plugin_defaults(config_file):
    out = rllm("config", "show", str(config_file), "backend=simulated", "simulated.p0=0.5", "hooks.opsd.coef=0.5")
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["simulated"]["p0"] == 0.5 and shown["simulated"]["gen_latency"] == 0.0
    assert shown["hooks"]["opsd"]["coef"] == 0.5 and shown["hooks"]["opsd"]["teacher_key"] == "teacher_messages"
    assert shown["loggers"]["jsonl"]["metrics_file"] == "metrics.jsonl"
    assert rllm_core.load_config(shown, validate_plugins=True).to_dict()["hooks"] == shown["hooks"]


def test_config_show_resolves_backend_auto(config_file):
    from rllm_core.plugins import get_registry

    out = rllm("config", "show", str(config_file))
    assert out.returncode == 0, out.stderr
    shown = yaml.safe_load(out.stdout)
    assert shown["backend"] == get_registry().default_backend() != "auto"
    assert isinstance(shown[shown["backend"]], dict)


def test_config_show_validate_plugins_rejects_an_unknown_reward(config_file):
    out = rllm("config", "show", str(config_file), "reward.name=exact_mach", "--validate-plugins")
    assert out.returncode == 2
    assert "reward.name: reward 'exact_mach' is not registered" in out.stderr
    assert "Traceback" not in out.stderr


def test_config_show_validate_plugins_without_a_real_backend_says_none_is_installed(config_file):
    out = rllm(
        "config", "show", str(config_file), "--validate-plugins", RLLM_PLUGINS_BLOCK="torch,rllm-example-backend"
    )
    assert out.returncode == 2
    assert "backend: no backend is installed; pip install rllm-torch" in out.stderr


def test_config_show_accepts_options_after_overrides(config_file, site_dir):
    out = rllm("config", "show", str(config_file), "backend=good", "loggers=[]", "--validate-plugins", site=site_dir)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["backend"] == "good"


def test_config_show_invalid_value_exits_2_naming_the_field(config_file):
    out = rllm("config", "show", str(config_file), "rollout.n=0", "algorithm.loss.agg_mode=nope")
    assert out.returncode == 2
    assert out.stdout == ""
    assert "rollout.n:" in out.stderr and "algorithm.loss.agg_mode:" in out.stderr
    assert "Traceback" not in out.stderr


def test_config_show_missing_file_exits_2(tmp_path):
    out = rllm("config", "show", str(tmp_path / "missing.yaml"))
    assert out.returncode == 2
    assert "config file not found" in out.stderr


def test_config_show_validate_plugins_names_an_unknown_backend(config_file, site_dir):
    out = rllm("config", "show", str(config_file), "backend=godo", "--validate-plugins", site=site_dir)
    assert out.returncode == 2
    assert "backend: backend 'godo' is not registered" in out.stderr
    assert "Did you mean 'good'" in out.stderr


def test_config_show_validate_plugins_checks_the_backend_section(config_file, site_dir):
    out = rllm(
        "config",
        "show",
        str(config_file),
        "backend=good",
        "good.size=x",
        "loggers=[]",
        "--validate-plugins",
        site=site_dir,
    )
    assert out.returncode == 2
    assert "good.size:" in out.stderr


# --------------------------------------------------------------------------------------------
# rllm serve (plugins/gateway/tests/test_serve.py serves with the plugin; here: without it)


def test_serve_without_the_gateway_plugin_exits_2_naming_the_package(tmp_path, config_file):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    # As if rllm-gateway were not installed: the import system refuses a module mapped to None.
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['rllm_gateway'] = None\n")
    out = rllm("serve", str(config_file), "--port", "0", site=blocker)
    assert out.returncode == 2, out.stderr
    assert "pip install rllm-gateway" in out.stderr
    assert "Traceback" not in out.stderr


# --------------------------------------------------------------------------------------------
# rllm train, export, --version, usage


def test_train_with_an_invalid_config_exits_2(config_file):
    out = rllm("train", str(config_file), "trainer.mode=turbo")
    assert out.returncode == 2
    assert "trainer.mode:" in out.stderr


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("reward.name=exact_mach", "reward.name"),
        ("workflow.name=my_missing_module:wf", "workflow.name"),
        ("reward.name=rllm_core.testing:nope", "reward.name"),
    ],
)
def test_train_with_a_bad_workflow_or_reward_name_exits_2_naming_the_field(config_file, override, field):
    out = rllm("train", str(config_file), "backend=simulated", "workflow.name=simulated", override)
    assert out.returncode == 2, out.stderr
    assert f"{field}: " in out.stderr
    assert "Traceback" not in out.stderr


def test_train_with_a_missing_torch_model_path_exits_2_naming_the_field(config_file):
    pytest.importorskip("rllm_torch")
    out = rllm("train", str(config_file), "backend=torch", "torch.model_path=/nonexistent/model")
    assert out.returncode == 2, out.stderr
    assert "torch.model_path: " in out.stderr and "/nonexistent/model" in out.stderr
    assert "Traceback" not in out.stderr


def test_version_matches_the_package():
    out = rllm("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"rllm-core {rllm_core.__version__}"


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "rllm"
    if not script.exists():
        pytest.skip("rllm-core is not installed in this interpreter's environment (no rllm script)")
    out = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == f"rllm-core {rllm_core.__version__}"


def test_no_command_is_a_usage_error():
    out = rllm()
    assert out.returncode == 2
    assert "usage: rllm" in out.stderr


def test_export_missing_checkpoint_exits_2(tmp_path):
    out = rllm("export", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert out.returncode == 2
    assert "checkpoint directory not found" in out.stderr


def test_export_without_a_known_backend_asks_for_the_flag(tmp_path):
    (tmp_path / "ckpt").mkdir()
    out = rllm("export", str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert out.returncode == 2
    assert "--backend NAME" in out.stderr


def test_export_with_an_unknown_backend_lists_the_installed_ones(tmp_path):
    (tmp_path / "ckpt").mkdir()
    out = rllm("export", str(tmp_path / "ckpt"), str(tmp_path / "out"), "--backend", "nosuch")
    assert out.returncode == 2
    assert "backend 'nosuch' is not registered; registered backends:" in out.stderr
    assert "torch" in out.stderr


def test_export_with_a_backend_that_cannot_export(tmp_path, site_dir):
    ckpt = tmp_path / "run" / "checkpoints" / "step_3"
    ckpt.mkdir(parents=True)
    (tmp_path / "run" / "config.yaml").write_text("backend: good\n")
    out = rllm("export", str(ckpt), str(tmp_path / "out"), site=site_dir)
    assert out.returncode == 2
    assert "backend 'good' does not support export" in out.stderr


def test_export_calls_the_backend_export_named_in_the_trainer_state(tmp_path, site_dir):
    ckpt = tmp_path / "step_5"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 5, "backend": "good_export"}))
    out = rllm("export", str(ckpt), str(tmp_path / "out"), site=site_dir)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "exported.txt").read_text() == "exported from step_5"


def test_the_export_flag_wins_over_the_saved_backend(tmp_path, site_dir):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.yaml").write_text("backend: good\n")
    out = rllm("export", str(ckpt), str(tmp_path / "out"), "--backend", "good_export", site=site_dir)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out" / "exported.txt").exists()


# --------------------------------------------------------------------------------------------
# rllm train: exit codes of a real run


_WORKFLOW = """
import asyncio

from rllm_core.testing import simulated_workflow


async def hangs_on_t9(task, engine):
    if task["id"] == "t9":
        await asyncio.Event().wait()
    return await simulated_workflow(task, engine)


async def raises_on_t9(task, engine):
    if task["id"] == "t9":
        raise ValueError("workflow bug")
    return await simulated_workflow(task, engine)
"""


def _train(tmp_path: Path, workflow: str, *overrides: str) -> subprocess.Popen:
    from rllm_core.testing import simulated_tasks

    (tmp_path / "cli_workflows.py").write_text(_WORKFLOW)
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(t) + "\n" for t in simulated_tasks(32)))
    config = {
        "backend": "simulated",
        "workflow": {"name": f"cli_workflows:{workflow}"},
        "reward": {"name": "simulated"},
        "data": {"train": str(tasks), "train_batch_size": 4},
        "rollout": {"n": 2},
        "trainer": {"mode": "async", "run_dir": str(tmp_path / "run"), "resume": "off"},
        "async": {"partial_rollout": True},  # no drain: a hung task holds back only the last step
        "loggers": {"jsonl": {}},
    }
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RLLM_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tmp_path), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "rllm_core.cli", "train", str(tmp_path / "train.yaml"), *overrides]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(90)
def test_train_interrupted_by_ctrl_c_checkpoints_and_exits_130(tmp_path):
    proc = _train(tmp_path, "hangs_on_t9")
    metrics = tmp_path / "run" / "metrics.jsonl"
    try:
        # The 31 other tasks make 7 steps; then training waits for t9, which never comes.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.exists() and metrics.read_text().count("\n") >= 7:
                break
            time.sleep(0.05)
        time.sleep(0.2)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert (tmp_path / "run" / "checkpoints" / "step_00000007" / "trainer_state.json").is_file()


@pytest.mark.timeout(90)
def test_train_that_crashes_exits_1_with_the_error(tmp_path):
    proc = _train(tmp_path, "raises_on_t9", "workflow.raise_on_error=true")
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err
    assert "ValueError: workflow bug" in err
