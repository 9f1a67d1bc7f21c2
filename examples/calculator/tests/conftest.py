import pytest

from rllm_core.plugins import reset_plugins


@pytest.fixture(autouse=True)
def _fresh_plugins():
    reset_plugins()
    yield
    reset_plugins()
