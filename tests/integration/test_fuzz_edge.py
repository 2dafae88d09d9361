"""Fuzzing the network edge with hypothesis (issue 9, item 5).

Targets:

* the PDU reader/decoder and the DIMSE framing, **live**: each example opens
  a TCP connection to an in-process node and writes hand-built PDUs
  (:mod:`tests.parrot`) mutated by hypothesis - before association, or after
  a valid A-ASSOCIATE-RQ - then half-closes; the node must close the
  connection within :data:`HANG_S`, no node thread may raise, and a listed
  peer's C-ECHO must still succeed at the end;
* the C-STORE command decoder (:func:`cad_node.scp.wire.decode_c_store_rq`,
  :func:`~cad_node.scp.wire.command_has_data_set`): never raises, and
  round-trips every well-formed request;
* the structure walk that decides what gets stored
  (:func:`cad_node.storage.parse.inspect_dataset`), seeded with pydicom's
  test files (bundled ones through ``get_testdata_file``, plus
  ``pydicom-test-files`` of the shared data when present) and mutated: it
  raises only :class:`~cad_node.storage.parse.DatasetError` /
  :class:`~cad_node.uids.InvalidUIDError`, and every data set it accepts is
  stored by the real :class:`~cad_node.storage.Spool` and reads back with
  pydicom, every element of it.

``CAD_NODE_FUZZ_EXAMPLES`` sets the examples per target (default 100, the
short run of ``make test``); ``make fuzz`` runs the long campaign.  Crashers
become regression cases: the live fuzzer's A-ABORT PDU with Source 14 (it
killed the DUL thread) is a parametrised case of
``tests/integration/test_scp_hostile.py::test_protocol_violation_aborts``.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.data import get_testdata_file

from cad_node.config import NodeConfig, PeerConfig, Settings, StudyConfig
from cad_node.scp import NodeServer
from cad_node.scp.wire import command_has_data_set, decode_c_store_rq, encode_c_store_rsp_raw
from cad_node.storage import Spool
from cad_node.storage.parse import DatasetError, inspect_dataset, split_part10
from cad_node.storage.spool import SpoolOutcome, UIDMismatchError
from cad_node.uids import InvalidUIDError
from tests import parrot
from tests.conftest import data_root, free_port

EXAMPLES = int(os.environ.get("CAD_NODE_FUZZ_EXAMPLES", "100"))
#: The node must have closed a fuzzed connection this long after the peer's EOF
#: (far below its request timeout: closing on EOF is what is tested).
HANG_S = 5.0
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

BUNDLED = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "JPEG2000.dcm", "emri_small.dcm",
           "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "SC_rgb_rle.dcm",
           "image_dfl.dcm", "waveform_ecg.dcm", "rtstruct.dcm", "liver_1frame.dcm"]


def _seeds() -> list[tuple[str, bytes]]:
    paths: list[Path] = []
    for name in BUNDLED:
        found = get_testdata_file(name)
        if isinstance(found, str):
            paths.append(Path(found))
    shared = data_root() / "pydicom-test-files"
    if shared.is_dir():
        paths.extend(sorted(shared.glob("*.dcm")))
    seeds: list[tuple[str, bytes]] = []
    for path in paths:
        raw = path.read_bytes()
        try:
            syntax, offset = split_part10(raw)
        except DatasetError:
            continue
        if len(raw) - offset <= 400_000:
            seeds.append((syntax, raw[offset:]))
    assert len(seeds) >= 8, "too few seed files"
    return seeds


SEEDS = _seeds()


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` with a few byte flips, insertions, deletions or a truncation."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(0, 6))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "dup"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        else:
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))]
    return bytes(data)


# -- C-STORE command decoder -----------------------------------------------------------

uids = st.text(alphabet="0123456789.", min_size=1, max_size=64)


@FUZZ
@given(st.binary(max_size=600))
@example(b"\x00\x00\x00\x01\xff\xff")  # an element header cut short
def test_command_decoder_never_raises(command: bytes) -> None:
    result = decode_c_store_rq(command)
    command_has_data_set(command)
    if result is not None:
        encode_c_store_rsp_raw(result.sop_class_raw, result.sop_instance_raw,
                               result.message_id, 0)


@FUZZ
@given(uids, uids, st.integers(0, 0xFFFF), st.data())
def test_command_decoder_round_trips_and_survives_mutation(
    sop_class: str, sop_instance: str, message_id: int, data: st.DataObject
) -> None:
    command = parrot.c_store_rq(sop_class, sop_instance, message_id)
    decoded = decode_c_store_rq(command)
    assert decoded is not None and command_has_data_set(command) is True
    assert decoded.message_id == message_id
    assert decoded.sop_class_uid.rstrip("\x00") == sop_class
    assert decoded.sop_instance_uid.rstrip("\x00") == sop_instance
    broken = data.draw(mutated(command))
    decode_c_store_rq(broken)
    command_has_data_set(broken)


# -- data set structure walk ---------------------------------------------------------

@pytest.fixture(scope="module")
def spool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spool]:
    # tmpfs when there is one: the fsyncs are not what is under test here
    shm = Path("/dev/shm")
    with tempfile.TemporaryDirectory(
        dir=shm if shm.is_dir() else tmp_path_factory.mktemp("spool")
    ) as tmp:
        s = Spool.open(tmp, 0)
        yield s
        s.close()


# pydicom's default (warn) validation, as the pipelines read stored files: the walk
# checks structure, and mutated values (a DS of "0./") are the sender's business.
@pytest.mark.invalid_values
@FUZZ
@given(st.data())
def test_structure_walk_accepts_only_what_reads_back(spool: Spool, data: st.DataObject) -> None:
    syntax, seed = data.draw(st.sampled_from(SEEDS))
    raw = data.draw(mutated(seed))
    try:
        header = inspect_dataset(raw, syntax)
    except (DatasetError, InvalidUIDError):
        return
    try:
        result = spool.store(raw, sop_class_uid=header.sop_class_uid,
                             sop_instance_uid=header.sop_instance_uid,
                             transfer_syntax_uid=syntax)
    except (DatasetError, InvalidUIDError, UIDMismatchError):
        return
    if result.status is not SpoolOutcome.STORED:
        return
    path = next(spool.objects_dir.rglob(f"{result.instance_id:010d}.dcm"))
    ds = dcmread(path)
    for elem in ds.iterall():
        _ = elem.value
    assert ds.SOPInstanceUID == header.sop_instance_uid


# -- live: PDUs into a running node ---------------------------------------------------

class _Crashes(logging.Handler):
    """Collects the ERROR records that mean an exception nobody expected.

    The node's own catch-alls log with ``exc_info``; pynetdicom's DUL reactor
    logs "Exception in DUL.run()" from its catch-all.  (pynetdicom also logs
    exceptions it handles, e.g. a non-ASCII AE title it then decodes another
    way: those are not crashes.)
    """

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        ours = record.name.startswith("cad_node") and record.exc_info is not None
        if ours or "Exception in DUL" in record.getMessage():
            self.records.append(record)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeServer, list[str]]]:
    settings_ = Settings(
        node=NodeConfig(host="127.0.0.1", port=free_port(),
                        storage_dir=str(tmp_path_factory.mktemp("live")), min_free_bytes=0,
                        association_request_timeout_s=15.0, max_pdu=65536,
                        max_associations=64, max_associations_per_peer=64),
        peers=[PeerConfig(ae_title="PARROT", host="127.0.0.1")],
        study=StudyConfig(series_quiet_s=60, study_quiet_s=120, force_complete_s=300),
    )
    crashes: list[str] = []
    previous_hook = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        crashes.append(f"{args.thread.name if args.thread else '?'}: {args.exc_value!r}")

    threading.excepthook = hook
    handler = _Crashes()
    for name in ("cad_node.scp", "pynetdicom"):
        logging.getLogger(name).addHandler(handler)
    server = NodeServer(settings_)
    server.start()
    try:
        yield server, crashes
    finally:
        server.stop()
        threading.excepthook = previous_hook
        for name in ("cad_node.scp", "pynetdicom"):
            logging.getLogger(name).removeHandler(handler)
        crashes.extend(f"{r.name}: {r.getMessage()}" for r in handler.records)
        assert crashes == [], crashes


def _exchange(port: int, prefix: bytes | None, payload: bytes) -> None:
    p = parrot.Parrot(port)
    try:
        if prefix is not None:
            reply = p.associate(prefix)
            assert reply.type == 0x02, reply
        p.send(payload)
        try:
            p.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        p.closed_by_node(HANG_S)
    finally:
        p.close()


_CT, _TS = parrot.CT_IMAGE_STORAGE, parrot.EXPLICIT_VR_LE
_CONTEXTS = [parrot.presentation_context(1, parrot.VERIFICATION, [parrot.IMPLICIT_VR_LE]),
             parrot.presentation_context(3, _CT, [_TS])]
_PDU_SEEDS = [
    parrot.associate_rq(contexts=_CONTEXTS),
    parrot.associate_rq(user_items=parrot.user_identity(b"user", b"secret")),
    parrot.p_data((1, 0x03, parrot.c_echo_rq())),
    parrot.p_data((3, 0x03, parrot.c_store_rq(_CT, "1.2.3.4")), (3, 0x02, SEEDS[0][1][:2000])),
    parrot.release_rq(),
    parrot.pdu(0x07, b"\x00\x00\x00\x00"),
]


@FUZZ
@given(st.data())
def test_live_pdus_never_crash_or_hang_the_node(
    live: tuple[NodeServer, list[str]], data: st.DataObject
) -> None:
    server, crashes = live
    after_association = data.draw(st.booleans())
    pdus = data.draw(st.lists(
        st.one_of(st.sampled_from(_PDU_SEEDS).flatmap(mutated), st.binary(max_size=200)),
        min_size=1, max_size=4))
    start = time.monotonic()
    _exchange(server.port, parrot.associate_rq(contexts=_CONTEXTS) if after_association
              else None, b"".join(pdus))
    assert time.monotonic() - start < HANG_S + 2
    assert crashes == []


def test_live_node_still_serves_after_fuzzing(live: tuple[NodeServer, list[str]]) -> None:
    server, crashes = live
    p = parrot.Parrot(server.port)
    assert p.associate().type == 0x02
    p.send(parrot.p_data((1, 0x03, parrot.c_echo_rq())))
    assert p.receive().status == 0x0000
    p.send(parrot.release_rq())
    assert p.receive().type == 0x06
    p.close()
    deadline = time.monotonic() + 2
    while server.admission.in_use and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.admission.in_use == 0
    assert struct.calcsize(">I") == 4 and crashes == []
