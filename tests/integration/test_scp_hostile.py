"""A hostile or broken peer cannot hurt the node (issue 9): raw PDUs from tests/parrot.py.

Every case ends in A-ABORT / A-ASSOCIATE-RJ or a close by the node, and after
each one dcmtk ``echoscu`` from a listed peer succeeds within 2 s.  The node
runs in this process, so its resident memory is this process's.
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.data import get_testdata_file
from pydicom.filereader import read_file_meta_info

from cad_node.config import NodeConfig, PeerConfig, Settings, StudyConfig
from cad_node.scp import AdmissionEvent, NodeServer, Status
from tests import parrot
from tests.conftest import ECHOSCU, free_port, require_program

PEERS = [
    PeerConfig(ae_title="PARROT", host="127.0.0.1"),
    PeerConfig(ae_title="ECHOSCU", host="127.0.0.1"),
]
TIMERS = StudyConfig(series_quiet_s=30, study_quiet_s=60, force_complete_s=120)
#: A source address on the loopback network that is not a listed peer.
STRANGER = "127.0.0.2"
A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RP, A_ABORT = 0x02, 0x03, 0x04, 0x06, 0x07


class Node:
    def __init__(self, root: Path, **node: Any) -> None:
        self.events: list[AdmissionEvent] = []
        node.setdefault("association_request_timeout_s", 1.5)
        settings = Settings(
            node=NodeConfig(host="127.0.0.1", port=free_port(), storage_dir=str(root),
                            min_free_bytes=0, **node),
            peers=PEERS, study=TIMERS,
        )
        self.server = NodeServer(settings, admission_observers=[self.events.append])
        self.server.start()
        self.port = self.server.port

    def in_use(self) -> int:
        return self.server.admission.in_use

    def wait_free(self, timeout: float = 1.0) -> float:
        """Seconds until every slot is free; fails after ``timeout``."""
        start = time.monotonic()
        while self.in_use():
            assert time.monotonic() - start < timeout, f"{self.in_use()} slot(s) still held"
            time.sleep(0.01)
        return time.monotonic() - start

    def parrot(self, source: str | None = None) -> parrot.Parrot:
        return parrot.Parrot(self.port, source=source)

    def echo_ok(self, within: float = 2.0) -> None:
        """dcmtk echoscu from a listed peer succeeds within ``within`` seconds (2 s)."""
        exe = require_program(ECHOSCU)
        start = time.monotonic()
        proc = subprocess.run([exe, "-aet", "ECHOSCU", "-aec", "CADNODE", "-to", "2",
                               "127.0.0.1", str(self.port)], capture_output=True, text=True,
                              timeout=10)
        elapsed = time.monotonic() - start
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert elapsed < within, f"echoscu took {elapsed:.2f} s"


@pytest.fixture(autouse=True)
def no_thread_crashes() -> Iterator[None]:
    """No node thread may die of an unhandled exception."""
    crashes: list[str] = []
    previous = threading.excepthook

    def hook(args: threading.ExceptHookArgs) -> None:
        crashes.append(f"{args.thread.name if args.thread else '?'}: {args.exc_value!r}")

    threading.excepthook = hook
    try:
        yield
    finally:
        threading.excepthook = previous
    assert crashes == []


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    n = Node(tmp_path / "node")
    yield n
    n.server.stop()


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def factory(**kw: Any) -> Node:
        nodes.append(Node(tmp_path / f"n{len(nodes)}", **kw))
        return nodes[-1]

    yield factory
    for n in nodes:
        n.server.stop()


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _dribble(p: parrot.Parrot, data: bytes, interval: float) -> threading.Event:
    """Send ``data`` one byte every ``interval`` seconds in a thread; set the event to stop."""
    stop = threading.Event()

    def run() -> None:
        for byte in data:
            if stop.is_set() or not p.send(bytes([byte])):
                return
            time.sleep(interval)

    threading.Thread(target=run, daemon=True).start()
    return stop


def _established(node: Node, contexts: list[bytes] | None = None) -> parrot.Parrot:
    p = node.parrot()
    reply = p.associate(parrot.associate_rq(contexts=contexts))
    assert reply.type == A_ASSOCIATE_AC, reply
    return p


# -- bounded memory ------------------------------------------------------------------

def test_huge_announced_lengths_keep_memory_flat_and_are_closed(node: Node) -> None:
    idle = _rss()
    parrots = []
    for length in (1 << 30, 1 << 30, 1 << 30, 1 << 30, 0xFFFFFFFF):
        p = node.parrot()
        p.send(struct.pack(">BBI", 0x01, 0, length))
        parrots.append(p)
    for p in parrots:  # an A-ASSOCIATE-RQ that long is rejected after its header
        assert p.closed_by_node(3.0) == [A_ASSOCIATE_RJ]
        p.close()
    # any other PDU type that long before acceptance: A-ABORT
    p = node.parrot()
    p.send(struct.pack(">BBI", 0x04, 0, 1 << 30))
    assert p.closed_by_node(3.0) in ([], [A_ABORT])
    p.close()
    rejected = [e for e in node.events if e.reason == "request-too-long"]
    assert len(rejected) == 5 and not any(e.accepted for e in rejected)
    assert _rss() - idle < 50 * 1024**2, f"RSS grew by {(_rss() - idle) / 1e6:.0f} MB"
    node.wait_free()
    node.echo_ok()


def test_p_data_longer_than_our_max_pdu_is_aborted(make_node: Callable[..., Node]) -> None:
    node = make_node(max_pdu=65536)
    p = _established(node)
    idle = _rss()
    p.send(struct.pack(">BBI", 0x04, 0, 65537) + b"\x00" * 1000)
    assert p.closed_by_node(3.0) in ([], [A_ABORT])
    assert _rss() - idle < 50 * 1024**2
    # at exactly the maximum the PDU is read (and its bad PDV aborts the association)
    p2 = _established(node)
    p2.send(struct.pack(">BBI", 0x04, 0, 65536) + struct.pack(">IB", 65532, 1) + b"\x03"
            + b"\x00" * 65530)
    assert p2.closed_by_node(3.0) in ([], [A_ABORT])
    node.wait_free()
    node.echo_ok()


def test_command_set_is_capped_at_64_kib(node: Node) -> None:
    p = _established(node)
    chunk = b"\x00" * 8000
    for _ in range(9):  # 72 000 bytes of command fragments, none of them last
        if not p.send(parrot.p_data((1, 0x01, chunk))):
            break
    assert p.closed_by_node(3.0) in ([], [A_ABORT])
    node.wait_free()
    node.echo_ok()


# -- admission before resources -----------------------------------------------------

def test_40_idle_strangers_take_no_slot_and_listed_peer_echoes(node: Node) -> None:
    strangers = [node.parrot(source=STRANGER) for _ in range(40)]
    node.echo_ok()
    node.wait_free()
    for p in strangers:  # refused at accept: closed by the node, nothing read
        assert p.closed_by_node(1.0) == []
        p.close()
    refused = [e for e in node.events if e.stage == "connect" and not e.accepted]
    assert len(refused) == 40 and {e.reason for e in refused} == {"not-a-peer"}
    node.echo_ok()


def test_idle_listed_connections_free_their_slots_on_close_and_on_timeout(
    make_node: Callable[..., Node],
) -> None:
    node = make_node(max_associations=4, association_request_timeout_s=1.0)
    idle = [node.parrot() for _ in range(4)]
    time.sleep(0.2)
    assert node.in_use() == 4
    busy = node.parrot()  # over the limit: told so with a transient reject
    reply = busy.associate()
    assert reply.type == A_ASSOCIATE_RJ and reply.body[1:4] == b"\x02\x03\x02", reply
    for p in idle[:2]:
        p.close()
    deadline = time.monotonic() + 1.0
    while node.in_use() > 2:
        assert time.monotonic() < deadline, "closing did not free the slots within 1 s"
        time.sleep(0.01)
    node.echo_ok()
    # the two left are closed by the node at the request timeout
    for p in idle[2:]:
        assert p.closed_by_node(2.5) == []
    node.wait_free()
    node.echo_ok()


def test_per_peer_limit(make_node: Callable[..., Node]) -> None:
    node = make_node(max_associations=8, max_associations_per_peer=2)
    held = [_established(node) for _ in range(2)]
    third = node.parrot().associate()
    assert third.type == A_ASSOCIATE_RJ and third.body[1:4] == b"\x02\x03\x02"
    for p in held:
        p.send(parrot.release_rq())
        assert p.receive().type == A_RELEASE_RP
        p.close()
    node.wait_free()
    node.echo_ok()


def test_500_simultaneous_connects(node: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    import gc

    # pynetdicom's accept loop ran a full gc.collect() every 60 turns: seconds of stall in
    # a large process (echoscu took 4.4 s on CI); the node's loop must not
    collect, in_accept_loop = gc.collect, []

    def spy(*args: Any) -> int:
        if threading.current_thread().name.startswith("scp-"):
            in_accept_loop.append(args)
        return collect(*args)

    monkeypatch.setattr(gc, "collect", spy)
    socks = []
    for _ in range(500):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", node.port))
        socks.append(s)
    time.sleep(0.5)
    for s in socks:
        s.close()
    # the kernel backlog still holds connections the node accepts after they closed:
    # those are dropped at accept, without a slot or a thread
    node.wait_free(2.0)
    node.echo_ok()
    assert in_accept_loop == []


def test_connections_closed_before_accept_take_no_slot_and_no_thread(node: Node) -> None:
    # the accept loop stops in the first connection's admission (accepts are in order)
    with node.server.admission._lock:
        first = node.parrot()
        time.sleep(0.2)
        gone = []
        for _ in range(50):
            s = socket.create_connection(("127.0.0.1", node.port))
            gone.append(s)
        for s in gone:
            s.close()
        threads = threading.active_count()
    deadline = time.monotonic() + 3.0
    while not node.events:  # the first one is admitted (the 50 after it are in the backlog)
        assert time.monotonic() < deadline
        time.sleep(0.01)
    first.close()
    node.wait_free()
    # the 50 were accepted after their peer had closed: dropped at accept, no admission
    # decision (so no slot) and no association thread
    assert [e.stage for e in node.events] == ["connect"]
    assert threading.active_count() <= threads + 2  # at most the first one's, ending
    node.echo_ok()


def test_slow_loris_is_cut_off_by_the_request_timeout(make_node: Callable[..., Node]) -> None:
    node = make_node(association_request_timeout_s=1.5)
    p = node.parrot()
    start = time.monotonic()
    stop = _dribble(p, parrot.associate_rq(), 1.0)
    try:
        types = p.closed_by_node(4.0)
    finally:
        stop.set()
    assert types in ([], [A_ABORT])
    assert time.monotonic() - start < 3.5
    node.wait_free()
    node.echo_ok()


def test_slow_dribble_inside_an_association_hits_the_pdu_deadline(
    make_node: Callable[..., Node], caplog: pytest.LogCaptureFixture,
) -> None:
    # each byte comes well within the network timeout; only the PDU deadline can stop it
    node = make_node(pdu_deadline_s=2.0, network_timeout_s=30.0)
    p = _established(node)
    start = time.monotonic()
    stop = _dribble(p, parrot.p_data((1, 0x03, b"\x00" * 200)), 0.5)
    with caplog.at_level("WARNING", logger="cad_node.scp"):
        try:
            types = p.closed_by_node(6.0)
        finally:
            stop.set()
    elapsed = time.monotonic() - start
    assert types in ([], [A_ABORT])
    assert 1.8 < elapsed < 2.0 + 1.0, f"closed after {elapsed:.2f} s"
    assert any("pdu_deadline_s" in r.getMessage() and "A-ABORT" in r.getMessage()
               for r in caplog.records)
    p.close()
    node.wait_free()
    node.echo_ok()


# -- protocol violations --------------------------------------------------------------

def _data_set() -> tuple[str, str, str, bytes]:
    path = get_testdata_file("CT_small.dcm")
    assert path is not None
    meta = read_file_meta_info(path)
    raw = Path(path).read_bytes()
    body = raw[132 + 12 + int(meta.FileMetaInformationGroupLength):]
    return (str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
            str(meta.TransferSyntaxUID), body)


def _store_contexts(syntax: str) -> list[bytes]:
    return [parrot.presentation_context(1, parrot.VERIFICATION, [parrot.IMPLICIT_VR_LE]),
            parrot.presentation_context(3, parrot.CT_IMAGE_STORAGE, [syntax])]


@pytest.mark.parametrize("case", [
    "unknown PDU type before association",
    "unknown PDU type after association",
    "truncated PDU",
    "undecodable A-ASSOCIATE-RQ",
    "data set before its command",
    "new command before the data set ended",
    "data set on another context",
    "empty PDV",
    "malformed command set",
    "C-STORE on an unaccepted context",
    "A-ABORT with an invalid source",  # found by the fuzzer: killed the DUL thread
    "A-ABORT with an invalid source before association",
])
def test_protocol_violation_aborts(node: Node, case: str) -> None:
    sop_class, sop_instance, syntax, body = _data_set()
    store = parrot.c_store_rq(sop_class, sop_instance)
    if case == "unknown PDU type before association":
        p = node.parrot()
        p.send(parrot.pdu(0x08, b"\x00" * 10))
    elif case == "truncated PDU":
        p = node.parrot()
        p.send(parrot.associate_rq()[:40])
        p.sock.shutdown(socket.SHUT_WR)
    elif case == "A-ABORT with an invalid source before association":
        p = node.parrot()
        p.send(parrot.pdu(0x07, b"\x00\x00\x0e\x00"))
    elif case == "undecodable A-ASSOCIATE-RQ":
        p = node.parrot()
        p.send(parrot.pdu(0x01, b"\x00\x01" + b"\xff" * 100))
    else:
        p = _established(node, _store_contexts(syntax))
        pdu = {
            "unknown PDU type after association": parrot.pdu(0x09, b"\x00" * 4),
            "data set before its command": parrot.p_data((3, 0x02, body[:1000])),
            "new command before the data set ended": parrot.p_data(
                (3, 0x03, store), (3, 0x00, body[:1000]), (3, 0x03, store)),
            "data set on another context": parrot.p_data((3, 0x03, store),
                                                         (1, 0x02, body[:1000])),
            "empty PDV": parrot.pdu(0x04, struct.pack(">IB", 1, 3)),
            "malformed command set": parrot.p_data((3, 0x03, b"\x00\x00\x00\x01\xff\xff")),
            "C-STORE on an unaccepted context": parrot.p_data((5, 0x03, store),
                                                              (5, 0x02, body)),
            "A-ABORT with an invalid source": parrot.pdu(0x07, b"\x00\x00\x0e\x00"),
        }[case]
        p.send(pdu)
    assert p.closed_by_node(3.0) in ([], [A_ABORT]), case
    p.close()
    node.wait_free()
    node.echo_ok()


def test_violation_does_not_disturb_another_association(node: Node) -> None:
    sop_class, sop_instance, syntax, body = _data_set()
    good = _established(node, _store_contexts(syntax))
    bad = _established(node)
    bad.send(parrot.p_data((1, 0x02, b"\x00" * 10)))
    assert bad.closed_by_node(3.0) in ([], [A_ABORT])
    good.send(parrot.p_data((3, 0x03, parrot.c_store_rq(sop_class, sop_instance)),
                            (3, 0x02, body)))
    reply = good.receive()
    assert reply.status == Status.SUCCESS
    good.send(parrot.release_rq())
    assert good.receive().type == A_RELEASE_RP
    node.echo_ok()


# -- odd but legal association requests ----------------------------------------------

@pytest.mark.parametrize("case", [
    "200 presentation contexts",
    "user identity 30 KB",
    "user identity 70 KB",
    "extended negotiation 30 KB",
    "extended negotiation 70 KB",
])
def test_odd_association_requests_end_cleanly(node: Node, case: str) -> None:
    if case == "200 presentation contexts":
        contexts = [parrot.presentation_context((2 * i + 1) % 256, parrot.VERIFICATION,
                                                [parrot.IMPLICIT_VR_LE]) for i in range(200)]
        rq = parrot.associate_rq(contexts=contexts)
    else:
        if case.startswith("user identity"):
            sub = parrot.user_identity(b"u" * 100, b"p" * 30_000)
        else:
            sub = b"".join(parrot.extended_negotiation(parrot.CT_IMAGE_STORAGE, b"\x01" * 10_000)
                           for _ in range(3))
        # 70 KB: the 16-bit item length cannot say so; further user items follow
        trailing = parrot.item(0x50, sub) if "70" in case else b""
        rq = parrot.associate_rq(user_items=sub, trailing=trailing + trailing[:9000])
    p = node.parrot()
    p.send(rq)
    reply = p.receive(3.0)
    if len(rq) > 64 * 1024:  # over the pre-acceptance cap: rejected-permanent, local limit
        assert reply.type == A_ASSOCIATE_RJ and reply.body[1:4] == b"\x01\x03\x02", reply
    else:
        assert reply.type in (A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_ABORT, 0), reply
        if reply.type == A_ASSOCIATE_AC:
            p.send(parrot.release_rq())
            assert p.receive().type == A_RELEASE_RP
    p.close()
    node.wait_free()
    node.echo_ok()


# -- the fast path's own edge cases ---------------------------------------------------

def test_fast_path_edge_cases(make_node: Callable[..., Node]) -> None:
    node = make_node()
    sop_class, sop_instance, syntax, body = _data_set()
    rt_plan = "1.2.840.10008.5.1.4.1.1.481.5"  # not a storage class the node accepts
    p = _established(node, _store_contexts(syntax))
    # an unsupported SOP class in the command, on an accepted context: 0x0122
    p.send(parrot.p_data((3, 0x03, parrot.c_store_rq(rt_plan, "1.2.3.4", 1)), (3, 0x02, body)))
    assert p.receive().status == Status.SOP_CLASS_NOT_SUPPORTED
    # the fallback through pynetdicom's handler: an element the fast decoder does not know
    extra = struct.pack("<HHI", 0x0000, 0x0600, 2) + b"\x00\x00"
    p.send(parrot.p_data((3, 0x03, parrot.c_store_rq(sop_class, sop_instance, 2, extra)),
                         (3, 0x02, body)))
    assert p.receive().status == Status.SUCCESS
    assert node.server.spool is not None
    assert node.server.spool.index.counts()["instance"] == 1
    # a C-STORE arriving during release is not answered; the release completes
    p.send(parrot.release_rq())
    p.send(parrot.p_data((3, 0x03, parrot.c_store_rq(sop_class, "1.2.3.5", 3)),
                         (3, 0x02, body)))
    assert p.closed_by_node(3.0)[:1] == [A_RELEASE_RP]
    node.wait_free()
    node.echo_ok()


def test_idle_timeout_aborts_in_the_replaced_loop(make_node: Callable[..., Node]) -> None:
    node = make_node(network_timeout_s=1.0)
    p = _established(node)
    start = time.monotonic()
    assert p.closed_by_node(4.0) == [A_ABORT]
    assert 0.8 < time.monotonic() - start < 3.5
    node.wait_free()
    node.echo_ok()


def test_stall_in_the_middle_of_a_pdu_is_aborted(make_node: Callable[..., Node]) -> None:
    node = make_node(network_timeout_s=1.0)
    p = _established(node)
    p.send(struct.pack(">BBI", 0x04, 0, 1000) + b"\x00" * 10)
    assert p.closed_by_node(4.0) in ([], [A_ABORT])
    node.wait_free()
    node.echo_ok()


# -- UID policy ----------------------------------------------------------------------

@pytest.mark.invalid_values  # stores and reads back a leading-zero UID on purpose
def test_leading_zero_uid_is_stored_and_flagged_traversal_refused(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    from pydicom import dcmread

    sop_class, sop_instance, syntax, body = _data_set()
    last = sop_instance.rsplit(".", 1)[1]
    sloppy = sop_instance[: -len(last)] + "0" + last[1:]  # same length, leading zero
    assert len(sloppy) == len(sop_instance) and body.count(sop_instance.encode()) == 1
    p = _established(node, _store_contexts(syntax))
    p.send(parrot.p_data((3, 0x03, parrot.c_store_rq(sop_class, sloppy)),
                         (3, 0x02, body.replace(sop_instance.encode(), sloppy.encode()))))
    with caplog.at_level("WARNING", logger="cad_node.scp"):
        assert p.receive().status == Status.SUCCESS
        time.sleep(0.1)
    assert any("non-conformant UID" in r.getMessage() and "leading zero" in r.getMessage()
               for r in caplog.records)
    # a traversal attempt in the command is refused, the association goes on
    p.send(parrot.p_data((3, 0x03, parrot.c_store_rq(sop_class, "1.2/../../x", 2)),
                         (3, 0x02, body)))
    assert p.receive().status == Status.INVALID_UID
    p.send(parrot.release_rq())
    assert p.receive().type == A_RELEASE_RP
    assert node.server.spool is not None
    stored = sorted(node.server.spool.objects_dir.rglob("*.dcm"))
    assert len(stored) == 1
    assert dcmread(stored[0]).SOPInstanceUID == sloppy
    # the flag is in the index, where the status page reads it
    study_uid = str(dcmread(stored[0]).StudyInstanceUID)
    study = node.server.spool.index.study(study_uid)
    assert study is not None and study.flagged_instances == 1
    defects = node.server.spool.index.uid_defects(study_uid)
    assert list(defects) == [sloppy] and "leading zero" in defects[sloppy]
    node.echo_ok()


def test_one_oversized_message_is_aborted_mid_way(
    make_node: Callable[..., Node], monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import cad_node.scp.server as server_module

    monkeypatch.setattr(server_module, "ABORT_SLACK_BYTES", 1024**2)
    node = make_node(max_bytes_per_association=1024**2, max_pdu=1024**2)
    sop_class, sop_instance, syntax, _ = _data_set()
    p = _established(node, _store_contexts(syntax))
    p.send(parrot.p_data((3, 0x03, parrot.c_store_rq(sop_class, sop_instance))))
    chunk = b"\x00" * (512 * 1024)
    sent = 0
    while sent < 8 * 1024**2 and p.send(parrot.p_data((3, 0x00, chunk))):
        sent += len(chunk)
    # aborted before the 8 MiB message ended: no response, A-ABORT or a close
    assert p.closed_by_node(5.0) in ([], [A_ABORT])
    assert sent < 8 * 1024**2 or any(
        "in the current message" in r.getMessage() for r in caplog.records)
    assert node.server.spool is not None
    assert node.server.spool.index.counts()["instance"] == 0
    node.wait_free()
    node.echo_ok()
