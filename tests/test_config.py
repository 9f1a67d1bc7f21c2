"""Config loading: YAML, merging, interpolation, overrides, validation paths, plugin sections."""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field

from rllm_core import hookimpl
from rllm_core.config import ConfigError, RLLMConfig, load_config, validate_plugin_sections
from rllm_core.plugins import registered, reset_plugins
from rllm_core.protocol import Backend


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --------------------------------------------------------------------------------------------
# loading, merging, interpolation, overrides


def test_yaml_file_is_loaded_into_the_schema(tmp_path):
    path = write(
        tmp_path,
        "c.yaml",
        "backend: mybackend\nrollout:\n  n: 4\ntrainer:\n  mode: async\nasync:\n  max_staleness: 3\n",
    )
    config = load_config(path)
    assert config.backend == "mybackend"
    assert config.rollout.n == 4
    assert config.trainer.mode == "async"
    assert config.async_.max_staleness == 3
    assert config.rollout.n_val == 1, "unset fields keep their defaults"


def test_later_files_override_earlier_ones_and_nested_sections_merge(tmp_path):
    base = write(tmp_path, "base.yaml", "rollout:\n  n: 4\n  n_val: 2\nalgorithm:\n  loss:\n    clip_low: 0.1\n")
    top = write(tmp_path, "top.yaml", "rollout:\n  n: 16\nalgorithm:\n  loss:\n    clip_high: 0.4\n")
    config = load_config(base, top)
    assert (config.rollout.n, config.rollout.n_val) == (16, 2)
    assert (config.algorithm.loss.clip_low, config.algorithm.loss.clip_high) == (0.1, 0.4)


def test_dicts_and_configs_are_sources_too(tmp_path):
    first = load_config({"rollout": {"n": 3}})
    config = load_config(first, {"trainer": {"epochs": 2}})
    assert (config.rollout.n, config.trainer.epochs) == (3, 2)


def test_interpolations_are_resolved(tmp_path):
    path = write(
        tmp_path,
        "c.yaml",
        "trainer:\n  project: demo\n  name: ${trainer.project}-run\n"
        "rollout:\n  n: 8\n  n_val: ${rollout.n}\n"
        "mybackend:\n  group_size: ${rollout.n}\n",
    )
    config = load_config(path, overrides=["rollout.n=4"])
    assert config.trainer.name == "demo-run"
    assert config.rollout.n_val == 4, "interpolation resolves after the overrides"
    assert config.section("mybackend") == {"group_size": 4}


def test_broken_interpolation_is_a_config_error(tmp_path):
    path = write(tmp_path, "c.yaml", "trainer:\n  name: ${nowhere.to_be_found}\n")
    with pytest.raises(ConfigError, match=r"nowhere\.to_be_found"):
        load_config(path)


def test_dotlist_overrides(tmp_path):
    path = write(tmp_path, "c.yaml", "backend: torch\nrollout:\n  n: 4\n")
    config = load_config(
        path,
        overrides=[
            "backend=tinker",
            "rollout.n=2",
            "algorithm.loss.clip_high=0.3",
            "rollout.train_sampling.top_p=0.9",
            "tinker.lora_rank=32",
            "tinker.base_model=Qwen/Qwen3-8B",
            "hooks.opsd.coef=0.5",
        ],
    )
    assert config.backend == "tinker"
    assert config.rollout.n == 2
    assert config.algorithm.loss.clip_high == 0.3
    assert config.rollout.train_sampling == {"top_p": 0.9}
    assert config.section("tinker") == {"lora_rank": 32, "base_model": "Qwen/Qwen3-8B"}
    assert config.hooks == {"opsd": {"coef": 0.5}}


def test_a_mapping_merged_with_a_list_is_a_config_error(tmp_path):
    first = write(tmp_path, "a.yaml", "workflow:\n  args:\n    k: 1\n")
    second = write(tmp_path, "b.yaml", "workflow:\n  args: [1, 2]\n")
    with pytest.raises(ConfigError, match="incompatible"):
        load_config(first, second)


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match=r"key=value, got: rollout\.n"):
        load_config(overrides=["rollout.n"])


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_yaml_names_the_file(tmp_path):
    path = write(tmp_path, "bad.yaml", "rollout: [n: 1\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml"):
        load_config(path)


