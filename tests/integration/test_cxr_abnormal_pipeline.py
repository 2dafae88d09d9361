"""The cxr pipeline with and without the cxr-abnormal bundle, on the real SIIM CR (issue #12)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from cad_node.models.bundle import default_models_dir, list_versions
from cad_node.pipelines import load_input
from cad_node.pipelines.cxr.abnormal import ABNORMAL_BUNDLE, load_abnormal_model
from cad_node.pipelines.cxr.pipeline import CxrPipeline
from cad_node.results.findings import AnalysisStatus, FindingSite, FindingType
from tests.conftest import require_data


@pytest.fixture(scope="module")
def cr() -> pydicom.Dataset:
    (path,) = sorted(require_data("cxr-dicom-siim").glob("*.dcm"))
    return pydicom.dcmread(path)


@pytest.mark.skipif(not list_versions(ABNORMAL_BUNDLE), reason="no cxr-abnormal bundle")
def test_probability_decision_and_boxes_in_the_lungs(cr: pydicom.Dataset) -> None:
    result = CxrPipeline().run(load_input("cxr", [cr]))
    assert result.status is AnalysisStatus.COMPLETED
    model = load_abnormal_model()
    p = result.measurements["abnormal_probability"]
    assert 0.0 <= p <= 1.0
    assert result.measurements["abnormal_threshold"] == round(model.threshold, 4)
    decision = result.qualitative["abnormal_decision"]
    abnormal = decision.startswith("abnormal")
    assert abnormal == (p >= round(model.threshold, 4)) or abs(p - model.threshold) < 1e-4
    boxes = [f for f in result.findings if f.finding_type is FindingType.ABNORMAL]
    assert bool(boxes) == abnormal  # boxes only for an abnormal decision
    lungs = np.zeros((cr.Rows, cr.Columns), bool)
    for site in (FindingSite.RIGHT_LUNG, FindingSite.LEFT_LUNG):
        lungs |= np.asarray(result.organ_masks[site].array[0], bool)
    rows, cols = np.nonzero(lungs)
    for f in boxes:
        assert f.region is not None and f.region.kind == "box"
        assert f.region.sop_instance_uid == cr.SOPInstanceUID
        (x0, y0), (x1, y1) = f.region.points
        # inside the lungs' bounding box (the boxes are clipped to it)
        assert cols.min() <= x0 < x1 <= cols.max() + 1
        assert rows.min() <= y0 < y1 <= rows.max() + 1
        assert f.probability is not None and 0.0 <= f.probability <= 1.0
        assert f.site in (FindingSite.RIGHT_LUNG, FindingSite.LEFT_LUNG, FindingSite.LUNG)
    probs = [f.probability for f in boxes]
    assert probs == sorted(probs, reverse=True)


def test_without_bundle_no_number(cr: pydicom.Dataset, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    (models / "cxr-lungs").symlink_to(default_models_dir() / "cxr-lungs")
    result = CxrPipeline(models_dir=models).run(load_input("cxr", [cr]))
    assert result.status is AnalysisStatus.COMPLETED
    assert "abnormal_probability" not in result.measurements
    assert "abnormal_decision" not in result.qualitative
    assert not [f for f in result.findings if f.finding_type is FindingType.ABNORMAL]
    assert any("abnormality model not installed" in n for n in result.notes)
