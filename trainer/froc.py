"""Detection metrics as the challenges compute them: LUNA16 FROC/CPM, DeepLesion, Dice.

LUNA16 (Setio et al., Med Image Anal 42:1-13, 2017; ``noduleCADEvaluationLUNA16.py``)
---------------------------------------------------------------------------------------
Per scan:

1. If a scan has more than ``max_candidates`` (100) candidates, only the most
   suspicious are kept, exactly as the reference script does: with the
   probabilities sorted in descending order, the threshold is the
   ``max_candidates``-th-plus-one value and the candidates *strictly above*
   it are kept (in input order, at most ``max_candidates``).  Ties at the
   threshold are therefore all dropped.
2. A candidate hits a reference nodule when the Euclidean distance between
   the candidate and the nodule centre is strictly less than the nodule
   radius (``dist**2 < (diameter/2)**2``).  Irrelevant findings with a
   negative diameter (LUNA16's ``annotations_excluded.csv`` rows with
   ``diameter_mm == -1``) get a 10 mm diameter, as in the reference script.
3. Reference nodules are processed first: a found nodule contributes one true
   positive with the *highest* probability among its hits; all its hits are
   removed (several hits count once and are not false positives).  A missed
   nodule still counts in the denominator.  A candidate may hit two nodules
   (it then counts for both, as in the reference script).
4. Then irrelevant findings: remaining candidates that hit one are removed
   (neither hit nor false positive).
5. All remaining candidates are false positives.

The FROC curve has one operating point per distinct probability threshold
(plus the origin).  Its coordinates are computed with the reference script's
floating-point arithmetic, not the exact fractions: the script takes the ROC
curve of the non-excluded candidates (``fpr = FP / nFP``, ``tpr = TP / nTP``)
and then ``fps = fpr * nFP / nScans`` and ``sens = tpr * nTP / nNodules``
(left to right, float64).  ``FP / nFP * nFP`` can land one rounding step above
``FP``; a jump of the curve that sits exactly on one of the seven rates then
lies just to the right of the rate, and ``numpy.interp`` returns the lowest
sensitivity of that jump, as the reference does (the exact fraction would
give the highest).  With 888 scans all seven rates are whole FP counts, so
this matters on the real LUNA16 data.  Sensitivity at 1/8, 1/4, 1/2, 1, 2, 4
and 8 FPs/scan is read from that curve by ``numpy.interp`` (beyond the last
operating point the curve stays at its last sensitivity).  The CPM is the mean
of the seven values.  When no candidate is a false positive the reference
script puts every operating point at 0 FPs/scan, so every sensitivity equals
the final sensitivity; so does this module.  When no reference nodule is
detected at all the reference script divides by zero and its sensitivities and
CPM are NaN: here too they are NaN (:attr:`FrocResult.defined` is false), and
reports say "undefined (no true positive)" instead of a number.

Bootstrap confidence intervals resample scans with replacement (as
``computeFROC_bootstrap``), recompute the curve and the seven sensitivities
(a resample in which no nodule is detected has no defined curve and is left
out; the reference script would propagate its NaN into every bound), and
report the mean and the ``floor(P * n)``-th sorted values with
``P = (1 - confidence)/2`` and ``1 - P``.

DeepLesion (Yan et al., J Med Imaging 5(3):036501, 2018; ``sens_at_FP``)
-----------------------------------------------------------------------
All detections of all images are ranked by score.  Walking down the list, a
detection whose overlap with a not-yet-hit lesion box of its image is
``>= threshold`` hits it; one that overlaps an already-hit lesion (and no
unhit one) is neither a hit nor a false positive; one whose best overlap is
``< threshold`` is a false positive.  Sensitivity at 0.5, 1, 2, 4, 8 and 16
FPs per image is read by linear interpolation on the (FPs/image, sensitivity)
points after each detection (beyond the last point: the last sensitivity).
Overlap is IoU or IoBB (intersection over the *detected* box's area); boxes
are inclusive pixel coordinates ``(x1, y1, x2, y2)`` whose areas are
``(x2 - x1 + 1) * (y2 - y1 + 1)``, the convention of the DeepLesion code.
Every result says which overlap it used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEEPLESION_FP_RATES",
    "LUNA16_FP_RATES",
    "LUNA16_IRRELEVANT_DEFAULT_DIAMETER_MM",
    "LUNA16_MAX_CANDIDATES",
    "UNDEFINED_CPM",
    "Candidate",
    "DeepLesionResult",
    "FrocResult",
    "ReferenceNodule",
    "box_iobb",
    "box_iou",
    "cap_candidates",
    "deeplesion_sensitivity",
    "dice",
    "luna16_froc",
    "plot_froc",
]

#: FP rates (per scan) at which LUNA16 reads sensitivity; their mean is the CPM.
LUNA16_FP_RATES: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: LUNA16 keeps at most this many candidates per scan.
LUNA16_MAX_CANDIDATES = 100
#: Diameter the LUNA16 script gives irrelevant findings with a negative diameter.
LUNA16_IRRELEVANT_DEFAULT_DIAMETER_MM = 10.0
#: FP rates (per image) at which DeepLesion reads sensitivity.
DEEPLESION_FP_RATES: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)

Overlap = Literal["iou", "iobb"]


@dataclass(frozen=True)
class ReferenceNodule:
    """A LUNA16 reference nodule, or an irrelevant finding (``irrelevant=True``).

    Coordinates are world (LPS) mm, as in LUNA16's ``annotations.csv``.
    """

    series_uid: str
    center_mm: tuple[float, float, float]
    diameter_mm: float
    irrelevant: bool = False


@dataclass(frozen=True)
class Candidate:
    """A CAD mark: position (LPS mm) and suspicion score."""

    series_uid: str
    center_mm: tuple[float, float, float]
    probability: float


@dataclass
class FrocResult:
    """LUNA16 FROC analysis.

    Attributes
    ----------
    fps_per_scan, sensitivity : ndarray
        The FROC curve's operating points (origin first).
    thresholds : ndarray
        Probability threshold of each operating point (``inf`` for the origin).
    fp_rates : tuple of float
        :data:`LUNA16_FP_RATES`.
    sensitivity_at : tuple of float
        Interpolated sensitivity at each of ``fp_rates``.
    cpm : float
        Mean of ``sensitivity_at``.
    n_scans, n_nodules, n_true_positives, n_false_positives, n_false_negatives : int
    n_candidates : int
        Candidates kept after the per-scan cap.
    n_double_hits, n_irrelevant_hits : int
        Candidates ignored because they were extra hits on a found nodule /
        hits on irrelevant findings.
    bootstrap_samples : int
    ci_lower, ci_upper : tuple of float or None
        Bootstrap bounds of ``sensitivity_at``.
    bootstrap_mean : tuple of float or None
    cpm_ci : (float, float) or None
    confidence : float
    """

    fps_per_scan: npt.NDArray[np.float64]
    sensitivity: npt.NDArray[np.float64]
    thresholds: npt.NDArray[np.float64]
    fp_rates: tuple[float, ...]
    sensitivity_at: tuple[float, ...]
    cpm: float
    n_scans: int
    n_nodules: int
    n_true_positives: int
    n_false_positives: int
    n_false_negatives: int
    n_candidates: int
    n_double_hits: int
    n_irrelevant_hits: int
    bootstrap_samples: int = 0
    confidence: float = 0.95
    bootstrap_mean: tuple[float, ...] | None = None
    ci_lower: tuple[float, ...] | None = None
    ci_upper: tuple[float, ...] | None = None
    cpm_ci: tuple[float, float] | None = None
    curve_fps: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    curve_lower: npt.NDArray[np.float64] | None = None
    curve_upper: npt.NDArray[np.float64] | None = None

    @property
    def defined(self) -> bool:
        """False when no reference nodule was detected (sensitivities and CPM are NaN)."""
        return not math.isnan(self.cpm)

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly summary (no curve arrays).

        An undefined CPM (no true positive) is ``None`` with ``"cpm_note":
        "undefined (no true positive)"``, never 0 (JSON has no NaN).
        """
        out: dict[str, object] = {
            "protocol": "LUNA16 FROC (hit: distance < radius; max "
                        f"{LUNA16_MAX_CANDIDATES} candidates/scan)",
            "fp_rates": list(self.fp_rates),
            "sensitivity_at": [_round_or_none(v) for v in self.sensitivity_at],
            "cpm": _round_or_none(self.cpm),
            "n_scans": self.n_scans,
            "n_nodules": self.n_nodules,
            "n_true_positives": self.n_true_positives,
            "n_false_positives": self.n_false_positives,
            "n_false_negatives": self.n_false_negatives,
            "n_candidates": self.n_candidates,
            "n_double_hits": self.n_double_hits,
            "n_irrelevant_hits": self.n_irrelevant_hits,
        }
        if not self.defined:
            out["cpm_note"] = UNDEFINED_CPM
        if self.cpm_ci is not None:
            out.update(
                bootstrap_samples=self.bootstrap_samples,
                confidence=self.confidence,
                ci_lower=[_round_or_none(v) for v in self.ci_lower or ()],
                ci_upper=[_round_or_none(v) for v in self.ci_upper or ()],
                cpm_ci=[_round_or_none(v) for v in self.cpm_ci],
            )
        return out


