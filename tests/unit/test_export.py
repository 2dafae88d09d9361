"""Outbound C-STORE against real peers: Orthanc and pynetdicom SCPs answering given statuses.

The pynetdicom SCPs are real association acceptors on loopback sockets; they
exist because no installed PACS can be made to answer 0xA7xx/0xA9xx/0xCxxx
or to stall on demand.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage, Verification

from cad_node.config import DestinationConfig, RetryConfig
from cad_node.dimse import Status
from cad_node.export.retry import RetryPolicy
from cad_node.export.sender import OutboundObject, echo, send_objects
from cad_node.export.status import SendOutcome, classify_status
from tests.conftest import free_port, require_data
from tests.system.conftest import OrthancServer


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-export"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ct_objects(lidc_dir: Path) -> list[OutboundObject]:
    files = sorted(lidc_dir.glob("*.dcm"))[:3]
    return [OutboundObject.from_file(p, "ct") for p in files]


def _dest(port: int, ae: str = "ORTHANC", timeout: float = 5.0) -> DestinationConfig:
    return DestinationConfig(name="pacs", ae_title=ae, host="127.0.0.1", port=port,
                             timeout_s=timeout)


class _StatusSCP:
    """A real pynetdicom Storage SCP answering the statuses it is given, in turn."""

    def __init__(self, statuses: list[int], delay_s: float = 0.0,
                 syntaxes: list[str] | None = None) -> None:
        self.statuses = list(statuses)
        self.delay_s = delay_s
        self.received: list[str] = []
        self.port = free_port()
        ae = AE(ae_title="STATUSSCP")
        kw: dict[str, Any] = {} if syntaxes is None else {"transfer_syntax": syntaxes}
        ae.add_supported_context(CTImageStorage, **kw)
        ae.add_supported_context(Verification)
        self.ae = ae
        self.server = ae.start_server(("127.0.0.1", self.port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])

    def _on_store(self, event: Any) -> int:
        if self.delay_s:
            time.sleep(self.delay_s)
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        self.received_ts = str(event.context.transfer_syntax)
        return self.statuses.pop(0) if self.statuses else 0x0000

    def close(self) -> None:
        self.server.shutdown()


def test_status_classes_follow_ps34_annex_b() -> None:
    assert classify_status(Status.SUCCESS) is SendOutcome.STORED
    assert classify_status(0xB007) is SendOutcome.STORED
    for code in (0xA700, 0xA7FF, 0xA710):
        assert classify_status(code) is SendOutcome.RETRYABLE
    for code in (0xA900, 0xA9FF, 0xC000, 0xCFFF, 0x0122, 0x0124):
        assert classify_status(code) is SendOutcome.PERMANENT


def test_backoff_grows_with_jitter_and_respects_horizon() -> None:
    policy = RetryPolicy.from_config(RetryConfig(initial_s=10, max_interval_s=60, multiplier=2,
                                                 jitter=0.2, horizon_s=300))
    assert [policy.base_delay(n) for n in (1, 2, 3, 4, 5)] == [10, 20, 40, 60, 60]
    rng = random.Random(7)
    delays = [policy.delay(2, rng) for _ in range(200)]
    assert 16.0 <= min(delays) < 17.0 and 23.0 < max(delays) <= 24.0  # 20 s +- 20 %
    assert policy.next_retry(1, first_failure_at=0.0, now=0.0, rng=rng) is not None
    assert policy.next_retry(9, first_failure_at=0.0, now=290.0, rng=rng) == 300.0
    assert policy.next_retry(9, first_failure_at=0.0, now=300.0) is None
    default = RetryPolicy.from_config(RetryConfig())
    assert default.horizon_s >= 3600  # hours, not seconds


def test_send_real_ct_to_orthanc(pacs: OrthancServer, ct_objects: list[OutboundObject]) -> None:
    dest = _dest(pacs.dicom_port)
    acked: list[str] = []
    report = send_objects(dest, ct_objects, calling_ae="CADNODE",
                          on_stored=lambda r: acked.append(r.obj.sop_instance_uid))
    assert report.error is None and report.tcp_nodelay
    assert [r.status for r in report.results] == [0, 0, 0]
    assert acked == [o.sop_instance_uid for o in ct_objects]
    study = str(pydicom.dcmread(ct_objects[0].path, stop_before_pixels=True).StudyInstanceUID)
    stored = {i["MainDicomTags"]["SOPInstanceUID"] for i in pacs.study_instances(study)}
    assert stored == set(acked)
    # Already acknowledged objects are skipped entirely.
    again = send_objects(dest, ct_objects, calling_ae="CADNODE", skip=set(acked))
    assert again.results == []
    assert echo(dest, calling_ae="CADNODE").ok


def test_refused_connection_is_retryable(ct_objects: list[OutboundObject]) -> None:
    dest = _dest(free_port(), timeout=2.0)  # nothing listens there
    report = send_objects(dest, ct_objects[:2], calling_ae="CADNODE")
    assert report.error is not None
    assert [r.outcome for r in report.results] == [SendOutcome.RETRYABLE] * 2
    result = echo(dest, calling_ae="CADNODE")
    assert not result.ok and result.error


def test_statuses_from_a_real_scp(ct_objects: list[OutboundObject]) -> None:
    scp = _StatusSCP([0xA701, 0xA900, 0xC123])
    try:
        report = send_objects(_dest(scp.port, "STATUSSCP"), ct_objects, calling_ae="CADNODE")
    finally:
        scp.close()
    assert [(r.outcome, r.status) for r in report.results] == [
        (SendOutcome.RETRYABLE, 0xA701), (SendOutcome.PERMANENT, 0xA900),
        (SendOutcome.PERMANENT, 0xC123)]
    assert report.retryable[0].error == "C-STORE status 0xA701"


def test_timeout_is_retryable(ct_objects: list[OutboundObject]) -> None:
    scp = _StatusSCP([], delay_s=3.0)
    try:
        report = send_objects(_dest(scp.port, "STATUSSCP", timeout=1.0), ct_objects[:2],
                              calling_ae="CADNODE")
    finally:
        scp.close()
    assert [r.outcome for r in report.results] == [SendOutcome.RETRYABLE] * 2


def test_transfer_syntax_the_destination_accepts(ct_objects: list[OutboundObject]) -> None:
    assert ct_objects[0].transfer_syntax_uid != ImplicitVRLittleEndian
    scp = _StatusSCP([], syntaxes=[ImplicitVRLittleEndian])
    try:
        report = send_objects(_dest(scp.port, "STATUSSCP"), ct_objects[:1], calling_ae="CADNODE")
    finally:
        scp.close()
    assert [r.outcome for r in report.results] == [SendOutcome.STORED]
    assert scp.received_ts == ImplicitVRLittleEndian


def test_unsupported_sop_class_is_permanent() -> None:
    sr = OutboundObject.from_file(require_data("pydicom-test-files", "test-SR.dcm"), "sr")
    scp = _StatusSCP([])
    try:
        report = send_objects(_dest(scp.port, "STATUSSCP"), [sr], calling_ae="CADNODE")
    finally:
        scp.close()
    assert report.results[0].outcome is SendOutcome.PERMANENT
    assert scp.received == []


def test_stored_callback_runs_before_next_object(ct_objects: list[OutboundObject]) -> None:
    seen: list[tuple[str, int]] = []
    scp = _StatusSCP([])
    lock = threading.Lock()

    def _cb(r: Any) -> None:
        with lock:
            seen.append((r.obj.sop_instance_uid, len(scp.received)))

    try:
        send_objects(_dest(scp.port, "STATUSSCP"), ct_objects, calling_ae="CADNODE", on_stored=_cb)
    finally:
        scp.close()
    assert [n for _, n in seen] == [1, 2, 3]
