"""Lung areas, outlines and the cardiothoracic ratio from the lung and heart masks.

All functions work on the *analysis image* (standard display orientation:
the patient's right lung on the image's left, head up), in pixels;
coordinates are image-relative ``(column, row)`` (PS3.3 C.18.6.1.1: the
top-left corner of the top-left pixel is ``(0, 0)``).

Cardiothoracic ratio (Danzer 1919, as radiologists measure it on a PA film):

* heart width: the widest horizontal extent of the heart mask on one row
  (rightmost minus leftmost heart pixel, plus one pixel);
* thorax width: the widest horizontal inner thoracic extent on one row, from
  the outer (rib-side) border of the right lung to that of the left lung;
* CTR = heart width / thorax width; both widths are in pixels of the same
  row spacing, so the ratio needs no millimetre scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from skimage import measure

__all__ = [
    "CARDIOMEGALY_CTR",
    "HorizontalExtent",
    "heart_extent",
    "outline",
    "simplify_polyline",
    "thorax_extent",
]

#: A CTR above this on a PA film suggests cardiomegaly (Danzer 1919; ACR DSI
#: "Cardiothoracic Ratio" use case).
CARDIOMEGALY_CTR = 0.50
#: Largest deviation (pixels) of the simplified outline from the mask contour.
OUTLINE_TOLERANCE_PX = 1.0
_HALF_PIXEL = 0.5


@dataclass(frozen=True)
class HorizontalExtent:
    """A horizontal line across a mask on one row."""

    row: int
    #: First and last column covered (inclusive).
    first: int
    last: int

    @property
    def width_px(self) -> int:
        """Pixels from the left edge of ``first`` to the right edge of ``last``."""
        return self.last - self.first + 1

    @property
    def points(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """End points ``(column, row)`` through the row's pixel centres."""
        y = self.row + _HALF_PIXEL
        return (float(self.first), y), (float(self.last + 1), y)


def _row_extents(mask: npt.NDArray[np.bool_]) -> tuple[npt.NDArray[np.intp], ...]:
    rows = np.flatnonzero(mask.any(axis=1))
    first = np.argmax(mask[rows], axis=1)
    last = mask.shape[1] - 1 - np.argmax(mask[rows, ::-1], axis=1)
    return rows, first, last


def heart_extent(heart: npt.NDArray[np.bool_]) -> HorizontalExtent | None:
    """Widest horizontal extent of the heart mask (None when empty)."""
    if not heart.any():
        return None
    rows, first, last = _row_extents(heart)
    k = int(np.argmax(last - first))
    return HorizontalExtent(int(rows[k]), int(first[k]), int(last[k]))


def thorax_extent(right_lung: npt.NDArray[np.bool_], left_lung: npt.NDArray[np.bool_]
                  ) -> HorizontalExtent | None:
    """Widest inner thoracic extent: right lung's outer border to the left lung's, on one row.

    On the analysis image the patient's right lung is on the left, so the line
    runs from the right lung's leftmost pixel to the left lung's rightmost
    pixel, on a row where both lungs are present.  None when no row has both.
    """
    both = right_lung.any(axis=1) & left_lung.any(axis=1)
    rows = np.flatnonzero(both)
    if rows.size == 0:
        return None
    first = np.argmax(right_lung[rows], axis=1)
    last = left_lung.shape[1] - 1 - np.argmax(left_lung[rows, ::-1], axis=1)
    k = int(np.argmax(last - first))
    if last[k] <= first[k]:
        return None
    return HorizontalExtent(int(rows[k]), int(first[k]), int(last[k]))


def simplify_polyline(points: npt.NDArray[np.float64], tolerance: float
                      ) -> npt.NDArray[np.float64]:
    """Ramer-Douglas-Peucker simplification (vectorised; keeps the first and last point)."""
    n = len(points)
    if n < 3:
        return points
    keep = np.zeros(n, bool)
    keep[0] = keep[-1] = True
    stack = [(0, n - 1)]
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        seg = points[b] - points[a]
        rel = points[a + 1:b] - points[a]
        norm = float(np.hypot(seg[0], seg[1]))
        if norm == 0.0:
            d = np.hypot(rel[:, 0], rel[:, 1])
        else:
            d = np.abs(seg[0] * rel[:, 1] - seg[1] * rel[:, 0]) / norm
        k = int(np.argmax(d))
        if d[k] > tolerance:
            m = a + 1 + k
            keep[m] = True
            stack.extend(((a, m), (m, b)))
    out: npt.NDArray[np.float64] = points[keep]
    return out


def outline(mask: npt.NDArray[np.bool_]) -> list[tuple[float, float]] | None:
    """The outer contour of a mask as an open polygon of ``(column, row)`` vertices.

    The longest iso-contour at 0.5 (through the pixel edges), simplified to
    within :data:`OUTLINE_TOLERANCE_PX`; None for an empty mask.
    """
    if not mask.any():
        return None
    rows_any = np.flatnonzero(mask.any(axis=1))
    cols_any = np.flatnonzero(mask.any(axis=0))
    r0, c0 = int(rows_any[0]), int(cols_any[0])
    crop = mask[r0:int(rows_any[-1]) + 1, c0:int(cols_any[-1]) + 1]
    padded = np.pad(crop.astype(np.float32), 1)
    contours = measure.find_contours(padded, 0.5)  # type: ignore[no-untyped-call]
    if not contours:
        return None
    longest = max(contours, key=len)
    simple = simplify_polyline(longest, OUTLINE_TOLERANCE_PX)
    if len(simple) > 3 and np.allclose(simple[0], simple[-1]):
        simple = simple[:-1]
    if len(simple) < 3:
        return None
    # (row, col) on the padded image -> (column, row) image-relative coordinates.
    xy = simple[:, ::-1] - 1.0 + _HALF_PIXEL + np.asarray([c0, r0], dtype=np.float64)
    rows, cols = mask.shape
    xy[:, 0] = np.clip(xy[:, 0], 0.0, float(cols))
    xy[:, 1] = np.clip(xy[:, 1], 0.0, float(rows))
    return [(float(x), float(y)) for x, y in xy]