#: How an undefined CPM (nothing detected) is reported.
UNDEFINED_CPM = "undefined (no true positive)"


def _round_or_none(v: float) -> float | None:
    return None if math.isnan(v) else round(v, 6)


# --------------------------------------------------------------------------- LUNA16


def cap_candidates(candidates: Sequence[Candidate], max_candidates: int) -> list[Candidate]:
    """Keep a scan's most suspicious candidates the way the LUNA16 script does.

    With more than ``max_candidates`` candidates, the threshold is the
    ``(max_candidates + 1)``-th highest probability; candidates strictly
    above it are kept, in input order, at most ``max_candidates``.
    """
    if max_candidates <= 0 or len(candidates) <= max_candidates:
        return list(candidates)
    probs = sorted((c.probability for c in candidates), reverse=True)
    threshold = probs[max_candidates]
    kept: list[Candidate] = []
    for c in candidates:
        if len(kept) >= max_candidates:
            break
        if c.probability > threshold:
            kept.append(c)
    return kept


@dataclass
class _Entries:
    """FROC vectors of one scan (as the reference script builds them)."""

    is_nodule: list[bool] = field(default_factory=list)
    prob: list[float] = field(default_factory=list)
    excluded: list[bool] = field(default_factory=list)
    tp: int = 0
    fp: int = 0
    fn: int = 0
    doubles: int = 0
    irrelevant: int = 0
    kept: int = 0