# --------------------------------------------------------------------------------------------
# validation errors name the field


@pytest.mark.parametrize(
    ("override", "path"),
    [
        ("rollout.n=0", "rollout.n"),
        ("algorithm.loss.agg_mode=token-sum", "algorithm.loss.agg_mode"),
        ("trainer.mode=turbo", "trainer.mode"),
        ("trainer.mdoe=async", "trainer.mdoe"),
        ("async.max_staleness=-1", "async.max_staleness"),
        ("algorithm.filter.mask_termination_reasons=[bored]", "algorithm.filter.mask_termination_reasons.0"),
        ("algorithm.optim.lr=0", "algorithm.optim.lr"),
    ],
)
def test_invalid_values_name_the_dotted_path(override, path):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert f"  {path}: " in str(err.value)


def test_every_bad_field_is_listed_at_once():
    with pytest.raises(ConfigError) as err:
        load_config(overrides=["rollout.n=0", "data.train_batch_size=0"])
    assert "rollout.n:" in str(err.value) and "data.train_batch_size:" in str(err.value)


def test_stepwise_mode_per_step_maps_to_broadcast_with_a_deprecation_warning():
    with pytest.warns(DeprecationWarning, match="per_step"):
        config = load_config(overrides=["algorithm.stepwise_mode=per_step"])
    assert config.algorithm.stepwise_mode == "broadcast"


def test_stepwise_mode_broadcast_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        assert load_config(overrides=["algorithm.stepwise_mode=broadcast"]).algorithm.stepwise_mode == "broadcast"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (["console"], {"console": {}}),
        ("console", {"console": {}}),
        ({"jsonl": None, "wandb": {"project": "p"}}, {"jsonl": {}, "wandb": {"project": "p"}}),
        (None, {}),
    ],
)
def test_loggers_and_hooks_accept_a_list_or_a_dict(value, expected):
    config = load_config({"loggers": value, "hooks": value})
    assert config.loggers == expected
    assert config.hooks == expected


def test_default_loggers_are_console_and_jsonl():
    assert load_config().loggers == {"console": {}, "jsonl": {}}


# --------------------------------------------------------------------------------------------
# plugin sections, validated through the registry


class MyBackendConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr_scale: float = Field(1.0, gt=0)
    """Multiplier on algorithm.optim.lr."""
    model: str = "tiny"


class MyBackend(Backend):
    name = "mybackend"
    config_model = MyBackendConfig


class MyHookSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    coef: float = Field(1.0, ge=0)


class MyLogger:
    config_model = None


class TestPlugin:
    @hookimpl
    def register_backends(self, register):
        register("mybackend", MyBackend, priority=10**9)

    @hookimpl
    def register_hooks(self, register):
        register("myhook", object, config_model=MyHookSettings)

    @hookimpl
    def register_loggers(self, register):
        register("mylogger", MyLogger)


@pytest.fixture
def test_plugin():
    with registered(TestPlugin(), name="config_test_plugin") as registry:
        yield registry


BASE = {"loggers": ["mylogger"], "backend": "mybackend"}


def test_backend_section_is_validated_by_its_config_model(test_plugin):
    config = load_config(BASE, overrides=["mybackend.lr_scale=2"], validate_plugins=True)
    section = config.plugin_config("mybackend")
    assert isinstance(section, MyBackendConfig)
    assert section.lr_scale == 2.0 and section.model == "tiny"
    assert MyBackend(config).backend_config is section


@pytest.mark.parametrize(
    ("override", "path"),
    [("mybackend.lr_scale=-1", "mybackend.lr_scale"), ("mybackend.modle=x", "mybackend.modle")],
)
def test_backend_section_errors_name_the_backend_field(test_plugin, override, path):
    with pytest.raises(ConfigError) as err:
        load_config(BASE, overrides=[override], validate_plugins=True)
    assert f"  {path}: " in str(err.value)


def test_sections_of_other_backends_are_left_alone(test_plugin):
    config = load_config(BASE, overrides=["otherbackend.anything=1"], validate_plugins=True)
    assert config.section("otherbackend") == {"anything": 1}


