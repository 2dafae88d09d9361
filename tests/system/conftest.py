"""Real peers for system tests: Orthanc (the PACS) and redis-server, on free loopback ports,
and :class:`ServeProcess`, the ``cad-node serve`` subprocess the system tests drive.

Both are started by the tests from generated configuration files with all
their state in a temporary directory, and stopped at the end.  They can be
stopped and started again on the same ports and storage to simulate outages.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ECHOSCU, ORTHANC, REDIS_SERVER, free_port, require_program

#: AE title of the test PACS.
ORTHANC_AE = "ORTHANC"
_START_TIMEOUT_S = 30.0


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> bool:
    """SIGTERM ``proc`` (if it still runs) and wait up to ``timeout`` s; True once it exited."""
    if proc.poll() is not None:
        return True
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


class OrthancServer:
    """An Orthanc process with a generated JSON configuration.

    Parameters
    ----------
    workdir : Path
        Holds the configuration, database, storage and log.
    extra : dict, optional
        Configuration entries added to (or replacing) the defaults, e.g. the
        DICOMweb plugin for the browser test.
    """

    def __init__(self, workdir: Path, extra: dict[str, Any] | None = None) -> None:
        self.exe = require_program(ORTHANC)
        self.workdir = workdir
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.ae_title = ORTHANC_AE
        self.proc: subprocess.Popen[bytes] | None = None
        storage = workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "orthanc.json"
        config: dict[str, Any] = {
            "Name": "cad-node-test-pacs",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "HttpServerEnabled": True,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "Plugins": [],
            "StableAge": 1,
            "ConcurrentJobs": 1,
            "HttpThreadsCount": 4,
            "StorageCompression": False,
            "OverwriteInstances": False,
        }
        config.update(extra or {})
        self.config_path.write_text(json.dumps(config))
        self.base = f"http://127.0.0.1:{self.http_port}"

    def start(self) -> None:
        """Start Orthanc and wait until both its REST API and DICOM port answer."""
        log = open(self.workdir / "orthanc.log", "ab")
        self.proc = subprocess.Popen(
            [self.exe, "--logdir=" + str(self.workdir), str(self.config_path)],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
        )
        log.close()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"Orthanc exited with {self.proc.returncode}; see {self.workdir}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.2)
        raise RuntimeError("Orthanc did not start in time")

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL) and wait for its port to close."""
        if self.proc is None:
            return
        if not terminate(self.proc, 15):
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None

    def get(self, path: str) -> Any:
        """GET a REST resource and decode its JSON."""
        with urllib.request.urlopen(self.base + path, timeout=10) as rsp:
            return json.loads(rsp.read().decode())

    def post(self, path: str, body: Any) -> Any:
        """POST JSON to a REST resource and decode the JSON answer."""
        req = urllib.request.Request(self.base + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as rsp:
            return json.loads(rsp.read().decode())

    def delete_all(self) -> None:
        """Delete every patient (resets the PACS between tests)."""
        for pid in self.get("/patients"):
            req = urllib.request.Request(f"{self.base}/patients/{pid}", method="DELETE")
            urllib.request.urlopen(req, timeout=30).close()

    def study_instances(self, study_instance_uid: str) -> list[dict[str, Any]]:
        """Every instance of a study, with its main DICOM tags."""
        found = self.post("/tools/find", {
            "Level": "Instance", "Query": {"StudyInstanceUID": study_instance_uid},
            "Expand": True,
        })
        return list(found)

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """The simplified tags of an instance."""
        return dict(self.get(f"/instances/{orthanc_id}/simplified-tags"))

    def instance_file(self, orthanc_id: str) -> bytes:
        """The stored DICOM file of an instance."""
        with urllib.request.urlopen(f"{self.base}/instances/{orthanc_id}/file",
                                    timeout=30) as rsp:
            return bytes(rsp.read())


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """One Orthanc for the session (tests reset it or use distinct studies)."""
    server = OrthancServer(tmp_path_factory.mktemp("orthanc"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


class RedisServer:
    """A redis-server configured as a durable queue (AOF everysec, noeviction), loopback only."""

    def __init__(self, workdir: Path) -> None:
        self.exe = require_program(REDIS_SERVER)
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Broker URL for Celery."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start redis-server and wait until it answers PING."""
        import redis

        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy",
             "noeviction", "--save", "", "--protected-mode", "yes"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port)
        deadline = time.monotonic() + _START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.exceptions.ConnectionError:
                time.sleep(0.1)
        raise RuntimeError("redis-server did not start in time")

    def stop(self) -> None:
        """Stop redis-server."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=15)
        self.proc = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One redis-server for the session."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


class ServeProcess:
    """A ``cad-node serve`` subprocess in its own session, its output in ``workdir/serve.log``.

    The base of the system tests' nodes (``tests/system/test_e2e.py``'s ``Node``,
    ``tests/system/test_ops.py``'s ``OpsNode``): they write the configuration
    and set :attr:`config`, :attr:`port` and :attr:`workdir`; this class starts
    the process, waits until it serves, reads its log and stops it.

    Attributes
    ----------
    workdir : Path
        Holds ``serve.log``.
    config : Path
        The configuration file passed as ``--config``.
    port : int
        The node's DICOM port (C-ECHO tells when it serves).
    log_tail : int
        Characters of the log that :meth:`log` returns (for assertion messages).
    """

    workdir: Path
    config: Path
    port: int
    log_tail = 6000

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the node and wait until it serves (each subclass's own set-up)."""
        raise NotImplementedError

    @contextlib.contextmanager
    def running(self) -> Iterator[ServeProcess]:
        """:meth:`start` on entry, :meth:`stop` on exit (the body of the node fixtures)."""
        self.start()
        try:
            yield self
        finally:
            self.stop()

    def spawn(self, *args: str, env: Mapping[str, str], cwd: Path | None = None) -> None:
        """Start ``cad-node serve --config CONFIG ARGS`` (not yet waiting for it)."""
        log = open(self.workdir / "serve.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from cad_node.cli import main; main()", "serve",
             "--config", str(self.config), *args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=dict(env),
            cwd=cwd)
        log.close()

    def wait_serving(self, timeout: float, ready: Callable[[], bool] | None = None) -> None:
        """Wait until the node answers dcmtk ``echoscu`` (and ``ready()`` holds, if given).

        Raises
        ------
        AssertionError
            The process exited, or ``timeout`` seconds passed; the message holds the log.
        """
        assert self.proc is not None, "spawn() first"
        echoscu = require_program(ECHOSCU)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            ok = subprocess.run([echoscu, "-aet", "MODALITY", "-aec", "CADNODE", "127.0.0.1",
                                 str(self.port)], capture_output=True, timeout=30)
            if ok.returncode == 0 and (ready is None or ready()):
                return
            time.sleep(0.3)
        raise AssertionError("cad-node serve did not start:\n" + self.log())

    def stop(self) -> None:
        """SIGTERM (90 s for a graceful stop), then SIGKILL the process group."""
        if self.proc is None:
            return
        terminate(self.proc, 90)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=10)
        self.proc = None

    def log(self) -> str:
        """The end of ``serve.log`` (:attr:`log_tail` characters), or "" before it exists."""
        path = self.workdir / "serve.log"
        return path.read_text(errors="replace")[-self.log_tail:] if path.exists() else ""


@pytest.fixture(scope="module")
def ct_files(lidc_dir: Path) -> list[Path]:
    """The real LIDC-IDRI-0001 CT's files, in name order."""
    return sorted(lidc_dir.glob("*.dcm"))


def kill_process_tree(pid: int) -> None:
    """SIGKILL a process group started with ``start_new_session=True``."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def postgres_bin() -> Path:
    """The bin directory of Debian's PostgreSQL (``/usr/lib/postgresql/<ver>/bin``)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if not found:
        require_program("/usr/lib/postgresql/15/bin/pg_ctl")  # skips, or fails under CI
    return found[-1].parent


class PostgresServer:
    """A PostgreSQL cluster made by ``initdb`` in a temporary directory, on a free port.

    Runs as the ``postgres`` system user when the tests run as root (``initdb``
    refuses root); trust authentication on 127.0.0.1 only.
    """

    def __init__(self) -> None:
        import tempfile

        self.bin = postgres_bin()
        self.root = Path(tempfile.mkdtemp(prefix="cad-node-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        if os.geteuid() == 0:
            import pwd

            pw = pwd.getpwnam("postgres")
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "cad", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")

    def _run(self, program: str, *args: str) -> None:
        cmd = [str(self.bin / program), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)

    @property
    def url(self) -> str:
        """``storage.database_url`` for this server."""
        return f"postgresql://cad@127.0.0.1:{self.port}/postgres"

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w",
                  "-t", "60", "-o",
                  f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 "
                  "-c max_connections=200", "start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``fast``: disconnect clients, clean shutdown)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop")

    def restart(self) -> None:
        """Stop and start again on the same port and data."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop if running and remove the cluster."""
        import shutil

        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the module's tests."""
    server = PostgresServer()
    server.start()
    try:
        yield server
    finally:
        server.cleanup()
