"""Per-nodule segmentation and measurements at source resolution.

Segmentation: inside a region of interest around the candidate, voxels above
:data:`NODULE_HU` that lie inside the *locally closed* lung (the lung mask
closed per slice with a disk larger than the nodule, so a juxtapleural nodule's
bay is inside while the chest wall stays outside) form the foreground; a small
opening detaches vessels; the component at the centre is the nodule.

Measurements follow Lung-RADS v2022: long axis = longest diameter on the axial
slice where it is largest, short axis = the longest diameter perpendicular to
it on the same slice, mean diameter = their mean.  Type from the HU
distribution: solid when most voxels are at or above :data:`SOLID_HU`,
part-solid when a solid component of at least :data:`MIN_SOLID_COMPONENT_MM`
exists, else ground glass.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError

from cad_node.results.findings import NoduleType

__all__ = [
    "NODULE_HU",
    "SOLID_HU",
    "NoduleMeasurement",
    "axial_diameters",
    "characterise_nodule",
]

#: Lowest attenuation counted as nodule (ground glass is about -750..-300 HU).
NODULE_HU = -650.0
#: Solid component threshold (HU).
SOLID_HU = -300.0
#: Solid fraction (voxels >= SOLID_HU) at/above which a nodule is solid ...
SOLID_FRACTION = 0.6
#: ... or whose solid component's mean axial diameter is this fraction of the whole's.
SOLID_DIAMETER_RATIO = 0.8
#: Smallest solid component (mean axial diameter, mm) that makes a nodule part-solid;
#: below it the nodule is ground glass.
MIN_SOLID_COMPONENT_MM = 3.0


@dataclass(frozen=True)
class NoduleMeasurement:
    """Mask and measurements of one nodule (source grid)."""

    #: Mask over the box ``offset .. offset + mask.shape`` of the source volume.
    mask: npt.NDArray[np.bool_]
    offset: tuple[int, int, int]
    center_index: tuple[float, float, float]
    long_axis_mm: float
    short_axis_mm: float
    volume_mm3: float
    mean_hu: float
    nodule_type: NoduleType
    #: Mean axial diameter of the solid component (part-solid nodules), mm.
    solid_mean_diameter_mm: float
    solid_fraction: float

    @property
    def mean_diameter_mm(self) -> float:
        """Lung-RADS mean diameter: (long + short) / 2."""
        return (self.long_axis_mm + self.short_axis_mm) / 2.0


def axial_diameters(
    slice_mask: npt.NDArray[np.bool_], spacing_yx: tuple[float, float]
) -> tuple[float, float]:
    """Longest diameter and longest perpendicular diameter (mm) of a 2-D mask.

    Pixel centres are hulled; each extent adds one pixel size so that a
    single pixel measures one pixel.
    """
    ys, xs = np.nonzero(slice_mask)
    if ys.size == 0:
        return 0.0, 0.0
    pts = np.stack([ys * spacing_yx[0], xs * spacing_yx[1]], axis=1)
    try:
        hull = pts[ConvexHull(pts).vertices] if len(pts) >= 3 else pts
    except QhullError:
        hull = pts
    d = np.linalg.norm(hull[:, None, :] - hull[None, :, :], axis=2)
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    pix = float(np.mean(spacing_yx))
    if d[i, j] == 0:
        return pix, pix
    u = (hull[j] - hull[i]) / d[i, j]
    v = np.array([-u[1], u[0]])
    proj = pts @ v
    long_mm = float(d[i, j]) + pix
    short_mm = float(proj.max() - proj.min()) + pix
    return long_mm, min(short_mm, long_mm)


def _close_local(lung: npt.NDArray[np.bool_], radius_mm: float,
                 spacing: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Per-slice closing with a disk of ``radius_mm`` via distance maps."""
    samp = (1e4, spacing[1], spacing[2])  # no coupling between slices
    pad = int(np.ceil(radius_mm / min(spacing[1], spacing[2]))) + 1
    padded = np.pad(lung, ((0, 0), (pad, pad), (pad, pad)))
    if not padded.any():
        return lung
    dil = ndi.distance_transform_edt(~padded, sampling=samp) <= radius_mm
    closed = ndi.distance_transform_edt(dil, sampling=samp) > radius_mm
    out: npt.NDArray[np.bool_] = (closed | padded)[:, pad:-pad, pad:-pad]
    return out


def _dilate(mask: npt.NDArray[np.bool_], radius_mm: float,
            sampling: tuple[float, ...]) -> npt.NDArray[np.bool_]:
    """Dilation by a Euclidean ball of ``radius_mm`` (anisotropic voxels)."""
    if not mask.any():
        return mask.copy()
    out: npt.NDArray[np.bool_] = ndi.distance_transform_edt(~mask, sampling=sampling) <= radius_mm
    return out