def test_backend_auto_resolves_to_the_highest_priority(test_plugin):
    config = load_config({"loggers": ["mylogger"]}, validate_plugins=True)
    assert config.backend == "mybackend"
    assert isinstance(config.plugin_config("mybackend"), MyBackendConfig)


def test_hook_settings_are_validated_and_defaults_filled(test_plugin):
    config = load_config(BASE, {"hooks": ["myhook"]}, validate_plugins=True)
    assert config.hooks == {"myhook": {"coef": 1.0}}
    with pytest.raises(ConfigError, match=r"  hooks\.myhook\.coef: "):
        load_config(BASE, overrides=["hooks.myhook.coef=-1"], validate_plugins=True)


def test_unknown_backend_is_named(test_plugin):
    with pytest.raises(ConfigError) as err:
        load_config(BASE, overrides=["backend=mybackedn"], validate_plugins=True)
    msg = str(err.value)
    assert msg.startswith("backend: ")
    assert "mybackend" in msg and "Did you mean 'mybackend'" in msg


def test_unknown_hook_logger_and_estimator_name_their_field(test_plugin):
    with pytest.raises(ConfigError, match=r"^hooks\.nohook: hook 'nohook' is not registered"):
        load_config(BASE, {"hooks": ["nohook"]}, validate_plugins=True)
    with pytest.raises(ConfigError, match=r"^loggers\.nologger: logger 'nologger' is not registered"):
        load_config(BASE, {"loggers": ["nologger"]}, validate_plugins=True)
    with pytest.raises(ConfigError, match=r"^algorithm\.adv_estimator: estimator 'nope'"):
        load_config(BASE, overrides=["algorithm.adv_estimator=nope"], validate_plugins=True)
    with pytest.raises(ConfigError, match=r"^algorithm\.estimator_map\.judge: estimator 'nope'"):
        load_config(BASE, overrides=["algorithm.estimator_map.judge=nope"], validate_plugins=True)


def test_module_attr_hooks_are_accepted(test_plugin):
    config = load_config(BASE, {"hooks": {"json:dumps": {"x": 1}}}, validate_plugins=True)
    assert config.hooks == {"json:dumps": {"x": 1}}


def test_plugin_sections_are_not_validated_unless_asked(test_plugin):
    config = load_config(BASE, overrides=["mybackend.lr_scale=-1", "backend=missing"])
    assert config.backend == "missing"
    with pytest.raises(ConfigError, match=r"^backend: "):
        validate_plugin_sections(config)


# --------------------------------------------------------------------------------------------
# round trip

_text = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-/. 0123456789", min_size=1, max_size=12)
_scalars = st.one_of(st.integers(-1000, 1000), st.booleans(), _text, st.floats(-1e6, 1e6, allow_nan=False))


@st.composite
def configs(draw) -> RLLMConfig:
    raw = {
        "backend": draw(st.sampled_from(["auto", "torch", "tinker"])),
        "workflow": {"name": draw(st.none() | _text), "args": draw(st.dictionaries(_text, _scalars, max_size=3))},
        "data": {
            "train": draw(st.none() | _text | st.lists(st.dictionaries(_text, _scalars, max_size=3), max_size=3)),
            "train_batch_size": draw(st.integers(1, 64)),
        },
        "rollout": {
            "n": draw(st.integers(1, 64)),
            "train_sampling": draw(st.dictionaries(_text, _scalars, max_size=3)),
        },
        "algorithm": {
            "adv_estimator": draw(_text),
            "estimator_map": draw(st.dictionaries(_text, _text, max_size=2)),
            "norm_adv_by_std": draw(st.booleans()),
            "loss": {
                "clip_high": draw(st.floats(0, 10)),
                "agg_mode": draw(st.sampled_from(["token-mean", "seq-mean-token-mean"])),
            },
            "optim": {"lr": draw(st.floats(1e-8, 1.0)), "betas": draw(st.tuples(st.floats(0, 1), st.floats(0, 1)))},
            "filter": {"mask_termination_reasons": draw(st.lists(st.sampled_from(["timeout", "error"]), max_size=2))},
        },
        "trainer": {
            "mode": draw(st.sampled_from(["sync", "async"])),
            "total_steps": draw(st.none() | st.integers(1, 99)),
        },
        "async": {"max_staleness": draw(st.integers(0, 5))},
        "loggers": draw(st.dictionaries(_text, st.dictionaries(_text, _scalars, max_size=2), max_size=3)),
        "hooks": draw(st.dictionaries(_text, st.dictionaries(_text, _scalars, max_size=2), max_size=2)),
        "myplugin": draw(st.dictionaries(_text, _scalars, max_size=3)),
    }
    return RLLMConfig.model_validate(raw)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(config=configs())
