"""A gateway over the scripted engine, served on 127.0.0.1 for the module."""

from __future__ import annotations

import pytest
from gateway_helpers import ScriptedEngine
from rllm_gateway import Gateway

from rllm_core.plugins import reset_plugins


@pytest.fixture(autouse=True)
def _fresh_plugins():
    reset_plugins()
    yield
    reset_plugins()


@pytest.fixture(scope="module")
def gateway():
    gw = Gateway(ScriptedEngine()).start()
    yield gw
    gw.stop()
