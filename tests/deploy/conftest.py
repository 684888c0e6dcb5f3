import pytest

from tests.support.bundle_run import tiny_run


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory):
    """A tiny finished run shared by the deploy tests (trained once per worker)."""
    return tiny_run(tmp_path_factory)
