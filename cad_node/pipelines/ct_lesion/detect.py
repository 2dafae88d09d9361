"""Decoding the detector's maps into boxes, NMS within a slice and across slices.

* :func:`decode`: centre peaks (3x3 local maxima of the sigmoid heatmap) ->
  boxes ``x1, y1, x2, y2`` in network pixels, score, type probabilities.
* :func:`nms`: greedy NMS on IoU within one slice.
* :func:`group_across_slices`: 2-D detections on neighbouring slices whose
  boxes overlap (IoU >= :data:`LINK_IOU`) are chained into one 3-D lesion;
  its key slice is the slice of its best-scoring box, its probability that
  score, its type the score-weighted mean of the type probabilities.  So one
  lesion becomes one finding spanning its slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

__all__ = [
    "LINK_IOU",
    "NMS_IOU",
    "Detection2D",
    "Lesion3D",
    "box_iou",
    "decode",
    "group_across_slices",
    "nms",
]

#: Boxes of one slice overlapping more than this are suppressed (greedy NMS).
NMS_IOU = 0.3
#: Boxes on adjacent slices overlapping at least this belong to one lesion.
LINK_IOU = 0.3
#: At most this many peaks are decoded per slice.
TOP_K = 20


@dataclass(frozen=True)
class Detection2D:
    """One box on one slice (source pixel coordinates once mapped)."""

    slice_index: int
    box: tuple[float, float, float, float]
    score: float
    type_probabilities: tuple[float, ...]


@dataclass
class Lesion3D:
    """Detections of one lesion on consecutive slices."""

    members: list[Detection2D] = field(default_factory=list)

    @property
    def key(self) -> Detection2D:
        """The best-scoring member (its slice is the key slice)."""
        return max(self.members, key=lambda d: d.score)

    @property
    def score(self) -> float:
        """Probability of the lesion (best member score)."""
        return self.key.score

    @property
    def slice_range(self) -> tuple[int, int]:
        """First and last slice index."""
        z = [d.slice_index for d in self.members]
        return min(z), max(z)

    @property
    def type_probabilities(self) -> npt.NDArray[np.float64]:
        """Score-weighted mean of the members' type probabilities."""
        w = np.array([d.score for d in self.members])
        p = np.array([d.type_probabilities for d in self.members])
        return np.asarray((w[:, None] * p).sum(0) / max(w.sum(), 1e-9))


def box_iou(box: npt.ArrayLike, boxes: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """IoU of one continuous box ``(x1, y1, x2, y2)`` with each row of ``boxes``."""
    b = np.asarray(box, dtype=float)
    g = np.asarray(boxes, dtype=float).reshape(-1, 4)
    iw = np.clip(np.minimum(g[:, 2], b[2]) - np.maximum(g[:, 0], b[0]), 0, None)
    ih = np.clip(np.minimum(g[:, 3], b[3]) - np.maximum(g[:, 1], b[1]), 0, None)
    inter = iw * ih
    union = (b[2] - b[0]) * (b[3] - b[1]) + (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]) - inter
    return np.asarray(inter / np.maximum(union, 1e-9))


def _sigmoid(x: npt.NDArray[np.floating]) -> npt.NDArray[np.float64]:
    return np.asarray(1.0 / (1.0 + np.exp(-np.asarray(x, dtype=float))))


def decode(
    heatmap: npt.NDArray[np.floating], size: npt.NDArray[np.floating],
    offset: npt.NDArray[np.floating], type_logits: npt.NDArray[np.floating], *,
    stride: int, min_score: float = 0.01, top_k: int = TOP_K,
) -> list[tuple[tuple[float, float, float, float], float, tuple[float, ...]]]:
    """Peaks of one slice's maps as ``(box, score, type probabilities)``, best first.

    Parameters
    ----------
    heatmap : ndarray (1, h, w)
        Logits.
    size, offset : ndarray (2, h, w)
        ``log`` width/height (input pixels) and cell offsets.
    type_logits : ndarray (T, h, w)
    stride : int
        Input pixels per output cell.
    """
    from scipy import ndimage

    prob = _sigmoid(heatmap[0])
    peaks = (prob == ndimage.maximum_filter(prob, size=3, mode="constant")) & (prob >= min_score)
    ys, xs = np.nonzero(peaks)
    order = np.argsort(-prob[ys, xs], kind="stable")[:top_k]
    out: list[tuple[tuple[float, float, float, float], float, tuple[float, ...]]] = []
    for i in order:
        y, x = int(ys[i]), int(xs[i])
        cx = (x + float(offset[0, y, x])) * stride
        cy = (y + float(offset[1, y, x])) * stride
        w = float(np.exp(np.clip(size[0, y, x], -2.0, 7.0)))
        h = float(np.exp(np.clip(size[1, y, x], -2.0, 7.0)))
        t = np.asarray(type_logits[:, y, x], dtype=float)
        t = np.exp(t - t.max())
        t /= t.sum()
        out.append(((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), float(prob[y, x]),
                    tuple(float(v) for v in t)))
    return out


def nms(dets: Sequence[Detection2D], iou: float = NMS_IOU) -> list[Detection2D]:
    """Greedy NMS of one slice's detections (best first)."""
    kept: list[Detection2D] = []
    for d in sorted(dets, key=lambda d: -d.score):
        if not kept or box_iou(d.box, [k.box for k in kept]).max() <= iou:
            kept.append(d)
    return kept


def group_across_slices(dets: Sequence[Detection2D], link_iou: float = LINK_IOU,
                        max_slice_gap: int = 1) -> list[Lesion3D]:
    """Chain detections on neighbouring slices into 3-D lesions (best first).

    Detections are visited from the best score down; each joins the lesion
    whose member on a slice at most ``max_slice_gap`` away overlaps it most
    (IoU >= ``link_iou``), if that lesion has no member on its slice yet;
    otherwise it starts a new lesion.  A detection on a slice that already
    holds a better-scoring member of an overlapping lesion is absorbed (NMS
    across slices never reports one lesion twice).
    """
    lesions: list[Lesion3D] = []
    by_slice: dict[int, list[tuple[Lesion3D, Detection2D]]] = {}
    for d in sorted(dets, key=lambda d: -d.score):
        best: Lesion3D | None = None
        best_iou = 0.0
        absorbed = False
        for z in range(d.slice_index - max_slice_gap, d.slice_index + max_slice_gap + 1):
            for les, m in by_slice.get(z, ()):
                ov = float(box_iou(d.box, [m.box])[0])
                if ov < link_iou:
                    continue
                if z == d.slice_index:
                    absorbed = True
                elif ov > best_iou:
                    best, best_iou = les, ov
        if absorbed:
            continue
        if best is None or any(m.slice_index == d.slice_index for m in best.members):
            best = Lesion3D([])
            lesions.append(best)
        best.members.append(d)
        by_slice.setdefault(d.slice_index, []).append((best, d))
    lesions.sort(key=lambda les: -les.score)
    return lesions