def test_config_round_trips_through_to_dict_and_yaml(config, tmp_path):
    from omegaconf import OmegaConf

    again = load_config(config.to_dict())
    assert again.to_dict() == config.to_dict()
    assert again == config
    path = tmp_path / "round_trip.yaml"
    path.write_text(OmegaConf.to_yaml(OmegaConf.create(config.to_dict())))
    assert load_config(path).to_dict() == config.to_dict()


# --------------------------------------------------------------------------------------------
# docs


def test_the_field_reference_in_docs_is_current():
    import importlib.util

    root = Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("_gen_config_reference", root / "docs" / "_gen_config_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert gen.current((root / "docs" / "config.md").read_text()) == gen.reference(), (
        "docs/config.md field reference is stale: run python docs/_gen_config_reference.py"
    )


def test_interpolation_sees_schema_defaults():
    config = load_config({"trainer": {"name": "${trainer.project}-x"}})
    assert config.trainer.name == "rllm-x"


@pytest.mark.parametrize(
    ("override", "expected"), [("off", "off"), ("no", "off"), ("false", "off"), ("true", "auto"), ("auto", "auto")]
)
def test_resume_override_off_parses_as_off_not_a_boolean(override, expected):
    # YAML 1.1 turns a bare ``off`` into False; the schema maps it back to the word the user meant.
    assert load_config(overrides=[f"trainer.resume={override}"]).trainer.resume == expected


def test_resume_accepts_booleans_and_keeps_paths():
    assert load_config({"trainer": {"resume": False}}).trainer.resume == "off"
    assert load_config({"trainer": {"resume": True}}).trainer.resume == "auto"
    assert load_config(overrides=["trainer.resume=runs/x/step_3"]).trainer.resume == "runs/x/step_3"


def test_a_list_of_loggers_in_an_override_replaces_the_files_loggers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("loggers: {console: {}, jsonl: {every: 2}}\nhooks: {a_hook: {x: 1}}\n")
    assert load_config(path, overrides=["loggers=[jsonl]"]).loggers == {"jsonl": {}}
    assert load_config(path, overrides=["hooks=[]"]).hooks == {}
    merged = load_config(path, overrides=["loggers.jsonl.every=3"])
    assert merged.loggers == {"console": {}, "jsonl": {"every": 3}}


# --------------------------------------------------------------------------------------------
# every name is resolved before anything is built


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            "reward.name=exact_mach",
            r"^reward\.name: reward 'exact_mach' is not registered; .*Did you mean 'exact_match'",
        ),
        (
            "workflow.name=simulatd",
            r"^workflow\.name: workflow 'simulatd' is not registered; .*Did you mean 'simulated'",
        ),
        (
            "reward.name=no_such_module_xyz:fn",
            r"^reward\.name: .*no module named 'no_such_module_xyz'; the module must be importable: "
            r"an installed package .*working directory .*PYTHONPATH",
        ),
        (
            "workflow.name=rllm_core.tsting:f",
            r"^workflow\.name: .*'rllm_core\.tsting' \(close names: rllm_core\.testing",
        ),
        (
            "reward.name=rllm_core.testing:simulated_rewrd",
            r"^reward\.name: .*'rllm_core\.testing' has no attribute 'simulated_rewrd' \(close names: simulated_reward",
        ),
        ("reward.name=rllm_core:__version__", r"^reward\.name: 'rllm_core:__version__' is not callable"),
        ("workflow.name=rllm_core.testing:SimulatedConfig", r"^workflow\.name: .*SimulatedConfig has no run"),
        ("reward.args.colour=1", r"^reward\.args\.colour: .*accepts no argument 'colour'"),
        ("workflow.args.colour=1", r"^workflow\.args\.colour: .*accepts: turns"),
    ],
)
def test_workflow_and_reward_names_and_args_are_config_errors_naming_the_field(tmp_path, override, message):
    from rllm_core.testing import simulated_config

    config = simulated_config(tmp_path, overrides=[override])
    with pytest.raises(ConfigError, match=message):
        validate_plugin_sections(config)


