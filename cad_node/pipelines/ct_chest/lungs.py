# mypy: disallow-untyped-calls=False
"""HU-based lung segmentation for chest CT (no training data needed).

Method (all on the ~1.4 mm working grid, :mod:`.grid`):

1. Air: HU < :data:`AIR_HU`.  Air components touching the in-plane border of
   the volume (outside the body, outside the field of view) are removed.
2. Inside-body air components are kept when they hold at least
   :data:`MIN_COMPONENT_FRACTION` of the largest one (drops bowel gas).
3. Trachea and main bronchi: seeded at the top-most small, central air
   component, grown with increasing HU thresholds (explosion-controlled
   region growing) and removed (dilated by one voxel for the airway wall).
4. Left/right separation: if the lungs touch (anterior junction), the mask is
   eroded until two large components appear; every voxel then joins the
   nearest one.  The component with the larger patient x (LPS: +x = patient
   left) is the left lung.
5. Vessels and small nodules are brought inside by filling holes slice by
   slice and a 2-D closing of :data:`CLOSING_RADIUS_MM` per lung.
6. Juxtapleural nodules: dense tissue in bays of the outline (what a per-slice
   closing with :data:`BAY_RADIUS_MM` adds) is included when it is compact
   (nodule-sized, see :data:`BAY_MAX_EXTENT_MM`); long structures (heart,
   aorta, hilum) are not.

Candidate search still uses a dilated lung mask (see :mod:`.candidates`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813 - conventional alias
from scipy import ndimage as ndi

from cad_node.pipelines.ct_chest.grid import WorkGrid

__all__ = [
    "AIR_HU",
    "CLOSING_RADIUS_MM",
    "LungSegmentation",
    "LungSegmentationError",
    "segment_lungs",
]

#: Voxels below this value are air/lung parenchyma (aerated lung is -950..-600 HU).
AIR_HU = -400.0
#: Inside-body air components smaller than this fraction of the largest are dropped.
MIN_COMPONENT_FRACTION = 0.1
#: Smallest plausible single-lung volume (mL); below it the segmentation failed.
MIN_LUNG_ML = 150.0
#: More lung than this (cm^2) on the first or last slice means the scan cut the lungs.
CUT_LUNG_AREA_CM2 = 10.0
#: Radius of the per-slice closing that brings vessels/juxtapleural nodules inside.
CLOSING_RADIUS_MM = 6.0
#: Juxtapleural inclusion: bays of the lung outline that a disk of this radius
#: cannot enter are candidates for a pleura-attached nodule ...
BAY_RADIUS_MM = 16.0
#: ... and are added when their dense part (> BAY_DENSE_HU) is compact: at most
#: this extent (mm) along every axis and this volume (mL), i.e. nodule-sized,
#: not the heart, aorta or hilum.
BAY_DENSE_HU = -500.0
BAY_MAX_EXTENT_MM = 36.0
BAY_MAX_ML = 20.0
#: Airway growing thresholds (HU), tried in order; growth stops at a leak.
AIRWAY_THRESHOLDS_HU = (-980.0, -960.0, -940.0, -920.0, -900.0)
#: A threshold step whose airway volume grows by more than this factor leaked into the lung.
AIRWAY_LEAK_FACTOR = 2.0
#: Above this volume (mL) the grown airway has certainly leaked.
AIRWAY_MAX_ML = 250.0
#: Trachea seed: a 2-D air component of this area (mm^2) range ...
TRACHEA_AREA_MM2 = (50.0, 800.0)
#: ... within this distance (mm) of the body centre in x.
TRACHEA_CENTRAL_MM = 35.0


class LungSegmentationError(ValueError):
    """No plausible pair of lungs was found (e.g. not a chest CT)."""


@dataclass(frozen=True)
class LungSegmentation:
    """Left/right lung masks in image array order ``(z, y, x)``.

    Attributes
    ----------
    left, right : numpy.ndarray of bool
        Source-grid masks; the trachea and main bronchi are excluded.
    airway : numpy.ndarray of bool
        Source-grid mask of the removed trachea/main bronchi (may be empty).
    volumes_ml : dict
        ``{"left_lung_volume_ml", "right_lung_volume_ml", "total_lung_volume_ml"}``.
    work_left, work_right : numpy.ndarray of bool
        The same masks on the working grid ``grid``.
    """

    left: npt.NDArray[np.bool_]
    right: npt.NDArray[np.bool_]
    airway: npt.NDArray[np.bool_]
    volumes_ml: dict[str, float]
    grid: WorkGrid
    work_left: npt.NDArray[np.bool_]
    work_right: npt.NDArray[np.bool_]
    #: The CT on the working grid (block means, HU), reused by candidate search.
    work_hu: npt.NDArray[np.float32] | None = field(default=None, repr=False)
    notes: list[str] = field(default_factory=list)

    @functools.cached_property
    def work_lungs(self) -> npt.NDArray[np.bool_]:
        """Both lungs on the working grid."""
        out: npt.NDArray[np.bool_] = self.work_left | self.work_right
        return out

    @functools.cached_property
    def lungs(self) -> npt.NDArray[np.bool_]:
        """Both lungs (source grid)."""
        out: npt.NDArray[np.bool_] = self.left | self.right
        return out


def _border_components(labels: npt.NDArray[np.int32]) -> set[int]:
    faces = np.concatenate([
        labels[:, 0, :].ravel(), labels[:, -1, :].ravel(),
        labels[:, :, 0].ravel(), labels[:, :, -1].ravel(),
    ])
    return set(np.unique(faces[faces > 0]).tolist())


def _superior_sign(image: sitk.Image) -> float:
    """+1 when array index z increases towards the head (LPS +z), else -1."""
    d = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    return 1.0 if d[2, 2] >= 0 else -1.0


def _find_trachea_seed(
    mask: npt.NDArray[np.bool_], body_x: npt.NDArray[np.float64], grid: WorkGrid, sup: float
) -> tuple[int, int, int] | None:
    sz, sy, sx = grid.spacing_zyx
    area_px = (TRACHEA_AREA_MM2[0] / (sy * sx), TRACHEA_AREA_MM2[1] / (sy * sx))
    order = range(mask.shape[0] - 1, -1, -1) if sup > 0 else range(mask.shape[0])
    seen_slices = 0
    for k in order:
        if not mask[k].any():
            continue
        seen_slices += 1
        if seen_slices > max(8, int(60 / sz)):  # only the top ~6 cm of the air region
            break
        lab, n = ndi.label(mask[k])
        if n == 0:
            continue
        areas = _sizes(lab, n)
        cents = ndi.center_of_mass(mask[k], lab, index=np.arange(1, n + 1))
        best = None
        for i, (area, (cy, cx)) in enumerate(zip(areas, cents, strict=True)):
            if not area_px[0] <= area <= area_px[1]:
                continue
            dist = abs(cx - body_x[k]) * sx
            if dist <= TRACHEA_CENTRAL_MM and (best is None or dist < best[0]):
                best = (dist, i + 1, cy, cx)
        if best is not None:
            ys, xs = np.nonzero(lab == best[1])
            j = int(np.argmin((ys - best[2]) ** 2 + (xs - best[3]) ** 2))
            return (k, int(ys[j]), int(xs[j]))
    return None


def _grow_airway(
    hu: npt.NDArray[np.float32], region: npt.NDArray[np.bool_], seed: tuple[int, int, int],
    voxel_ml: float,
) -> npt.NDArray[np.bool_] | None:
    best: npt.NDArray[np.bool_] | None = None
    prev_vol = 0.0
    for thr in AIRWAY_THRESHOLDS_HU:
        cand = region & (hu < thr)
        if not cand[seed]:
            continue
        lab, _ = ndi.label(cand)
        comp = lab == lab[seed]
        vol = float(comp.sum()) * voxel_ml
        if vol > AIRWAY_MAX_ML or (best is not None and vol > AIRWAY_LEAK_FACTOR * prev_vol
                                   and vol > 20.0):
            break
        best, prev_vol = comp, vol
    return best


def _sizes(lab: npt.NDArray[np.int32], n: int) -> npt.NDArray[np.int64]:
    """Voxel count of labels ``1..n``."""
    return np.bincount(lab.ravel(), minlength=n + 1)[1:]


def _bbox(mask: npt.NDArray[np.bool_], pad: int) -> tuple[slice, ...]:
    out = []
    for ax in range(mask.ndim):
        other = tuple(a for a in range(mask.ndim) if a != ax)
        idx = np.nonzero(mask.any(axis=other))[0]
        out.append(slice(max(0, int(idx[0]) - pad), min(mask.shape[ax], int(idx[-1]) + pad + 1)))
    return tuple(out)


def _split_two(mask: npt.NDArray[np.bool_], voxel_ml: float) -> list[npt.NDArray[np.bool_]]:
    """Split a mask into its two largest parts, eroding when they touch."""
    box = _bbox(mask, 1)
    parts = _split_two_cropped(mask[box], voxel_ml)
    out = []
    for p in parts:
        full = np.zeros_like(mask)
        full[box] = p
        out.append(full)
    return out


def _split_two_cropped(mask: npt.NDArray[np.bool_], voxel_ml: float) -> list[npt.NDArray[np.bool_]]:
    struct = ndi.generate_binary_structure(3, 1)
    eroded = mask
    for _ in range(12):
        lab, n = ndi.label(eroded)
        if n >= 2:
            sizes = _sizes(lab, n)
            order = np.argsort(sizes)[::-1]
            if sizes[order[1]] * voxel_ml >= MIN_LUNG_ML / 4 and sizes[order[1]] >= 0.1 * sizes[
                order[0]
            ]:
                seeds = np.zeros(mask.shape, dtype=np.int8)
                seeds[lab == order[0] + 1] = 1
                seeds[lab == order[1] + 1] = 2
                if eroded is mask:
                    return [seeds == 1, seeds == 2]
                _, idx = ndi.distance_transform_edt(seeds == 0, return_indices=True)
                nearest = seeds[idx[0], idx[1], idx[2]]
                return [mask & (nearest == 1), mask & (nearest == 2)]
        eroded = ndi.binary_erosion(eroded, struct)
        if not eroded.any():
            break
    return [mask]


#: Connectivity within each axial slice only (per-slice 2-D operations in one call).
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndi.generate_binary_structure(2, 1)
_IN_PLANE_8 = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE_8[1] = True


def _close_slices(mask: npt.NDArray[np.bool_], radius_px: float) -> npt.NDArray[np.bool_]:
    """Per-slice 2-D closing (disk of ``radius_px``) and hole filling."""
    r = round(radius_px)
    box = _bbox(mask, 0)
    crop = np.pad(mask[box], ((0, 0), (r + 1, r + 1), (r + 1, r + 1))).astype(np.uint8)
    # octagonal disk: alternate 4- and 8-connected unit steps (separable, fast)
    steps = [_IN_PLANE if i % 2 == 0 else _IN_PLANE_8 for i in range(r)]
    work = crop.astype(bool)
    for st in steps:
        work = ndi.binary_dilation(work, structure=st)
    for st in reversed(steps):
        work = ndi.binary_erosion(work, structure=st, border_value=1)
    closed = ndi.binary_fill_holes(work | crop.astype(bool), structure=_IN_PLANE)
    out = np.zeros_like(mask)
    out[box] = closed[:, r + 1:-(r + 1), r + 1:-(r + 1)]
    return out


def _juxtapleural_bays(
    part: npt.NDArray[np.bool_], hu: npt.NDArray[np.float32], grid: WorkGrid
) -> npt.NDArray[np.bool_]:
    """Compact dense regions in bays of one lung's outline (pleura-attached nodules)."""
    sz, sy, sx = grid.spacing_zyx
    box = _bbox(part, 0)
    # the envelope is found on a 2x coarser in-plane grid (a block is "lung" if any
    # voxel is), which is ample for a 16 mm disk and 4x cheaper
    crop = part[box]
    ny, nx = crop.shape[1:]
    even = np.pad(crop, ((0, 0), (0, ny % 2), (0, nx % 2)))
    coarse = np.asarray(even.reshape(crop.shape[0], even.shape[1] // 2, 2, even.shape[2] // 2,
                                     2).any(axis=(2, 4)), dtype=bool)
    pad = int(np.ceil(BAY_RADIUS_MM / (2 * min(sy, sx)))) + 1
    coarse = np.pad(coarse, ((0, 0), (pad, pad), (pad, pad)))
    samp = (1e4, 2 * sy, 2 * sx)  # per-slice distances (no coupling between slices)
    dil = ndi.distance_transform_edt(~coarse, sampling=samp) <= BAY_RADIUS_MM
    closed = (ndi.distance_transform_edt(dil, sampling=samp) > BAY_RADIUS_MM)[:, pad:-pad,
                                                                               pad:-pad]
    closed = np.repeat(np.repeat(closed, 2, axis=1), 2, axis=2)[:, :ny, :nx]
    added = np.zeros_like(part)
    added[box] = closed & ~crop
    added &= hu > BAY_DENSE_HU
    lab, n = ndi.label(added)
    if n == 0:
        return added
    keep = np.zeros(n + 1, dtype=bool)
    max_vox = BAY_MAX_ML / grid.voxel_ml
    sizes = _sizes(lab, n)
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is None or sizes[i - 1] > max_vox:
            continue
        extent = [(s.stop - s.start) * d for s, d in zip(sl, (sz, sy, sx), strict=True)]
        keep[i] = max(extent) <= BAY_MAX_EXTENT_MM
    out: npt.NDArray[np.bool_] = keep[lab]
    return out


