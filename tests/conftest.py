"""Shared test fixtures: real data location, free ports, real peer programs.

Data lives outside the repository (``CAD_NODE_TEST_DATA``, default
``../shared/data``).  Tests that need it skip with a reason when it is missing,
except under ``CI=true``, where a missing data set is a failure.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

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


def in_ci() -> bool:
    """True when running under CI (``CI=true``)."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def data_root() -> Path:
    """Root of the shared test data (``CAD_NODE_TEST_DATA``)."""
    env = os.environ.get("CAD_NODE_TEST_DATA")
    return Path(env) if env else (REPO_ROOT.parent / "shared" / "data")


def require_data(*parts: str) -> Path:
    """Return ``data_root()/parts``; skip (or fail under CI) when it is missing."""
    path = data_root().joinpath(*parts)
    if not path.exists():
        msg = f"test data {path} is missing (set CAD_NODE_TEST_DATA)"
        if in_ci():
            pytest.fail(msg + " — required under CI=true")
        pytest.skip(msg)
    return path


def require_program(path: str) -> str:
    """Return ``path`` if it is an executable; skip (or fail under CI) otherwise."""
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        resolved = shutil.which(os.path.basename(path))
        msg = f"peer program {path} is not installed (make peers)"
        if resolved is None:
            if in_ci():
                pytest.fail(msg + " — required under CI=true")
            pytest.skip(msg)
        return resolved
    return path


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
