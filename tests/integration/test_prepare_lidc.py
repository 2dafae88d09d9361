"""``cad-train prepare lidc`` on the real LIDC-IDRI-0001 case plus synthetic cases.

The synthetic cases are phantom series (trainer.synthetic) with reader XML
drawn around a phantom nodule of known position; one has a corrupt XML, one
an XML of another series.  The real case is linked (not copied) into the
temporary TCIA-style tree.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from trainer.prepare import prepare_lidc
from trainer.synthetic import NoduleSpec, make_phantom, write_dicom_series

LUNA16_CENTER = (56.20840547, 86.34341278, -115.8675792)
LUNA16_DIAMETER = 23.35064438
SERIES_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
PHANTOM_NODULE_VOX = (20, 60, 40)  # z, y, x
PHANTOM_DIAMETER = 12.0


def _reader_xml(series_uid: str, files: list[Path], center_vox: tuple[int, int, int],
                radius_px: float, spacing_z: float, readers: int) -> str:
    """LIDC XML with ``readers`` sessions, each outlining a sphere just outside its edge."""
    sops = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    zs = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
          for f in files]
    kz, cy, cx = center_vox
    sessions = []
    for reader in range(readers):
        rois = []
        for k in range(len(files)):
            dz = (k - kz) * spacing_z / 1.0  # 1 mm pixels in-plane; radius in mm == px
            if abs(dz) >= radius_px:
                continue
            r = math.sqrt(radius_px**2 - dz**2) + 0.7
            pts: list[tuple[int, int]] = []
            for t in np.linspace(0, 2 * math.pi, 90, endpoint=False):
                p = (round(cx + r * math.cos(t)), round(cy + r * math.sin(t)))
                if not pts or pts[-1] != p:
                    pts.append(p)
            edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>"
                            for x, y in pts)
            rois.append(f"<roi><imageZposition>{zs[k]}</imageZposition><imageSOP_UID>{sops[k]}"
                        f"</imageSOP_UID><inclusion>TRUE</inclusion>{edges}</roi>")
        sessions.append(
            f"<readingSession><servicingRadiologistID>{reader}</servicingRadiologistID>"
            f"<unblindedReadNodule><noduleID>N{reader}</noduleID><characteristics>"
            f"<malignancy>{reader + 1}</malignancy><texture>5</texture></characteristics>"
            f"{''.join(rois)}</unblindedReadNodule></readingSession>")
    return ('<?xml version="1.0"?><LidcReadMessage xmlns="http://www.nih.gov"><ResponseHeader>'
            f"<SeriesInstanceUid>{series_uid}</SeriesInstanceUid></ResponseHeader>"
            f"{''.join(sessions)}</LidcReadMessage>")


def _phantom_case(root: Path, patient: str, seed: int, *, xml: str) -> Path:
    spacing = (2.0, 1.0, 1.0)
    ph = make_phantom((40, 120, 120), spacing,
                      [NoduleSpec(PHANTOM_DIAMETER, center_vox=PHANTOM_NODULE_VOX)], seed=seed)
    series_dir = root / patient / "study" / "series"
    files = write_dicom_series(ph.volume_hu, ph.spacing, ph.origin, series_dir, seed=seed,
                               patient_id=patient)
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    if xml == "good":
        text = _reader_xml(uid, files, PHANTOM_NODULE_VOX, PHANTOM_DIAMETER / 2, spacing[0], 3)
    elif xml == "foreign":
        text = _reader_xml("1.2.3.4.5", files, PHANTOM_NODULE_VOX, PHANTOM_DIAMETER / 2,
                           spacing[0], 3)
    elif xml == "cxr":
        text = '<?xml version="1.0"?><IdriReadMessage xmlns="http://www.nih.gov"/>'
    else:
        text = '<?xml version="1.0"?><LidcReadMessage xmlns="http://www.nih.gov"><Respo'
    (series_dir / "001.xml").write_text(text)
    return series_dir


@pytest.fixture(scope="module")
def prepared(lidc_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tcia")
    # real case in the TCIA layout: LIDC-IDRI-0001/<study>/<series> (symlinked)
    real_series = root / "LIDC-IDRI-0001" / lidc_dir.parent.name / lidc_dir.name
    real_series.parent.mkdir(parents=True)
    real_series.symlink_to(lidc_dir, target_is_directory=True)
    _phantom_case(root, "LIDC-IDRI-9001", 1, xml="good")
    _phantom_case(root, "LIDC-IDRI-9002", 2, xml="corrupt")
    _phantom_case(root, "LIDC-IDRI-9003", 3, xml="foreign")
    _phantom_case(root, "LIDC-IDRI-9004", 4, xml="cxr")
    out = tmp_path_factory.mktemp("prepared")
    results = prepare_lidc(root, out, spacing=1.0, progress=False)
    return root, out, results


def test_statuses_and_errors(prepared) -> None:
    _, out, results = prepared
    status = {r.case_id: r for r in results}
    assert status["LIDC-IDRI-0001"].status == "done"
    assert status["LIDC-IDRI-9001"].status == "done"
    corrupt = status["LIDC-IDRI-9002"]
    assert corrupt.status == "failed" and "001.xml" in corrupt.message
    assert "not well-formed" in corrupt.message
    foreign = status["LIDC-IDRI-9003"]
    assert foreign.status == "failed" and "1.2.3.4.5" in foreign.message
    # a radiograph reading (IdriReadMessage) is not a CT annotation: skipped, not failed
    assert status["LIDC-IDRI-9004"].status == "skipped"
    assert "IdriReadMessage" in status["LIDC-IDRI-9004"].message
    errors = list(csv.DictReader((out / "errors.csv").open()))
    assert {e["case_id"] for e in errors} == {"LIDC-IDRI-9002", "LIDC-IDRI-9003"}


def test_real_case_consensus(prepared) -> None:
    _, out, _ = prepared
    ann = [r for r in csv.DictReader((out / "annotations.csv").open())
           if r["seriesuid"] == SERIES_UID]
    assert len(ann) == 1
    c = (float(ann[0]["coordX"]), float(ann[0]["coordY"]), float(ann[0]["coordZ"]))
    assert math.dist(c, LUNA16_CENTER) < 2.0
    assert abs(float(ann[0]["diameter_mm"]) - LUNA16_DIAMETER) / LUNA16_DIAMETER < 0.15
    case = json.loads((out / "cases" / "LIDC-IDRI-0001.json").read_text())
    nodule = next(cl for cl in case["clusters"] if cl["kind"] == "nodule")
    assert nodule["readers"] == [0, 1, 2, 3]
    assert len(case["marks"]) == 4  # one >= 3 mm mark per reader
    data = np.load(out / "cases" / "LIDC-IDRI-0001.npz")
    assert data["volume_hu"].dtype == np.int16
    assert tuple(data["spacing_zyx"]) == (1.0, 1.0, 1.0)
    # 133 slices x 2.5 mm = 332.5 mm -> 332 (rounded) slices of 1 mm; 512 x 0.703125 = 360
    assert data["volume_hu"].shape == (332, 360, 360)
    assert data["volume_hu"].min() >= -1024
    lab = data["consensus_label"]
    idx = np.argwhere(lab == 1).mean(axis=0)
    o = data["origin_xyz"]
    centre = (o[0] + idx[2], o[1] + idx[1], o[2] + idx[0])
    assert math.dist(centre, LUNA16_CENTER) < 2.0
    # per-reader masks: cropped, with an offset into the original 133 x 512 x 512 grid
    for i in range(4):
        m, off = data[f"mark{i}_mask"], data[f"mark{i}_offset"]
        assert m.any() and (off + m.shape <= np.array([133, 512, 512])).all()
    index = list(csv.DictReader((out / "index.csv").open()))
    real = next(r for r in index if r["case_id"] == "LIDC-IDRI-0001")
    assert real["n_nodules"] == "1" and real["series_instance_uid"] == SERIES_UID
    assert int(real["n_irrelevant"]) == 22  # 9 small-nodule + 13 non-nodule marks


def test_phantom_case_truth(prepared) -> None:
    from trainer.prepare import load_lidc_case

    _, out, _ = prepared
    case = load_lidc_case(out, "LIDC-IDRI-9001")
    assert case.volume_hu.dtype == np.int16 and case.spacing_zyx == (1.0, 1.0, 1.0)
    (nod,) = case.nodules
    # the consensus label sits where the phantom drew the nodule (>= -300 HU, solid +30)
    lab = case.consensus_label == nod["label"]
    assert lab.sum() > 0 and np.median(case.volume_hu[lab]) > -300
    with pytest.raises(ValueError, match="case name"):
        load_lidc_case(out, "../etc")
    case = json.loads((out / "cases" / "LIDC-IDRI-9001.json").read_text())
    nodules = [c for c in case["clusters"] if c["kind"] == "nodule"]
    assert len(nodules) == 1 and nodules[0]["n_readers"] == 3
    # phantom origin: x, y centred on 0 -> x0 = -(120-1)/2 = -59.5, z0 = -(40-1)*2/2 = -39
    # nodule voxel (20, 60, 40) -> (-59.5 + 40, -59.5 + 60, -39 + 40) = (-19.5, 0.5, 1.0)
    assert math.dist(nodules[0]["center_mm"], (-19.5, 0.5, 1.0)) < 1.0
    assert nodules[0]["diameter_mm"] == pytest.approx(PHANTOM_DIAMETER, rel=0.15)
    assert [c["malignancy"] for c in nodules[0]["characteristics"]] == [1, 2, 3]


def test_resume_skips_done_cases(prepared) -> None:
    root, out, _ = prepared
    npz = out / "cases" / "LIDC-IDRI-0001.npz"
    before = npz.stat().st_mtime_ns
    again = prepare_lidc(root, out, spacing=1.0, progress=False)
    status = {r.case_id: r.status for r in again}
    assert status["LIDC-IDRI-0001"] == "skipped" and status["LIDC-IDRI-9001"] == "skipped"
    assert status["LIDC-IDRI-9002"] == "failed"  # failed cases are retried
    assert npz.stat().st_mtime_ns == before
    assert not list((out / "cases").glob(".*.tmp"))  # no partial files left behind
    assert len(list(csv.DictReader((out / "index.csv").open()))) == 2


def test_cli_exit_status(prepared) -> None:
    from trainer.cli import app

    root, out, _ = prepared
    res = CliRunner().invoke(app, ["prepare", "lidc", str(root), str(out)])
    assert res.exit_code == 1  # two cases fail; the others were prepared
    assert "LIDC-IDRI-9002" in res.output and "001.xml" in res.output
    res = CliRunner().invoke(app, ["prepare", "lidc", str(root / "nope"), str(out)])
    assert res.exit_code != 0


def test_discovery_follows_each_folder_once(tmp_path: Path) -> None:
    # os.walk(followlinks=True) went round a symlink loop, listing the same
    # series again and again (as LIDC-IDRI-0005_2, _3 ...) until paths got too long.
    from trainer.prepare import discover_lidc

    series = tmp_path / "LIDC-IDRI-0005" / "study" / "series"
    series.mkdir(parents=True)
    (series / "000001.dcm").write_bytes(b"")
    (series / "001.xml").write_text("<x/>")
    (series / "loop").symlink_to(tmp_path, target_is_directory=True)
    (tmp_path / "again").symlink_to(series, target_is_directory=True)
    found = discover_lidc(tmp_path)
    assert [(s.case_id, s.series_dir.name) for s in found] == [("LIDC-IDRI-0005", "series")]
