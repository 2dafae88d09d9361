"""Chest X-ray part 2 result objects on the real SIIM CR: SR groups, heatmap SC, Parametric Map.

The result is written by hand (a box, an abnormal and a TB probability, a
heatmap inside a lung mask) so every expected value is independent of the
builders; every object goes through the conformance gate with dciodvfy.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from cad_node.config import ResultsConfig
from cad_node.results import build_results, validate
from cad_node.results.findings import (
    AnalysisResult,
    AnalysisStatus,
    Finding,
    FindingSite,
    FindingType,
    ImageClassification,
    ImageMask,
    ModelIdentity,
    Region2D,
)
from cad_node.results.pm import PARAMETRIC_MAP_STORAGE
from tests.conftest import require_data

LUNGS = ModelIdentity(name="cxr-lungs", version="1.0.0", device_uid="2.25.1001")
ABNORMAL = ModelIdentity(name="cxr-abnormal", version="0.9.0", device_uid="2.25.1002")
TB = ModelIdentity(name="cxr-tb", version="0.0.1", device_uid="2.25.1003")
SETTINGS = ResultsConfig(use_dciodvfy=True)
BOX = [(200.0, 300.0), (400.0, 500.0)]


@pytest.fixture(scope="module")
def cr() -> Dataset:
    (path,) = sorted(require_data("cxr-dicom-siim").glob("*.dcm"))
    return pydicom.dcmread(path)


def _result(cr: Dataset) -> AnalysisResult:
    uid = str(cr.SOPInstanceUID)
    rows, cols = int(cr.Rows), int(cr.Columns)
    lung = np.zeros((rows, cols), bool)
    lung[250:800, 150:480] = True
    heat = np.zeros((rows, cols), np.float32)
    heat[300:500, 200:400] = np.linspace(0.0, 1.0, 200, dtype=np.float32)[None, :]
    return AnalysisResult(
        pipeline="cxr", status=AnalysisStatus.COMPLETED,
        series_instance_uid=str(cr.SeriesInstanceUID), model=LUNGS,
        findings=[Finding(tracking_id="Abnormal 1", finding_type=FindingType.ABNORMAL,
                          site=FindingSite.RIGHT_LUNG, probability=0.71,
                          region=Region2D(sop_instance_uid=uid, kind="box", points=BOX))],
        organ_masks={FindingSite.RIGHT_LUNG: ImageMask(lung[None], (uid,))},
        classifications=[
            ImageClassification(finding_type=FindingType.ABNORMAL, probability=0.71,
                                threshold=0.2, operating_rule="sensitivity 99% on validation",
                                model=ABNORMAL),
            ImageClassification(finding_type=FindingType.TUBERCULOSIS, probability=0.12,
                                threshold=0.4, model=TB)],
        attribution=ImageMask(heat[None], (uid,)),
        attribution_method="Integrated Gradients (captum) of cxr-abnormal 0.9.0",
    )


def _groups(sr: Dataset) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}

    def walk(ds: Dataset) -> None:
        for item in ds.get("ContentSequence", []):
            children = list(item.get("ContentSequence", []))
            ids = [c.TextValue for c in children if c.ValueType == "TEXT"
                   and c.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier"]
            if ids:
                out[str(ids[0])] = {
                    "nums": {c.ConceptNameCodeSequence[0].CodeMeaning:
                             float(c.MeasuredValueSequence[0].NumericValue)
                             for c in children if c.ValueType == "NUM"},
                    "codes": {c.ConceptNameCodeSequence[0].CodeMeaning:
                              c.ConceptCodeSequence[0].CodeMeaning
                              for c in children if c.ValueType == "CODE"},
                    "algorithms": [c.TextValue for c in _all(item) if c.ValueType == "TEXT"
                                   and c.ConceptNameCodeSequence[0].CodeMeaning
                                   == "Algorithm Name"],
                }
            walk(item)

    walk(sr)
    return out


def _all(ds: Dataset) -> list[Dataset]:
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out += _all(item)
    return out


def test_part2_objects(cr: Dataset, tmp_path: Path) -> None:
    result = _result(cr)
    objs = build_results(result, [cr], settings=SETTINGS, objects=("sr", "sc", "gsps", "pm"))
    assert [str(o.kind) for o in objs] == ["sr", "sc", "sc", "sc", "gsps", "pm"]
    for o in objs:
        report = validate(o, [cr], others=objs, use_dciodvfy=True)
        assert report.ok and report.dciodvfy_ran, (o.kind, o.role, report.errors)
    sr = objs[0].dataset
    groups = _groups(sr)
    abnormal = groups["Abnormal (whole image)"]
    assert abnormal["nums"] == {"Certainty of Finding": 0.71, "Operating threshold": 0.2}
    assert abnormal["codes"]["Abnormal"] == "Present"  # type: ignore[index]
    assert set(abnormal["algorithms"]) == {"cxr-abnormal"}  # type: ignore[arg-type]
    tb = groups["Tuberculosis (whole image)"]
    assert tb["codes"]["Tuberculosis"] == "Absent"  # type: ignore[index]
    (box,) = [g for k, g in groups.items() if k.endswith(":Abnormal 1")]  # OHIF RectangleROI
    assert box["nums"] == {"Certainty of Finding": 0.71}
    scoords = [i for i in _all(sr) if i.ValueType == "SCOORD"]
    assert list(map(float, scoords[0].GraphicData)) == [
        200.0, 300.0, 400.0, 300.0, 400.0, 500.0, 200.0, 500.0, 200.0, 300.0]
    texts = [str(i.TextValue) for i in _all(sr) if i.ValueType == "TEXT"]
    assert any(t.startswith("Abnormal probability 0.710") and "POSITIVE" in t for t in texts)
    heat_sc = objs[1].dataset
    assert "attribution heatmap" in str(heat_sc.DerivationDescription)
    px = heat_sc.pixel_array
    assert px.shape == (int(cr.Rows), int(cr.Columns), 3)
    # coloured (R != B) inside the hot region, plain grey far from it
    assert int(px[400, 395, 0]) != int(px[400, 395, 2])
    assert int(px[900, 900, 0]) == int(px[900, 900, 1]) == int(px[900, 900, 2])
    pm = objs[-1].dataset
    assert str(pm.SOPClassUID) == PARAMETRIC_MAP_STORAGE
    values = np.asarray(pm.pixel_array, np.float32).reshape(int(pm.Rows), int(pm.Columns))
    np.testing.assert_array_equal(values, np.asarray(result.attribution.array[0]))  # type: ignore[union-attr]
    assert str(cr.SOPInstanceUID) in str(pm.PerFrameFunctionalGroupsSequence[0])  # derivation
    again = build_results(result, [cr], settings=SETTINGS, objects=("pm",))[0].dataset
    assert again.SOPInstanceUID == pm.SOPInstanceUID
    assert again.FrameOfReferenceUID == pm.FrameOfReferenceUID


def test_pm_needs_a_heatmap(cr: Dataset) -> None:
    result = _result(cr).model_copy(update={"attribution": None})
    objs = build_results(result, [cr], settings=SETTINGS, objects=("sr", "pm"))
    assert [str(o.kind) for o in objs] == ["sr"]


def test_pm_leaves_the_source_untouched(cr: Dataset) -> None:
    before = {e.keyword for e in cr}
    build_results(_result(cr), [cr], settings=ResultsConfig(use_dciodvfy=False), objects=("pm",))
    assert {e.keyword for e in cr} == before and "PixelData" in cr
