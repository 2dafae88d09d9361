"""Crash safety of ingest: ``kill -9`` the node mid-series, restart, lose nothing acknowledged.

The node runs as a real ``cad-node serve`` subprocess; the sender is dcmtk
``storescu -v``, whose log pairs every "Sending file" with the C-STORE
response it got, so the test knows exactly which instances were acknowledged.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from cad_node.storage import Spool
from tests.conftest import ECHOSCU, STORESCU, free_port, require_program

CAD_NODE = str(Path(sys.executable).with_name("cad-node"))
ACKS_BEFORE_KILL = 40


class ServeProcess:
    """``cad-node serve --config FILE`` in its own process group."""

    def __init__(self, config: Path, port: int, log: Path) -> None:
        self.config, self.port, self.log = config, port, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([CAD_NODE, "serve", "--config", str(self.config)],
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        echo = require_program(ECHOSCU)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            if subprocess.run([echo, "-aet", "STORESCU", "-aec", "CADNODE", "127.0.0.1",
                               str(self.port)], capture_output=True).returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError("cad-node serve did not answer C-ECHO in time")

    def kill9(self) -> None:
        assert self.proc is not None
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)
        self.proc = None

    def terminate(self) -> int:
        if self.proc is None:
            return 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill9()
            return -9
        self.proc = None
        return code


@pytest.fixture
def node(tmp_path: Path) -> Iterator[ServeProcess]:
    port = free_port()
    config = tmp_path / "cad-node.yaml"
    config.write_text(
        f"node: {{ae_title: CADNODE, host: 127.0.0.1, port: {port}, "
        f"storage_dir: {tmp_path / 'storage'}, min_free_bytes: 0}}\n"
        "peers: [{ae_title: STORESCU, host: 127.0.0.1}]\n"
        "study: {series_quiet_s: 600, study_quiet_s: 600, force_complete_s: 3600}\n"
        # Ingest alone: no embedded worker (its own tests cover it), no metrics port.
        "jobs: {embedded_worker: false}\n"
        "metrics: {enabled: false}\n"
        "log_level: WARNING\n"
    )
    proc = ServeProcess(config, port, tmp_path / "serve.log")
    yield proc
    if proc.proc is not None:
        proc.kill9()


def acknowledged(storescu_log: str) -> list[str]:
    """Files whose C-STORE got Success, from ``storescu -v`` output."""
    acked, current = [], None
    for line in storescu_log.splitlines():
        if "Sending file: " in line:
            current = line.split("Sending file: ", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current is not None:
            acked.append(current)
            current = None
    return acked


def test_kill_9_mid_series_loses_nothing_acknowledged(
    node: ServeProcess, lidc_dir: Path, tmp_path: Path
) -> None:
    files = sorted(str(p) for p in lidc_dir.glob("*.dcm"))
    assert len(files) == 133
    node.start()
    sender = subprocess.Popen(
        [require_program(STORESCU), "-v", "-aec", "CADNODE", "127.0.0.1", str(node.port), *files],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        env={"TCP_NODELAY": "1"},
    )
    assert sender.stdout is not None
    log_lines: list[str] = []
    acks = 0
    for line in sender.stdout:
        log_lines.append(line)
        if "Received Store Response (Success)" in line:
            acks += 1
            if acks == ACKS_BEFORE_KILL:
                node.kill9()  # while storescu is sending the next instance
                break
    rest, _ = sender.communicate(timeout=60)
    log_lines.append(rest)
    acked = acknowledged("".join(log_lines))
    assert len(acked) >= ACKS_BEFORE_KILL
    assert len(acked) < 133, "the node was killed after the whole series"

    node.start()
    storage = tmp_path / "storage"
    assert not list(storage.rglob("*.tmp")), "temp file left in the store"
    index = Spool.open_index_readonly(storage)
    try:
        study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
        stored = {i.sop_instance_uid: i for i in index.instances_for_study(study_uid)}
        for path in acked:
            original = dcmread(path)
            inst = stored.get(original.SOPInstanceUID)
            assert inst is not None, f"acknowledged {path} is not in the index"
            copy = dcmread(inst.path)
            np.testing.assert_array_equal(copy.pixel_array, original.pixel_array)
        # the sender retries the whole series: everything lands, nothing twice
        again = subprocess.run(
            [require_program(STORESCU), "-v", "-aec", "CADNODE", "127.0.0.1", str(node.port),
             *files], capture_output=True, text=True, timeout=300, env={"TCP_NODELAY": "1"})
        assert again.returncode == 0, again.stderr[-2000:]
        assert index.counts()["instance"] == 133
        on_disk = [p for p in (storage / "spool" / "objects").rglob("*") if p.is_file()]
        assert len(on_disk) == 133
    finally:
        index.close()
    assert node.terminate() == 0


def test_serve_rejects_a_bad_config_before_binding(tmp_path: Path) -> None:
    port = free_port()
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"node: {{port: {port}, max_pdu: -5, storage_dir: {tmp_path}}}\n")
    proc = subprocess.run([CAD_NODE, "serve", "--config", str(bad)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert "node.max_pdu" in proc.stderr
    assert not (tmp_path / "spool").exists()
