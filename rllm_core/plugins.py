"""The plugin manager: entry points, built-ins, the registry of named things, trainer-hook calls.

Everything beyond the core arrives through the pluggy entry-point group ``rllm``. Built-ins are
registered through the same path (as plugins named ``rllm.*``), so they can be blocked by name.

Environment switches:

``RLLM_STRICT_PLUGINS=1``  re-raise plugin load and registration errors instead of warning.
``RLLM_PLUGINS_ALLOW``     comma list: load only these entry points / distributions (built-ins
                           stay unless blocked).
``RLLM_PLUGINS_BLOCK``     comma list of entry points, distributions or built-ins not to load.
``RLLM_TRACE_HOOKS=1``     print every hook call (plugin, hook, duration) to stderr.
"""

from __future__ import annotations

import asyncio
import difflib
import importlib
import inspect
import os
import pkgutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pluggy

from rllm_core import hookspecs
from rllm_core.hookspecs import REGISTRATION_HOOKS

__all__ = [
    "HookRunner",
    "PluginInfo",
    "PluginLoadError",
    "Registration",
    "Registry",
    "UnknownPluginError",
    "get_plugin_manager",
    "get_registry",
    "import_object",
    "plugin_infos",
    "registered",
    "reset_plugins",
]

BUILTINS: dict[str, str] = {
    "rllm.estimators": "rllm_core.builtins.estimators",
    "rllm.grouping": "rllm_core.builtins.grouping",
    "rllm.loggers": "rllm_core.builtins.loggers",
    "rllm.opsd": "rllm_core.builtins.opsd",
    "rllm.parsers": "rllm_core.builtins.parsers",
    "rllm.testing": "rllm_core.builtins.testing",
}

# Names users are likely to ask for, and the distribution that provides them.
KNOWN_PROVIDERS: dict[tuple[str, str], str] = {
    ("backend", "torch"): "rllm-torch",
    ("backend", "tinker"): "rllm-tinker",
    ("backend", "verl"): "rllm-verl",
    ("logger", "wandb"): "rllm-wandb",
    ("logger", "mlflow"): "rllm-mlflow",
    **{
        ("reward", name): "rllm-rewards"
        for name in ("math", "countdown", "exact_match", "f1", "multiple_choice", "code")
    },
}

ENTRY_POINT_GROUP = "rllm"


class UnknownPluginError(LookupError):
    """A name that no installed plugin registered."""


class PluginLoadError(RuntimeError):
    """A plugin failed to import, register, or validate (strict mode only raises this)."""


@dataclass
class Registration:
    """One named thing a plugin registered."""

    kind: str
    name: str
    obj: Any
    plugin: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def config_model(self) -> Any:
        """The pydantic model for this thing's config section, if it declares one."""
        return self.options.get("config_model") or getattr(self.obj, "config_model", None)


@dataclass
class PluginInfo:
    """What ``rllm plugins`` shows for one plugin."""

    name: str
    dist: str | None = None
    version: str | None = None
    builtin: bool = False
    registers: dict[str, list[str]] = field(default_factory=dict)
    hooks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.dist,
            "version": self.version,
            "builtin": self.builtin,
            "registers": self.registers,
            "hooks": self.hooks,
            "errors": self.errors,
        }


def _env_list(name: str) -> set[str]:
    return {x.strip() for x in os.environ.get(name, "").split(",") if x.strip()}


def _strict() -> bool:
    return os.environ.get("RLLM_STRICT_PLUGINS", "") not in ("", "0", "false", "False")


def _report(info: PluginInfo, message: str, exc: BaseException | None = None) -> None:
    where = info.name
    if info.dist:
        where += f" (distribution {info.dist} {info.version or '?'})"
    text = f"rllm plugin {where}: {message}"
    if exc is not None:
        text += f": {type(exc).__name__}: {exc}"
    info.errors.append(text)
    if _strict():
        raise PluginLoadError(text) from exc
    warnings.warn(text, RuntimeWarning, stacklevel=3)


