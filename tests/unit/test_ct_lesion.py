"""ct-lesion building blocks: 2.5-D input, decoding, NMS across slices, RECIST, reconcile."""

from __future__ import annotations

import numpy as np
import pytest

from cad_node.pipelines.ct_lesion.detect import (
    Detection2D,
    box_iou,
    decode,
    group_across_slices,
    nms,
)
from cad_node.pipelines.ct_lesion.recist import ellipse_mask, lesion_mask, recist_axes
from cad_node.pipelines.ct_lesion.slices import (
    HU_WINDOW,
    INPUT_SIZE,
    SliceGrid,
    key_slice_input,
    normalise,
    slice_offsets_mm,
    volume_inputs,
)

T8 = (0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0)


def test_normalise_is_the_deeplesion_window() -> None:
    out = normalise(np.array([-2000, HU_WINDOW[0], 0.0, HU_WINDOW[1], 5000]))
    assert out.tolist() == pytest.approx([0.0, 0.0, 1024 / 4095, 1.0, 1.0])


def test_key_slice_without_neighbours_repeats_it() -> None:
    key = np.full((64, 64), 40, dtype=np.int16)
    x, grid = key_slice_input(key, (0.8, 0.8))
    assert x.shape == (3, INPUT_SIZE, INPUT_SIZE)
    assert np.array_equal(x[0], x[1]) and np.array_equal(x[1], x[2])
    assert grid.step_x == pytest.approx(2.0)  # 1.6 mm / 0.8 mm


def test_neighbour_interpolated_at_2mm_and_missing_side_filled_from_key() -> None:
    key = np.zeros((64, 64), dtype=np.int16)
    up = np.full((64, 64), 500, dtype=np.int16)  # the slice 5 mm above
    x, _ = key_slice_input(key, (1.6, 1.6), {5.0: up})
    centre = (slice(100, 156), slice(100, 156))
    lo, _ = HU_WINDOW
    assert x[2][centre] == pytest.approx((0.4 * 500 - lo) / 4095, abs=1e-5)  # 2/5 of the way
    assert np.array_equal(x[0], x[1])  # nothing below: the key slice


def test_volume_inputs_replicate_edges_and_keep_geometry() -> None:
    vol = np.stack([np.full((40, 40), 10 * k, dtype=np.int16) for k in range(5)])
    x, grid = volume_inputs(vol, (2.0, 1.6, 1.6))
    lo, _ = HU_WINDOW
    c = (slice(120, 136), slice(120, 136))
    assert x[0, 0][c] == pytest.approx((0 - lo) / 4095)          # below slice 0: slice 0
    assert x[2, 0][c] == pytest.approx((10 - lo) / 4095)         # 2 mm below slice 2 = slice 1
    assert x[4, 2][c] == pytest.approx((40 - lo) / 4095)         # above the top: the top
    b = grid.to_source(grid.to_network([[3.0, 4.0, 10.0, 12.0]]))
    assert b[0].tolist() == pytest.approx([3.0, 4.0, 10.0, 12.0])


def test_grid_maps_network_pixels_to_source_pixels() -> None:
    g = SliceGrid.centred((255.5, 255.5), (0.8, 0.8), pixel_mm=1.6, size=256)
    assert g.to_source([[127.5, 127.5, 127.5, 127.5]])[0, 0] == pytest.approx(255.5)
    assert g.to_source([[0.0, 0.0, 1.0, 1.0]])[0, 2] - g.origin_x == pytest.approx(2.0)


def test_decode_finds_the_peak_with_its_size_and_type() -> None:
    h, w = 16, 16
    heat = np.full((1, h, w), -8.0)
    heat[0, 5, 7] = 3.0
    size = np.zeros((2, h, w))
    size[:, 5, 7] = (np.log(12.0), np.log(8.0))
    off = np.zeros((2, h, w))
    off[:, 5, 7] = (0.5, 0.25)
    types = np.zeros((8, h, w))
    types[3, 5, 7] = 5.0
    out = decode(heat, size, off, types, stride=4, min_score=0.1)
    assert len(out) == 1
    box, score, tp = out[0]
    assert box == pytest.approx((30 - 6, 21 - 4, 30 + 6, 21 + 4))
    assert score == pytest.approx(1 / (1 + np.exp(-3.0)))
    assert int(np.argmax(tp)) == 3


def test_nms_within_a_slice() -> None:
    a = Detection2D(3, (0, 0, 10, 10), 0.9, T8)
    b = Detection2D(3, (1, 1, 11, 11), 0.8, T8)
    c = Detection2D(3, (30, 30, 40, 40), 0.7, T8)
    assert nms([b, a, c]) == [a, c]


def test_one_lesion_across_slices_becomes_one_finding() -> None:
    dets = [Detection2D(10, (0, 0, 10, 10), 0.6, T8),
            Detection2D(11, (1, 0, 11, 10), 0.9, T8),
            Detection2D(12, (1, 1, 11, 11), 0.5, T8),
            Detection2D(11, (0, 1, 10, 11), 0.4, T8),   # duplicate on slice 11: absorbed
            Detection2D(11, (50, 50, 60, 60), 0.3, T8),  # another lesion
            Detection2D(14, (1, 1, 11, 11), 0.2, T8)]   # gap of 2 slices: separate
    lesions = group_across_slices(dets)
    assert [les.slice_range for les in lesions] == [(10, 12), (11, 11), (14, 14)]
    assert lesions[0].key.slice_index == 11 and lesions[0].score == 0.9
    assert float(box_iou((0, 0, 10, 10), [(5, 0, 15, 10)])[0]) == pytest.approx(1 / 3)


