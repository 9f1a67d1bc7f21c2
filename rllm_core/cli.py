"""The ``rllm`` command line.

``rllm plugins [--json]``                      what is installed: each plugin, what it registers, load errors
``rllm config show CONFIG [a.b=c ...]``        the resolved config as YAML, plugin defaults included
``rllm train CONFIG [a.b=c ...]``              run ``UnifiedTrainer(load_config(...)).fit()``
``rllm export CHECKPOINT OUT [--backend NAME]`` the backend's export of a checkpoint (e.g. a HF model dir)
``rllm serve CONFIG [a.b=c ...]``              the gateway (``rllm-gateway``) in front of the config's
                                               rollout engine, for debugging agents, until Ctrl-C

Exit codes: 0 success, 1 runtime failure (the traceback is printed), 2 bad config or bad
arguments, 130 interrupted (``rllm train`` stopped by Ctrl-C, after its checkpoint; ``rllm serve``
stopped by Ctrl-C, its only way to end).
Importing this module is cheap; each command imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["main"]

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit code 2."""


# ---------------------------------------------------------------------------------------------
# rllm plugins


def _hook_plugin_hooks(obj: Any) -> list[str]:
    """Trainer hooks that a registered hook factory implements (when it is a class we can inspect)."""
    from rllm_core.hookspecs import TRAINER_HOOKS

    if not isinstance(obj, type):
        return []
    # pluggy's HookimplMarker("rllm") tags implementations with an ``rllm_impl`` dict of options.
    hooks = set()
    for attr in dir(obj):
        opts = getattr(getattr(obj, attr, None), "rllm_impl", None)
        if isinstance(opts, dict):
            hook = opts.get("specname") or attr
            if hook in TRAINER_HOOKS:
                hooks.add(hook)
    return sorted(hooks)


def _plugin_rows() -> list[dict[str, Any]]:
    from rllm_core.plugins import get_registry, plugin_infos

    infos = plugin_infos()
    registry = get_registry()
    rows = []
    for info in infos:
        row = info.as_dict()
        hook_plugins = {}
        for name in info.registers.get("hook", []):
            try:
                obj = registry.resolve("hook", name)
            except LookupError:
                continue
            hook_plugins[name] = _hook_plugin_hooks(obj)
        row["hook_plugins"] = hook_plugins
        rows.append(row)
    return rows


def _format_table(rows: list[dict[str, Any]]) -> str:
    lines = []
    for row in rows:
        origin = "built-in" if row["builtin"] else f"{row['distribution'] or '?'} {row['version'] or '?'}"
        status = "ERROR" if row["errors"] else "ok"
        lines.append(f"{row['name']}  [{origin}]  {status}")
        for kind, names in sorted(row["registers"].items()):
            lines.append(f"    {kind + 's:':<13} {', '.join(names)}")
        if row["hooks"]:
            lines.append(f"    {'hooks:':<13} {', '.join(row['hooks'])}")
        for name, hooks in row["hook_plugins"].items():
            if hooks:
                lines.append(f"    {'hook ' + name + ':':<13} {', '.join(hooks)}")
        for err in row["errors"]:
            first, *rest = err.splitlines()
            lines.append(f"    error: {first}")
            lines.extend(f"           {line}" for line in rest)
    broken = sum(1 for r in rows if r["errors"])
    lines.append("")
    lines.append(f"{len(rows)} plugins, {broken} with errors")
    return "\n".join(lines)


def _cmd_plugins(args: argparse.Namespace) -> int:
    import warnings

    # Load errors are shown in the output; the warnings would only repeat them on stderr.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rows = _plugin_rows()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(_format_table(rows))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# rllm config show


def _cmd_config_show(args: argparse.Namespace) -> int:
    """The config the trainer would run: plugin sections resolved and filled with their defaults.

    ``backend: auto`` becomes the backend the trainer would pick and its section, the hooks' and
    the loggers' settings are shown with every default. A plugin problem (unknown name, bad
    setting) is an error with ``--validate-plugins``; without it, a note on stderr, and what did
    not resolve is shown as written.
    """
    from omegaconf import OmegaConf

    from rllm_core.config import ConfigError, load_config, validate_plugin_sections

    config = load_config(args.config, overrides=args.overrides)
    try:
        validate_plugin_sections(config)
    except ConfigError as exc:
        if args.validate_plugins:
            raise
        print(f"rllm: note: plugin sections that did not resolve are shown as written: {exc}", file=sys.stderr)
    shown = config.to_dict()
    backend_section = config.plugin_config(config.backend)
    if hasattr(backend_section, "model_dump"):  # validated: every default filled in
        shown[config.backend] = backend_section.model_dump(mode="json")
    sys.stdout.write(OmegaConf.to_yaml(OmegaConf.create(shown)))
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# rllm train


