"""The SCP against real peers: dcmtk echoscu/storescu on a free loopback port.

Where dcmtk cannot produce the bad input (invalid or mismatched command UIDs,
garbage or zero-length data sets) a pynetdicom SCU sends hand-crafted Part-10
files in raw ("chunked") mode, so the bytes on the wire are exactly the ones
written here.  Those SCUs run in this process with pynetdicom's UI validator
relaxed by the test itself (:func:`send_raw`): the node relaxes it only in its
own association threads.
"""

from __future__ import annotations

import struct
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config

from cad_node.config import NodeConfig, PeerConfig, Settings, StudyConfig
from cad_node.scp import NodeServer, Status
from cad_node.storage import free_bytes
from cad_node.study import StudyComplete
from tests.conftest import ECHOSCU, STORESCU, free_port, require_data, require_program

PEERS = [
    PeerConfig(ae_title="STORESCU", host="127.0.0.1"),
    PeerConfig(ae_title="ECHOSCU", host="127.0.0.1"),
    PeerConfig(ae_title="PYSCU", host="127.0.0.1"),
    PeerConfig(ae_title="FARAWAY", host="10.1.2.3"),
    PeerConfig(ae_title="BYNAME", host="localhost"),  # resolved once at start
]
FAST_TIMERS = StudyConfig(series_quiet_s=1.0, study_quiet_s=2.0, force_complete_s=120,
                          poll_interval_s=0.1)


class Node:
    """A started NodeServer plus the hand-off events it produced."""

    def __init__(self, root: Path, **node: Any) -> None:
        self.storage = root / "storage"
        self.events: list[StudyComplete] = []
        settings = Settings(
            node=NodeConfig(host="127.0.0.1", port=free_port(), storage_dir=str(self.storage),
                            min_free_bytes=node.pop("min_free_bytes", 0), **node),
            peers=PEERS,
            study=FAST_TIMERS,
        )
        self.server = NodeServer(settings, self.events.append)
        self.server.start()
        self.port = self.server.port

    @property
    def index(self):  # type: ignore[no-untyped-def]
        assert self.server.spool is not None
        return self.server.spool.index

    def files(self) -> list[Path]:
        return sorted(p for p in (self.storage / "spool" / "objects").rglob("*") if p.is_file())

    def wait_events(self, count: int, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events) < count and time.monotonic() < deadline:
            time.sleep(0.05)


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    nodes: list[Node] = []

    def factory(**node: Any) -> Node:
        n = Node(tmp_path / f"n{len(nodes)}", **node)
        nodes.append(n)
        return n

    yield factory
    for n in nodes:
        n.server.stop()


def storescu(port: int, *args: str, aet: str = "STORESCU") -> subprocess.CompletedProcess[str]:
    exe = require_program(STORESCU)
    return subprocess.run([exe, "-v", "-aet", aet, "-aec", "CADNODE", "127.0.0.1", str(port),
                           *args], capture_output=True, text=True, timeout=300,
                          env={"TCP_NODELAY": "1"})