def _rotated_ellipse(a: float, b: float, theta: float, shape: tuple[int, int] = (200, 200),
                     centre: tuple[float, float] = (100.0, 100.0)) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    u = (xx - centre[0]) * np.cos(theta) + (yy - centre[1]) * np.sin(theta)
    v = -(xx - centre[0]) * np.sin(theta) + (yy - centre[1]) * np.cos(theta)
    return np.asarray((u / a) ** 2 + (v / b) ** 2 <= 1.0)


@pytest.mark.parametrize("theta", [0.0, 0.5, 1.1])
def test_recist_axes_of_a_rotated_ellipse(theta: float) -> None:
    mask = _rotated_ellipse(30.0, 15.0, theta)
    ax = recist_axes(mask, (0.5, 0.5))
    assert ax.long_mm == pytest.approx(30.0, abs=1.0)   # 2 a x 0.5 mm
    assert ax.short_mm == pytest.approx(15.0, abs=1.0)
    (x0, y0), (x1, y1) = ax.long_points
    angle = np.arctan2(y1 - y0, x1 - x0) % np.pi
    assert min(abs(angle - theta), np.pi - abs(angle - theta)) < 0.1


def test_recist_rejects_an_empty_mask() -> None:
    with pytest.raises(ValueError, match="empty"):
        recist_axes(np.zeros((5, 5), bool), (1.0, 1.0))


def test_mask_grown_from_a_box_recovers_a_hypodense_lesion() -> None:
    rng = np.random.default_rng(0)
    hu = rng.normal(100, 8, (200, 200))
    lesion = _rotated_ellipse(20.0, 12.0, 0.6)
    hu[lesion] = rng.normal(30, 8, int(lesion.sum()))
    ys, xs = np.nonzero(lesion)
    pad = 4.0 / 0.7  # DeepLesion box: extent + 5 px (4 mm)
    box = (xs.min() - pad, ys.min() - pad, xs.max() + pad, ys.max() + pad)
    m = lesion_mask(hu, box, (0.7, 0.7))
    assert m.method == "region growing"
    dice = 2 * (m.mask & lesion).sum() / (m.mask.sum() + lesion.sum())
    assert dice > 0.85
    ax = recist_axes(m.mask, (0.7, 0.7))
    assert ax.long_mm == pytest.approx(40 * 0.7, abs=2.0)
    assert ax.short_mm == pytest.approx(24 * 0.7, abs=2.0)


def test_mask_falls_back_to_the_inscribed_ellipse_without_contrast() -> None:
    hu = np.zeros((100, 100))
    m = lesion_mask(hu, (10.0, 10.0, 60.0, 40.0), (1.0, 1.0))
    assert m.method in {"ellipse", "region growing"}
    assert m.mask[25, 35] and not m.mask[11, 11]
    assert ellipse_mask((0, 0, 10, 4), (20, 20)).sum() > 0


def test_nine_slice_input_spans_minus_8_to_plus_8_mm() -> None:
    assert slice_offsets_mm(9).tolist() == [-8.0, -6.0, -4.0, -2.0, 0.0, 2.0, 4.0, 6.0, 8.0]
    with pytest.raises(ValueError, match="5 input slices"):
        slice_offsets_mm(5)
    # slice k holds 10*k HU; 2.5 mm apart, so offset d mm from slice k is 10*(k + d/2.5) HU
    vol = np.stack([np.full((40, 40), 10 * k, dtype=np.int16) for k in range(12)])
    x, _ = volume_inputs(vol, (2.5, 1.6, 1.6), [5, 0], n_slices=9)
    assert x.shape == (2, 9, INPUT_SIZE, INPUT_SIZE)
    lo, _ = HU_WINDOW
    c = (slice(120, 136), slice(120, 136))
    want = [10 * (5 + d / 2.5) for d in slice_offsets_mm(9)]
    assert [float(x[0, ch][c].mean()) * 4095 + lo for ch in range(9)] == pytest.approx(want,
                                                                                       abs=0.05)
    # at the bottom of the series the missing slices repeat slice 0
    assert float(x[1, 0][c].mean()) * 4095 + lo == pytest.approx(0.0, abs=0.05)
    key, _ = key_slice_input(np.zeros((64, 64), dtype=np.int16), (0.8, 0.8), n_slices=9)
    assert key.shape == (9, INPUT_SIZE, INPUT_SIZE)


def test_windowed_nine_slice_network_keeps_the_output_maps() -> None:
    import torch

    from cad_node.pipelines.ct_lesion.network import LesionCenterNet

    net = LesionCenterNet(in_channels=9, windows=[[-1024.0, 3071.0], [-175.0, 275.0]],
                          head_width=8).eval()
    assert net.stem.conv.in_channels == 18  # 9 slices x 2 windows
    with torch.no_grad():
        out = net(torch.rand(1, 9, 64, 64))
    assert out["heatmap"].shape == (1, 1, 16, 16) and out["type_logits"].shape == (1, 8, 16, 16)
    with pytest.raises(ValueError, match="high > low"):
        LesionCenterNet(windows=[[100.0, 0.0]])
