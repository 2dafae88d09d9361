"""The ``cxr`` pipeline on the real SIIM CR with the shipped ``cxr-lungs`` bundle.

Completed analyses, refusals (each a failure SR + summary page with the
reason), MONOCHROME1 twin, missing pixel spacing, AP view; every object
through dciodvfy.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from cad_node.config import ResultsConfig
from cad_node.imaging.radiograph import DX_FOR_PROCESSING_SOP_CLASS
from cad_node.pipelines import get_pipeline, load_input
from cad_node.pipelines.cxr.pipeline import CxrPipeline
from cad_node.results import build_results
from cad_node.results.findings import AnalysisResult, AnalysisStatus, FindingSite, FindingType
from tests.conftest import dciodvfy, require_data

SETTINGS = ResultsConfig(use_dciodvfy=False)
ALL = ("sr", "seg", "sc", "gsps")


@pytest.fixture(scope="module")
def cr() -> Dataset:
    (path,) = sorted(require_data("cxr-dicom-siim").glob("*.dcm"))
    ds = pydicom.dcmread(path)
    # Twins below edit pixels; the JPEG path is tested in e2e and unit tests.
    ds.decompress(generate_instance_uid=False)
    return ds


@pytest.fixture(scope="module")
def pipeline() -> CxrPipeline:
    p = get_pipeline("cxr")
    assert isinstance(p, CxrPipeline)
    return p


@pytest.fixture(scope="module")
def completed(pipeline: CxrPipeline, cr: Dataset) -> AnalysisResult:
    return pipeline.run(load_input("cxr", [cr]))


def _masks(result: AnalysisResult) -> dict[FindingSite, np.ndarray]:
    return {k: np.asarray(v.array[0]) for k, v in result.organ_masks.items()}


def _objects(result: AnalysisResult, source: Dataset, tmp: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for obj in build_results(result, [source], settings=SETTINGS, objects=ALL):
        path = tmp / obj.filename
        obj.dataset.save_as(path, enforce_file_format=True)
        errors, _ = dciodvfy(path)
        assert errors == [], (obj.filename, errors)
        out.setdefault(str(obj.kind), []).append(path)
    return out


def _texts(ds: Dataset) -> list[str]:
    out = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "TEXT":
            out.append(str(item.TextValue))
        out += _texts(item)
    return out


def _nums(ds: Dataset) -> list[tuple[str, float, str, int]]:
    """(concept meaning, value, unit, number of SCOORD children) of every NUM."""
    out = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "NUM":
            mv = item.MeasuredValueSequence[0]
            scoords = sum(1 for c in item.get("ContentSequence", []) if c.ValueType == "SCOORD")
            out.append((item.ConceptNameCodeSequence[0].CodeMeaning, float(mv.NumericValue),
                        mv.MeasurementUnitsCodeSequence[0].CodeValue, scoords))
        out += _nums(item)
    return out


def test_real_cr_completed(completed: AnalysisResult, cr: Dataset, tmp_path: Path) -> None:
    assert completed.status is AnalysisStatus.COMPLETED, completed.failure_reason
    masks = _masks(completed)
    assert set(masks) == {FindingSite.RIGHT_LUNG, FindingSite.LEFT_LUNG, FindingSite.HEART}
    right, left = masks[FindingSite.RIGHT_LUNG], masks[FindingSite.LEFT_LUNG]
    # Patient's right lung on the image's left (standard PA display).
    assert np.nonzero(right)[1].mean() < np.nonzero(left)[1].mean()
    meas = completed.radiograph
    assert meas is not None and meas.ctr is not None
    assert 0.3 < meas.ctr < 0.7, meas.ctr
    # The SIIM header keeps the original detector spacing (0.168 mm) on the 1024-pixel
    # re-encoding: areas follow the header, and the pipeline says the scale is suspect.
    assert meas.right_lung_area_cm2 == pytest.approx(right.sum() * 0.168**2 / 100)
    assert any("implausibly small" in n for n in completed.notes)
    assert meas.heart_width_mm == pytest.approx(meas.heart_width_px * 0.168)
    objs = _objects(completed, cr, tmp_path)
    assert sorted(objs) == ["gsps", "sc", "seg", "sr"]
    sr = pydicom.dcmread(objs["sr"][0])
    nums = _nums(sr)
    widths = [n for n in nums if n[0] == "Width"]
    assert [n[2] for n in widths] == ["mm", "mm"] and all(n[3] == 1 for n in widths)
    (ctr,) = [n for n in nums if n[0] == "Cardiothoracic ratio"]
    assert ctr[1] == pytest.approx(round(meas.ctr, 3))
    assert sorted(n[1] for n in nums if n[0] == "Area") == sorted(
        [round(meas.right_lung_area_cm2, 2), round(meas.left_lung_area_cm2 or 0, 2)])
    texts = _texts(sr)
    assert any("TB screening not installed" in t for t in texts)
    assert not any("tuberculosis probability:" in t.lower() for t in texts)
    seg = pydicom.dcmread(objs["seg"][0])
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Right lung", "Left lung", "Heart"]
    np.testing.assert_array_equal(seg.pixel_array[0].astype(bool), right)


def test_monochrome1_twin_gives_the_same_masks(
    pipeline: CxrPipeline, completed: AnalysisResult, cr: Dataset
) -> None:
    twin = copy.deepcopy(cr)
    top = (1 << int(cr.BitsStored)) - 1
    twin.PixelData = (top - cr.pixel_array.astype(np.int32)).astype(
        cr.pixel_array.dtype).tobytes()
    twin.PhotometricInterpretation = "MONOCHROME1"
    result = pipeline.run(load_input("cxr", [twin]))
    assert result.status is AnalysisStatus.COMPLETED
    a, b = _masks(completed), _masks(result)
    for site in a:
        np.testing.assert_array_equal(a[site], b[site], err_msg=site.name)
    assert result.radiograph is not None and completed.radiograph is not None
    assert result.radiograph.ctr == completed.radiograph.ctr


def test_no_pixel_spacing_masks_and_ctr_without_mm(
    pipeline: CxrPipeline, completed: AnalysisResult, cr: Dataset, tmp_path: Path
) -> None:
    bare = copy.deepcopy(cr)
    del bare.PixelSpacing
    result = pipeline.run(load_input("cxr", [bare]))
    assert result.status is AnalysisStatus.COMPLETED
    for site, mask in _masks(completed).items():
        np.testing.assert_array_equal(_masks(result)[site], mask)
    meas = result.radiograph
    assert meas is not None and completed.radiograph is not None
    assert meas.ctr == completed.radiograph.ctr
    assert meas.right_lung_area_cm2 is None and meas.heart_width_mm is None
    assert "right_lung_area_cm2" not in result.measurements
    objs = _objects(result, bare, tmp_path)
    sr = pydicom.dcmread(objs["sr"][0])
    # part 2's probabilities (issue #12) are the other NUMs
    nums = [n for n in _nums(sr) if n[0] not in ("Certainty of Finding", "Operating threshold")]
    assert [n[0] for n in nums] == ["Cardiothoracic ratio"]
    assert nums[0][3] == 2  # both CTR lines inside the ratio NUM
    assert any("no mm measurements" in t for t in _texts(sr))


def test_ap_view_ctr_not_assessable(pipeline: CxrPipeline, cr: Dataset) -> None:
    ap = copy.deepcopy(cr)
    ap.ViewPosition = "AP"
    result = pipeline.run(load_input("cxr", [ap]))
    assert result.status is AnalysisStatus.COMPLETED and result.radiograph is not None
    assert result.radiograph.ctr is None
    assert not [f for f in result.findings if f.finding_type is FindingType.CARDIOMEGALY]
    assert "AP view" in (result.radiograph.ctr_not_assessable or "")
    assert "AP view" in result.qualitative["cardiothoracic_ratio"]


def _lateral(ds: Dataset) -> Dataset:
    ds.ViewPosition = "LL"
    return ds


def _dx_processing(ds: Dataset) -> Dataset:
    ds.SOPClassUID = DX_FOR_PROCESSING_SOP_CLASS
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PROCESSING"
    return ds


def _hand(ds: Dataset) -> Dataset:
    ds.BodyPartExamined = "HAND"
    return ds


def _tiny(ds: Dataset) -> Dataset:
    small = ds.pixel_array[::16, ::16]
    ds.Rows, ds.Columns = small.shape
    ds.PixelData = np.ascontiguousarray(small).tobytes()
    return ds


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (_lateral, "View Position LL is not a frontal"),
        (_dx_processing, "For Processing"),
        (_hand, "Body Part Examined HAND is not a chest"),
        (_tiny, "64x64 pixels is too small"),
    ],
)
def test_refusals_give_failure_sr_and_summary(
    edit: object, reason: str, pipeline: CxrPipeline, cr: Dataset, tmp_path: Path
) -> None:
    source = edit(copy.deepcopy(cr))  # type: ignore[operator]
    result = pipeline.run(load_input("cxr", [source]))
    assert result.status is AnalysisStatus.FAILED
    assert reason in (result.failure_reason or "")
    objs = _objects(result, source, tmp_path)
    assert sorted(objs) == ["sc", "sr"] and len(objs["sc"]) == 1  # SR + summary page
    sr = pydicom.dcmread(objs["sr"][0])
    texts = _texts(sr)
    assert any(reason in t for t in texts) and "No findings." not in texts
    summary = pydicom.dcmread(objs["sc"][0])
    assert summary.DerivationDescription == "CAD summary page"
