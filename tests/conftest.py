"""Fixtures shared by several test files."""
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

# The benchmark scripts, importable by the tests that check them or reuse their workloads.
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The seed-0 tiny model in the official layout, written once per session. Read-only for the
    tests: worker processes and subprocesses load it by path."""
    from wan22_core.config import TINY
    from wan22_core.tiny import make_tiny  # imports transformers: kept out of processes that import tests

    return make_tiny(tmp_path_factory.mktemp("models") / "official", "official", TINY, seed=0)


@pytest.fixture
def world_readable_dir():
    """A folder any user can enter (pytest's tmp_path is private to its user)."""
    folder = Path(tempfile.mkdtemp(prefix="wan22-test-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)
