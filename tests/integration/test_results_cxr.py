"""Result objects for the real SIIM chest radiograph (CR, JPEG baseline), and the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from typer.testing import CliRunner

from cad_node.cli import app
from cad_node.config import ResultsConfig
from cad_node.results import ResultObject, build_results, validate
from cad_node.results.findings import (
    AnalysisResult,
    AnalysisStatus,
    Finding,
    FindingSite,
    FindingType,
    ModelIdentity,
    Region2D,
)
from cad_node.results.io import save_result
from cad_node.results.sc import CONTOUR_RGB
from tests.conftest import REPO_ROOT, dciodvfy, require_data

MODEL = ModelIdentity(name="cxr-abnormal-test", version="0.4.0", device_uid="2.25.5150")
SETTINGS = ResultsConfig(use_dciodvfy=False)
BOX = [(200.0, 300.0), (400.0, 560.0)]
WARNINGS_FILE = REPO_ROOT / "tests" / "fixtures" / "results" / "dciodvfy_warnings.tsv"


def _justified() -> list[re.Pattern[str]]:
    lines = [ln for ln in WARNINGS_FILE.read_text().splitlines() if ln and not ln.startswith("#")]
    return [re.compile(ln.split("\t", 1)[0]) for ln in lines]


@pytest.fixture(scope="module")
def cxr_path() -> Path:
    (path,) = sorted(require_data("cxr-dicom-siim").glob("*.dcm"))
    return path


@pytest.fixture(scope="module")
def cxr(cxr_path: Path) -> Dataset:
    ds = pydicom.dcmread(cxr_path)
    assert ds.Modality == "CR" and ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    return ds


@pytest.fixture(scope="module")
def result(cxr: Dataset) -> AnalysisResult:
    finding = Finding(
        tracking_id="Finding 1",
        finding_type=FindingType.ABNORMAL,
        site=FindingSite.RIGHT_LUNG,
        probability=0.81,
        region=Region2D(sop_instance_uid=cxr.SOPInstanceUID, kind="box", points=BOX),
    )
    return AnalysisResult(
        pipeline="cxr",
        status=AnalysisStatus.COMPLETED,
        series_instance_uid=cxr.SeriesInstanceUID,
        findings=[finding],
        model=MODEL,
    )


@pytest.fixture(scope="module")
def built(
    result: AnalysisResult, cxr: Dataset, tmp_path_factory: pytest.TempPathFactory
) -> list[tuple[ResultObject, Path]]:
    out = tmp_path_factory.mktemp("cxr-results")
    objs = build_results(result, [cxr], settings=SETTINGS, objects=("sr", "sc", "gsps", "kos"))
    paths = []
    for obj in objs:
        obj.dataset.save_as(out / obj.filename, enforce_file_format=True)
        paths.append((obj, out / obj.filename))
    return paths


def test_cxr_objects_valid(built: list[tuple[ResultObject, Path]], cxr: Dataset) -> None:
    assert [o.kind for o, _ in built] == ["sr", "sc", "sc", "gsps", "kos"]
    justified = _justified()
    objs = [o for o, _ in built]
    for obj, path in built:
        errors, warnings = dciodvfy(path)
        assert errors == [], (obj.filename, errors)
        for w in warnings:
            assert any(p.search(w) for p in justified), (obj.filename, w)
        report = validate(obj, [cxr], others=objs)
        assert report.ok, (obj.filename, report.errors)
        # The source's invalid Patient's Age ("62") is not propagated.
        assert "PatientAge" not in pydicom.dcmread(path)


def _scoords(ds: Dataset) -> list[Dataset]:
    out = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "SCOORD":
            out.append(item)
        out += _scoords(item)
    return out


def test_cxr_sr_scoord_box(built: list[tuple[ResultObject, Path]], cxr: Dataset) -> None:
    sr = pydicom.dcmread(built[0][1])
    # The box as the group's Image Region, and again inside its first NUM (the
    # graphic OHIF's RectangleROI tool reads, issue #13); both the same.
    in_num, scoord = _scoords(sr)  # NUMs come before the region in the group
    assert in_num.RelationshipType == "INFERRED FROM"
    assert list(in_num.GraphicData) == list(scoord.GraphicData)
    assert scoord.GraphicType == "POLYLINE"
    pts = np.asarray(scoord.GraphicData, float).reshape(-1, 2)
    (x0, y0), (x1, y1) = BOX
    np.testing.assert_allclose(pts, [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)])
    ref = scoord.ContentSequence[0].ReferencedSOPSequence[0]
    assert ref.ReferencedSOPInstanceUID == cxr.SOPInstanceUID
    proc = [
        i.ConceptCodeSequence[0].CodeValue
        for i in sr.ContentSequence
        if i.ConceptNameCodeSequence[0].CodeValue == "121058"
    ]
    assert proc == ["399208008"]
    assert sr.StudyInstanceUID == cxr.StudyInstanceUID
    assert sr.SeriesInstanceUID != cxr.SeriesInstanceUID


def test_cxr_sc_box_burned_at_location(built: list[tuple[ResultObject, Path]]) -> None:
    sc = pydicom.dcmread(built[1][1])
    rgb = sc.pixel_array
    assert rgb.shape == (1024, 1024, 3)
    yellow = np.all(rgb == np.asarray(CONTOUR_RGB, np.uint8), axis=-1)
    rows, cols = np.nonzero(yellow)
    (x0, y0), (x1, y1) = BOX
    assert cols.min() >= x0 - 2 and cols.max() <= x1 + 2
    assert rows.min() >= y0 - 2 and rows.max() <= y1 + 2
    # Every yellow pixel lies on one of the four edges, and each edge is drawn.
    on_edge = (
        (np.abs(cols - x0) <= 2)
        | (np.abs(cols - x1) <= 2)
        | (np.abs(rows - y0) <= 2)
        | (np.abs(rows - y1) <= 2)
    )
    assert on_edge.all()
    for edge in (np.abs(cols - x0) <= 2, np.abs(cols - x1) <= 2):
        assert edge.sum() > 0.9 * (y1 - y0)
    for edge in (np.abs(rows - y0) <= 2, np.abs(rows - y1) <= 2):
        assert edge.sum() > 0.9 * (x1 - x0)


def test_cli_report(result: AnalysisResult, cxr_path: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "image.dcm").symlink_to(cxr_path)
    (src / "notes.txt").write_text("not DICOM")
    findings = tmp_path / "F.json"
    save_result(result, findings)
    out = tmp_path / "out"
    run = CliRunner().invoke(
        app,
        [
            "report",
            "--findings",
            str(findings),
            "--source",
            str(src),
            "--out",
            str(out),
            "--objects",
            "sr,sc",
            "--no-dciodvfy",
        ],
    )
    assert run.exit_code == 0, run.output
    assert sorted(p.name for p in out.iterdir()) == ["sc_001.dcm", "sc_002.dcm", "sr_001.dcm"]
    bad = CliRunner().invoke(
        app,
        [
            "report",
            "--findings",
            str(findings),
            "--source",
            str(src),
            "--out",
            str(out),
            "--objects",
            "sr,pdf",
        ],
    )
    assert bad.exit_code == 2 and "pdf" in bad.output
