"""DeepLesion evaluation: hand-computed cases and a port of the official logic side by side.

``_official_*`` re-implements, line for line in behaviour, the evaluation of
the DeepLesion authors (Ke Yan, NIH CC: MULAN ``maskrcnn/data/datasets/
evaluation/DeepLesion/detection_eval.py`` ``sens_at_FP``/``FROC``/``IOU``,
and the IoBB overlap ``inters / detected-box area`` of the DeepLesion
evaluation code): detections of all images sorted by ``argsort(score)[::-1]``,
a detection whose best overlap is below the threshold is a false positive,
otherwise it marks every not-yet-hit lesion it overlaps enough; FP rates
inside the curve are interpolated with ``scipy.interpolate.interp1d``,
beyond its end the final sensitivity is used.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import interpolate

from trainer.froc import DEEPLESION_FP_RATES, deeplesion_sensitivity


def _official_overlap(box: np.ndarray, gts: np.ndarray, iobb: bool) -> np.ndarray:
    ixmin = np.maximum(gts[:, 0], box[0])
    iymin = np.maximum(gts[:, 1], box[1])
    ixmax = np.minimum(gts[:, 2], box[2])
    iymax = np.minimum(gts[:, 3], box[3])
    iw = np.maximum(ixmax - ixmin + 1.0, 0.0)
    ih = np.maximum(iymax - iymin + 1.0, 0.0)
    inters = iw * ih
    area = (box[2] - box[0] + 1.0) * (box[3] - box[1] + 1.0)
    if iobb:
        return np.asarray(inters / area)
    uni = area + (gts[:, 2] - gts[:, 0] + 1.0) * (gts[:, 3] - gts[:, 1] + 1.0) - inters
    return np.asarray(inters / uni)


def _official_froc(boxes_all: list[np.ndarray], gts_all: list[np.ndarray], th: float,
                   iobb: bool) -> tuple[np.ndarray, np.ndarray]:
    n_img = len(boxes_all)
    img_idxs = np.hstack([[i] * len(boxes_all[i]) for i in range(n_img)]).astype(int)
    boxes_cat = np.vstack(boxes_all)
    order = np.argsort(boxes_cat[:, -1])[::-1]
    boxes_cat = boxes_cat[order, :4]
    img_idxs = img_idxs[order]
    hits = [np.zeros((len(g),), dtype=bool) for g in gts_all]
    n_hits = n_miss = 0
    tps, fps = [], []
    for i in range(len(boxes_cat)):
        ov = _official_overlap(boxes_cat[i], gts_all[img_idxs[i]], iobb)
        if len(ov) == 0 or ov.max() < th:
            n_miss += 1
        else:
            for j in range(len(ov)):
                if ov[j] >= th and not hits[img_idxs[i]][j]:
                    hits[img_idxs[i]][j] = True
                    n_hits += 1
        tps.append(n_hits)
        fps.append(n_miss)
    n_gt = len(np.vstack(gts_all))
    return np.array(tps, dtype=float) / n_gt, np.array(fps, dtype=float) / n_img


def _official_sens_at_fp(boxes_all: list[np.ndarray], gts_all: list[np.ndarray],
                         avg_fp: tuple[float, ...], th: float, iobb: bool) -> np.ndarray:
    sens, fp_per_img = _official_froc(boxes_all, gts_all, th, iobb)
    inside = [a for a in avg_fp if a <= fp_per_img[-1]]
    outside = [a for a in avg_fp if a > fp_per_img[-1]]
    f = interpolate.interp1d(fp_per_img, sens)
    return np.hstack([f(np.array(inside)), np.ones(len(outside)) * sens[-1]])


GTS = [np.array([[0.0, 0.0, 9.0, 9.0]]), np.array([[20.0, 20.0, 29.0, 29.0]])]
DETS = [
    np.array([[0.0, 0.0, 9.0, 9.0, 0.9], [50.0, 50.0, 59.0, 59.0, 0.8]]),
    np.array([[20.0, 20.0, 24.0, 24.0, 0.7], [0.0, 0.0, 9.0, 9.0, 0.6]]),
]


def test_hand_computed_iou() -> None:
    # ranked: 0.9 hit A; 0.8 FP; 0.7 IoU 25/100 = 0.25 -> FP; 0.6 FP.
    # (FP/image, sens): (0, .5) (.5, .5) (1, .5) (1.5, .5)
    r = deeplesion_sensitivity(DETS, GTS, overlap="iou")
    assert r.sensitivity_at == pytest.approx((0.5,) * 6)
    assert r.fps_per_image.tolist() == [0.0, 0.5, 1.0, 1.5]


def test_hand_computed_iobb() -> None:
    # 0.7: intersection 25 / detected box 25 = IoBB 1 -> hits B.
    # (0, .5) (.5, .5) (.5, 1) (1, 1): 1 lesion of 2 at 0.5 FP/image, both by 1 FP/image
    r = deeplesion_sensitivity(DETS, GTS, overlap="iobb")
    assert r.sensitivity.tolist() == [0.5, 0.5, 1.0, 1.0]
    assert r.sensitivity_at[1:] == pytest.approx((1.0,) * 5)


def test_hand_computed_threshold_edge() -> None:
    # a detection at exactly IoU 0.5 hits (>= threshold, as the official code)
    gts = [np.array([[0.0, 0.0, 9.0, 9.0]])]
    dets = [np.array([[0.0, 0.0, 9.0, 19.0, 0.5]])]  # inter 100, union 200
    assert deeplesion_sensitivity(dets, gts, overlap="iou").sensitivity_at[0] == 1.0


@pytest.mark.parametrize("iobb", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_matches_official_logic_on_random_detections(seed: int, iobb: bool) -> None:
    rng = np.random.default_rng(seed)
    gts, dets = [], []
    for _ in range(int(rng.integers(3, 9))):
        g = []
        for _ in range(int(rng.integers(1, 4))):
            x, y, w, h = rng.uniform(0, 400), rng.uniform(0, 400), *rng.uniform(8, 60, 2)
            g.append([x, y, x + w, y + h])
        gts.append(np.array(g))
        d = []
        for _ in range(int(rng.integers(1, 12))):
            if rng.random() < 0.4:  # jittered copy of a lesion box
                b = np.array(g[int(rng.integers(len(g)))]) + rng.normal(0, 4, 4)
            else:
                x, y, w, h = rng.uniform(0, 400), rng.uniform(0, 400), *rng.uniform(8, 60, 2)
                b = np.array([x, y, x + w, y + h])
            d.append([*b, rng.uniform()])  # continuous scores: no ties
        dets.append(np.array(d))
    ours = deeplesion_sensitivity(dets, gts, overlap="iobb" if iobb else "iou")
    sens, fpi = _official_froc(dets, gts, 0.5, iobb)
    np.testing.assert_allclose(ours.sensitivity, sens)
    np.testing.assert_allclose(ours.fps_per_image, fpi)
    rates = tuple(a for a in DEEPLESION_FP_RATES if a >= fpi[0])  # interp1d's domain
    official = _official_sens_at_fp(dets, gts, rates, 0.5, iobb)
    np.testing.assert_allclose([v for a, v in zip(DEEPLESION_FP_RATES, ours.sensitivity_at,
                                                  strict=True) if a >= fpi[0]], official)
