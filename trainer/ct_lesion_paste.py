"""Real lesion appearance and geometric/intensity augmentation for the ct-lesion trainer.

The real DeepLesion *training* material here is 24 liver key slices
(``Images_png`` with the boxes of ``Images_png_boxes_liver.csv``).  Besides
training on them directly, this module

* cuts every training lesion out of its slice (:func:`lesion_bank`): the mask
  is the pipeline's own region-grown lesion mask
  (:func:`cad_node.pipelines.ct_lesion.recist.lesion_mask`) from the box, and
  the patch keeps the lesion's HU *relative to* the median of the tissue ring
  around it;
* pastes such real lesions (:func:`paste_lesions`), scaled, flipped and
  rotated, into the liver of another slice (a real CT background or another
  training slice): ``new = (1 - m) * hu + m * (ring median of the target + the
  lesion's relative HU)``, so a hypodense real lesion stays hypodense by the
  same HU against its new liver.  The neighbour channels get the mask shrunk
  (a lesion is smaller 2 mm off its largest slice);
* augments a whole ``(slices, H, W)`` HU stack with its boxes
  (:func:`augment`): rotation, scale, shift, flip, HU gain/offset, noise.
  A box is treated as its inscribed ellipse when rotated.

Only lesions of ``train`` material ever enter the bank: the DL_info ``val``
and ``test`` rows are never cut or pasted.  Everything is driven by a
:class:`numpy.random.Generator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from cad_node.pipelines.ct_lesion.recist import BOX_PAD_MM, lesion_mask
from cad_node.pipelines.ct_lesion.slices import (
    HU_WINDOW,
    INPUT_SIZE,
    PIXEL_MM,
    SliceGrid,
    body_centre,
    resample_plane,
)

__all__ = ["BankLesion", "augment", "lesion_bank", "paste_lesions", "slice_on_grid"]

#: Pixels of tissue ring around a lesion whose median is its background.
RING_PX = 4
#: Margin (network pixels) kept around a lesion patch.
MARGIN_PX = 6


@dataclass(frozen=True)
class BankLesion:
    """A real lesion on the network grid: HU relative to its ring, soft mask, type."""

    delta_hu: npt.NDArray[np.float32]
    mask: npt.NDArray[np.float32]
    lesion_type: int
    source: str


def slice_on_grid(hu: npt.NDArray[np.generic], spacing_xy: tuple[float, float],
                  pixel_mm: float = PIXEL_MM) -> tuple[npt.NDArray[np.float32], SliceGrid]:
    """A source slice resampled onto the body-centred network grid (HU) and the grid."""
    grid = SliceGrid.centred(body_centre(np.asarray(hu)), spacing_xy, pixel_mm=pixel_mm)
    return resample_plane(np.asarray(hu), grid)[0], grid


def lesion_bank(slices: Sequence[object]) -> list[BankLesion]:
    """Cut every lesion of the given training slices (``RealSlice``-like objects).

    Each object needs ``name``, ``hu`` (source HU), ``spacing_xy``, ``boxes``
    (source px) and ``types``.  A lesion whose mask is empty is skipped.
    """
    out: list[BankLesion] = []
    for s in slices:
        hu_src = np.asarray(s.hu)  # type: ignore[attr-defined]
        sp = tuple(float(v) for v in s.spacing_xy)  # type: ignore[attr-defined]
        plane, grid = slice_on_grid(hu_src, sp)  # type: ignore[arg-type]
        for box, t in zip(s.boxes, s.types, strict=True):  # type: ignore[attr-defined]
            m_src = lesion_mask(hu_src, tuple(float(v) for v in box), sp).mask  # type: ignore[arg-type]
            m = resample_plane(m_src.astype(np.float32), grid, fill_hu=0.0)[0]
            if (m > 0.5).sum() < 4:
                continue
            ys, xs = np.nonzero(m > 0.05)
            y0, y1 = max(0, ys.min() - MARGIN_PX), min(INPUT_SIZE, ys.max() + MARGIN_PX + 1)
            x0, x1 = max(0, xs.min() - MARGIN_PX), min(INPUT_SIZE, xs.max() + MARGIN_PX + 1)
            mc = np.clip(m[y0:y1, x0:x1], 0, 1)
            hc = plane[y0:y1, x0:x1]
            inside = mc > 0.5
            ring = ndimage.binary_dilation(inside, iterations=RING_PX) & ~ndimage.binary_dilation(
                inside, iterations=1)
            if ring.sum() < 4:
                continue
            bg = float(np.median(hc[ring]))
            delta = np.where(mc > 0.05, hc - bg, 0.0).astype(np.float32)
            out.append(BankLesion(delta, mc.astype(np.float32), int(t), str(s.name)))  # type: ignore[attr-defined]
    return out


def _transform_patch(lesion: BankLesion, rng: np.random.Generator, scale: float
                     ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    d, m = lesion.delta_hu, lesion.mask
    k = int(rng.integers(4))
    d, m = np.rot90(d, k), np.rot90(m, k)
    if rng.random() < 0.5:
        d, m = d[:, ::-1], m[:, ::-1]
    d = ndimage.zoom(np.ascontiguousarray(d), scale, order=1)
    m = np.clip(ndimage.zoom(np.ascontiguousarray(m), scale, order=1), 0, 1)
    return d.astype(np.float32), m.astype(np.float32)


def paste_lesions(hu: npt.NDArray[np.float32], allowed: npt.NDArray[np.bool_],
                  bank: Sequence[BankLesion], rng: np.random.Generator, n: int,
                  occupied: npt.NDArray[np.bool_] | None = None,
                  scale_range: tuple[float, float] = (0.75, 1.35),
                  ) -> tuple[npt.NDArray[np.float32], list[tuple[float, float, float, float]],
                             list[int]]:
    """Paste up to ``n`` bank lesions into ``hu`` ``(slices, H, W)`` where ``allowed``.

    The centre slice is the key slice.  Returns the new stack, the boxes
    (network px, padded by :data:`BOX_PAD_MM` as DeepLesion's) and the types.
    ``occupied`` (key-slice pixels already holding a lesion) is updated.
    """
    out = hu.copy()
    nsl, h, w = out.shape
    key = nsl // 2
    occ = np.zeros((h, w), dtype=bool) if occupied is None else occupied
    boxes: list[tuple[float, float, float, float]] = []
    types: list[int] = []
    if not bank or not allowed.any():
        return out, boxes, types
    pad = BOX_PAD_MM / PIXEL_MM
    for _ in range(3 * n):
        if len(boxes) >= n:
            break
        les = bank[int(rng.integers(len(bank)))]
        d, m = _transform_patch(les, rng, float(rng.uniform(*scale_range)))
        ph, pw = m.shape
        cand = np.argwhere(allowed & ~occ)
        if len(cand) == 0 or ph >= h or pw >= w:
            break
        cy, cx = cand[int(rng.integers(len(cand)))]
        y0, x0 = int(cy) - ph // 2, int(cx) - pw // 2
        if y0 < 0 or x0 < 0 or y0 + ph > h or x0 + pw > w:
            continue
        inside = m > 0.5
        # the lesion must lie in the allowed tissue (mostly) and not on another lesion
        region = allowed[y0:y0 + ph, x0:x0 + pw]
        if region[inside].mean() < 0.8 or occ[y0:y0 + ph, x0:x0 + pw][inside].any():
            continue
        ring = ndimage.binary_dilation(inside, iterations=RING_PX) & ~inside
        for ch in range(nsl):
            mk = m
            if ch != key:  # 2 mm off the key slice: a little smaller, sometimes gone
                shrink = float(rng.uniform(0.6, 1.0))
                mk = np.clip((m - (1 - shrink)) / max(shrink, 1e-3), 0, 1) if shrink < 1 else m
            tile = out[ch, y0:y0 + ph, x0:x0 + pw]
            bg = float(np.median(tile[ring])) if ring.any() else float(np.median(tile))
            out[ch, y0:y0 + ph, x0:x0 + pw] = tile * (1 - mk) + mk * (bg + d)
        ys, xs = np.nonzero(inside)
        boxes.append((x0 + xs.min() - 0.5 - pad, y0 + ys.min() - 0.5 - pad,
                      x0 + xs.max() + 0.5 + pad, y0 + ys.max() + 0.5 + pad))
        types.append(les.lesion_type)
        occ[y0:y0 + ph, x0:x0 + pw] |= ndimage.binary_dilation(inside, iterations=4)
    return out, boxes, types


def augment(hu: npt.NDArray[np.float32], boxes: npt.NDArray[np.float64],
            rng: np.random.Generator, *, rotate_deg: float = 12.0,
            scale_range: tuple[float, float] = (0.85, 1.2), shift_px: float = 12.0,
            noise_hu: float = 12.0,
            ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64], npt.NDArray[np.intp]]:
    """Random affine + intensity augmentation of a ``(slices, H, W)`` HU stack and its boxes.

    Returns the stack, the boxes kept and their indices: a box whose centre
    leaves the image is dropped.
    """
    nsl, h, w = hu.shape
    th = np.deg2rad(float(rng.uniform(-rotate_deg, rotate_deg)))
    sc = float(rng.uniform(*scale_range))
    t = rng.uniform(-shift_px, shift_px, 2)
    c = np.array([(h - 1) / 2.0, (w - 1) / 2.0])
    # output (y, x) -> input: inv(R*S) (o - c - t) + c
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) * sc
    inv = np.linalg.inv(rot)
    offset = c - inv @ (c + t)
    out = np.empty_like(hu)
    for k in range(nsl):
        out[k] = ndimage.affine_transform(hu[k], inv, offset=offset, order=1, mode="constant",
                                          cval=HU_WINDOW[0])
    gain = float(rng.uniform(0.93, 1.07))
    out = 40.0 + (out - 40.0) * gain + float(rng.uniform(-20, 20))
    sigma = float(rng.uniform(0, noise_hu))
    if sigma > 0:
        out = out + ndimage.gaussian_filter(rng.normal(0, sigma, out.shape),
                                            (0, 0.7, 0.7)).astype(np.float32)
    new: list[tuple[float, float, float, float]] = []
    kept: list[int] = []
    for i, (x1, y1, x2, y2) in enumerate(np.asarray(boxes, dtype=float).reshape(-1, 4)):
        cy, cx = (y1 + y2) / 2, (x1 + x2) / 2
        a, b = (x2 - x1) / 2 * sc, (y2 - y1) / 2 * sc  # semi-axes of the inscribed ellipse
        ny, nx = rot @ (np.array([cy, cx]) - c) + c + t
        hx = float(np.hypot(a * np.cos(th), b * np.sin(th)))
        hy = float(np.hypot(a * np.sin(th), b * np.cos(th)))
        if 0 <= nx < w and 0 <= ny < h:
            new.append((nx - hx, ny - hy, nx + hx, ny + hy))
            kept.append(i)
    return (out.astype(np.float32), np.asarray(new, dtype=float).reshape(-1, 4),
            np.asarray(kept, dtype=np.intp))
