"""Reporting at the operating point (issue #14 item 1) on the real LIDC-IDRI-0001 CT.

The pipeline runs once per session (``ct_chest_lidc_run``); its result holds
ranked candidates and the operating threshold it applied.  The reference
nodule is the LUNA16 annotation of the scan (an independent source).  The
objects are read back with highdicom, dsrdump and dciodvfy.
"""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest

from cad_node.config import ObjectKind, ResultsConfig
from cad_node.results import build_results
from cad_node.results.operating_point import OPERATING_THRESHOLD_KEY
from tests.conftest import DSRDUMP, dciodvfy, require_data, require_program

LUNA_SERIES = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
SETTINGS = ResultsConfig(use_dciodvfy=False)
KINDS = tuple(ObjectKind)
#: Enough to see what each kind carries, without the whole set twice (time budget).
SOME = (ObjectKind.SR, ObjectKind.SEG, ObjectKind.SC)


@pytest.fixture(scope="module")
def source(lidc_dir: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p) for p in sorted(lidc_dir.glob("*.dcm"))]


@pytest.fixture(scope="module")
def luna_nodule() -> tuple[np.ndarray, float]:
    path = require_data("lidc-idri-0001", "luna16_style_annotations.csv")
    with path.open(newline="") as fh:
        (row,) = [r for r in csv.DictReader(fh) if r["seriesuid"] == LUNA_SERIES]
    return np.array([float(row[k]) for k in ("coordX", "coordY", "coordZ")]), float(
        row["diameter_mm"])


def _save(objs: list[Any], out: Path) -> dict[str, list[Path]]:
    files: dict[str, list[Path]] = {}
    for obj in objs:
        path = out / obj.filename
        obj.dataset.save_as(path, enforce_file_format=True)
        files.setdefault(str(obj.kind), []).append(path)
    return files


def _dsrdump(path: Path) -> str:
    exe = require_program(DSRDUMP)
    return subprocess.run([exe, "+Pl", str(path)], capture_output=True, text=True,
                          timeout=60, check=True).stdout


def test_default_objects_carry_only_findings_at_the_operating_point(
    ct_chest_lidc_run: Any, source: list[pydicom.Dataset], luna_nodule: tuple[np.ndarray, float],
    tmp_path: Path,
) -> None:
    result = ct_chest_lidc_run.result
    threshold = result.measurements[OPERATING_THRESHOLD_KEY]
    above = [f for f in result.findings if f.probability >= threshold]
    below = [f for f in result.findings if f.probability < threshold]
    assert above and below, "LIDC-IDRI-0001 should give candidates on both sides"
    files = _save(build_results(result, source, settings=SETTINGS, objects=KINDS), tmp_path)
    (sr_path,) = files["sr"]
    sr = hd.sr.srread(sr_path)
    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    planar = sr.content.get_planar_roi_measurement_groups()
    reported = {g.tracking_identifier for g in volumetric}
    assert reported == {f.tracking_id for f in above}
    assert len(planar) == len(above) and len(reported) <= 3
    # the reference nodule is among them: a reported centre within its radius
    centre, diameter = luna_nodule
    certainties = []
    for g in volumetric:
        (point,) = [it for it in g[0].ContentSequence if it.ValueType == "SCOORD3D"]
        if np.linalg.norm(np.asarray(point.GraphicData, float) - centre) <= diameter / 2:
            certainties += [m.value for m in g.get_measurements()
                            if m.name.meaning == "Certainty of Finding"]
    assert certainties and min(certainties) >= threshold
    # SEG: organ segments + one per reported finding; SC: one key image each + summary
    seg = pydicom.dcmread(files["seg"][0])
    labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    assert [lb for lb in labels if lb.startswith("Nodule")] == [f.tracking_id for f in above]
    assert len(files["sc"]) == len(above) + 1
    text = _dsrdump(sr_path)
    assert f"{len(below)} candidate(s) below the operating point: not reported." in text
    assert f"detection certainty >= {threshold:.5g}" in text
    for f in below:
        assert f'"Tracking Identifier")="{f.tracking_id}"' not in text
    for paths in files.values():
        for path in paths:
            errors, _ = dciodvfy(path)
            assert errors == [], (path.name, errors)


def test_below_operating_point_option_labels_candidates(
    ct_chest_lidc_run: Any, source: list[pydicom.Dataset], tmp_path: Path
) -> None:
    result = ct_chest_lidc_run.result
    threshold = result.measurements[OPERATING_THRESHOLD_KEY]
    below = [f for f in result.findings if f.probability < threshold]
    default = build_results(result, source, settings=SETTINGS, objects=(ObjectKind.SR,))
    objs = build_results(result, source, settings=SETTINGS, objects=SOME,
                         below_operating_point=True)
    files = _save(objs, tmp_path)
    (sr_path,) = files["sr"]
    assert pydicom.dcmread(sr_path).SOPInstanceUID != default[0].dataset.SOPInstanceUID
    sr = hd.sr.srread(sr_path)
    labelled = [g for g in sr.content.get_volumetric_roi_measurement_groups()
                if g.tracking_identifier.endswith("(below operating point)")]
    assert len(labelled) == len(below)
    for g in labelled:
        values = {q.name.meaning: q.value.meaning for q in g.get_qualitative_evaluations()}
        assert values == {"Rendering Intent":
                          "Presentation Optional: Rendering device may present",
                          "CAD Operating Point": "Below operating point"}
    # never drawn like a finding: no planar group, no segment, no key image, no GSPS mark
    tracking = {g.tracking_uid for g in labelled}
    assert not tracking & {g.tracking_uid for g in sr.content.get_planar_roi_measurement_groups()}
    seg = pydicom.dcmread(files["seg"][0])
    assert not {str(s.TrackingUID) for s in seg.SegmentSequence if "TrackingUID" in s} & {
        str(t) for t in tracking}
    n_above = len(result.findings) - len(below)
    assert len(files["sc"]) == n_above + 1
    assert "listed separately, labelled 'below operating point'" in _dsrdump(sr_path)
    errors, _ = dciodvfy(sr_path)
    assert errors == [], errors


def test_nothing_above_the_threshold_says_so_with_the_threshold(
    ct_chest_lidc_run: Any, source: list[pydicom.Dataset], tmp_path: Path
) -> None:
    result = ct_chest_lidc_run.result
    strict = result.model_copy(update={
        "measurements": {**result.measurements, OPERATING_THRESHOLD_KEY: 0.99999}})
    files = _save(build_results(strict, source, settings=SETTINGS,
                                objects=(ObjectKind.SR, ObjectKind.GSPS, ObjectKind.KOS)),
                  tmp_path)
    assert set(files) == {"sr"}  # no GSPS/KOS without findings
    (sr_path,) = files["sr"]
    text = _dsrdump(sr_path)
    assert "No nodule found at the operating point (detection certainty >= 0.99999)." in text
    assert "(111241,DCM," in text  # all algorithms succeeded without findings
    assert '"Measurement Group"' not in text
    errors, _ = dciodvfy(sr_path)
    assert errors == []