def test_bad_names_fail_before_the_backend_is_built(tmp_path):
    from rllm_core.testing import SimulatedBackend, simulated_config
    from rllm_core.trainer import UnifiedTrainer

    built = []

    class Recording(SimulatedBackend):
        name = "recording"

        def __init__(self, config):
            built.append(config)
            super().__init__(config)

    class Plugin:
        @hookimpl
        def register_backends(self, register):
            register("recording", Recording)

    with registered(Plugin()):
        for override in ("reward.name=nope", "workflow.name=nope_module:wf", "hooks.nohook.x=1"):
            with pytest.raises(ConfigError):
                UnifiedTrainer(simulated_config(tmp_path, overrides=["backend=recording", override]))
        assert built == []
        UnifiedTrainer(simulated_config(tmp_path, overrides=["backend=recording"]))
        assert len(built) == 1


def test_every_plugin_problem_is_listed_at_once(test_plugin):
    with pytest.raises(ConfigError) as err:
        load_config(
            BASE,
            overrides=["mybackend.lr_scale=-1", "reward.name=nope", "hooks.nohook.x=1", "algorithm.adv_estimator=x"],
            validate_plugins=True,
        )
    lines = str(err.value).splitlines()
    assert lines[0] == "invalid config:"
    assert [line.split(":")[0].strip() for line in lines[1:]] == [
        "mybackend.lr_scale",
        "hooks.nohook",
        "algorithm.adv_estimator",
        "reward.name",
    ]


def test_a_module_in_the_working_directory_is_found_without_pythonpath(tmp_path, monkeypatch):
    # Console scripts (``rllm train``) do not put the working directory on sys.path; python -m does.
    (tmp_path / "my_cwd_reward.py").write_text("def reward(task, action):\n    return 1.0\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_cwd_reward", raising=False)
    config = load_config(BASE_SIMULATED, overrides=["reward.name=my_cwd_reward:reward"], validate_plugins=True)
    assert config.reward.name == "my_cwd_reward:reward"
    monkeypatch.delitem(sys.modules, "my_cwd_reward")


BASE_SIMULATED = {"backend": "simulated", "loggers": [], "workflow": {"name": "simulated"}}


# --------------------------------------------------------------------------------------------
# top-level keys that no section and no plugin owns


def test_a_misspelt_section_warns_naming_the_closest_known_name():
    with pytest.warns(UserWarning, match=r"config section 'trainr' .* did you mean 'trainer'\?"):
        config = load_config(BASE_SIMULATED, overrides=["trainr.total_steps=5"], validate_plugins=True)
    assert config.section("trainr") == {"total_steps": 5}
    with pytest.warns(UserWarning, match=r"'simulatd' .* did you mean 'simulated'\?"):
        load_config(BASE_SIMULATED, overrides=["simulatd.p0=0.5"], validate_plugins=True)


def test_sections_named_like_a_plugin_do_not_warn(test_plugin):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        # the chosen backend, another registered backend, a logger's name, a well-known uninstalled backend
        load_config(
            BASE,
            overrides=["mybackend.model=x", "simulated.p0=0.5", "mylogger.a=1", "tinker.lora_rank=8"],
            validate_plugins=True,
        )


# --------------------------------------------------------------------------------------------
# backend: auto


def test_backend_auto_never_picks_the_simulated_test_backend(monkeypatch):
    monkeypatch.setenv("RLLM_PLUGINS_ALLOW", "-")  # no entry points: only the built-ins, which have no real backend
    reset_plugins()
    with pytest.raises(ConfigError, match=r"^backend: no backend is installed; pip install rllm-torch.* simulated"):
        load_config({"loggers": []}, validate_plugins=True)
    assert load_config(BASE_SIMULATED, validate_plugins=True).backend == "simulated", "still selectable by name"
