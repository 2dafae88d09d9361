"""Real-lesion pasting and augmentation of the ct-lesion trainer, on hand-made slices."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cad_node.pipelines.ct_lesion.recist import BOX_PAD_MM
from cad_node.pipelines.ct_lesion.slices import INPUT_SIZE, PIXEL_MM
from trainer.ct_lesion_paste import BankLesion, augment, lesion_bank, paste_lesions


def _disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return ((yy - cy) ** 2 + (xx - cx) ** 2) <= r ** 2


def test_bank_keeps_the_lesion_hu_relative_to_its_ring() -> None:
    # a 60 HU "liver" with a 20 HU lesion of radius 12 px at 0.8 mm (about 19 mm)
    hu = np.full((512, 512), -1000.0)
    hu[_disc(hu.shape, 256, 256, 200)] = 60.0
    hu[_disc(hu.shape, 250, 300, 12)] = 20.0
    pad = BOX_PAD_MM / 0.8
    s = SimpleNamespace(name="case", hu=hu.astype(np.int16), spacing_xy=(0.8, 0.8),
                        boxes=np.array([[288 - pad, 238 - pad, 312 + pad, 262 + pad]]),
                        types=np.array([4]))
    bank = lesion_bank([s])
    assert len(bank) == 1 and bank[0].lesion_type == 4 and bank[0].source == "case"
    inside = bank[0].mask > 0.9
    # the lesion's diameter on the 1.6 mm grid: about 24 * 0.8 / 1.6 = 12 px
    assert 9 <= inside.any(axis=0).sum() <= 15
    assert float(np.median(bank[0].delta_hu[inside])) == pytest.approx(-40.0, abs=3.0)


def test_paste_transplants_the_contrast_and_returns_a_padded_box() -> None:
    r = 5
    m = _disc((2 * r + 13, 2 * r + 13), r + 6, r + 6, r).astype(np.float32)
    lesion = BankLesion(np.where(m > 0, -50.0, 0.0).astype(np.float32), m, 4, "x")
    hu = np.full((3, INPUT_SIZE, INPUT_SIZE), 70.0, dtype=np.float32)
    allowed = np.zeros((INPUT_SIZE, INPUT_SIZE), dtype=bool)
    allowed[60:200, 60:200] = True
    rng = np.random.default_rng(0)
    out, boxes, types = paste_lesions(hu, allowed, [lesion], rng, 1, scale_range=(1.0, 1.0))
    assert types == [4] and len(boxes) == 1
    x1, y1, x2, y2 = boxes[0]
    cx, cy = round((x1 + x2) / 2), round((y1 + y2) / 2)
    assert allowed[cy, cx]
    assert out[1, cy, cx] == pytest.approx(20.0, abs=1.0)  # 70 HU tissue - 50 HU lesion
    pad = BOX_PAD_MM / PIXEL_MM
    assert x2 - x1 == pytest.approx(2 * r + 1 + 2 * pad, abs=1.01)
    # the neighbour channels hold the same lesion, never a larger one
    for ch in (0, 2):
        assert (out[ch] < 45).sum() <= (out[1] < 45).sum()
    assert np.array_equal(out[:, ~allowed], hu[:, ~allowed])  # nothing outside the tissue


def test_augment_moves_the_box_with_the_lesion() -> None:
    hu = np.full((3, INPUT_SIZE, INPUT_SIZE), 0.0, dtype=np.float32)
    disc = _disc((INPUT_SIZE, INPUT_SIZE), 100, 150, 8)
    hu[:, disc] = 500.0
    boxes = np.array([[142.0, 92.0, 158.0, 108.0]])
    for seed in range(5):
        out, new, kept = augment(hu, boxes, np.random.default_rng(seed), noise_hu=0.0)
        assert kept.tolist() == [0]
        ys, xs = np.nonzero(out[1] > 250)
        x1, y1, x2, y2 = new[0]
        assert (x1 + x2) / 2 == pytest.approx(xs.mean(), abs=1.0)
        assert (y1 + y2) / 2 == pytest.approx(ys.mean(), abs=1.0)
        assert x2 - x1 == pytest.approx(xs.max() - xs.min() + 1, abs=2.5)
    # a box whose centre leaves the image is dropped
    _, new, kept = augment(hu, np.array([[0.0, 0.0, 2.0, 2.0]]), np.random.default_rng(1),
                           rotate_deg=0.0, scale_range=(1.0, 1.0), shift_px=20.0)
    assert len(kept) == len(new) <= 1