def segment_lungs(image: sitk.Image) -> LungSegmentation:
    """Segment the left and right lungs of a chest CT.

    Parameters
    ----------
    image : SimpleITK.Image
        CT volume in Hounsfield units (LPS geometry, e.g.
        :attr:`cad_node.imaging.LoadedSeries.image`).

    Returns
    -------
    LungSegmentation

    Raises
    ------
    LungSegmentationError
        No two plausible lungs were found (the message says why).
    """
    grid = WorkGrid.for_image(image)
    hu = grid.downsample(sitk.GetArrayViewFromImage(image))
    notes: list[str] = []
    air = hu < AIR_HU
    lab, n = ndi.label(air)
    if n == 0:
        raise LungSegmentationError("no air inside the body: not a chest CT")
    outside = _border_components(lab)
    sizes = _sizes(lab, n)
    inside = [(int(sizes[i]), i + 1) for i in range(n) if (i + 1) not in outside]
    if not inside:
        raise LungSegmentationError("no air enclosed by the body: not a chest CT")
    inside.sort(reverse=True)
    biggest = inside[0][0]
    keep = [lbl for size, lbl in inside if size >= MIN_COMPONENT_FRACTION * biggest]
    candidates = np.isin(lab, keep)
    del lab
    body = ~air | candidates
    sup = _superior_sign(image)
    xs = np.arange(body.shape[2], dtype=np.float64)
    counts = body.sum(axis=(1,))  # (z, x)
    with np.errstate(invalid="ignore", divide="ignore"):
        body_x = (counts * xs).sum(axis=1) / counts.sum(axis=1)
    body_x = np.nan_to_num(body_x, nan=body.shape[2] / 2)
    seed = _find_trachea_seed(candidates, body_x, grid, sup)
    airway = np.zeros_like(candidates)
    if seed is not None:
        grown = _grow_airway(hu, candidates, seed, grid.voxel_ml)
        if grown is not None:
            airway = ndi.binary_dilation(grown, iterations=1) & candidates
    else:
        notes.append("trachea not found: airway not removed")
    lungs = candidates & ~airway
    lab, n = ndi.label(lungs)
    if n == 0:
        raise LungSegmentationError("no lung left after airway removal")
    sizes = _sizes(lab, n)
    big = [i + 1 for i in np.argsort(sizes)[::-1][:2] if sizes[i] * grid.voxel_ml >= MIN_LUNG_ML]
    if not big:
        raise LungSegmentationError(
            f"largest air region inside the body is {sizes.max() * grid.voxel_ml:.0f} mL: "
            "no lungs (not a chest CT?)"
        )
    if len(big) == 2:
        parts = [lab == big[0], lab == big[1]]
    else:
        parts = _split_two(lab == big[0], grid.voxel_ml)
    del lab
    if len(parts) != 2:
        raise LungSegmentationError("only one lung found (could not separate left and right)")
    radius_px = CLOSING_RADIUS_MM / grid.spacing_zyx[2]
    parts = [_close_slices(p, radius_px) for p in parts]
    parts = [(p | _juxtapleural_bays(p, hu, grid)) & ~airway for p in parts]
    overlap = parts[0] & parts[1]
    parts[1] &= ~overlap
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    phys_x = []
    for p in parts:
        c = np.array(ndi.center_of_mass(p))  # (z, y, x) working index
        src = grid.to_source_index(c)[::-1] * np.asarray(image.GetSpacing())
        phys_x.append(float((direction @ src)[0]))
    left_w, right_w = (parts[0], parts[1]) if phys_x[0] > phys_x[1] else (parts[1], parts[0])
    vols = {
        "left_lung_volume_ml": float(left_w.sum()) * grid.voxel_ml,
        "right_lung_volume_ml": float(right_w.sum()) * grid.voxel_ml,
    }
    vols["total_lung_volume_ml"] = vols["left_lung_volume_ml"] + vols["right_lung_volume_ml"]
    for side in ("left", "right"):
        if vols[f"{side}_lung_volume_ml"] < MIN_LUNG_ML:
            raise LungSegmentationError(
                f"{side} lung only {vols[f'{side}_lung_volume_ml']:.0f} mL: not a chest CT?"
            )
    both = left_w | right_w
    edge_mm2 = grid.spacing_zyx[1] * grid.spacing_zyx[2]
    for k, where in ((0, "first"), (both.shape[0] - 1, "last")):
        area_cm2 = float(both[k].sum()) * edge_mm2 / 100.0
        if area_cm2 > CUT_LUNG_AREA_CM2:
            notes.append(f"lungs continue beyond the {where} slice ({area_cm2:.0f} cm2 of lung "
                         "there): lung volumes are partial")
    return LungSegmentation(
        left=grid.upsample(left_w),
        right=grid.upsample(right_w),
        airway=grid.upsample(airway),
        volumes_ml=vols,
        grid=grid,
        work_left=left_w,
        work_right=right_w,
        work_hu=hu,
        notes=notes,
    )
