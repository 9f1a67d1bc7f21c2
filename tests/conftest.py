import pytest

from rllm_core.plugins import reset_plugins


@pytest.fixture(autouse=True)
def _fresh_plugins():
    """Each test sees the installed plugins loaded afresh (and leaves nothing registered behind)."""
    reset_plugins()
    yield
    reset_plugins()
