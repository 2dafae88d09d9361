"""The findings contract: validation rules and the JSON round trip."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from cad_node.results.findings import (
    AnalysisResult,
    AnalysisStatus,
    Finding,
    FindingSite,
    FindingType,
    ImageMask,
    ModelIdentity,
    NoduleType,
    Region2D,
)

MODEL = ModelIdentity(name="m", version="1.0.0", device_uid="2.25.1234")


def _finding(**kw: object) -> Finding:
    base: dict[str, object] = {
        "tracking_id": "Nodule 1",
        "finding_type": FindingType.NODULE,
        "center_mm": (1.0, 2.0, 3.0),
    }
    base.update(kw)
    return Finding.model_validate(base)


def test_json_round_trip_keeps_coded_enums() -> None:
    result = AnalysisResult(
        pipeline="ct-chest",
        status=AnalysisStatus.COMPLETED,
        series_instance_uid="1.2.3",
        findings=[
            _finding(site=FindingSite.LEFT_UPPER_LOBE, nodule_type=NoduleType.PART_SOLID,
                     probability=0.75, long_axis_mm=8.0, short_axis_mm=6.0),
        ],
        measurements={"left_lung_volume_ml": 2500.0},
        model=MODEL,
    )
    text = result.model_dump_json()
    assert '"finding_type":"NODULE"' in text
    assert '"site":"LEFT_UPPER_LOBE"' in text
    assert AnalysisResult.model_validate_json(text) == result


@pytest.mark.parametrize("form", ["NODULE", "27925004", ["27925004", "Nodule"]])
def test_finding_type_accepts_name_code_and_pair(form: object) -> None:
    assert _finding(finding_type=form).finding_type is FindingType.NODULE


def test_unknown_finding_type_is_an_error() -> None:
    with pytest.raises(ValidationError, match="finding_type"):
        _finding(finding_type="12345")


def test_finding_needs_a_location() -> None:
    with pytest.raises(ValidationError, match="center_mm or region"):
        Finding(tracking_id="x", finding_type=FindingType.MASS)


def test_short_axis_cannot_exceed_long_axis() -> None:
    with pytest.raises(ValidationError, match="short_axis_mm"):
        _finding(long_axis_mm=5.0, short_axis_mm=6.0)


def test_probability_outside_unit_interval_is_an_error() -> None:
    with pytest.raises(ValidationError, match="probability"):
        _finding(probability=1.5)


def test_failed_analysis_needs_reason_and_no_findings() -> None:
    with pytest.raises(ValidationError, match="failure_reason"):
        AnalysisResult(pipeline="p", status=AnalysisStatus.FAILED, series_instance_uid="1.2")
    with pytest.raises(ValidationError, match="no findings"):
        AnalysisResult(pipeline="p", status=AnalysisStatus.FAILED, failure_reason="MR",
                       series_instance_uid="1.2", findings=[_finding()])


def test_duplicate_tracking_ids_are_an_error() -> None:
    with pytest.raises(ValidationError, match="unique"):
        AnalysisResult(pipeline="p", status=AnalysisStatus.COMPLETED,
                       series_instance_uid="1.2", findings=[_finding(), _finding()])


def test_box_region_corners_must_be_ordered() -> None:
    with pytest.raises(ValidationError, match="corners"):
        Region2D(sop_instance_uid="1.2", kind="box", points=[(10.0, 10.0), (5.0, 20.0)])


def test_image_mask_alignment_rules() -> None:
    arr = np.zeros((2, 4, 4), dtype=bool)
    assert not ImageMask(arr, ("1.1", "1.2")).is_fractional
    with pytest.raises(ValueError, match="2 frames but 1"):
        ImageMask(arr, ("1.1",))
    with pytest.raises(ValueError, match="unique"):
        ImageMask(arr, ("1.1", "1.1"))
    with pytest.raises(TypeError, match="bool or float32"):
        ImageMask(arr.astype(np.uint8), ("1.1", "1.2"))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ImageMask(np.full((2, 4, 4), 1.5, dtype=np.float32), ("1.1", "1.2"))
