"""The durable spool, its index and the structural data-set check (real files)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info

from cad_node.storage import (
    InsufficientStorageError,
    MalformedDatasetError,
    MissingAttributeError,
    Spool,
    SpoolLockedError,
    SpoolOutcome,
    UIDMismatchError,
    free_bytes,
    inspect_dataset,
    split_part10,
)
from cad_node.uids import InvalidUIDError
from tests.conftest import require_data


def part10(path: Path) -> tuple[bytes, str, str, str]:
    """(data set bytes, SOP Class UID, SOP Instance UID, transfer syntax), via pydicom."""
    meta = read_file_meta_info(path)
    # preamble+prefix (132) + the (0002,0000) element (12) + the rest of group 2
    offset = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    raw = path.read_bytes()[offset:]
    return (raw, str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID),
            str(meta.TransferSyntaxUID))


def store(spool: Spool, path: Path):  # type: ignore[no-untyped-def]
    raw, cls, inst, ts = part10(path)
    return spool.store(raw, sop_class_uid=cls, sop_instance_uid=inst, transfer_syntax_uid=ts)


def spool_files(spool: Spool) -> list[Path]:
    return sorted(p for p in spool.objects_dir.rglob("*") if p.is_file())


@pytest.fixture
def spool(tmp_path: Path):  # type: ignore[no-untyped-def]
    sp = Spool.open(tmp_path)
    yield sp
    sp.close()


ODD_FILES = [
    "JPEG2000.dcm", "693_J2KI.dcm", "MR_small_jp2klossless.dcm", "JPGExtended.dcm",
    "SC_rgb_jpeg_gdcm.dcm", "SC_rgb_dcmtk_+eb+cr.dcm", "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_RLE.dcm", "SC_rgb_rle_16bit.dcm", "image_dfl.dcm", "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm", "CT_small.dcm",
]


@pytest.mark.parametrize("name", ODD_FILES)
def test_inspect_matches_pydicom_on_every_transfer_syntax(name: str) -> None:
    path = require_data("pydicom-test-files", name)
    raw, _, _, ts = part10(path)
    header = inspect_dataset(raw, ts)
    ds = dcmread(path, stop_before_pixels=True)
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.sop_class_uid == ds.SOPClassUID
    assert header.study_instance_uid == ds.StudyInstanceUID
    assert header.series_instance_uid == ds.SeriesInstanceUID
    assert header.modality == ds.get("Modality")
    assert split_part10(path.read_bytes()) == (ts, len(path.read_bytes()) - len(raw))


def test_truncated_garbage_and_empty_data_sets_are_refused() -> None:
    raw, _, _, ts = part10(require_data("pydicom-test-files", "CT_small.dcm"))
    for cut in (1, 7, 100, len(raw) // 2, len(raw) - 1):
        with pytest.raises(MalformedDatasetError):
            inspect_dataset(raw[:cut], ts)
    with pytest.raises(MalformedDatasetError, match="empty"):
        inspect_dataset(b"", ts)
    garbage = np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    for syntax in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50"):
        with pytest.raises(MalformedDatasetError):
            inspect_dataset(garbage, syntax)
    truncated_file = require_data("pydicom-test-files", "MR_truncated.dcm")
    raw_t, _, _, ts_t = part10(truncated_file)
    with pytest.raises(MalformedDatasetError, match="truncated"):
        inspect_dataset(raw_t, ts_t)
    # encapsulated pixel data without its sequence delimiter
    raw_j, _, _, ts_j = part10(require_data("pydicom-test-files", "JPEG2000.dcm"))
    assert raw_j[-8:] == b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    with pytest.raises(MalformedDatasetError, match="delimiter"):
        inspect_dataset(raw_j[:-8], ts_j)
    # a deflated stream cut short
    raw_d, _, _, ts_d = part10(require_data("pydicom-test-files", "image_dfl.dcm"))
    with pytest.raises(MalformedDatasetError, match="deflate"):
        inspect_dataset(raw_d[: len(raw_d) // 2], ts_d)
    assert zlib.decompressobj(-15).decompress(raw_d)  # the full one really is deflate


def test_missing_study_uid_is_refused() -> None:
    path = require_data("pydicom-test-files", "JPEGLSNearLossless_08.dcm")
    assert "StudyInstanceUID" not in dcmread(path, stop_before_pixels=True)
    raw, _, _, ts = part10(path)
    with pytest.raises(MissingAttributeError, match="Study Instance UID"):
        inspect_dataset(raw, ts)


def test_real_ct_series_is_stored_durably_and_indexed(spool: Spool, lidc_dir: Path) -> None:
    files = sorted(lidc_dir.glob("*.dcm"))
    assert len(files) == 133
    results = [store(spool, f) for f in files]
    assert all(r.status is SpoolOutcome.STORED for r in results)
    assert spool.index.counts() == {"patient": 1, "study": 1, "series": 1, "instance": 133}
    stored = spool_files(spool)
    assert len(stored) == 133
    # named by the node's own ids only
    for p in stored:
        assert p.suffix == ".dcm" and p.stem.isdigit() and p.parent.name.isdigit()
    study_uid = dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    instances = spool.index.instances_for_study(study_uid)
    assert len(instances) == 133
    by_uid = {dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
    for inst in instances[::33]:
        assert inst.path.is_absolute() and inst.path.exists()
        original = dcmread(by_uid[inst.sop_instance_uid])
        copy = dcmread(inst.path)
        assert copy.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
        assert copy.SOPInstanceUID == inst.sop_instance_uid
        np.testing.assert_array_equal(copy.pixel_array, original.pixel_array)
        assert inst.modality == "CT"


def test_duplicates_keep_the_first_copy(spool: Spool, tmp_path: Path) -> None:
    path = require_data("pydicom-test-files", "CT_small.dcm")
    first = store(spool, path)
    first_file = spool_files(spool)[0]
    first_sha = hashlib.sha256(first_file.read_bytes()).hexdigest()
    again = store(spool, path)
    assert again.status is SpoolOutcome.DUPLICATE and again.instance_id == first.instance_id
    # same SOP Instance UID, different bytes: still the first copy is kept
    ds = dcmread(path)
    ds.PatientName = "Someone^Else"
    other = tmp_path / "other.dcm"
    ds.save_as(other)
    changed = store(spool, other)
    assert changed.status is SpoolOutcome.DUPLICATE
    assert spool_files(spool) == [first_file]
    assert hashlib.sha256(first_file.read_bytes()).hexdigest() == first_sha
    assert spool.index.counts()["instance"] == 1
    assert spool.index.studies()[0].revision == 1  # duplicates do not reopen a study


def test_bad_command_uids_and_mismatches_write_nothing(spool: Spool) -> None:
    raw, cls, inst, ts = part10(require_data("pydicom-test-files", "CT_small.dcm"))
    for bad in ("../../etc/passwd", "1.2..3", "1." + "2" * 63):
        with pytest.raises(InvalidUIDError):
            spool.store(raw, sop_class_uid=cls, sop_instance_uid=bad, transfer_syntax_uid=ts)
    with pytest.raises(UIDMismatchError) as info:
        spool.store(raw, sop_class_uid=cls, sop_instance_uid="1.2.3.4", transfer_syntax_uid=ts)
    assert not info.value.sop_class
    with pytest.raises(UIDMismatchError) as info:
        spool.store(raw, sop_class_uid="1.2.840.10008.5.1.4.1.1.7", sop_instance_uid=inst,
                    transfer_syntax_uid=ts)
    assert info.value.sop_class
    with pytest.raises(MalformedDatasetError):
        spool.store(raw[:5000], sop_class_uid=cls, sop_instance_uid=inst, transfer_syntax_uid=ts)
    assert spool_files(spool) == []
    assert spool.index.counts()["instance"] == 0


def test_free_disk_watermark_refuses_and_leaves_nothing(tmp_path: Path) -> None:
    path = require_data("pydicom-test-files", "CT_small.dcm")
    with Spool.open(tmp_path, min_free_bytes=free_bytes(tmp_path) + 2**30) as sp:
        with pytest.raises(InsufficientStorageError):
            store(sp, path)
        assert spool_files(sp) == []
        assert sp.index.counts()["instance"] == 0


def test_lock_recovery_and_reader_in_another_process(tmp_path: Path, lidc_dir: Path) -> None:
    files = sorted(lidc_dir.glob("*.dcm"))[:3]
    with Spool.open(tmp_path) as sp:
        with pytest.raises(SpoolLockedError):
            Spool.open(tmp_path)
        for f in files[:2]:
            store(sp, f)
        shard = spool_files(sp)[0].parent
    # simulate a crash: a half-written temp file, and a complete file that was
    # renamed but never indexed (its sender never got Success)
    (shard / ".0000000003.tmp").write_bytes(b"\x00" * 1000)
    (shard / "0000000007.dcm").write_bytes(files[2].read_bytes())
    with Spool.open(tmp_path) as sp:
        assert not list(shard.glob("*.tmp"))
        assert sp.index.counts()["instance"] == 3
        adopted = sp.index.instance(7)
        assert adopted is not None and adopted.path == shard / "0000000007.dcm"
        result = store(sp, files[2])  # the sender's resend is a duplicate now
        assert result.status is SpoolOutcome.DUPLICATE and result.instance_id == 7
        study_uid = adopted.study_instance_uid
        code = (
            "import sys; from cad_node.storage import Spool; "
            "idx = Spool.open_index_readonly(sys.argv[1]); "
            "print(len(idx.instances_for_study(sys.argv[2])))"
        )
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path), study_uid],
                             capture_output=True, text=True, check=True, timeout=60)
        assert out.stdout.strip() == "3"
        new = store(sp, sorted(lidc_dir.glob("*.dcm"))[3])
        assert new.instance_id == 8  # ids never reused
    assert os.listdir(tmp_path / "spool") != []


def test_file_hash_is_off_the_store_path_and_correct_after_reopen(tmp_path: Path) -> None:
    """SHA-256 is not computed before Success; readers get the file's true hash."""
    import sqlite3

    from cad_node.storage.index import SHA256_PENDING

    paths = [require_data("pydicom-test-files", name) for name in ("CT_small.dcm", "MR_small.dcm")]
    with Spool.open(tmp_path) as sp:
        for p in paths:
            store(sp, p)
    # the process is gone (as after kill -9 right after Success): rows still pending
    db = sqlite3.connect(Spool.index_path(tmp_path))
    assert {r[0] for r in db.execute("SELECT sha256 FROM instance")} == {SHA256_PENDING}
    ro = Spool.open_index_readonly(tmp_path)
    try:
        for study in ro.studies():
            for inst, sha, _own in ro.instance_hashes(study.study_id):
                assert sha == hashlib.sha256(inst.path.read_bytes()).hexdigest()
    finally:
        ro.close()
    assert {r[0] for r in db.execute("SELECT sha256 FROM instance")} == {SHA256_PENDING}
    with Spool.open(tmp_path) as sp:
        for study in sp.index.studies():
            for inst, sha, _own in sp.index.instance_hashes(study.study_id):
                assert sha == hashlib.sha256(inst.path.read_bytes()).hexdigest()
    recorded = dict(db.execute("SELECT relpath, sha256 FROM instance"))
    db.close()
    objects = tmp_path.resolve() / "spool" / "objects"
    assert recorded == {
        rel: hashlib.sha256((objects / rel).read_bytes()).hexdigest() for rel in recorded
    }


def test_duplicate_log_compares_file_hashes(
    spool: Spool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = require_data("pydicom-test-files", "CT_small.dcm")
    store(spool, path)
    with caplog.at_level("INFO", logger="cad_node.storage.spool"):
        store(spool, path)
    assert "identical to instance" in caplog.text and "DIFFERENT" not in caplog.text
    caplog.clear()
    ds = dcmread(path)
    ds.PatientName = "Someone^Else"
    other = tmp_path / "other.dcm"
    ds.save_as(other)
    with caplog.at_level("INFO", logger="cad_node.storage.spool"):
        store(spool, other)
    assert "DIFFERENT bytes" in caplog.text
