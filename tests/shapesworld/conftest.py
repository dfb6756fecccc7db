import pytest

from tests.tiny import tiny_quickstart


@pytest.fixture(scope="module")
def stage0(tmp_path_factory):
    """The parts (data, stage 0) a test module's method runs start from."""
    out = tmp_path_factory.mktemp("qs")
    tiny_quickstart(out)
    return out
