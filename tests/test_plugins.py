"""The plugin system: built-ins, entry points, broken plugins, allow/block lists, trace, HookRunner."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
import sys
import warnings
from pathlib import Path

import pytest

from rllm_core import hookimpl
from rllm_core.hookspecs import REGISTRATION_HOOKS, TRAINER_HOOKS
from rllm_core.plugins import (
    BUILTINS,
    HookRunner,
    PluginLoadError,
    UnknownPluginError,
    get_plugin_manager,
    get_registry,
    plugin_infos,
    registered,
    reset_plugins,
)

_spec = importlib.util.spec_from_file_location(
    "_rllm_plugin_site", Path(__file__).parent / "fixtures" / "plugin_site.py"
)
plugin_site = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plugin_site)

ALL_BUILTINS = ",".join(BUILTINS)


@pytest.fixture(scope="session")
def site_dir(tmp_path_factory) -> Path:
    return plugin_site.build_plugin_site(tmp_path_factory.getbasetemp() / "rllm_plugin_site")


@pytest.fixture
def installed(site_dir, monkeypatch):
    """The fixture distributions are importable and discoverable for one test only."""
    monkeypatch.syspath_prepend(str(site_dir))
    importlib.invalidate_caches()
    reset_plugins()
    yield site_dir
    for name in list(sys.modules):
        if name.split(".")[0] in plugin_site.MODULES:
            del sys.modules[name]
    reset_plugins()


def infos_by_name() -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return {info.name: info for info in plugin_infos()}


class RewardPlugin:
    def __init__(self, **rewards):
        self.rewards = rewards

    @hookimpl
    def register_rewards(self, register):
        for name, fn in self.rewards.items():
            register(name, fn)


def reward_a(task, action):
    return 1.0


def reward_b(task, action):
    return 0.0


# --------------------------------------------------------------------------------------------
# built-ins and registration


def test_builtins_are_plugins_listed_by_name():
    infos = infos_by_name()
    for name in BUILTINS:
        assert name in infos, f"built-in {name} missing from plugin_infos()"
        assert infos[name].builtin
        assert infos[name].dist is None


def test_builtin_grouping_implements_the_grouping_hook():
    infos = infos_by_name()
    assert "trajectory_grouping_hook" in infos["rllm.grouping"].hooks
    assert get_plugin_manager().get_plugin("rllm.grouping") is not None


def test_registered_plugin_shows_up_and_is_removed_afterwards():
    with registered(RewardPlugin(my_reward=reward_a), name="t_mine") as registry:
        assert registry.resolve("reward", "my_reward") is reward_a
        assert "my_reward" in registry.names("reward")
        assert infos_by_name()["t_mine"].registers == {"reward": ["my_reward"]}
    with pytest.raises(UnknownPluginError):
        get_registry().get("reward", "my_reward")
    assert "t_mine" not in infos_by_name()


def test_each_registration_hook_registers_its_kind():
    objs = {kind: object() for kind in REGISTRATION_HOOKS}

    class Everything:
        @hookimpl
        def register_backends(self, register):
            register("x_backend", objs["backend"], priority=-5)

        @hookimpl
        def register_rewards(self, register):
            register("x_reward", objs["reward"])

        @hookimpl
        def register_loggers(self, register):
            register("x_logger", objs["logger"])

        @hookimpl
        def register_workflows(self, register):
            register("x_workflow", objs["workflow"])

        @hookimpl
        def register_advantage_estimators(self, register):
            register("x_estimator", objs["estimator"])

        @hookimpl
        def register_hooks(self, register):
            register("x_hook", objs["hook"])

        @hookimpl
        def register_tool_parsers(self, register):
            register("x_tool_parser", objs["tool_parser"])

        @hookimpl
        def register_reasoning_parsers(self, register):
            register("x_reasoning_parser", objs["reasoning_parser"])

    with registered(Everything(), name="t_everything") as registry:
        for kind, obj in objs.items():
            reg = registry.get(kind, f"x_{kind}")
            assert reg.obj is obj
            assert reg.plugin == "t_everything"
        assert registry.get("backend", "x_backend").options == {"priority": -5}


def test_default_backend_is_the_highest_priority():
    class Backends:
        @hookimpl
        def register_backends(self, register):
            register("low", object, priority=10**6)
            register("high", object, priority=10**6 + 1)

    with registered(Backends(), name="t_backends") as registry:
        assert registry.default_backend() == "high"


def test_config_model_comes_from_options_or_class_attribute():
    class WithModel:
        config_model = dict

    class Plugin:
        @hookimpl
        def register_loggers(self, register):
            register("attr_logger", WithModel)
            register("option_logger", object, config_model=list)

    with registered(Plugin(), name="t_models") as registry:
        assert registry.get("logger", "attr_logger").config_model is dict
        assert registry.get("logger", "option_logger").config_model is list


def test_duplicate_name_is_rejected_naming_both_plugins():
    with registered(RewardPlugin(dup=reward_a), name="t_first_plugin"):
        with pytest.warns(RuntimeWarning, match=r"t_second_plugin.*'dup'.*already registered by t_first_plugin"):
            with registered(RewardPlugin(dup=reward_b), name="t_second_plugin") as registry:
                assert registry.resolve("reward", "dup") is reward_a
                errors = infos_by_name()["t_second_plugin"].errors
    assert any("t_first_plugin" in e and "t_second_plugin" in e for e in errors)


def test_invalid_registration_name_is_reported():
    with pytest.warns(RuntimeWarning, match="invalid name"):
        with registered(RewardPlugin(**{"": reward_a}), name="t_nameless") as registry:
            assert "" not in registry.names("reward")


def test_unknown_name_lists_registered_names_and_closest_match():
    with registered(RewardPlugin(exact_match=reward_a, f1_score=reward_b), name="t_rewards"):
        with pytest.raises(UnknownPluginError) as err:
            get_registry().get("reward", "exact_mach")
    msg = str(err.value)
    assert "'exact_mach' is not registered" in msg
    assert "exact_match" in msg and "f1_score" in msg
    assert "Did you mean 'exact_match'?" in msg


def test_unknown_verl_backend_suggests_installing_rllm_verl(monkeypatch):
    monkeypatch.setenv("RLLM_PLUGINS_BLOCK", "verl")  # as if rllm-verl were not installed
    reset_plugins()
    with pytest.raises(UnknownPluginError, match="pip install rllm-verl"):
        get_registry().get("backend", "verl")


def test_unknown_kind_is_an_error_listing_kinds():
    with pytest.raises(ValueError, match="kinds: backend"):
        get_registry().get("backends", "x")


def test_module_attr_names_are_imported_on_the_fly():
    reg = get_registry().get("reward", "json:dumps")
    assert reg.obj is json.dumps
    assert reg.plugin == "json"
    assert get_registry().resolve("workflow", "os.path:join") is __import__("os").path.join
    with pytest.raises(UnknownPluginError, match="could not be imported"):
        get_registry().get("reward", "json:no_such_function")
    with pytest.raises(UnknownPluginError, match="could not be imported"):
        get_registry().get("reward", "no_such_module_xyz:fn")


# --------------------------------------------------------------------------------------------
# installed distributions found through their entry points


def test_installed_plugin_is_found_through_its_entry_point(installed):
    infos = infos_by_name()
    good = infos["good"]
    assert (good.dist, good.version, good.builtin) == ("rllm-good-plugin", "1.2.3", False)
    assert good.registers == {
        "backend": ["good", "good_export"],
        "reward": ["good_reward"],
        "hook": ["good_hook"],
        "tool_parser": ["good_tool_parser"],
    }
    assert good.errors == []
    registry = get_registry()
    assert registry.resolve("backend", "good").__module__ == "rllm_good_plugin"
    assert registry.resolve("reward", "good_reward")({"answer": 3}, 3) == 1.0


def test_an_installed_tool_parser_is_selected_by_config_and_used_by_an_engine(installed):
    import asyncio

    from rllm_core.config import load_config
    from rllm_core.engine import RolloutEngine
    from rllm_core.parsers import build_parser
    from rllm_core.types import ModelOutput

    config = load_config(
        {"backend": "simulated", "rollout": {"tool_parser": "good_tool_parser"}}, validate_plugins=True
    )

    class Engine(RolloutEngine):
        supports_tools = True

        async def _generate(self, messages, **sampling):
            return self.parse(ModelOutput(text="call lookup", finish_reason="stop"))

    engine = Engine(tool_parser=build_parser("tool_parser", config.rollout.tool_parser))
    out = asyncio.run(engine.get_model_response([{"role": "user", "content": "?"}], tools=[]))
    assert [c["function"]["name"] for c in out.tool_calls] == ["lookup"] and out.finish_reason == "tool_calls"


def test_plugin_whose_import_raises_does_not_stop_the_others(installed):
    with pytest.warns(RuntimeWarning, match=r"broken_import \(distribution rllm-broken-plugin 0.0.1\)"):
        registry = get_registry()
    assert "good_reward" in registry.names("reward")
    (error,) = infos_by_name()["broken_import"].errors
    assert "rllm-broken-plugin 0.0.1" in error
    assert "RuntimeError: boom while importing rllm_broken_plugin" in error
    assert get_plugin_manager().get_plugin("broken_import") is None


def test_plugin_with_a_bad_hook_signature_is_reported_and_skipped(installed):
    infos = infos_by_name()
    (error,) = infos["bad_hook"].errors
    assert "rllm-broken-plugin 0.0.1" in error
    assert "invalid hook implementation" in error and "not_a_hook_argument" in error
    assert get_plugin_manager().get_plugin("bad_hook") is None
    assert infos["good"].errors == []


def test_plugin_whose_register_hook_raises_is_reported_and_others_register(installed):
    infos = infos_by_name()
    (error,) = infos["raising_register"].errors
    assert "rllm-broken-plugin 0.0.1" in error
    assert "register_rewards raised: ValueError: boom inside register_rewards" in error
    assert "good_reward" in get_registry().names("reward")


def test_strict_mode_reraises_load_errors(installed, monkeypatch):
    monkeypatch.setenv("RLLM_STRICT_PLUGINS", "1")
    monkeypatch.setenv("RLLM_PLUGINS_BLOCK", ALL_BUILTINS)
    reset_plugins()
    with pytest.raises(PluginLoadError, match=r"distribution rllm-broken-plugin 0\.0\.1"):
        get_registry()


def test_strict_mode_reraises_a_raising_register_hook(monkeypatch):
    class Raises:
        @hookimpl
        def register_rewards(self, register):
            raise KeyError("nope")

    monkeypatch.setenv("RLLM_STRICT_PLUGINS", "1")
    monkeypatch.setenv("RLLM_PLUGINS_BLOCK", ALL_BUILTINS)
    with pytest.raises(PluginLoadError, match="t_raiser: register_rewards raised: KeyError"):
        with registered(Raises(), name="t_raiser"):
            pass


def test_allow_list_loads_only_the_named_distributions(installed, monkeypatch):
    monkeypatch.setenv("RLLM_PLUGINS_ALLOW", "rllm-good-plugin")
    reset_plugins()
    infos = infos_by_name()
    assert "good" in infos
    assert not {"broken_import", "bad_hook", "raising_register"} & set(infos)
    assert set(BUILTINS) <= set(infos), "built-ins stay unless blocked"


def test_allow_list_accepts_entry_point_names(installed, monkeypatch):
    monkeypatch.setenv("RLLM_PLUGINS_ALLOW", "bad_hook")
    reset_plugins()
    infos = infos_by_name()
    assert "bad_hook" in infos
    assert not {"good", "broken_import", "raising_register"} & set(infos)


def test_block_list_blocks_a_distribution(installed, monkeypatch):
    monkeypatch.setenv("RLLM_PLUGINS_BLOCK", "rllm-broken-plugin")
    reset_plugins()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        warnings.filterwarnings("ignore", message=r"rllm plugin rllm\.", category=RuntimeWarning)
        infos = {i.name: i for i in plugin_infos()}
    assert "good" in infos
    assert not {"broken_import", "bad_hook", "raising_register"} & set(infos)


def test_block_list_blocks_a_builtin_by_name(monkeypatch):
    monkeypatch.setenv("RLLM_PLUGINS_BLOCK", "rllm.grouping, rllm.opsd")
    reset_plugins()
    infos = infos_by_name()
    assert "rllm.grouping" not in infos and "rllm.opsd" not in infos
    assert get_plugin_manager().get_plugin("rllm.grouping") is None
    assert "rllm.estimators" in infos


def test_loading_is_lazy_and_idempotent(installed):
    import rllm_core.plugins  # noqa: F401  (importing the manager loads nothing)

    assert "rllm_good_plugin" not in sys.modules
    registry = get_registry()
    module = sys.modules["rllm_good_plugin"]
    module.REGISTER_CALLS.clear()
    reset_plugins()
    registry = get_registry()
    assert get_registry() is registry
    assert get_plugin_manager() is get_plugin_manager()
    infos_by_name()
    assert module.REGISTER_CALLS == ["register_backends", "register_rewards", "register_hooks", "register_tool_parsers"]
    assert sys.modules["rllm_good_plugin"] is module, "the plugin module is imported once"
    reset_plugins()
    get_registry()
    assert module.REGISTER_CALLS.count("register_backends") == 2, "reset_plugins() loads again"


# --------------------------------------------------------------------------------------------
# trace switch


def test_trace_switch_prints_registration_and_trainer_hook_calls(monkeypatch, capsys):
    monkeypatch.setenv("RLLM_TRACE_HOOKS", "1")
    reset_plugins()
    with registered(RewardPlugin(traced=reward_a), name="t_traced_plugin"):
        pass
    err = capsys.readouterr().err
    assert "[rllm trace] t_traced_plugin.register_rewards" in err

    class OnBatchEnd:
        @hookimpl
        def on_batch_end(self, trainer, metrics):
            return None

    runner = HookRunner([("tracer", OnBatchEnd())])
    asyncio.run(runner.call("on_batch_end", trainer=None, metrics={}))
    assert "[rllm trace] tracer.on_batch_end" in capsys.readouterr().err


def test_no_trace_without_the_switch(monkeypatch, capsys):
    monkeypatch.delenv("RLLM_TRACE_HOOKS", raising=False)
    with registered(RewardPlugin(quiet=reward_a), name="t_quiet_plugin"):
        pass
    assert "[rllm trace]" not in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# HookRunner: trainer hooks on the plugins a config switches on


class Recorder:
    """Implements every trainer hook, half of them async, recording (hook, args)."""

    def __init__(self):
        self.calls = []

    @hookimpl
    def trajectory_grouping_hook(self, episodes, config):
        self.calls.append(("trajectory_grouping_hook", episodes, config))
        return ["grouped", *episodes]

    @hookimpl
    async def postprocess_opsd(self, episode, engine, config):
        await asyncio.sleep(0)
        self.calls.append(("postprocess_opsd", episode, engine, config))

    @hookimpl
    def on_policy_updated(self, trainer, version):
        self.calls.append(("on_policy_updated", trainer, version))

    @hookimpl
    async def on_train_start(self, trainer):
        self.calls.append(("on_train_start", trainer))

    @hookimpl
    def on_train_end(self, trainer):
        self.calls.append(("on_train_end", trainer))

    @hookimpl
    async def on_epoch_start(self, trainer, epoch):
        self.calls.append(("on_epoch_start", trainer, epoch))

    @hookimpl
    def on_epoch_end(self, trainer, epoch):
        self.calls.append(("on_epoch_end", trainer, epoch))

    @hookimpl
    async def on_batch_start(self, trainer, step):
        self.calls.append(("on_batch_start", trainer, step))

    @hookimpl
    def on_batch_end(self, trainer, metrics):
        self.calls.append(("on_batch_end", trainer, metrics))

    @hookimpl
    async def on_validation_start(self, trainer):
        self.calls.append(("on_validation_start", trainer))

    @hookimpl
    def on_validation_end(self, trainer, metrics):
        self.calls.append(("on_validation_end", trainer, metrics))


def test_every_trainer_hook_reaches_a_switched_on_plugin():
    rec = Recorder()
    runner = HookRunner([("recorder", rec)])
    trainer, metrics = object(), {"loss": 1.0}

    async def drive():
        assert await runner.call_first("trajectory_grouping_hook", episodes=["e"], config="cfg") == ["grouped", "e"]
        await runner.call("postprocess_opsd", episode="ep", engine="eng", config="cfg")
        await runner.call("on_train_start", trainer=trainer)
        await runner.call("on_epoch_start", trainer=trainer, epoch=0)
        await runner.call("on_batch_start", trainer=trainer, step=1)
        await runner.call("on_policy_updated", trainer=trainer, version=1)
        await runner.call("on_batch_end", trainer=trainer, metrics=metrics)
        await runner.call("on_validation_start", trainer=trainer)
        await runner.call("on_validation_end", trainer=trainer, metrics=metrics)
        await runner.call("on_epoch_end", trainer=trainer, epoch=0)
        await runner.call("on_train_end", trainer=trainer)

    asyncio.run(drive())
    assert rec.calls == [
        ("trajectory_grouping_hook", ["e"], "cfg"),
        ("postprocess_opsd", "ep", "eng", "cfg"),
        ("on_train_start", trainer),
        ("on_epoch_start", trainer, 0),
        ("on_batch_start", trainer, 1),
        ("on_policy_updated", trainer, 1),
        ("on_batch_end", trainer, metrics),
        ("on_validation_start", trainer),
        ("on_validation_end", trainer, metrics),
        ("on_epoch_end", trainer, 0),
        ("on_train_end", trainer),
    ]
    assert {c[0] for c in rec.calls} == set(TRAINER_HOOKS)
    assert runner.failures == {}


def test_sync_and_async_implementations_are_both_awaited():
    seen = []

    class SyncImpl:
        @hookimpl
        def on_batch_end(self, trainer, metrics):
            seen.append("sync")
            return "sync-result"

    class AsyncImpl:
        @hookimpl
        async def on_batch_end(self, trainer, metrics):
            await asyncio.sleep(0.001)
            seen.append("async")
            return "async-result"

    runner = HookRunner([("s", SyncImpl()), ("a", AsyncImpl())])
    results = asyncio.run(runner.call("on_batch_end", trainer=None, metrics={}))
    assert sorted(seen) == ["async", "sync"]
    assert sorted(results) == ["async-result", "sync-result"]


def test_implementations_may_take_a_subset_of_the_arguments():
    got = []

    class Partial:
        @hookimpl
        def on_batch_end(self, metrics):
            got.append(metrics)

    asyncio.run(HookRunner([("p", Partial())]).call("on_batch_end", trainer=None, metrics={"a": 1}))
    assert got == [{"a": 1}]


def test_a_raising_implementation_is_isolated_and_counted():
    ran = []

    class Bad:
        @hookimpl
        def on_batch_end(self, trainer, metrics):
            raise RuntimeError("bad hook")

    class Good:
        @hookimpl
        def on_batch_end(self, trainer, metrics):
            ran.append(metrics["step"])

    runner = HookRunner([("good", Good()), ("bad", Bad())])

    async def twice():
        await runner.call("on_batch_end", trainer=None, metrics={"step": 1})
        await runner.call("on_batch_end", trainer=None, metrics={"step": 2})

    with pytest.warns(RuntimeWarning, match="hook on_batch_end of plugin 'bad' raised") as record:
        asyncio.run(twice())
    assert ran == [1, 2]
    assert runner.failures == {"bad.on_batch_end": 2}
    assert len([w for w in record if "bad hook" in str(w.message)]) == 1, "warned once, counted every time"


def test_call_first_follows_pluggy_order_and_stops_at_the_first_result():
    called = []

    def grouping(tag, result, **opts):
        class Impl:
            @hookimpl(**opts)
            def trajectory_grouping_hook(self, episodes, config):
                called.append(tag)
                return result

        return Impl()

    # pluggy order: tryfirst, then last registered first, trylast at the end.
    runner = HookRunner(
        [
            ("default", grouping("default", ["default"], trylast=True)),
            ("older", grouping("older", ["older"])),
            ("newer_none", grouping("newer_none", None)),
        ]
    )
    assert asyncio.run(runner.call_first("trajectory_grouping_hook", episodes=[], config=None)) == ["older"]
    assert called == ["newer_none", "older"]

    called.clear()
    runner.add("eager", grouping("eager", ["eager"], tryfirst=True))
    assert asyncio.run(runner.call_first("trajectory_grouping_hook", episodes=[], config=None)) == ["eager"]
    assert called == ["eager"]


def test_hook_runner_reports_invalid_hook_plugins_by_name():
    class Wrong:
        @hookimpl
        def on_epoch_end(self, trainer, epoch, surplus):
            pass

    with pytest.raises(PluginLoadError, match="hook plugin 'wrong' has an invalid hook implementation"):
        HookRunner([("wrong", Wrong())])


def test_hook_runner_has_and_names():
    runner = HookRunner([("rec", Recorder())])
    assert runner.names() == ["rec"]
    assert runner.has("on_batch_end")
    assert not HookRunner().has("on_batch_end")