def characterise_nodule(
    hu: npt.NDArray[np.generic],
    lungs: npt.NDArray[np.bool_],
    center_index: tuple[int, int, int],
    diameter_mm: float,
    spacing_zyx: tuple[float, float, float],
) -> NoduleMeasurement | None:
    """Segment and measure the nodule at ``center_index``.

    Parameters
    ----------
    hu : numpy.ndarray, shape (z, y, x)
        Source volume (HU).
    lungs : numpy.ndarray of bool
        Both lungs, same shape.
    center_index : (int, int, int)
        Candidate centre (source voxel).
    diameter_mm : float
        Estimated diameter (from the candidate scale).
    spacing_zyx : tuple of float

    Returns
    -------
    NoduleMeasurement or None
        None when no nodule-like tissue is found at the centre.
    """
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    reach = max(0.8 * diameter_mm + 2.0, 6.0)
    half = np.ceil(reach / spacing).astype(int) + 1
    c = np.asarray(center_index)
    lo = np.maximum(c - half, 0)
    hi = np.minimum(c + half + 1, hu.shape)
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    roi = np.asarray(hu[box], dtype=np.float32)
    lung_roi = _close_local(lungs[box], diameter_mm / 2.0 + 4.0, spacing)
    grids = np.meshgrid(*[(np.arange(a, b) - ci) * s for a, b, ci, s in
                          zip(lo, hi, c, spacing, strict=True)], indexing="ij")
    dist = np.sqrt(sum(g**2 for g in grids))
    fg = (roi >= NODULE_HU) & lung_roi & (dist <= reach)
    # detach vessels and pleural contact: opening with a ball of half the radius
    # (Euclidean ball in mm via distance maps: cost independent of the radius)
    r_open = max(diameter_mm / 4.0, float(spacing[1:].max()))
    samp = tuple(float(v) for v in spacing)
    eroded = ndi.distance_transform_edt(np.pad(fg, 1), sampling=samp)[1:-1, 1:-1, 1:-1] > r_open
    opened = _dilate(eroded, r_open, samp) & fg
    cl = tuple(c - lo)
    lab, _ = ndi.label(opened)
    seed = lab[cl]
    if seed == 0:
        # nearest labelled voxel within the estimated radius
        near = (lab > 0) & (dist <= max(diameter_mm / 2.0, 2.0 * float(spacing.max())))
        if not near.any():
            return None
        d_near = np.where(near, dist, np.inf)
        seed = lab[np.unravel_index(int(np.argmin(d_near)), d_near.shape)]
    mask = lab == seed
    # restore the rim the opening removed (voxels of fg adjacent to the component)
    mask = _dilate(mask, r_open, samp) & fg
    nvox = int(mask.sum())
    if nvox == 0:
        return None
    voxel_mm3 = float(np.prod(spacing))
    values = roi[mask]
    solid = mask & (roi >= SOLID_HU)
    solid_fraction = float(solid.sum()) / nvox
    best = (0.0, 0.0, 0)
    for k in np.nonzero(mask.any(axis=(1, 2)))[0]:
        la, sa = axial_diameters(mask[k], (spacing[1], spacing[2]))
        if la > best[0]:
            best = (la, sa, int(k))
    solid_d = max((sum(axial_diameters(solid[k], (spacing[1], spacing[2]))) / 2.0
                   for k in np.nonzero(solid.any(axis=(1, 2)))[0]), default=0.0)
    mean_d = (best[0] + best[1]) / 2.0
    if solid_fraction >= SOLID_FRACTION or solid_d >= SOLID_DIAMETER_RATIO * mean_d:
        ntype = NoduleType.SOLID
    elif solid_d >= MIN_SOLID_COMPONENT_MM:
        ntype = NoduleType.PART_SOLID
    else:
        ntype = NoduleType.GROUND_GLASS
    com = np.array(ndi.center_of_mass(mask)) + lo
    zs = np.nonzero(mask.any(axis=(1, 2)))[0]
    return NoduleMeasurement(
        mask=mask[zs[0]:zs[-1] + 1],
        offset=(int(lo[0] + zs[0]), int(lo[1]), int(lo[2])),
        center_index=(float(com[0]), float(com[1]), float(com[2])),
        long_axis_mm=best[0],
        short_axis_mm=best[1],
        volume_mm3=nvox * voxel_mm3,
        mean_hu=float(values.mean()),
        nodule_type=ntype,
        solid_mean_diameter_mm=solid_d,
        solid_fraction=solid_fraction,
    )