def import_object(spec: str) -> Any:
    """Import ``package.module:attr.sub`` and return the attribute.

    The module must be importable: an installed package, or a module in a directory on
    ``sys.path`` (e.g. one in ``PYTHONPATH``). The working directory is tried last when it is not
    on ``sys.path``: ``python -m`` puts it there but console scripts such as ``rllm`` do not, and
    appending it never shadows an installed module. Errors say which part is missing and list the
    closest names.
    """
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected 'module:attr', got {spec!r}")
    obj: Any = _import_module(module_name)
    where = module_name
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            names = [n for n in dir(obj) if not n.startswith("_")]
            raise AttributeError(f"{where!r} has no attribute {part!r}{_close_names(part, names)}") from None
        where = f"{where}:{part}" if where == module_name else f"{where}.{part}"
    return obj


def _close_names(name: str, candidates: Any) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3)
    return f" (close names: {', '.join(close)})" if close else ""


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or name
        if name != missing and not name.startswith(missing + "."):
            raise  # the module exists, but something it imports is not installed
        cwd = os.getcwd()
        if cwd not in sys.path and "" not in sys.path:
            sys.path.append(cwd)
            try:
                return importlib.import_module(name)
            except ModuleNotFoundError as again:
                if again.name != missing:
                    raise
                sys.path.remove(cwd)
        parent = missing.rpartition(".")[0]
        try:
            path = importlib.import_module(parent).__path__ if parent else [*sys.path, cwd]
            siblings = [f"{parent}.{m.name}" if parent else m.name for m in pkgutil.iter_modules(path)]
        except Exception:  # best effort: only for the hint
            siblings = []
        raise ModuleNotFoundError(
            f"no module named {missing!r}{_close_names(missing, siblings)}; the module must be importable: "
            f"an installed package (pip install -e .), or a module in the working directory ({cwd}) or in a "
            "directory listed in PYTHONPATH",
            name=missing,
        ) from None


class _Manager:
    """Loads plugins once and builds the registry once (thread-safe, idempotent)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.pm: pluggy.PluginManager | None = None
        self.infos: dict[str, PluginInfo] = {}
        self.registry: Registry | None = None

    def plugin_manager(self) -> pluggy.PluginManager:
        with self._lock:
            if self.pm is None:
                self.pm = self._load()
            return self.pm

    def _load(self) -> pluggy.PluginManager:
        pm = pluggy.PluginManager("rllm")
        pm.add_hookspecs(hookspecs)
        if os.environ.get("RLLM_TRACE_HOOKS"):
            pm.trace.root.setwriter(lambda msg: sys.stderr.write(f"[rllm trace] {msg}"))
            pm.enable_tracing()
        blocked = _env_list("RLLM_PLUGINS_BLOCK")
        allowed = _env_list("RLLM_PLUGINS_ALLOW")
        for name, module_name in BUILTINS.items():
            if name in blocked:
                continue
            info = self.infos.setdefault(name, PluginInfo(name=name, builtin=True))
            try:
                pm.register(importlib.import_module(module_name), name=name)
            except Exception as exc:
                _report(info, "failed to load", exc)
        self._load_entry_points(pm, allowed, blocked)
        for info in self.infos.values():
            plugin = pm.get_plugin(info.name)
            if plugin is not None:
                info.hooks = sorted(
                    h.name for h in pm.get_hookcallers(plugin) or [] if not h.name.startswith("register_")
                )
        return pm

    def _load_entry_points(self, pm: pluggy.PluginManager, allowed: set[str], blocked: set[str]) -> None:
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = getattr(ep, "dist", None)
            dist_name = dist.metadata["Name"] if dist is not None else None
            names = {ep.name, dist_name} - {None}
            if names & blocked or (allowed and not names & allowed):
                continue
            if pm.get_plugin(ep.name) is not None or ep.name in self.infos:
                continue  # the same entry point seen twice (e.g. an editable and a regular install)
            info = PluginInfo(name=ep.name, dist=dist_name, version=dist.version if dist else None)
            self.infos[ep.name] = info
            try:
                plugin = ep.load()
            except Exception as exc:
                _report(info, f"failed to import {ep.value!r}", exc)
                continue
            try:
                pm.register(plugin, name=ep.name)
            except Exception as exc:
                _report(info, "has an invalid hook implementation", exc)

    def get_registry(self) -> Registry:
        with self._lock:
            if self.registry is None:
                self.registry = Registry(self.plugin_manager(), self.infos)
            return self.registry

    def reset(self) -> None:
        with self._lock:
            self.pm = None
            self.infos = {}
            self.registry = None


_MANAGER = _Manager()


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with built-ins and entry points loaded (once)."""
    return _MANAGER.plugin_manager()