def _cmd_train(args: argparse.Namespace) -> int:
    from rllm_core.config import load_config

    config = load_config(args.config, overrides=args.overrides)
    from rllm_core.trainer import UnifiedTrainer

    trainer = UnifiedTrainer(config)
    trainer.fit()
    if trainer.interrupted:  # stopped gracefully, but a wrapper must tell it from a finished run
        where = f"; checkpoint {trainer.last_checkpoint}" if trainer.last_checkpoint else ""
        print(f"rllm: interrupted at step {trainer.step}{where}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# rllm export


def _saved_backend(checkpoint: Path) -> str | None:
    """The backend named in what the trainer saved with (or next to) the checkpoint."""
    for directory in (checkpoint, checkpoint.parent, checkpoint.parent.parent):
        state = directory / "trainer_state.json"
        if state.is_file():
            try:
                data = json.loads(state.read_text())
            except ValueError:
                data = {}
            name = data.get("backend") or (data.get("config") or {}).get("backend")
            if isinstance(name, str) and name and name != "auto":
                return name
        config = directory / "config.yaml"
        if config.is_file():
            from omegaconf import OmegaConf

            try:
                name = OmegaConf.load(config).get("backend")
            except Exception:
                name = None
            if isinstance(name, str) and name and name != "auto":
                return name
    return None


def _cmd_export(args: argparse.Namespace) -> int:
    from rllm_core.plugins import UnknownPluginError, get_registry

    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise _UsageError(f"checkpoint directory not found: {checkpoint}")
    name = args.backend or _saved_backend(checkpoint)
    if name is None:
        raise _UsageError(
            f"cannot tell which backend wrote {checkpoint} (no trainer_state.json or config.yaml naming it); "
            "pass --backend NAME"
        )
    try:
        backend_cls = get_registry().resolve("backend", name)
    except UnknownPluginError as exc:
        raise _UsageError(f"--backend: {exc}") from None
    export = getattr(backend_cls, "export", None)
    if not callable(export):
        raise _UsageError(
            f"backend {name!r} does not support export (its class has no export(checkpoint_dir, out_dir))"
        )
    result = export(checkpoint, Path(args.out))
    print(f"exported {checkpoint} with backend {name!r} to {result or args.out}")
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# rllm serve


def _cmd_serve(args: argparse.Namespace) -> int:
    """The gateway in front of the rollout engine the trainer would build, until Ctrl-C.

    The backend and its engine are built as ``UnifiedTrainer`` builds them; the sampling defaults are
    ``rollout.train_sampling`` (``--validation``: ``val_sampling``), which a request's own settings
    override. One session is opened at start and printed with its key; the admin key opens more and
    shows what a session recorded.
    """
    try:
        from rllm_gateway import Gateway
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "rllm_gateway":
            raise  # installed, but something it needs is not: the traceback says what
        raise _UsageError("needs the gateway plugin, which is not installed: pip install rllm-gateway") from None
    import asyncio
    import secrets
    import urllib.parse

    from rllm_core.config import load_config, validate_plugin_sections
    from rllm_core.engine import SamplingEngine
    from rllm_core.plugins import get_registry

    config = load_config(args.config, overrides=args.overrides)
    validate_plugin_sections(config)
    backend = get_registry().resolve("backend", config.backend)(config)
    backend.validate_config(config)
    engine = backend.init_rollout_engine()
    if getattr(backend, "rollout_engine", None) is None:
        backend.rollout_engine = engine
    sampling = config.rollout.val_sampling if args.validation else config.rollout.train_sampling
    served = SamplingEngine(engine, sampling, is_validation=args.validation)
    admin_key = args.admin_key or "sk-rllm-admin-" + secrets.token_urlsafe(24)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    gateway = Gateway(served, host=args.host, port=args.port, advertise=args.advertise, loop=loop, admin_key=admin_key)
    try:
        try:
            gateway.start()
        except OSError as exc:
            raise _UsageError(f"--host {args.host} --port {args.port}: cannot listen there ({exc})") from None
        url, key = gateway.open(args.session)
        base, sid = gateway.base_url, urllib.parse.quote(args.session, safe="")
        auth = f"-H 'Authorization: Bearer {admin_key}'"
        print(
            f"rllm serve: gateway for backend {config.backend!r} on {base} "
            f"({'validation' if args.validation else 'training'} sampling)\n"
            f"session {args.session!r}, ready for an OpenAI client:\n"
            f"  export OPENAI_BASE_URL={url}\n"
            f"  export OPENAI_API_KEY={key}\n"
            f"admin key: {admin_key}\n"
            f'open another session:   curl -s -X POST {base}/sessions {auth} -d \'{{"session_id": "mine"}}\'\n'
            f"what a session recorded: curl -s {base}/sessions/{sid}/traces {auth}\n"
            f"close a session:        curl -s -X DELETE {base}/sessions/{sid} {auth}\n"
            "serving until Ctrl-C",
            flush=True,
        )
        loop.run_forever()  # the engine's loop; Ctrl-C raises KeyboardInterrupt out of it
    finally:
        gateway.stop()
        loop.run_until_complete(backend.shutdown())
        loop.close()
    return EXIT_OK


# ---------------------------------------------------------------------------------------------
# entry point


def _parser() -> argparse.ArgumentParser:
    from rllm_core import __version__

    parser = argparse.ArgumentParser(prog="rllm", description="RL post-training for LLM agents (rllm-core).")
    parser.add_argument("--version", action="version", version=f"rllm-core {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("plugins", help="list installed plugins, what they register, and load errors")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    p.set_defaults(func=_cmd_plugins)

    p = commands.add_parser("config", help="inspect configs")
    config_commands = p.add_subparsers(dest="config_command", metavar="SUBCOMMAND", required=True)
    p = config_commands.add_parser("show", help="print the resolved config as YAML")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotlist overrides, e.g. trainer.mode=async")
    p.add_argument(
        "--validate-plugins",
        action="store_true",
        help="make a plugin problem (unknown backend, workflow, reward, hook, logger or estimator; bad plugin setting) "
        "an error (exit 2) instead of a note",
    )
    p.set_defaults(func=_cmd_config_show)

    p = commands.add_parser("train", help="train with a config")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotlist overrides, e.g. backend=torch")
    p.set_defaults(func=_cmd_train)

    p = commands.add_parser("export", help="export a checkpoint with its backend (e.g. to a Hugging Face model dir)")
    p.add_argument("checkpoint", help="checkpoint directory")
    p.add_argument("out", help="output directory")
    p.add_argument("--backend", help="backend that wrote the checkpoint (default: read from the saved config)")
    p.set_defaults(func=_cmd_export)

    p = commands.add_parser(
        "serve", help="serve the gateway (rllm-gateway) in front of the config's rollout engine, until Ctrl-C"
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotlist overrides, e.g. backend=torch")
    p.add_argument("--host", default="127.0.0.1", help="where to bind (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    p.add_argument("--advertise", help="the host name URLs give (default: --host, or this machine's name)")
    p.add_argument("--session", default="debug", help="id of the session opened at start")
    p.add_argument("--admin-key", help="key of the admin routes (default: a random one, printed)")
    p.add_argument("--validation", action="store_true", help="sample with rollout.val_sampling")
    p.set_defaults(func=_cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``rllm`` command; returns the exit code."""
    parser = _parser()
    # Intermixed parsing lets options follow the KEY=VALUE overrides (``show c.yaml a=1 --validate-plugins``).
    args, rest = parser.parse_known_args(argv)
    if rest:
        if hasattr(args, "overrides") and not any(r.startswith("-") for r in rest):
            args.overrides = [*args.overrides, *rest]
        else:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")

    import warnings

    from rllm_core.config import ConfigError
    from rllm_core.plugins import PluginLoadError

    # One line per warning (plugin load errors, deprecations), without the source line Python adds.
    warnings.formatwarning = lambda message, category, *_args, **_kw: f"rllm: {category.__name__}: {message}\n"

    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"rllm: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except _UsageError as exc:
        print(f"rllm {args.command}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PluginLoadError as exc:
        print(f"rllm: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("rllm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception:
        import traceback

        traceback.print_exc()
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