def echoscu(
    port: int, aet: str = "ECHOSCU", aec: str = "CADNODE"
) -> subprocess.CompletedProcess[str]:
    exe = require_program(ECHOSCU)
    return subprocess.run([exe, "-v", "-aet", aet, "-aec", aec, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


def test_echo_and_admission(make_node: Callable[..., Node]) -> None:
    node = make_node()
    ok = echoscu(node.port)
    assert ok.returncode == 0, ok.stderr
    assert "Received Echo Response (Success)" in ok.stdout + ok.stderr
    for aet, aec, reason in [
        ("NOBODY", "CADNODE", "Calling AE Title Not Recognized"),
        ("ECHOSCU", "SOMEONE", "Called AE Title Not Recognized"),
        ("FARAWAY", "CADNODE", "No Reason"),  # known AE title, wrong source IP
    ]:
        rej = echoscu(node.port, aet, aec)
        out = rej.stdout + rej.stderr
        assert rej.returncode != 0 and "Association Rejected" in out, out
        assert reason in out, out
    assert echoscu(node.port).returncode == 0  # still serving
    assert echoscu(node.port, "BYNAME").returncode == 0


def test_ct_series_lands_and_hands_off_once(make_node: Callable[..., Node], lidc_dir: Path) -> None:
    node = make_node()
    files = sorted(str(p) for p in lidc_dir.glob("*.dcm"))
    assert len(files) == 133
    sent = storescu(node.port, *files)
    assert sent.returncode == 0, sent.stderr[-2000:]
    assert (sent.stdout + sent.stderr).count("Received Store Response (Success)") == 133
    assert node.index.counts() == {"patient": 1, "study": 1, "series": 1, "instance": 133}
    assert len(node.files()) == 133
    node.wait_events(1)
    assert len(node.events) == 1
    event = node.events[0]
    study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    assert event.study_instance_uid == study_uid and event.generation == 1
    assert len(event.instances) == 133
    # the same study again: all duplicates (Success), no second hand-off
    again = storescu(node.port, *files)
    assert again.returncode == 0
    assert (again.stdout + again.stderr).count("Received Store Response (Success)") == 133
    time.sleep(FAST_TIMERS.study_quiet_s + FAST_TIMERS.series_quiet_s + 1.0)
    assert len(node.events) == 1
    assert node.index.counts()["instance"] == 133 and len(node.files()) == 133


#: Odd transfer-syntax files grouped by the dcmtk storescu option that proposes
#: their transfer syntax (storescu proposes one compressed syntax per run).
ODD_FILES: dict[str, list[str]] = {
    "-xw": ["JPEG2000.dcm", "693_J2KI.dcm"],  # JPEG 2000 (lossy)
    "-xv": ["MR_small_jp2klossless.dcm"],  # JPEG 2000 lossless
    "-xx": ["JPGExtended.dcm"],  # JPEG extended (12 bit)
    "-xy": ["SC_rgb_dcmtk_+eb+cr.dcm"],  # JPEG baseline
    "-xs": ["SC_rgb_jpeg_gdcm.dcm"],  # JPEG lossless SV1
    "-xt": ["MR_small_jpeg_ls_lossless.dcm"],  # JPEG-LS lossless
    "-xr": ["MR_small_RLE.dcm", "SC_rgb_rle_16bit.dcm"],  # RLE
    "-xd": ["image_dfl.dcm"],  # deflated explicit VR LE
    "-xb": ["MR_small_bigendian.dcm"],  # explicit VR big endian
    "-xi": ["MR_small_implicit.dcm"],  # implicit VR LE
}


def test_odd_transfer_syntaxes_sr_and_seg_are_stored_and_decode(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    groups = {opt: [require_data("pydicom-test-files", n) for n in names]
              for opt, names in ODD_FILES.items()}
    # JPEG-LS near-lossless: the only sample lacks Study/Series Instance UID
    # (Type 1, needed for assembly); add them, keeping the encapsulated pixels.
    jls = dcmread(require_data("pydicom-test-files", "JPEGLSNearLossless_08.dcm"))
    jls.StudyInstanceUID = "1.2.826.0.1.3680043.10.511.1.1"
    jls.SeriesInstanceUID = "1.2.826.0.1.3680043.10.511.1.2"
    jls.save_as(tmp_path / "jls_near_lossless.dcm")
    groups["-xu"] = [tmp_path / "jls_near_lossless.dcm"]
    # results a PACS may echo back: SR and SEG (storescu proposes them with -R)
    groups["-x="] = [require_data("pydicom-test-files", "test-SR.dcm"),
                     require_data("highdicom-test-files", "seg_image_ct_binary.dcm")]
    syntaxes = set()
    for option, paths in groups.items():
        # several samples share a SOP Instance UID: a fresh node per group,
        # otherwise the keep-first duplicate policy would hide later copies
        node = make_node()
        sent = storescu(node.port, "-R", option, *(str(p) for p in paths))
        out = sent.stdout + sent.stderr
        assert sent.returncode == 0, out[-3000:]
        assert out.count("Received Store Response (Success)") == len(paths), out
        stored = {}
        for inst_file in node.files():
            ds = dcmread(inst_file)
            stored[ds.SOPInstanceUID] = ds
        assert len(stored) == len(paths), option
        for p in paths:
            original = dcmread(p)
            copy = stored[original.SOPInstanceUID]
            assert copy.SOPClassUID == original.SOPClassUID
            if "PixelData" not in original:
                continue  # SR
            syntax = original.file_meta.TransferSyntaxUID
            syntaxes.add(str(copy.file_meta.TransferSyntaxUID))
            if option != "-x=":  # storescu -x= may re-encode uncompressed data
                # received in the sender's transfer syntax and stored as received
                assert copy.file_meta.TransferSyntaxUID == syntax, p.name
            if syntax.is_compressed:
                assert copy.PixelData == original.PixelData, p.name
            np.testing.assert_array_equal(copy.pixel_array, original.pixel_array,
                                          err_msg=p.name)
    # every syntax of cad_node.scp.TRANSFER_SYNTAXES except JPEG lossless
    # process 14 (no sample in the data set)
    assert len(syntaxes) == 12, sorted(syntaxes)


def test_eight_concurrent_associations(make_node: Callable[..., Node], lidc_dir: Path) -> None:
    node = make_node()
    files = sorted(str(p) for p in lidc_dir.glob("*.dcm"))
    groups = [files[i::8] for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        done = list(pool.map(lambda g: storescu(node.port, *g), groups))
    for proc, group in zip(done, groups, strict=True):
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert (proc.stdout + proc.stderr).count("Received Store Response (Success)") == len(group)
    assert node.index.counts()["instance"] == 133
    assert len(node.files()) == 133


# -- hand-crafted bad input (pynetdicom SCU) -----------------------------------
def _element(elem: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("latin-1")
    return raw + (b"\x00" if len(raw) % 2 else b"")


def craft_part10(path: Path, sop_class: str, sop_instance: str, syntax: str, body: bytes) -> Path:
    """A Part-10 file whose meta (hence the C-STORE command) says what we want."""
    elems = (_element(0x0001, b"OB", b"\x00\x01") + _element(0x0002, b"UI", _ui(sop_class))
             + _element(0x0003, b"UI", _ui(sop_instance)) + _element(0x0010, b"UI", _ui(syntax)))
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(elems))
    path.write_bytes(b"\x00" * 128 + b"DICM" + group_length + elems + body)
    return path


def send_raw(port: int, files: list[Path], contexts: list[tuple[str, str]]) -> list[int]:
    """Send files unchanged (pynetdicom chunked mode); return each response status."""
    ae = AE(ae_title="PYSCU")
    for cls, syntax in contexts:
        ae.add_requested_context(cls, syntax)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    previous_ui = _config.VALIDATORS["UI"]
    _config.STORE_SEND_CHUNKED_DATASET = True
    # this SCU must be able to send invalid UIDs on purpose
    _config.VALIDATORS["UI"] = lambda value: (True, "")
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="CADNODE")
        assert assoc.is_established
        statuses = []
        for f in files:
            rsp = assoc.send_c_store(f)
            assert "Status" in rsp, f"no response for {f.name} (association dropped)"
            statuses.append(int(rsp.Status))
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        _config.VALIDATORS["UI"] = previous_ui
    return statuses


@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
@pytest.mark.filterwarnings("ignore:The value length")
@pytest.mark.invalid_values  # a hostile peer's data sets, on purpose
def test_bad_uids_and_bad_data_sets_fail_and_server_keeps_serving(
    make_node: Callable[..., Node], tmp_path: Path
) -> None:
    node = make_node()
    src = require_data("pydicom-test-files", "CT_small.dcm")
    meta = read_file_meta_info(src)
    cls, inst = str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID)
    syntax = str(meta.TransferSyntaxUID)
    body = src.read_bytes()[132 + 12 + int(meta.FileMetaInformationGroupLength):]
    work = tmp_path / "crafted"
    work.mkdir()
    before = {p for p in tmp_path.rglob("*") if not p.is_relative_to(node.storage)}
    sc_class = "1.2.840.10008.5.1.4.1.1.7"
    cases: list[tuple[str, str, str, bytes, Status]] = [
        ("traversal", cls, "../../etc/passwd", body, Status.INVALID_UID),
        ("empty component", cls, "1.2..3", body, Status.INVALID_UID),
        ("65 characters", cls, "1." + "2" * 63, body, Status.INVALID_UID),
        ("instance differs", cls, "1.2.3.4.5", body, Status.SOP_INSTANCE_UID_MISMATCH),
        ("class differs", sc_class, inst, body, Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS),
        ("truncated", cls, inst, body[: len(body) - 1000], Status.MALFORMED_DATA_SET),
        ("garbage", cls, inst,
         np.random.default_rng(3).integers(0, 256, 20000, dtype=np.uint8).tobytes(),
         Status.MALFORMED_DATA_SET),
        ("zero length", cls, inst, b"", Status.MALFORMED_DATA_SET),
    ]
    files = [craft_part10(work / f"{i}.dcm", c, u, syntax, b)
             for i, (_, c, u, b, _) in enumerate(cases)]
    good = craft_part10(work / "good.dcm", cls, inst, syntax, body)
    statuses = send_raw(node.port, [*files, good], [(cls, syntax), (sc_class, syntax)])
    for (name, *_, expected), status in zip(cases, statuses, strict=False):
        assert status == expected, f"{name}: got 0x{status:04X}, expected 0x{int(expected):04X}"
    assert statuses[-1] == Status.SUCCESS
    # exactly the good instance is stored, named by the node's id
    stored = node.files()
    assert [p.name for p in stored] == ["0000000001.dcm"]
    assert dcmread(stored[0]).SOPInstanceUID == inst
    # nothing was written outside the storage directory
    after = {p for p in tmp_path.rglob("*") if not p.is_relative_to(node.storage)}
    assert after == before | set(files) | {good} | {work}
    assert not [p for p in node.storage.rglob("*passwd*")]
    assert echoscu(node.port).returncode == 0


def test_free_disk_watermark_answers_a700(make_node: Callable[..., Node], tmp_path: Path) -> None:
    node = make_node(min_free_bytes=free_bytes(tmp_path) + 2**30)
    src = require_data("pydicom-test-files", "CT_small.dcm")
    sent = storescu(node.port, str(src))
    assert "Received Store Response (Refused: OutOfResources)" in sent.stdout + sent.stderr
    meta = read_file_meta_info(src)
    statuses = send_raw(node.port, [src], [(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)])
    assert statuses == [Status.OUT_OF_RESOURCES] == [0xA700]
    assert node.files() == []
    assert not list(node.storage.rglob("*.tmp"))
    assert node.index.counts()["instance"] == 0


def test_byte_cap_per_association(make_node: Callable[..., Node], lidc_dir: Path) -> None:
    files = sorted(str(p) for p in lidc_dir.glob("*.dcm"))[:6]
    size = Path(files[0]).stat().st_size
    node = make_node(max_bytes_per_association=int(size * 3.5))
    sent = storescu(node.port, "--no-halt", *files)
    out = sent.stdout + sent.stderr
    assert out.count("Received Store Response (Success)") == 3, out
    assert out.count("Refused: OutOfResources") == 3, out
    assert node.index.counts()["instance"] == 3
    # a new association has a fresh budget
    sent = storescu(node.port, *files[3:5])
    assert (sent.stdout + sent.stderr).count("Received Store Response (Success)") == 2


def test_spool_lock_refuses_a_second_node(make_node: Callable[..., Node]) -> None:
    node = make_node()
    settings = node.server.settings.model_copy(
        update={"node": node.server.settings.node.model_copy(update={"port": free_port()})})
    second = NodeServer(settings)
    with pytest.raises(RuntimeError, match="in use"):
        second.start()
    assert echoscu(node.port).returncode == 0


def test_max_associations_is_enforced(make_node: Callable[..., Node]) -> None:
    node = make_node(max_associations=1)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    held = ae.associate("127.0.0.1", node.port, ae_title="CADNODE")
    assert held.is_established
    try:
        rej = echoscu(node.port)
        out = rej.stdout + rej.stderr
        assert rej.returncode != 0 and "Association Rejected" in out, out
        assert "Local Limit Exceeded" in out, out
    finally:
        held.release()
    deadline = time.monotonic() + 10
    while echoscu(node.port).returncode != 0:
        assert time.monotonic() < deadline, "slot not freed after release"
        time.sleep(0.1)


def test_association_far_beyond_its_byte_cap_is_aborted(
    make_node: Callable[..., Node], lidc_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import cad_node.scp.server as server_module

    monkeypatch.setattr(server_module, "ABORT_SLACK_BYTES", 1024**2)
    files = sorted(lidc_dir.glob("*.dcm"))[:8]
    size = files[0].stat().st_size
    node = make_node(max_bytes_per_association=int(size * 2.5))
    ae = AE(ae_title="PYSCU")
    meta = read_file_meta_info(files[0])
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="CADNODE")
    assert assoc.is_established
    statuses: list[int | None] = []
    for f in files:
        rsp = assoc.send_c_store(f)
        statuses.append(int(rsp.Status) if "Status" in rsp else None)
        if statuses[-1] is None:  # no response: the node aborted the association
            break
    assoc.abort()
    assert statuses[:2] == [Status.SUCCESS, Status.SUCCESS]
    assert Status.OUT_OF_RESOURCES in statuses
    assert statuses[-1] is None, f"the association should have been aborted: {statuses}"
    assert node.index.counts()["instance"] == 2
    assert echoscu(node.port).returncode == 0


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC101])
@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.840.113619.2.55.3.604688119.9"])
def test_fast_c_store_rsp_encoding_matches_pynetdicom(status: int, sop_instance: str) -> None:
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE

    from cad_node.scp.wire import encode_c_store_rsp

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = 517
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    (pdata,) = list(msg.encode_msg(1, 131072))
    expected = pdata.presentation_data_value_list[0][1]
    assert b"\x03" + encode_c_store_rsp(
        "1.2.840.10008.5.1.4.1.1.2", sop_instance, 517, status) == expected