def get_registry() -> Registry:
    """The process-wide registry of backends, rewards, loggers, workflows, estimators, hooks and parsers."""
    return _MANAGER.get_registry()


def plugin_infos() -> list[PluginInfo]:
    """Every plugin seen, loaded or not, with what it registered and its errors."""
    get_registry()
    return list(_MANAGER.infos.values())


def reset_plugins() -> None:
    """Forget loaded plugins; the next lookup loads them again (tests, notebooks)."""
    _MANAGER.reset()


@contextmanager
def registered(plugin: Any, name: str | None = None) -> Iterator[Registry]:
    """Register ``plugin`` (an object or module with ``@hookimpl`` functions) for a block."""
    pm = get_plugin_manager()
    plugin_name = pm.register(plugin, name=name)
    _MANAGER.infos.setdefault(plugin_name or "?", PluginInfo(name=plugin_name or "?"))
    _MANAGER.registry = None
    try:
        yield get_registry()
    finally:
        pm.unregister(name=plugin_name)
        _MANAGER.infos.pop(plugin_name or "?", None)
        _MANAGER.registry = None


class Registry:
    """Named things by kind: ``backend``, ``reward``, ``logger``, ``workflow``, ``estimator``, ``hook``,
    ``tool_parser``, ``reasoning_parser``."""

    KINDS = tuple(REGISTRATION_HOOKS)

    def __init__(self, pm: pluggy.PluginManager, infos: dict[str, PluginInfo]) -> None:
        self._items: dict[str, dict[str, Registration]] = {k: {} for k in self.KINDS}
        # Registration hooks are called directly (one try/except per plugin), so pluggy's own
        # tracing never sees them: trace them here.
        trace = bool(os.environ.get("RLLM_TRACE_HOOKS"))
        for kind, hook_name in REGISTRATION_HOOKS.items():
            hook = getattr(pm.hook, hook_name)
            # pluggy calls implementations last-registered first; we register in load order so
            # that built-ins come first and a clash is reported against the later plugin.
            for impl in hook.get_hookimpls():
                info = infos.setdefault(impl.plugin_name, PluginInfo(name=impl.plugin_name))
                start = time.perf_counter()
                try:
                    impl.function(register=self._register_fn(kind, info))
                except PluginLoadError:
                    raise
                except Exception as exc:
                    _report(info, f"{hook_name} raised", exc)
                finally:
                    if trace:
                        ms = (time.perf_counter() - start) * 1e3
                        sys.stderr.write(f"[rllm trace] {impl.plugin_name}.{hook_name} {ms:.2f} ms\n")

    def _register_fn(self, kind: str, info: PluginInfo):
        def register(name: str, obj: Any, **options: Any) -> None:
            if not isinstance(name, str) or not name:
                _report(info, f"registered a {kind} with an invalid name {name!r}")
                return
            existing = self._items[kind].get(name)
            if existing is not None and existing.plugin != info.name:
                _report(info, f"{kind} {name!r} is already registered by {existing.plugin}; ignored")
                return
            self._items[kind][name] = Registration(kind, name, obj, info.name, options)
            info.registers.setdefault(kind, []).append(name)

        return register

    def names(self, kind: str) -> list[str]:
        """Registered names of one kind, sorted."""
        return sorted(self._items[kind])

    def get(self, kind: str, name: str) -> Registration:
        """The registration for ``name``; ``module:attr`` strings are imported on the fly."""
        if kind not in self._items:
            raise ValueError(f"unknown plugin kind {kind!r}; kinds: {', '.join(self.KINDS)}")
        found = self._items[kind].get(name)
        if found is not None:
            return found
        if ":" in name:
            try:
                obj = import_object(name)
            except (ImportError, AttributeError, ValueError) as exc:
                raise UnknownPluginError(f"{kind} {name!r} could not be imported: {exc}") from exc
            return Registration(kind, name, obj, plugin=name.partition(":")[0])
        raise UnknownPluginError(self._unknown_message(kind, name))

    def _unknown_message(self, kind: str, name: str) -> str:
        names = self.names(kind)
        msg = f"{kind} {name!r} is not registered; registered {kind}s: {', '.join(names) or '(none)'}."
        close = difflib.get_close_matches(name, names, n=1)
        if close:
            msg += f" Did you mean {close[0]!r}?"
        provider = KNOWN_PROVIDERS.get((kind, name))
        if provider:
            msg += f" It is provided by {provider}: pip install {provider}"
        elif kind != "backend":
            msg += " An importable 'module:attr' path also works."
        return msg

    def resolve(self, kind: str, name: str) -> Any:
        """The registered object itself."""
        return self.get(kind, name).obj

    def default_backend(self) -> str:
        """The installed backend with the highest ``priority``; never one registered with ``auto=False``."""
        items = self._items["backend"]
        candidates = [r for r in items.values() if r.options.get("auto", True)]
        if not candidates:
            msg = "no backend is installed; pip install rllm-torch (the local backend)"
            if items:
                msg += f". Never chosen by 'auto', but selectable by name (backend=NAME): {', '.join(sorted(items))}"
            raise UnknownPluginError(msg)
        return max(candidates, key=lambda r: (r.options.get("priority", 0), r.name)).name


