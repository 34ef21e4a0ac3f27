import pytest


@pytest.fixture(autouse=True)
def _single_threaded(one_thread):
    """Every test here runs on one thread (see tests/conftest.py)."""
