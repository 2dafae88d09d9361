# mypy: disallow-untyped-calls=False
"""Per-lesion 2-D mask on the key slice and its RECIST long and short axes.

Mask (:func:`lesion_mask`), started from a detected box:

1. the box is shrunk by the DeepLesion padding (:data:`BOX_PAD_MM`: DL_info
   boxes are the RECIST extent plus 5 pixels, ~4 mm) to the lesion extent;
2. seeds: pixels of the central 40 % of that extent whose HU lies between the
   25th and 75th percentile there (robust to a necrotic or calcified core);
3. region growing from the seeds with SimpleITK ``ConfidenceConnected`` (mean
   +- :data:`CONFIDENCE_MULTIPLIER` standard deviations of the current region,
   two iterations) on the median-smoothed slice, confined to the padded box;
4. holes filled, one opening, the component holding the seeds kept;
5. when growing fails (less than :data:`MIN_FILL` of the inscribed ellipse, or
   no seeds), the ellipse inscribed in the lesion extent is the mask
   (``method == "ellipse"``).

RECIST (:func:`recist_axes`): the long axis is the longest chord of the mask
(its maximum Feret diameter, between convex-hull points); the short axis the
longest chord perpendicular to it, both measured in mm with the pixel
spacing, end points at the outer edges of the boundary pixels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813
from scipy import ndimage

__all__ = [
    "BOX_PAD_MM",
    "LesionMask",
    "RecistAxes",
    "ellipse_mask",
    "lesion_mask",
    "recist_axes",
]

#: DeepLesion pads the RECIST extent by 5 pixels (~0.8 mm each) to make its boxes.
BOX_PAD_MM = 4.0
#: ConfidenceConnected multiplier (standard deviations).  This and
#: :data:`ELLIPSE_SLACK` were chosen on the 14 DeepLesion ``val`` rows of
#: deeplesion-samples (grid 1.5-3.0 x 1.0-1.3, reference boxes): long/short axis
#: MAE 1.21/0.99 mm, against 1.86/1.18 mm for the ellipse inscribed in the box.
CONFIDENCE_MULTIPLIER = 2.5
#: Grown region smaller than this fraction of the inscribed ellipse: use the ellipse.
MIN_FILL = 0.35
#: The grown region is confined to the inscribed ellipse scaled by this factor
#: (a box's corners are never lesion; without it growing leaks into like tissue).
ELLIPSE_SLACK = 1.1


@dataclass(frozen=True)
class LesionMask:
    """A lesion mask on its key slice (full slice size) and how it was made."""

    mask: npt.NDArray[np.bool_]
    method: str


@dataclass(frozen=True)
class RecistAxes:
    """RECIST diameters (mm) and end points ``(x, y)`` in source pixels."""

    long_mm: float
    short_mm: float
    long_points: tuple[tuple[float, float], tuple[float, float]]
    short_points: tuple[tuple[float, float], tuple[float, float]]


def _extent(box: tuple[float, float, float, float], spacing_xy: tuple[float, float],
            shape: tuple[int, int]) -> tuple[float, float, float, float]:
    px, py = BOX_PAD_MM / spacing_xy[0], BOX_PAD_MM / spacing_xy[1]
    x1, y1, x2, y2 = box
    if x2 - x1 > 3 * px:
        x1, x2 = x1 + px, x2 - px
    if y2 - y1 > 3 * py:
        y1, y2 = y1 + py, y2 - py
    return (max(x1, 0.0), max(y1, 0.0), min(x2, shape[1] - 1.0), min(y2, shape[0] - 1.0))


def _scaled(extent: tuple[float, float, float, float],
            factor: float) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = extent
    cx, cy, hx, hy = (x1 + x2) / 2, (y1 + y2) / 2, (x2 - x1) / 2 * factor, (y2 - y1) / 2 * factor
    return (cx - hx, cy - hy, cx + hx, cy + hy)


def ellipse_mask(extent: tuple[float, float, float, float],
                 shape: tuple[int, int]) -> npt.NDArray[np.bool_]:
    """Pixels inside the axis-aligned ellipse inscribed in ``extent`` (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = extent
    cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
    ax, ay = max((x2 - x1) / 2, 0.5), max((y2 - y1) / 2, 0.5)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    inside = np.asarray(((xx - cx) / ax) ** 2 + ((yy - cy) / ay) ** 2 <= 1.0)
    if not inside.any():  # a sub-pixel extent: its nearest pixel
        inside[int(np.clip(round(cy), 0, shape[0] - 1)), int(np.clip(round(cx), 0, shape[1] - 1))] \
            = True
    return inside


def lesion_mask(hu: npt.NDArray[np.generic], box: tuple[float, float, float, float],
                spacing_xy: tuple[float, float]) -> LesionMask:
    """Mask of the lesion in ``box`` (source pixels, DeepLesion padding) on slice ``hu``."""
    shape = (int(hu.shape[0]), int(hu.shape[1]))
    ext = _extent(box, spacing_xy, shape)
    ellipse = ellipse_mask(ext, shape)
    x1, y1, x2, y2 = box
    cx0, cy0 = max(int(np.floor(x1)), 0), max(int(np.floor(y1)), 0)
    cx1, cy1 = min(int(np.ceil(x2)) + 1, shape[1]), min(int(np.ceil(y2)) + 1, shape[0])
    if cx1 - cx0 < 3 or cy1 - cy0 < 3:
        return LesionMask(ellipse, "ellipse")
    crop = np.asarray(hu[cy0:cy1, cx0:cx1], dtype=np.float32)
    ex1, ey1, ex2, ey2 = ext
    mx, my = 0.3 * (ex2 - ex1), 0.3 * (ey2 - ey1)
    core = np.zeros(crop.shape, dtype=bool)
    core[round(ey1 + my) - cy0:round(ey2 - my) - cy0 + 1,
         round(ex1 + mx) - cx0:round(ex2 - mx) - cx0 + 1] = True
    if not core.any():
        return LesionMask(ellipse, "ellipse")
    smooth = sitk.Median(sitk.GetImageFromArray(crop), [1, 1])
    sm = sitk.GetArrayFromImage(smooth)
    lo, hi = np.percentile(sm[core], [25, 75])
    seeds = np.argwhere(core & (sm >= lo) & (sm <= hi))
    if len(seeds) == 0:
        return LesionMask(ellipse, "ellipse")
    if len(seeds) > 200:
        seeds = seeds[:: len(seeds) // 200 + 1]
    grown = sitk.ConfidenceConnected(
        smooth, seedList=[(int(x), int(y)) for y, x in seeds], numberOfIterations=2,
        multiplier=CONFIDENCE_MULTIPLIER, initialNeighborhoodRadius=1, replaceValue=1)
    g = sitk.GetArrayFromImage(grown).astype(bool)
    g = ndimage.binary_opening(ndimage.binary_fill_holes(g), iterations=1)
    lab, n = ndimage.label(g)
    if n == 0:
        return LesionMask(ellipse, "ellipse")
    counts = np.bincount(lab[seeds[:, 0], seeds[:, 1]], minlength=n + 1)
    counts[0] = 0
    g = lab == int(np.argmax(counts))
    full = np.zeros(shape, dtype=bool)
    full[cy0:cy1, cx0:cx1] = g
    full &= ellipse_mask(_scaled(ext, ELLIPSE_SLACK), shape)
    if full.sum() < MIN_FILL * max(ellipse.sum(), 1):
        return LesionMask(ellipse, "ellipse")
    return LesionMask(full, "region growing")


def recist_axes(mask: npt.NDArray[np.bool_], spacing_xy: tuple[float, float]) -> RecistAxes:
    """RECIST long and short axes of a 2-D mask (module docstring).

    Raises
    ------
    ValueError
        Empty mask.
    """
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        raise ValueError("empty lesion mask: no RECIST axes")
    sx, sy = float(spacing_xy[0]), float(spacing_xy[1])
    # outer edges of the boundary pixels: the pixel corners
    cx = np.concatenate([xs - 0.5, xs + 0.5, xs - 0.5, xs + 0.5])
    cy = np.concatenate([ys - 0.5, ys - 0.5, ys + 0.5, ys + 0.5])
    pts = np.unique(np.stack([cx * sx, cy * sy], 1), axis=0)
    if len(pts) > 3:
        from scipy.spatial import ConvexHull

        hull = pts[ConvexHull(pts).vertices]
    else:
        hull = pts
    d = np.linalg.norm(hull[:, None, :] - hull[None, :, :], axis=2)
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    p, q = hull[i], hull[j]
    long_mm = float(d[i, j])
    u = (q - p) / max(long_mm, 1e-9)
    v = np.array([-u[1], u[0]])
    centres = np.stack([xs * sx, ys * sy], 1)
    tu = (centres - p) @ u
    tv = (centres - p) @ v
    step = max(min(sx, sy), 1e-6)
    bins = np.round(tu / step).astype(int)
    best_len, best = 0.0, (p, p)
    for b in np.unique(bins):
        sel = bins == b
        lo, hi = tv[sel].min() - step / 2, tv[sel].max() + step / 2
        if hi - lo > best_len:
            base = p + u * (b * step)
            best_len, best = float(hi - lo), (base + v * lo, base + v * hi)
    short_mm = min(best_len, long_mm)

    def px(a: npt.NDArray[np.float64]) -> tuple[float, float]:
        return (float(a[0] / sx), float(a[1] / sy))

    return RecistAxes(long_mm, short_mm, (px(p), px(q)), (px(best[0]), px(best[1])))
