"""LUNA16 FROC/CPM, DeepLesion sensitivity and Dice against hand-computed cases.

Every expected value below is worked out by hand in the comments; none is
produced by the code under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer.froc import (
    LUNA16_FP_RATES,
    Candidate,
    ReferenceNodule,
    box_iobb,
    box_iou,
    cap_candidates,
    deeplesion_sensitivity,
    dice,
    luna16_froc,
    plot_froc,
)


def far(i: float) -> tuple[float, float, float]:
    """A position far from every reference nodule in these tests."""
    return (1000.0 + 30.0 * i, 0.0, 0.0)


def test_strict_radius() -> None:
    # Nodule at the origin, d = 10 mm -> r = 5 mm.
    refs = [ReferenceNodule("A", (0.0, 0.0, 0.0), 10.0)]
    cands = [
        Candidate("A", (5.0, 0.0, 0.0), 0.9),  # distance 5 == r: NOT < r -> false positive
        Candidate("A", (4.99, 0.0, 0.0), 0.8),  # distance 4.99 < 5 -> hit
    ]
    r = luna16_froc(refs, cands)
    assert (r.n_true_positives, r.n_false_positives, r.n_false_negatives) == (1, 1, 0)
    # Operating points: origin (0, 0); t=0.9: 1 FP -> (1, 0); t=0.8: 1 TP -> (1, 1).
    # Below 1 FP/scan the curve runs from (0,0) to (1,0): sensitivity 0; at 1 FP/scan the
    # highest sensitivity of that FP rate (1.0); beyond, the last value 1.0.
    assert r.sensitivity_at == pytest.approx((0, 0, 0, 1, 1, 1, 1))
    assert r.cpm == pytest.approx(4 / 7)


def test_double_hits_and_irrelevant_findings() -> None:
    refs = [
        ReferenceNodule("A", (0.0, 0.0, 0.0), 10.0),
        ReferenceNodule("A", (50.0, 0.0, 0.0), -1.0, irrelevant=True),  # -> 10 mm, r = 5
        ReferenceNodule("A", (100.0, 0.0, 0.0), 6.0, irrelevant=True),  # r = 3
        ReferenceNodule("B", (0.0, 0.0, 0.0), 8.0),
    ]
    cands = [
        Candidate("A", (1.0, 0.0, 0.0), 0.9),  # hit on the nodule
        Candidate("A", (0.0, 2.0, 0.0), 0.7),  # second hit: counted once, not a FP
        Candidate("A", (52.0, 0.0, 0.0), 0.95),  # 2 mm from an irrelevant finding: ignored
        Candidate("A", (104.0, 0.0, 0.0), 0.6),  # 4 mm from the r=3 irrelevant one: FP
        Candidate("A", far(1), 0.5),  # FP
        Candidate("B", (10.0, 0.0, 0.0), 0.8),  # 10 mm from B's nodule (r=4): FP, B missed
    ]
    r = luna16_froc(refs, cands)
    assert r.n_scans == 2 and r.n_nodules == 2
    assert (r.n_true_positives, r.n_false_positives, r.n_false_negatives) == (1, 3, 1)
    assert (r.n_double_hits, r.n_irrelevant_hits) == (1, 1)
    # Ranked: 0.9 TP, 0.8 FP, 0.6 FP, 0.5 FP; 2 nodules, 2 scans.
    # Points: (0,0) (0,0.5) (0.5,0.5) (1.0,0.5) (1.5,0.5) -> 0.5 at every FP rate.
    # (Had the 0.95 mark been a FP, the curve would start (0,0) (0.5,0) and the
    # sensitivity at 1/8 would be 0.)
    assert r.sensitivity_at == pytest.approx((0.5,) * 7)
    assert r.cpm == pytest.approx(0.5)
    # 4 sorted operating points after the origin, at probabilities 0.9 0.8 0.6 0.5
    np.testing.assert_allclose(r.fps_per_scan, [0, 0, 0.5, 1.0, 1.5])
    np.testing.assert_allclose(r.sensitivity, [0, 0.5, 0.5, 0.5, 0.5])


def test_interpolation_between_operating_points() -> None:
    # Two scans, one nodule each (d=10 at the origin).
    refs = [ReferenceNodule(s, (0.0, 0.0, 0.0), 10.0) for s in ("A", "B")]
    cands = [
        Candidate("A", (0.0, 0.0, 1.0), 0.9),  # TP
        Candidate("A", far(1), 0.5),  # FP
        Candidate("B", (1.0, 0.0, 0.0), 0.5),  # TP, same probability as the FPs
        Candidate("B", far(2), 0.5),  # FP
    ]
    r = luna16_froc(refs, cands)
    # Points: origin (0, 0); t=0.9: TP=1 FP=0 -> (0, 0.5); t=0.5: TP=2, FP=2 -> (2/2, 2/2) = (1, 1).
    # Linear between (0, .5) and (1, 1): s(f) = 0.5 + 0.5 f
    #   f=1/8 -> 0.5625, 1/4 -> 0.625, 1/2 -> 0.75, 1 -> 1.0; 2, 4, 8 -> 1.0 (last point).
    expected = (0.5625, 0.625, 0.75, 1.0, 1.0, 1.0, 1.0)
    assert r.sensitivity_at == pytest.approx(expected)
    # CPM = (0.5625 + 0.625 + 0.75 + 4) / 7 = 5.9375 / 7
    assert r.cpm == pytest.approx(5.9375 / 7)


def test_interpolation_many_scans() -> None:
    # Four scans with one nodule each; ranked marks T F T F F T F F.
    refs = [ReferenceNodule(s, (0.0, 0.0, 0.0), 10.0) for s in "ABCD"]
    hit = (0.0, 0.0, 0.0)
    cands = [
        Candidate("A", hit, 0.9), Candidate("B", far(1), 0.8), Candidate("C", hit, 0.7),
        Candidate("D", far(2), 0.6), Candidate("D", far(3), 0.5), Candidate("D", hit, 0.4),
        Candidate("B", far(4), 0.3), Candidate("B", far(5), 0.2),
    ]
    r = luna16_froc(refs, cands)
    # Points (FP/4, TP/4): (0,0) (0,.25) (.25,.25) (.25,.5) (.5,.5) (.75,.5) (.75,.75)
    #                      (1,.75) (1.25,.75)
    # f=1/8: between (0,.25) and (.25,.25) -> .25; f=1/4: highest at .25 -> .5; f=1/2 -> .5;
    # f=1: .75; f=2,4,8: last point .75.  CPM = (.25+.5+.5+.75*4)/7 = 4.25/7.
    assert r.sensitivity_at == pytest.approx((0.25, 0.5, 0.5, 0.75, 0.75, 0.75, 0.75))
    assert r.cpm == pytest.approx(4.25 / 7)
    # An extra scan without nodules or marks halves nothing but the FP rate denominator:
    # 5 scans -> points (FP/5, TP/4): (0,.25) (.2,.25) (.2,.5) (.4,.5) (.6,.5) (.6,.75) (.8,.75)
    # (1.0,.75)... f=1/8 -> .25, f=1/4: between (.2,.5) and (.4,.5) -> .5, f=1/2: between
    # (.4,.5) and (.6,.5) -> .5, f=1 -> .75, then .75.
    r5 = luna16_froc(refs, cands, series_uids=list("ABCDE"))
    assert r5.n_scans == 5
    assert r5.sensitivity_at == pytest.approx((0.25, 0.5, 0.5, 0.75, 0.75, 0.75, 0.75))


def test_candidate_cap() -> None:
    # Scan A has the only nodule; 19 further scans without anything -> 20 scans.
    refs = [ReferenceNodule("A", (0.0, 0.0, 0.0), 10.0)]
    fps = [Candidate("A", far(i), i / 100) for i in range(1, 101)]  # p = 0.01 .. 1.00
    hit = Candidate("A", (0.0, 0.0, 0.0), 0.005)  # the 101st, least suspicious
    uids = ["A"] + [f"S{i}" for i in range(19)]
    capped = luna16_froc(refs, [*fps, hit], series_uids=uids)
    # 101 > 100 candidates: threshold = 101st highest = 0.005; keep p > 0.005 -> the 100 FPs.
    assert capped.n_candidates == 100
    assert (capped.n_true_positives, capped.n_false_negatives) == (0, 1)
    # nothing detected: undefined (NaN, as the reference script), not 0
    assert not capped.defined and all(np.isnan(v) for v in capped.sensitivity_at)
    # Without the cap the hit is found after all 100 FPs: (100/20 = 5 FPs/scan, 1.0) -> at
    # 8 FPs/scan (beyond the last point) the sensitivity is 1.0, at 4 it is still 0.
    uncapped = luna16_froc(refs, [*fps, hit], series_uids=uids, max_candidates=0)
    assert uncapped.n_true_positives == 1
    assert uncapped.sensitivity_at[-1] == pytest.approx(1.0)
    assert uncapped.sensitivity_at[-2] == pytest.approx(0.0)


def test_cap_drops_ties_at_threshold() -> None:
    # 99 candidates p = 0.02..1.00 plus two at p = 0.01: the 101st highest is 0.01,
    # only p > 0.01 survive -> 99 candidates.
    cands = [Candidate("A", far(i), i / 100) for i in range(2, 101)]
    cands += [Candidate("A", far(200), 0.01), Candidate("A", far(201), 0.01)]
    assert len(cap_candidates(cands, 100)) == 99
    assert len(cap_candidates(cands[:100], 100)) == 100  # not more than 100: unchanged


def test_no_false_positives_and_errors() -> None:
    refs = [ReferenceNodule("A", (0.0, 0.0, 0.0), 10.0), ReferenceNodule("A", (50, 0, 0), 10.0)]
    r = luna16_froc(refs, [Candidate("A", (0.0, 0.0, 0.0), 0.3)])
    # No FP at all: LUNA16 puts every point at 0 FPs/scan -> final sensitivity 1/2 everywhere.
    assert r.sensitivity_at == pytest.approx((0.5,) * 7)
    with pytest.raises(ValueError, match="without reference nodules"):
        luna16_froc([], [Candidate("A", (0.0, 0.0, 0.0), 0.3)])


def test_bootstrap_is_seeded(tmp_path: Path) -> None:
    refs = [ReferenceNodule(s, (0.0, 0.0, 0.0), 10.0) for s in "ABCD"]
    cands = [Candidate("A", (0, 0, 0), 0.9), Candidate("B", far(1), 0.8),
             Candidate("C", (0, 0, 0), 0.7), Candidate("D", far(2), 0.6)]
    a = luna16_froc(refs, cands, bootstrap=200, seed=3)
    b = luna16_froc(refs, cands, bootstrap=200, seed=3)
    c = luna16_froc(refs, cands, bootstrap=200, seed=4)
    assert a.ci_lower == b.ci_lower and a.cpm_ci == b.cpm_ci
    assert a.bootstrap_mean != c.bootstrap_mean
    assert a.ci_lower is not None and a.ci_upper is not None and a.cpm_ci is not None
    for lo, hi in zip(a.ci_lower, a.ci_upper, strict=True):
        assert 0.0 <= lo <= hi <= 1.0
    assert a.cpm_ci[0] <= a.cpm <= a.cpm_ci[1]
    # A single scan: every resample is the scan itself -> a zero-width interval.
    one = luna16_froc(refs[:1], cands[:1], bootstrap=20, seed=1)
    assert one.ci_lower == one.ci_upper == one.sensitivity_at
    png = plot_froc(a, tmp_path / "froc.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_box_overlaps_by_hand() -> None:
    gt = np.array([[0, 0, 9, 9], [50, 50, 59, 59]])  # 10 x 10 = 100 px each (inclusive)
    # [0,0,9,4]: 10 x 5 = 50 px, all inside gt 0 -> IoU 50/(100+50-50) = 0.5, IoBB 50/50 = 1
    np.testing.assert_allclose(box_iou([0, 0, 9, 4], gt), [0.5, 0.0])
    np.testing.assert_allclose(box_iobb([0, 0, 9, 4], gt), [1.0, 0.0])
    # [45,45,59,59]: 15 x 15 = 225 px, overlap with gt 1 is 10 x 10 = 100
    # IoU = 100/(225+100-100) = 0.4444, IoBB = 100/225 = 0.4444
    np.testing.assert_allclose(box_iou([45, 45, 59, 59], gt)[1], 100 / 225)
    np.testing.assert_allclose(box_iobb([45, 45, 59, 59], gt)[1], 100 / 225)
    # [50,50,54,54]: 5 x 5 = 25 px inside gt 1 -> IoU 25/100, IoBB 1
    np.testing.assert_allclose(box_iou([50, 50, 54, 54], gt)[1], 0.25)
    np.testing.assert_allclose(box_iobb([50, 50, 54, 54], gt)[1], 1.0)


def test_deeplesion_sensitivity_iou_and_iobb() -> None:
    gts = [np.array([[10, 10, 19, 19]]), np.array([[0, 0, 9, 9], [50, 50, 59, 59]])]
    dets = [
        np.array([
            [10, 10, 19, 19, 0.9],  # IoU 1: hit on image 0's lesion
            [10, 10, 19, 19, 0.8],  # same lesion again: neither hit nor FP
            [100, 100, 109, 109, 0.7],  # FP
        ]),
        np.array([
            [45, 45, 59, 59, 0.5],  # IoU = IoBB = 0.444: FP
            [0, 0, 9, 4, 0.45],  # IoU 0.5 (>= 0.5): hit; IoBB 1: hit
            [50, 50, 54, 54, 0.4],  # IoU 0.25: FP; IoBB 1: hit
        ]),
    ]
    iou = deeplesion_sensitivity(dets, gts, overlap="iou")
    # Ranked (2 images, 3 lesions), IoU: .9 hit (FP 0, s 1/3), .8 ignored, .7 FP (0.5/img),
    # .5 FP (1.0/img), .45 hit (s 2/3 at 1.0/img), .4 FP (1.5/img).
    # s(0.5) = 1/3 (the highest value at 0.5 FPs/img); s(1) = 2/3; s(2..16) = 2/3 (last).
    assert iou.overlap == "iou"
    assert iou.sensitivity_at == pytest.approx((1 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3))
    iobb = deeplesion_sensitivity(dets, gts, overlap="iobb")
    # IoBB: .9 hit, .8 ignored, .7 FP (.5), .5 FP (1.0), .45 hit (2/3), .4 hit (3/3) at 1.0/img.
    assert iobb.sensitivity_at == pytest.approx((1 / 3, 1.0, 1.0, 1.0, 1.0, 1.0))
    assert iobb.to_dict()["protocol"].startswith("DeepLesion sensitivity")
    with pytest.raises(ValueError, match="overlap"):
        deeplesion_sensitivity(dets, gts, overlap="dice")  # type: ignore[arg-type]


def test_dice_by_hand() -> None:
    a = np.zeros((4, 4), dtype=bool)
    b = np.zeros((4, 4), dtype=bool)
    a[0:2, 0:2] = True  # 4 px
    b[0:2, 0:3] = True  # 6 px, 4 shared
    assert dice(a, b) == pytest.approx(2 * 4 / (4 + 6))
    assert dice(np.zeros(3), np.zeros(3)) == 1.0
    assert dice(a, ~a) == 0.0


def test_fp_rates_are_luna16s() -> None:
    assert LUNA16_FP_RATES == (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8)


def test_jump_exactly_on_a_rate_is_read_as_the_reference_script_does() -> None:
    # 7 scans; scan A holds two nodules (r = 5 mm) and every mark.  7 FPs at
    # 0.99..0.93, a hit on nodule 1 at 0.9, 18 more FPs at 0.5..0.33, a hit on
    # nodule 2 at 0.1: 25 FPs in all.
    refs = [ReferenceNodule("A", (0.0, 0.0, 0.0), 10.0),
            ReferenceNodule("A", (200.0, 0.0, 0.0), 10.0)]
    cands = [Candidate("A", far(i), 0.99 - 0.01 * i) for i in range(7)]
    cands.append(Candidate("A", (1.0, 0.0, 0.0), 0.9))
    cands += [Candidate("A", far(7 + i), 0.5 - 0.01 * i) for i in range(18)]
    cands.append(Candidate("A", (201.0, 0.0, 0.0), 0.1))
    r = luna16_froc(refs, cands, list("ABCDEFG"))
    assert (r.n_true_positives, r.n_false_positives) == (2, 25)
    # Exactly, the jump 0 -> 0.5 sits at 7/7 = 1 FP/scan.  The reference script
    # computes fpr * nFP / nScans = (7/25) * 25 / 7 = 1.0000000000000002 (one
    # rounding step above 1), so np.interp at 1 reads the foot of the jump: 0.
    assert (7 / 25) * 25 / 7 > 1.0
    # 1/8, 1/4, 1/2: 0; 1: 0 (not 0.5); 2 (14 FPs): 0.5; 4 and 8, beyond the last
    # point (25/7 = 3.57 FPs/scan, sensitivity 1): 1.
    assert r.sensitivity_at == pytest.approx((0, 0, 0, 0, 0.5, 1, 1))
    assert r.cpm == pytest.approx(2.5 / 7)


def test_nothing_detected_is_undefined_not_zero() -> None:
    refs = [ReferenceNodule("A", (0.0, 0.0, 0.0), 10.0)]
    cands = [Candidate("A", far(i), 0.9 - 0.1 * i) for i in range(3)]
    r = luna16_froc(refs, cands, bootstrap=20)
    assert (r.n_true_positives, r.n_false_positives, r.n_false_negatives) == (0, 3, 1)
    assert not r.defined
    assert np.isnan(r.cpm) and all(np.isnan(v) for v in r.sensitivity_at)
    d = r.to_dict()
    assert d["cpm"] is None and d["cpm_note"] == "undefined (no true positive)"
    from trainer.froc import luna16_markdown

    assert "CPM: undefined (no true positive)" in luna16_markdown(r, title="t")