@pytest.mark.parametrize("sop_instance", ["1.2.3.4", "1.2.3.45", "1.2.3.4.5.6.7.8.9"])
def test_c_store_rq_decoded_without_pydicom(sop_instance: str) -> None:
    """The fast C-STORE-RQ decoder reads what pynetdicom's encoder writes."""
    from io import BytesIO

    from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
    from pynetdicom.dimse_primitives import C_ECHO, C_STORE

    from cad_node.scp.wire import decode_c_store_rq

    req = C_STORE()
    req.MessageID = 4321
    req.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    req.AffectedSOPInstanceUID = sop_instance
    req.Priority = 2
    req.MoveOriginatorApplicationEntityTitle = "MOVER"
    req.MoveOriginatorMessageID = 7
    req.DataSet = BytesIO(b"\x08\x00\x18\x00\x02\x00\x00\x001\x00")  # a data set follows
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    command = msg.encode_msg(1, 131072)
    pdv = next(command).presentation_data_value_list[0][1]
    assert pdv[0] == 0x03  # command, last fragment
    decoded = decode_c_store_rq(pdv[1:])
    assert decoded is not None
    assert decoded.message_id == 4321
    assert decoded.sop_class_uid.rstrip("\x00") == "1.2.840.10008.5.1.4.1.1.2"
    assert decoded.sop_instance_uid.rstrip("\x00") == sop_instance
    # a truncated command and any other command go to pynetdicom
    assert decode_c_store_rq(pdv[1:-3]) is None
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    echo_msg = C_ECHO_RQ()
    echo_msg.primitive_to_message(echo)
    echo_pdv = next(echo_msg.encode_msg(1, 131072)).presentation_data_value_list[0][1]
    assert decode_c_store_rq(echo_pdv[1:]) is None
