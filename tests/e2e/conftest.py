"""pytest fixtures of the end-to-end suite. Importing harness generates the python stubs from
proto/ once (shared by concurrent runs through an atomic rename) and puts them on sys.path."""

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402


def pytest_report_header(config):
    return [f"luacallout binary: {harness.BIN}", f"python stubs: {harness.STUB_DIR}"]


@pytest.fixture(scope="session", autouse=True)
def _binary_present():
    if not os.access(harness.BIN, os.X_OK):
        pytest.fail(f"server binary {harness.BIN} is missing or not executable "
                    f"(set LUACALLOUT_BIN)", pytrace=False)


@pytest.fixture
def servers(tmp_path):
    """Function-scoped factory: servers started here are SIGTERMed at teardown and must exit 0
    without a sanitizer report."""
    f = harness.ServerFactory(tmp_path)
    yield f
    f.close()


@pytest.fixture(scope="module")
def module_servers(tmp_path_factory, request):
    """Module-scoped factory, for one server shared by the tests of a module."""
    f = harness.ServerFactory(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))
    yield f
    f.close()