def _hits(cand: Candidate, ref: ReferenceNodule) -> bool:
    diameter = ref.diameter_mm
    if diameter < 0:
        diameter = LUNA16_IRRELEVANT_DEFAULT_DIAMETER_MM
    r2 = (diameter / 2.0) ** 2
    d2 = sum((a - b) ** 2 for a, b in zip(cand.center_mm, ref.center_mm, strict=True))
    return d2 < r2


def _scan_entries(cands: list[Candidate], refs: list[ReferenceNodule]) -> _Entries:
    e = _Entries(kept=len(cands))
    remaining = set(range(len(cands)))
    included = [r for r in refs if not r.irrelevant]
    excluded = [r for r in refs if r.irrelevant]
    for ref in included:
        matches = [i for i, c in enumerate(cands) if _hits(c, ref)]
        if matches:
            e.doubles += len(matches) - 1
            remaining -= set(matches)
            e.is_nodule.append(True)
            e.prob.append(max(cands[i].probability for i in matches))
            e.excluded.append(False)
            e.tp += 1
        else:
            e.is_nodule.append(True)
            e.prob.append(-math.inf)
            e.excluded.append(True)
            e.fn += 1
    for ref in excluded:
        for i in sorted(remaining):
            if _hits(cands[i], ref):
                remaining.discard(i)
                e.irrelevant += 1
    for i in sorted(remaining):
        e.is_nodule.append(False)
        e.prob.append(cands[i].probability)
        e.excluded.append(False)
        e.fp += 1
    return e


