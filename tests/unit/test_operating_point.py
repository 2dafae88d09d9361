"""The operating-threshold rule of trainer.operating_point on hand-made findings."""

from __future__ import annotations

import numpy as np

from trainer.insertion import ExclusionZone, InsertedNodule, NoduleKind, Placement
from trainer.operating_point import ScanFindings, choose_threshold, label_findings


def _scan(sid: str, probs: list[float], labels: list[int], n_nodules: int = 0,
          capped: bool = False) -> ScanFindings:
    p = np.asarray(probs, dtype=np.float64)
    return ScanFindings(sid, p, np.zeros((len(p), 3)), np.asarray(labels, dtype=np.int8),
                        n_nodules=n_nodules, capped=capped)


def test_label_findings_hits_double_hits_and_ignored_regions() -> None:
    nod = InsertedNodule((0.0, 0.0, 0.0), 10.0, NoduleKind.SOLID, Placement.PARENCHYMAL, 0.0)
    ignore = [ExclusionZone((100.0, 0.0, 0.0), 8.0)]
    p = np.array([0.9, 0.8, 0.7, 0.6])
    c = np.array([[1.0, 0, 0], [0, 4.9, 0], [105.0, 0, 0], [50.0, 0, 0]])
    # 0.9 hits (1 mm < 5); 0.8 hits the same nodule again: neither; 0.7 is 5 mm inside
    # the 8 mm ignore zone: neither; 0.6 is a false positive.
    assert label_findings(p, c, [nod], ignore).tolist() == [1, -1, -1, 0]


def test_threshold_is_the_lowest_meeting_both_limits() -> None:
    # Two synthetic scans (2 nodules each); 1 FP/scan allowed -> at most 2 FPs in all.
    syn = [_scan("s0", [0.95, 0.9, 0.8, 0.6], [1, 0, 1, 0], n_nodules=2),
           _scan("s1", [0.85, 0.7, 0.65], [1, 0, 0], n_nodules=2)]
    # FPs with p >= t: t=0.6 -> 4; 0.65 -> 3; 0.7 -> 2 (0.9, 0.7): synthetic limit -> 0.7.
    neg = [_scan("n0", [0.92, 0.88, 0.75, 0.72], [0, 0, 0, -1])]
    # negative scan, at most 1 FP: t=0.75 -> 3 FPs, 0.88 -> 2, 0.9 -> 1 (0.92): limit 0.9.
    out = choose_threshold(syn, neg, fp_per_scan=1.0, max_per_negative_scan=1,
                           min_threshold=0.5)
    # lowest admitted value 0.9; highest rejected below it 0.88 -> halfway 0.89.
    assert out["threshold"] == 0.89
    h = out["heldout_synthetic"]
    # at 0.89: s0's 0.95 (hit) and 0.9 (FP); nothing of s1
    assert (h["true_positives"], h["false_positives"], h["nodules"]) == (1, 1, 4)
    assert out["real_negative_scans"][0]["false_positives"] == 1
    # without the negative scan the synthetic limit alone: 0.7 admitted, 0.65 rejected
    alone = choose_threshold(syn, [], fp_per_scan=1.0, max_per_negative_scan=1,
                             min_threshold=0.5)
    assert alone["threshold"] == 0.675


def test_threshold_never_below_the_floor_or_a_capped_scan() -> None:
    syn = [_scan("s0", [0.9, 0.4, 0.3], [1, 0, 0], n_nodules=1)]
    # 1 FP/scan allows t = 0.3's neighbour, but the floor is 0.5
    assert choose_threshold(syn, [], fp_per_scan=1.0, max_per_negative_scan=0,
                            min_threshold=0.5)["threshold"] == 0.5
    capped = [_scan("s0", [0.9, 0.8, 0.7], [1, 1, 1], n_nodules=3, capped=True)]
    # all admissible, but the scan hit the report cap: not below its lowest, 0.7
    assert choose_threshold(capped, [], fp_per_scan=1.0, max_per_negative_scan=0,
                            min_threshold=0.5)["threshold"] == 0.7
