"""Shared test fixtures: real data location, free ports, real peer programs.

Data lives outside the repository (``CAD_NODE_TEST_DATA``, default
``../shared/data``).  Tests that need it skip with a reason when it is missing,
except under ``CI=true``, where a missing data set is a failure.  The files
that ship inside pydicom are read from there (:func:`pydicom_data`), so the
tests that need only those never skip.

pydicom raises on invalid values during the tests, as highdicom's own
conftest makes it (``enforce_valid_values``, in pydicom 3
``settings.reading_validation_mode`` - which also governs values assigned to
a data set - and ``settings.writing_validation_mode`` set to ``RAISE``): a
builder that writes an invalid value fails its test.  A test that must handle
invalid values on purpose (a hostile peer's data set, a source file with a
bad value) marks itself ``@pytest.mark.invalid_values`` and runs with
pydicom's default (warn).
"""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import NoReturn

import pydicom
import pytest
from pydicom import config as pydicom_config

REPO_ROOT = Path(__file__).resolve().parent.parent

#: Real peer programs, called by absolute path: pynetdicom installs its own
#: ``storescu``/``echoscu`` scripts into the venv, which would shadow dcmtk's.
STORESCU = "/usr/bin/storescu"
ECHOSCU = "/usr/bin/echoscu"
STORESCP = "/usr/bin/storescp"
DSRDUMP = "/usr/bin/dsrdump"
DCIODVFY = "/usr/bin/dciodvfy"
ORTHANC = "/usr/sbin/Orthanc"
REDIS_SERVER = "/usr/bin/redis-server"
SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"


def in_ci() -> bool:
    """True when running under CI (``CI=true``)."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def data_root() -> Path:
    """Root of the shared test data (``CAD_NODE_TEST_DATA``)."""
    env = os.environ.get("CAD_NODE_TEST_DATA")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data")


#: Folder of ``data_root()`` that mirrors pydicom's bundled test files.
PYDICOM_TEST_FILES = "pydicom-test-files"


def pydicom_data(name: str) -> Path:
    """A test file that ships inside pydicom (``pydicom.data.get_testdata_file``).

    Never downloads (``download=False``): a name pydicom does not bundle is a
    test error, not missing data.
    """
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if not isinstance(path, str):
        pytest.fail(f"{name} is not bundled with pydicom {pydicom.__version__}")
    return Path(path)


def _bundled_with_pydicom(name: str) -> bool:
    from pydicom.data import get_testdata_file

    return isinstance(get_testdata_file(name, download=False), str)


def require_data(*parts: str) -> Path:
    """Return ``data_root()/parts``; skip (or fail under CI) when it is missing.

    ``require_data("pydicom-test-files", name)`` returns :func:`pydicom_data`
    when pydicom bundles ``name``: those tests need no shared data.
    """
    if len(parts) == 2 and parts[0] == PYDICOM_TEST_FILES and _bundled_with_pydicom(parts[1]):
        return pydicom_data(parts[1])
    path = data_root().joinpath(*parts)
    if not path.exists():
        skip_or_fail(f"test data {path} is missing (set CAD_NODE_TEST_DATA)")
    return path


def skip_or_fail(reason: str) -> NoReturn:
    """Skip the test with ``reason``; under ``CI=true`` fail it instead."""
    if in_ci():
        pytest.fail(reason + " — required under CI=true")
    pytest.skip(reason)


def require_program(path: str) -> str:
    """Return ``path`` if it is an executable; skip (or fail under CI) otherwise.

    Only the absolute path counts, never a program of the same name on
    ``PATH``: with the venv active that would be pynetdicom's ``storescu``.
    """
    if not os.path.isabs(path):
        raise ValueError(f"peer programs are called by absolute path, not {path!r}")
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        skip_or_fail(f"peer program {path} is not installed (make peers)")
    return path


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "invalid_values: the test handles invalid DICOM values on purpose"
    )
    # Session-wide, so module- and session-scoped fixtures that build objects
    # run under it too.
    pydicom_config.settings.reading_validation_mode = pydicom_config.RAISE
    pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE


@pytest.fixture(autouse=True)
def _lenient_pydicom_when_marked(request: pytest.FixtureRequest):  # type: ignore[no-untyped-def]
    """pydicom's default (warn) for a test marked ``invalid_values``."""
    if request.node.get_closest_marker("invalid_values") is None:
        yield
        return
    settings = pydicom_config.settings
    before = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom_config.WARN
    try:
        yield
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = before


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    """Run dicom3tools ``dciodvfy`` on ``path``; return (errors, warnings) lines."""
    exe = require_program(DCIODVFY)
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [ln for ln in lines if ln.startswith("Error")]
    warnings = [ln for ln in lines if ln.startswith("Warning")]
    return errors, warnings


@pytest.fixture(scope="session")
def lidc_dir() -> Path:
    """The 133-slice LIDC-IDRI-0001 series directory (DICOM files + 069.xml)."""
    root = require_data("lidc-idri-0001", "LIDC-IDRI-0001")
    series = [p.parent for p in root.rglob("069.xml")]
    assert len(series) == 1, f"expected one series folder with 069.xml under {root}"
    return series[0]


@pytest.fixture(scope="session")
def lidc_series(lidc_dir: Path):  # type: ignore[no-untyped-def]
    """LIDC-IDRI-0001 loaded once per session (``cad_node.imaging.LoadedSeries``)."""
    from cad_node.imaging import load_series

    return load_series(sorted(lidc_dir.glob("*.dcm")))


@pytest.fixture(scope="session")
def ct_chest_lidc_run(lidc_series):  # type: ignore[no-untyped-def]
    """ONE ct-chest pipeline run on LIDC-IDRI-0001 per session (``CtChestRun``)."""
    from cad_node.pipelines.ct_chest.pipeline import CtChestPipeline

    return CtChestPipeline().run_detailed(lidc_series)