def _froc_curve(is_nodule: npt.NDArray[np.bool_], prob: npt.NDArray[np.float64],
                excluded: npt.NDArray[np.bool_], n_scans: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Operating points (fps/scan, sensitivity, threshold) as ``computeFROC``."""
    total_nodules = int(is_nodule.sum())
    if total_nodules == 0:
        raise ValueError("FROC is undefined without reference nodules")
    keep = ~excluded
    gt = is_nodule[keep]
    p = prob[keep]
    order = np.argsort(-p, kind="mergesort")
    gt, p = gt[order], p[order]
    # one operating point at the end of each run of equal probabilities
    last_of_run = np.r_[p[1:] != p[:-1], True] if len(p) else np.zeros(0, dtype=bool)
    tp = np.cumsum(gt)[last_of_run]
    fp = np.cumsum(~gt)[last_of_run]
    thresholds = np.r_[np.inf, p[last_of_run]]
    tp = np.r_[0, tp].astype(np.float64)
    fp = np.r_[0, fp].astype(np.float64)
    n_fp, n_tp = fp[-1], tp[-1]
    if int(np.sum(~is_nodule)) == 0:
        fps = np.zeros_like(fp)  # LUNA16: "this system has no false positives"
    elif n_fp == 0:
        fps = np.zeros_like(fp)  # only irrelevant-finding marks besides the hits
    else:
        fpr = fp / n_fp  # sklearn.metrics.roc_curve, as the reference script
        fps = fpr * n_fp / n_scans
    if n_tp == 0:
        # the reference divides by zero: NaN sensitivities, NaN CPM
        sens = np.full_like(tp, np.nan)
    else:
        tpr = tp / n_tp
        sens = tpr * n_tp / total_nodules
    return fps, sens, thresholds


def _sens_at(fps: np.ndarray, sens: np.ndarray, rates: npt.ArrayLike) -> np.ndarray:
    return np.asarray(np.interp(np.asarray(rates, dtype=float), fps, sens), dtype=float)


def _mean_ci(values: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and bounds per column: the ``floor(P n)``-th and ``floor((1-P) n)``-th sorted values."""
    v = np.sort(values, axis=0)
    n = v.shape[0]
    pz = (1.0 - confidence) / 2.0
    lo = v[min(math.floor(pz * n), n - 1)]
    hi = v[min(math.floor((1.0 - pz) * n), n - 1)]
    return v.mean(axis=0), lo, hi


def luna16_froc(
    references: Sequence[ReferenceNodule],
    candidates: Sequence[Candidate],
    series_uids: Sequence[str] | None = None,
    *,
    max_candidates: int = LUNA16_MAX_CANDIDATES,
    fp_rates: Sequence[float] = LUNA16_FP_RATES,
    bootstrap: int = 0,
    seed: int = 0,
    confidence: float = 0.95,
) -> FrocResult:
    """LUNA16 FROC analysis and CPM (rules in the module docstring).

    Parameters
    ----------
    references : sequence of ReferenceNodule
        Reference nodules and irrelevant findings of all scans.
    candidates : sequence of Candidate
        CAD marks; those of scans outside ``series_uids`` are ignored.
    series_uids : sequence of str, optional
        The evaluated scans (scans without nodules or candidates count in the
        FPs/scan denominator); default: every series named in ``references``
        or ``candidates``.
    max_candidates : int
        Per-scan cap (LUNA16: 100; <= 0 disables it).
    fp_rates : sequence of float
        Where to read sensitivity (default 1/8 .. 8).
    bootstrap : int
        Number of bootstrap resamples of the scans (0: no confidence intervals;
        LUNA16 uses 1000).
    seed : int
        Seed of the bootstrap.
    confidence : float
        Confidence level of the intervals.

    Returns
    -------
    FrocResult

    Raises
    ------
    ValueError
        No reference nodule in the evaluated scans.
    """
    if series_uids is None:
        seen: dict[str, None] = {}
        for r in references:
            seen.setdefault(r.series_uid)
        for c in candidates:
            seen.setdefault(c.series_uid)
        series_uids = list(seen)
    uids = list(dict.fromkeys(series_uids))
    by_scan_c: dict[str, list[Candidate]] = {u: [] for u in uids}
    for c in candidates:
        if c.series_uid in by_scan_c:
            by_scan_c[c.series_uid].append(c)
    by_scan_r: dict[str, list[ReferenceNodule]] = {u: [] for u in uids}
    for r in references:
        if r.series_uid in by_scan_r:
            by_scan_r[r.series_uid].append(r)
    per_scan = {u: _scan_entries(cap_candidates(by_scan_c[u], max_candidates), by_scan_r[u])
                for u in uids}

    arrays = {
        u: (np.asarray(e.is_nodule, dtype=bool), np.asarray(e.prob, dtype=float),
            np.asarray(e.excluded, dtype=bool))
        for u, e in per_scan.items()
    }
    empty = (np.zeros(0, dtype=bool), np.zeros(0), np.zeros(0, dtype=bool))

    def vectors(scans: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        parts = [arrays[u] for u in scans] or [empty]
        return (np.concatenate([a[0] for a in parts]), np.concatenate([a[1] for a in parts]),
                np.concatenate([a[2] for a in parts]))

    g, p, x = vectors(uids)
    fps, sens, thr = _froc_curve(g, p, x, len(uids))
    at = _sens_at(fps, sens, fp_rates)
    result = FrocResult(
        fps_per_scan=fps, sensitivity=sens, thresholds=thr, fp_rates=tuple(fp_rates),
        sensitivity_at=tuple(float(v) for v in at), cpm=float(np.mean(at)),
        n_scans=len(uids), n_nodules=int(g.sum()),
        n_true_positives=sum(e.tp for e in per_scan.values()),
        n_false_positives=sum(e.fp for e in per_scan.values()),
        n_false_negatives=sum(e.fn for e in per_scan.values()),
        n_candidates=sum(e.kept for e in per_scan.values()),
        n_double_hits=sum(e.doubles for e in per_scan.values()),
        n_irrelevant_hits=sum(e.irrelevant for e in per_scan.values()),
        confidence=confidence,
    )
    if bootstrap > 0:
        rng = np.random.default_rng(seed)
        grid = np.linspace(min(fp_rates), max(fp_rates), 200)
        at_samples: list[np.ndarray] = []
        grid_samples: list[np.ndarray] = []
        for _ in range(bootstrap):
            pick = [uids[i] for i in rng.integers(0, len(uids), size=len(uids))]
            bg, bp, bx = vectors(pick)
            if not (bg & ~bx).any():
                continue  # without a detected nodule a resample has no (defined) curve
            bf, bs, _ = _froc_curve(bg, bp, bx, len(pick))
            at_samples.append(_sens_at(bf, bs, fp_rates))
            grid_samples.append(_sens_at(bf, bs, grid))
        if at_samples:
            arr = np.vstack(at_samples)
            mean, lo, hi = _mean_ci(arr, confidence)
            cpms = arr.mean(axis=1, keepdims=True)
            _, clo, chi = _mean_ci(cpms, confidence)
            _, glo, ghi = _mean_ci(np.vstack(grid_samples), confidence)
            result.bootstrap_samples = len(at_samples)
            result.bootstrap_mean = tuple(float(v) for v in mean)
            result.ci_lower = tuple(float(v) for v in lo)
            result.ci_upper = tuple(float(v) for v in hi)
            result.cpm_ci = (float(clo[0]), float(chi[0]))
            result.curve_fps = grid
            result.curve_lower = glo
            result.curve_upper = ghi
    return result


# --------------------------------------------------------------------------- DeepLesion


def _as_boxes(a: npt.ArrayLike, width: int) -> np.ndarray:
    arr = np.asarray(a, dtype=float)
    if arr.size == 0:
        return np.zeros((0, width))
    arr = arr.reshape(-1, arr.shape[-1])
    if arr.shape[1] < width:
        raise ValueError(f"boxes need {width} columns, got shape {arr.shape}")
    return arr


def _inter(box: np.ndarray, gts: np.ndarray) -> np.ndarray:
    iw = np.maximum(np.minimum(gts[:, 2], box[2]) - np.maximum(gts[:, 0], box[0]) + 1.0, 0.0)
    ih = np.maximum(np.minimum(gts[:, 3], box[3]) - np.maximum(gts[:, 1], box[1]) + 1.0, 0.0)
    return np.asarray(iw * ih)


def _area(b: np.ndarray) -> np.ndarray:
    return np.asarray((b[..., 2] - b[..., 0] + 1.0) * (b[..., 3] - b[..., 1] + 1.0))


def box_iou(box: npt.ArrayLike, gts: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """IoU of one box ``(x1, y1, x2, y2)`` (inclusive pixels) with each of ``gts``."""
    b = np.asarray(box, dtype=float)[:4]
    g = _as_boxes(gts, 4)
    inter = _inter(b, g)
    return np.asarray(inter / (_area(b) + _area(g) - inter))


def box_iobb(box: npt.ArrayLike, gts: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Intersection over the detected box's area (IoBB) of ``box`` with each of ``gts``."""
    b = np.asarray(box, dtype=float)[:4]
    g = _as_boxes(gts, 4)
    return np.asarray(_inter(b, g) / _area(b))


@dataclass
class DeepLesionResult:
    """DeepLesion sensitivity at FPs per image.

    Attributes
    ----------
    overlap : {"iou", "iobb"}
        Which overlap defined a hit.
    threshold : float
    fp_rates, sensitivity_at : tuple of float
    fps_per_image, sensitivity : ndarray
        Points after each ranked detection.
    n_images, n_lesions, n_detections : int
    """

    overlap: str
    threshold: float
    fp_rates: tuple[float, ...]
    sensitivity_at: tuple[float, ...]
    fps_per_image: npt.NDArray[np.float64]
    sensitivity: npt.NDArray[np.float64]
    n_images: int
    n_lesions: int
    n_detections: int

    def to_dict(self) -> dict[str, object]:
        """JSON-friendly summary."""
        return {
            "protocol": f"DeepLesion sensitivity at FPs/image, hit: {self.overlap.upper()} >= "
                        f"{self.threshold}",
            "overlap": self.overlap,
            "threshold": self.threshold,
            "fp_rates": list(self.fp_rates),
            "sensitivity_at": [round(v, 6) for v in self.sensitivity_at],
            "mean_sensitivity": round(float(np.mean(self.sensitivity_at)), 6),
            "n_images": self.n_images,
            "n_lesions": self.n_lesions,
            "n_detections": self.n_detections,
        }


def deeplesion_sensitivity(
    detections: Sequence[npt.ArrayLike],
    ground_truth: Sequence[npt.ArrayLike],
    *,
    overlap: Overlap = "iou",
    threshold: float = 0.5,
    fp_rates: Sequence[float] = DEEPLESION_FP_RATES,
) -> DeepLesionResult:
    """DeepLesion sensitivity at FPs per image (rules in the module docstring).

    Parameters
    ----------
    detections : sequence of array (N_i, 5)
        Per image: ``x1, y1, x2, y2, score`` rows.
    ground_truth : sequence of array (M_i, 4)
        Per image (same order): lesion boxes ``x1, y1, x2, y2``.
    overlap : {"iou", "iobb"}
    threshold : float
    fp_rates : sequence of float

    Returns
    -------
    DeepLesionResult
    """
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} detection lists for {len(ground_truth)} images")
    if overlap not in ("iou", "iobb"):
        raise ValueError(f"overlap must be 'iou' or 'iobb', not {overlap!r}")
    fn = box_iou if overlap == "iou" else box_iobb
    n_img = len(detections)
    gts = [_as_boxes(g, 4) for g in ground_truth]
    n_gt = sum(len(g) for g in gts)
    if n_gt == 0:
        raise ValueError("sensitivity is undefined without lesions")
    rows: list[tuple[float, int, np.ndarray]] = []
    for i, d in enumerate(detections):
        for box in _as_boxes(d, 5):
            rows.append((float(box[4]), i, box[:4]))
    # stable sort by descending score (ties keep image/detection order)
    rows.sort(key=lambda r: -r[0])
    hit = [np.zeros(len(g), dtype=bool) for g in gts]
    n_hits = n_fp = 0
    tps: list[int] = []
    fps: list[int] = []
    for _, i, box in rows:
        ov = fn(box, gts[i]) if len(gts[i]) else np.zeros(0)
        if len(ov) == 0 or ov.max() < threshold:
            n_fp += 1
        else:
            for j in np.nonzero(ov >= threshold)[0]:
                if not hit[i][j]:
                    hit[i][j] = True
                    n_hits += 1
        tps.append(n_hits)
        fps.append(n_fp)
    sens = np.asarray(tps, dtype=float) / n_gt
    fpi = np.asarray(fps, dtype=float) / n_img
    if len(rows) == 0:
        at = np.zeros(len(fp_rates))
    else:
        at = np.interp(np.asarray(fp_rates, dtype=float), fpi, sens)
    return DeepLesionResult(overlap, threshold, tuple(fp_rates), tuple(float(v) for v in at),
                            fpi, sens, n_img, n_gt, len(rows))


# --------------------------------------------------------------------------- Dice


def dice(prediction: npt.ArrayLike, truth: npt.ArrayLike) -> float:
    """Dice coefficient ``2|A∩B| / (|A| + |B|)`` of two masks (1.0 when both are empty)."""
    a = np.asarray(prediction, dtype=bool)
    b = np.asarray(truth, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"mask shapes differ: {a.shape} vs {b.shape}")
    denom = int(a.sum()) + int(b.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(a, b).sum()) / denom


# --------------------------------------------------------------------------- plots


def plot_froc(
    result: FrocResult | DeepLesionResult,
    path: str | Path,
    *,
    title: str = "FROC",
) -> Path:
    """Write the FROC curve as a PNG (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, ax = plt.subplots(figsize=(6, 4.5), dpi=100)
    try:
        if isinstance(result, FrocResult):
            x, y = result.fps_per_scan, result.sensitivity
            xmax = max(result.fp_rates)
            xs = np.linspace(min(result.fp_rates), xmax, 400)
            ax.plot(xs, np.interp(xs, x, y), "b-", lw=2, label=f"CPM {result.cpm:.3f}")
            if result.curve_lower is not None and result.curve_upper is not None:
                ax.fill_between(result.curve_fps, result.curve_lower, result.curve_upper,
                                color="b", alpha=0.15,
                                label=f"{int(result.confidence * 100)}% bootstrap CI")
            ax.set_xlabel("Average number of false positives per scan")
        else:
            xs = np.linspace(min(result.fp_rates), max(result.fp_rates), 400)
            ax.plot(xs, np.interp(xs, result.fps_per_image, result.sensitivity), "b-", lw=2,
                    label=f"{result.overlap.upper()} >= {result.threshold}")
            ax.set_xlabel("Average number of false positives per image")
        ax.plot(result.fp_rates, result.sensitivity_at, "ro")
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(result.fp_rates))
        ax.set_xticklabels([f"{v:g}" for v in result.fp_rates])
        ax.set_ylim(0, 1)
        ax.set_ylabel("Sensitivity")
        ax.grid(True, which="both", alpha=0.4)
        ax.legend(loc="lower right")
        ax.set_title(title)
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def luna16_markdown(result: FrocResult, *, title: str, plot_name: str | None = None,
                    extra: Mapping[str, str] | None = None) -> str:
    """A markdown report of a LUNA16 FROC analysis."""
    lines = [f"# {title}", "", "Protocol: LUNA16 FROC. Hit = candidate centre within the nodule "
             "radius (strict <); several hits on one nodule count once and are not false "
             "positives; hits on irrelevant findings are ignored; at most "
             f"{LUNA16_MAX_CANDIDATES} candidates per scan; sensitivity interpolated linearly on "
             "the FROC curve.", ""]
    for k, v in (extra or {}).items():
        lines.append(f"- {k}: {v}")
    lines += [
        f"- scans: {result.n_scans}, reference nodules: {result.n_nodules}, candidates: "
        f"{result.n_candidates}",
        f"- true positives: {result.n_true_positives}, false positives: "
        f"{result.n_false_positives}, missed: {result.n_false_negatives}",
        f"- ignored: {result.n_double_hits} double hits, {result.n_irrelevant_hits} hits on "
        "irrelevant findings",
        "",
    ]
    ci = result.ci_lower is not None and result.ci_upper is not None
    header = "| FPs/scan | sensitivity |" + (
        f" {int(result.confidence * 100)}% CI |" if ci else "")
    lines += [header, "|---|---|" + ("---|" if ci else "")]
    for i, (f, s) in enumerate(zip(result.fp_rates, result.sensitivity_at, strict=True)):
        row = f"| {f:g} | {s:.3f} |" if not math.isnan(s) else f"| {f:g} | undefined |"
        if ci:
            assert result.ci_lower is not None and result.ci_upper is not None
            row += f" {result.ci_lower[i]:.3f} – {result.ci_upper[i]:.3f} |"
        lines.append(row)
    cpm = f"**CPM: {result.cpm:.3f}**" if result.defined else f"**CPM: {UNDEFINED_CPM}**"
    if result.cpm_ci is not None:
        cpm += (f" ({int(result.confidence * 100)}% CI {result.cpm_ci[0]:.3f} – "
                f"{result.cpm_ci[1]:.3f}, {result.bootstrap_samples} bootstrap samples)")
    lines += ["", cpm, ""]
    if plot_name:
        lines += [f"![FROC]({plot_name})", ""]
    return "\n".join(lines)


def deeplesion_markdown(results: Sequence[DeepLesionResult], *, title: str,
                        plot_name: str | None = None) -> str:
    """A markdown report of DeepLesion sensitivities (one row per overlap criterion)."""
    if not results:
        raise ValueError("no results")
    rates = results[0].fp_rates
    lines = [f"# {title}", "", "Protocol: DeepLesion sensitivity at FPs per image (detections of "
             "all images ranked by score; repeated hits on a lesion are neither hits nor false "
             "positives).", "",
             f"- images: {results[0].n_images}, lesions: {results[0].n_lesions}, detections: "
             f"{results[0].n_detections}", "",
             "| hit criterion | " + " | ".join(f"{f:g}" for f in rates) + " | mean |",
             "|---|" + "---|" * (len(rates) + 1)]
    for r in results:
        lines.append(f"| {r.overlap.upper()} >= {r.threshold:g} | "
                     + " | ".join(f"{v:.3f}" for v in r.sensitivity_at)
                     + f" | {float(np.mean(r.sensitivity_at)):.3f} |")
    lines.append("")
    if plot_name:
        lines += [f"![FROC]({plot_name})", ""]
    return "\n".join(lines)
