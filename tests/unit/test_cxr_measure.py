"""CTR extents, outlines, contour distance and the triage metrics, on hand-made inputs."""

from __future__ import annotations

import numpy as np
import pytest

from cad_node.pipelines.cxr.lungs import postprocess
from cad_node.pipelines.cxr.measure import heart_extent, outline, thorax_extent
from trainer.cxr_abnormal import auc, normal_recall_at_sensitivity
from trainer.cxr_lungs import contour_distance_mm


def _masks() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    right = np.zeros((100, 120), bool)
    left = np.zeros_like(right)
    heart = np.zeros_like(right)
    right[20:80, 10:50] = True      # image left = patient's right
    right[60, 5:10] = True          # widest thoracic row: 5 .. 109
    left[20:80, 70:105] = True
    left[60, 105:110] = True
    heart[50:75, 40:80] = True
    heart[70, 35:85] = True         # widest heart row: 35 .. 84 (50 px)
    return right, left, heart


def test_ctr_extents_by_hand() -> None:
    right, left, heart = _masks()
    h = heart_extent(heart)
    t = thorax_extent(right, left)
    assert h is not None and t is not None
    assert (h.row, h.first, h.last, h.width_px) == (70, 35, 84, 50)
    assert (t.row, t.first, t.last, t.width_px) == (60, 5, 109, 105)
    assert h.points == ((35.0, 70.5), (85.0, 70.5))
    assert h.width_px / t.width_px == pytest.approx(50 / 105)


def test_thorax_needs_both_lungs_on_a_row() -> None:
    right, left, _ = _masks()
    left[:] = False
    assert thorax_extent(right, left) is None
    assert heart_extent(np.zeros((5, 5), bool)) is None


def test_outline_of_a_rectangle() -> None:
    m = np.zeros((50, 60), bool)
    m[10:30, 20:45] = True
    poly = np.asarray(outline(m))
    assert poly[:, 0].min() == pytest.approx(20.0, abs=0.5)
    assert poly[:, 0].max() == pytest.approx(45.0, abs=0.5)
    assert poly[:, 1].min() == pytest.approx(10.0, abs=0.5)
    assert poly[:, 1].max() == pytest.approx(30.0, abs=0.5)
    assert outline(np.zeros((5, 5), bool)) is None


def test_postprocess_keeps_largest_component_and_fills_holes() -> None:
    p = np.zeros((3, 40, 40), np.float32)
    p[0, 5:25, 5:25] = 0.9
    p[0, 10:12, 10:12] = 0.1     # a hole
    p[0, 30:33, 30:33] = 0.9     # a small second component
    masks = postprocess(p)
    expected = np.zeros((40, 40), bool)
    expected[5:25, 5:25] = True
    np.testing.assert_array_equal(masks.right_lung, expected)
    assert not masks.left_lung.any()


def test_contour_distance_of_shifted_squares() -> None:
    a = np.zeros((40, 40), bool)
    a[10:20, 10:20] = True
    b = np.roll(a, 2, axis=1)
    # Left/right edges are 2 px apart, top/bottom rows overlap except at the ends.
    d = contour_distance_mm(a, b, 0.5)
    assert 0.0 < d <= 1.0
    assert contour_distance_mm(a, a, 0.5) == 0.0
    assert contour_distance_mm(a, np.zeros_like(a), 0.5) == float("inf")


def test_auc_and_normal_recall_by_hand() -> None:
    # 100 abnormals 1..100, normals at 0.5, 1.5 and 50.5.
    abnormal = np.arange(1, 101, dtype=float)
    normal = np.asarray([0.5, 1.5, 50.5])
    scores = np.concatenate([abnormal, normal])
    labels = np.concatenate([np.ones(100, int), np.zeros(3, int)])
    # FN = 1%: one abnormal (score 1) may fall below; threshold = 2.
    assert normal_recall_at_sensitivity(scores, labels, 0.99) == pytest.approx(2 / 3)
    expected = (np.sum(abnormal[:, None] > normal[None, :])) / 300
    assert auc(scores, labels) == pytest.approx(expected)
