"""Meta-tests that keep the plugin surface honest: every hookspec is tested and documented."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest

from rllm_core import hookspecs

ROOT = Path(__file__).resolve().parent.parent
HOOKSPECS = sorted(name for name, fn in vars(hookspecs).items() if hasattr(fn, "rllm_spec"))


def signature(name: str) -> str:
    """``name(arg, other)``: how the docs must spell each hook."""
    params = inspect.signature(getattr(hookspecs, name)).parameters
    return f"{name}({', '.join(params)})"


def test_hookspecs_are_found_and_grouped():
    assert len(HOOKSPECS) >= 17
    assert set(HOOKSPECS) == set(hookspecs.REGISTRATION_HOOKS.values()) | set(hookspecs.TRAINER_HOOKS)


def _test_sources() -> str:
    files = [*ROOT.glob("tests/**/*.py"), *ROOT.glob("plugins/*/tests/**/*.py")]
    return "\n".join(p.read_text() for p in files if p.resolve() != Path(__file__).resolve())


@pytest.mark.parametrize("name", HOOKSPECS)
def test_every_hookspec_is_exercised_by_a_test(name):
    assert re.search(rf"\b{name}\b", _test_sources()), f"no test under tests/ or plugins/*/tests/ mentions {name}"


@pytest.mark.parametrize("name", HOOKSPECS)
def test_every_hookspec_is_documented_with_its_signature(name):
    docs = "\n".join(p.read_text() for p in (ROOT / "docs").glob("**/*.md"))
    assert signature(name) in docs, f"docs/ must document {signature(name)} (see docs/plugins.md)"
