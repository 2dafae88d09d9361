"""Context features, their late fusion, and the test-scan report of the operating point."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813

from cad_node.models.bundle import device_uid_for
from cad_node.pipelines.ct_chest.candidates import Candidate
from cad_node.pipelines.ct_chest.features import (
    ContextFusion,
    context_features,
    mediastinum_distance_mm,
    vessel_branches,
)
from trainer.operating_point import ScanFindings, describe_rule, report_test_scan


def _image(vol: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(vol.astype(np.float32))
    img.SetSpacing((1.0, 1.0, 1.0))
    return img


def _volume_with(kind: str) -> np.ndarray:
    """Air-filled lung (-900 HU) with, at the centre (20, 20, 20): a 6 mm ball, a
    3 mm vessel along x, a ball on that vessel, or a Y of three vessels."""
    z, y, x = np.mgrid[:41, :41, :41].astype(np.float64)
    vol = np.full((41, 41, 41), -900.0)
    ball = (z - 20) ** 2 + (y - 20) ** 2 + (x - 20) ** 2 <= 9.0
    tube_x = (z - 20) ** 2 + (y - 20) ** 2 <= 2.25
    tube_y = ((z - 20) ** 2 + (x - 20) ** 2 <= 2.25) & (y > 20)
    if kind in ("ball", "ball on vessel"):
        vol[ball] = 40.0
    if kind in ("vessel", "ball on vessel", "bifurcation"):
        vol[tube_x] = 40.0
    if kind == "bifurcation":
        vol[tube_y] = 40.0
    return vol


@pytest.mark.parametrize(("kind", "branches"), [
    ("ball", 0), ("vessel", 2), ("ball on vessel", 2), ("bifurcation", 3)])
def test_vessel_branches_count_what_crosses_the_shell(kind: str, branches: int) -> None:
    img = _image(_volume_with(kind))
    lung = np.ones((41, 41, 41), dtype=bool)
    cand = [Candidate((20.0, 20.0, 20.0), (20, 20, 20), 6.0, 100.0)]
    assert vessel_branches(img, lung, cand).tolist() == [branches]


def test_mediastinum_distance_from_two_lungs() -> None:
    # two lungs x in [4, 24) and [40, 60) on a 1 mm grid; the gap x in [24, 40) is the
    # mediastinum (16 x 60 x 40 mm = 38 ml)
    lung = np.zeros((40, 60, 64), dtype=bool)
    lung[:, :, 4:24] = True
    lung[:, :, 40:60] = True
    pts = np.array([[20.0, 30.0, 8.0], [20.0, 30.0, 20.0], [20.0, 30.0, 30.0]])
    d = mediastinum_distance_mm(lung, (1.0, 1.0, 1.0), pts)
    # on the 3 mm grid the gap starts at x = 24; 3 mm steps: 16 -> 15, 4 -> 3, inside 0
    assert d[2] == 0.0
    assert d[0] > d[1] > 0.0
    assert d[0] == pytest.approx(16.0, abs=3.0) and d[1] == pytest.approx(4.0, abs=3.0)
    # one lung only: no mediastinum, a large distance
    one = lung.copy()
    one[:, :, 40:] = False
    assert (mediastinum_distance_mm(one, (1.0, 1.0, 1.0), pts) == 1000.0).all()


def test_context_features_columns() -> None:
    img = _image(_volume_with("vessel"))
    lung = np.ones((41, 41, 41), dtype=bool)
    cand = [Candidate((20.0, 20.0, 20.0), (20, 20, 20), 3.0, 100.0)]
    f = context_features(img, lung, cand)
    assert f.shape == (1, 3)
    assert f[0, 0] > 0.5  # a tube: vesselness high
    assert f[0, 2] == 2.0
    assert context_features(img, lung, []).shape == (0, 3)


def test_fusion_fit_learns_the_direction_of_a_feature() -> None:
    rng = np.random.default_rng(0)
    n = 400
    y = (rng.uniform(size=n) < 0.3).astype(np.float64)
    logit = rng.normal(size=n) + 1.0 * (y - 0.5)
    feats = np.zeros((n, 3))
    feats[:, 2] = np.where(y > 0.5, rng.integers(0, 2, n), rng.integers(2, 5, n))
    fu = ContextFusion.fit(logit, feats, y, ["vessel_branches"])
    assert fu.weights[0] > 0 and fu.weights[1] < 0
    p = fu.probability(logit, feats)
    assert p[y > 0.5].mean() > p[y < 0.5].mean() + 0.3
    again = ContextFusion.from_mapping(fu.to_mapping())
    assert again == fu
    ident = ContextFusion((), (1.0,), 0.0)
    assert ident.probability(np.array([0.0, 2.0]), np.zeros((2, 3))) == pytest.approx(
        1 / (1 + np.exp(-np.array([0.0, 2.0]))))
    with pytest.raises(ValueError, match="unknown context feature"):
        ContextFusion(("colour",), (1.0, 1.0), 0.0)
    with pytest.raises(ValueError, match="weights"):
        ContextFusion(("vesselness",), (1.0,), 0.0)
    with pytest.raises(ValueError, match="invalid context_fusion"):
        ContextFusion.from_mapping({"features": []})


def test_device_uid_changes_with_the_fusion() -> None:
    sha = "ab" * 32
    a = device_uid_for(sha, 0.8)
    b = device_uid_for(sha, 0.8, {"features": ["vesselness"], "weights": [1, -1],
                                  "intercept": 0})
    c = device_uid_for(sha, 0.8, {"features": ["vesselness"], "weights": [1, -2],
                                  "intercept": 0})
    assert len({a, b, c}) == 3


def test_test_scan_report_separates_the_trained_slab() -> None:
    p = np.array([0.95, 0.9, 0.85, 0.4])
    c = np.array([[0, 0, -50.0], [0, 0, -250.0], [0, 0, -100.0], [0, 0, -260.0]])
    lab = np.array([0, 0, -1, 0], dtype=np.int8)
    scan = ScanFindings("neg", p, c, lab)
    rep = report_test_scan(scan, 0.8, trained=True, training_z_mm=(-154.5, -9.5))
    assert (rep["false_positives"], rep["false_positives_unseen"]) == (2, 1)
    assert rep["irrelevant_findings_above"] == 1
    assert [f["in_training_slab"] for f in rep["findings_above"]] == [True, False, True]
    assert rep["highest_below"] == 0.4
    untouched = report_test_scan(scan, 0.8)
    assert untouched["false_positives_unseen"] == 2 and untouched["training_negatives_z_mm"] is None
    text = describe_rule(1.0, 1, 0.5, [], background="lidc-idri-0001",
                         test_scans=["lidc-idri-0002"])
    assert "background scan lidc-idri-0001 has at most 1" in text
    assert "lidc-idri-0002 played no part" in text