class HookRunner:
    """Calls trainer hooks on the hook plugins a run switched on.

    Implementations may be sync or async. One that raises is reported once per hook with the
    plugin's name and counted in ``failures``; the others still run and training goes on.
    """

    def __init__(self, plugins: list[tuple[str, Any]] | None = None, trace: bool | None = None) -> None:
        self.pm = pluggy.PluginManager("rllm")
        self.pm.add_hookspecs(hookspecs)
        self.failures: dict[str, int] = {}
        self.trace = bool(os.environ.get("RLLM_TRACE_HOOKS")) if trace is None else trace
        for name, plugin in plugins or []:
            self.add(name, plugin)

    def add(self, name: str, plugin: Any) -> None:
        try:
            self.pm.register(plugin, name=name)
        except Exception as exc:
            raise PluginLoadError(f"hook plugin {name!r} has an invalid hook implementation: {exc}") from exc

    def names(self) -> list[str]:
        return [n for n, _ in self.pm.list_name_plugin()]

    def has(self, hook: str) -> bool:
        return bool(getattr(self.pm.hook, hook).get_hookimpls())

    async def _call_impl(self, hook: str, impl: Any, kwargs: dict[str, Any]) -> Any:
        args = {k: kwargs[k] for k in impl.argnames if k in kwargs}
        start = time.perf_counter()
        try:
            result = impl.function(**args)
            if inspect.isawaitable(result):
                result = await result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            key = f"{impl.plugin_name}.{hook}"
            self.failures[key] = self.failures.get(key, 0) + 1
            if self.failures[key] == 1:
                warnings.warn(
                    f"hook {hook} of plugin {impl.plugin_name!r} raised {exc!r}", RuntimeWarning, stacklevel=2
                )
            return None
        finally:
            if self.trace:
                ms = (time.perf_counter() - start) * 1e3
                sys.stderr.write(f"[rllm trace] {impl.plugin_name}.{hook} {ms:.2f} ms\n")
        return result

    def _impls(self, hook: str) -> list[Any]:
        # pluggy's own call order: last registered first, tryfirst/trylast respected.
        return list(reversed(getattr(self.pm.hook, hook).get_hookimpls()))

    async def call(self, hook: str, **kwargs: Any) -> list[Any]:
        """Call every implementation in order; return the non-None results."""
        results = []
        for impl in self._impls(hook):
            result = await self._call_impl(hook, impl, kwargs)
            if result is not None:
                results.append(result)
        return results

    async def call_first(self, hook: str, **kwargs: Any) -> Any:
        """Call implementations in order until one returns non-None."""
        for impl in self._impls(hook):
            result = await self._call_impl(hook, impl, kwargs)
            if result is not None:
                return result
        return None
