# mypy: disallow-untyped-calls=False
"""Lesion insertion: synthetic lung nodules blended into real CT lung backgrounds.

No large annotated training set can be downloaded here, so the shipped CT
candidate scorer learns from *real* lung backgrounds (vessels, fissures,
airways, pleura, noise of a real scanner) with *synthetic* nodules inserted
as positives.  Users can mix this with real data (LIDC) in their own configs.

Nodule model
------------
* **Size**: volume-equivalent diameter, log-uniform in ``[d_min, d_max]`` mm.
* **Shape**: a randomly oriented ellipsoid (axis ratios 0.65-1) with smooth
  lobulation (low-frequency radial modulation).
* **Type** (Lung-RADS / Fleischner terminology):
  ``solid`` (-20 to +60 HU), ``ground-glass`` (-720 to -420 HU, vessels stay
  visible through it) and ``part-solid`` (ground-glass with an eccentric
  solid core of 30-60 % of the diameter).
* **Texture**: spatially correlated noise inside the lesion.
* **Blending**: partial-volume occupancy from 3x3x3 sub-voxel sampling,
  smoothed by a small point-spread function, ``out = max(bg, bg (1-a) +
  lesion a + noise)``: the lesion displaces air but never darkens vessels,
  chest wall or bone; scanner-like noise of the background's measured level
  is added so the lesion is not suspiciously smooth.
* **Placement**: ``parenchymal`` (well inside the lung),
  ``juxtapleural`` (centre 30-70 % of the radius from the pleura, so part of
  the lesion merges with the chest wall) and ``juxtavascular`` (centre 40-90 %
  of the radius from a vessel).

Everything is driven by a :class:`numpy.random.Generator`, so a seed fixes
the result.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813
from scipy import ndimage

from cad_node.models.patches import VolumeGeometry

__all__ = [
    "DEFAULT_KIND_WEIGHTS",
    "DEFAULT_PLACEMENT_WEIGHTS",
    "ExclusionZone",
    "InsertedNodule",
    "LungBackground",
    "NoduleKind",
    "Placement",
    "insert_nodules",
    "parenchyma_mask",
    "render_nodule",
]

#: HU range of lung parenchyma used by the fallback lung mask.
PARENCHYMA_HU = (-950.0, -500.0)
#: HU above which an in-lung voxel is taken as vessel (or other soft tissue).
VESSEL_HU = -400.0
#: HU range of solid nodules.
SOLID_HU = (-20.0, 60.0)
#: HU range of ground-glass nodules.
GGN_HU = (-720.0, -420.0)
#: Solid-core diameter as a fraction of the nodule diameter (part-solid).
CORE_FRACTION = (0.3, 0.6)
#: Minimum gap (mm) between the surfaces of two inserted nodules.
MIN_GAP_MM = 4.0


class NoduleKind(enum.Enum):
    """Attenuation type of an inserted nodule."""

    SOLID = "solid"
    PART_SOLID = "part-solid"
    GROUND_GLASS = "ground-glass"


class Placement(enum.Enum):
    """Where a nodule is placed relative to pleura and vessels."""

    PARENCHYMAL = "parenchymal"
    JUXTAPLEURAL = "juxtapleural"
    JUXTAVASCULAR = "juxtavascular"


#: Default mix of nodule types (solid nodules dominate in screening).
DEFAULT_KIND_WEIGHTS: dict[NoduleKind, float] = {
    NoduleKind.SOLID: 0.6,
    NoduleKind.PART_SOLID: 0.15,
    NoduleKind.GROUND_GLASS: 0.25,
}
#: Default mix of placements.
DEFAULT_PLACEMENT_WEIGHTS: dict[Placement, float] = {
    Placement.PARENCHYMAL: 0.45,
    Placement.JUXTAPLEURAL: 0.3,
    Placement.JUXTAVASCULAR: 0.25,
}


@dataclass(frozen=True)
class ExclusionZone:
    """A sphere no inserted nodule (and no negative sample) may come near.

    Used to keep a real nodule out of the training data.
    """

    center_mm: tuple[float, float, float]
    radius_mm: float


@dataclass(frozen=True)
class InsertedNodule:
    """Ground truth of one inserted nodule."""

    center_mm: tuple[float, float, float]
    diameter_mm: float
    kind: NoduleKind
    placement: Placement
    mean_hu: float


def parenchyma_mask(hu: npt.NDArray[np.floating], n_components: int = 2) -> npt.NDArray[np.bool_]:
    """A simple HU lung mask: parenchyma-range voxels inside the body.

    Fallback for development when no lung segmentation is available: voxels
    in :data:`PARENCHYMA_HU` that are not connected to the outside air, the
    largest ``n_components`` connected components, closed and hole-filled
    slice by slice so vessels are inside.
    """
    air = hu < PARENCHYMA_HU[1]
    outside = np.zeros_like(air)
    # Air connected to the volume border (per slice) is outside the body.
    for z in range(air.shape[0]):
        lab, _ = ndimage.label(air[z])
        border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
        border = border[border > 0]
        outside[z] = np.isin(lab, border)
    lung = air & ~outside & (hu > PARENCHYMA_HU[0] - 74)
    lab, n = ndimage.label(lung)
    if n == 0:
        return lung
    sizes = ndimage.sum(lung, lab, range(1, n + 1))
    keep = np.argsort(sizes)[::-1][:n_components] + 1
    keep = keep[sizes[keep - 1] > 0.05 * sizes.max()]
    mask = np.isin(lab, keep)
    for z in range(mask.shape[0]):
        if mask[z].any():
            mask[z] = ndimage.binary_fill_holes(ndimage.binary_closing(mask[z], iterations=3))
    return mask


def _noise_factor(sigma_px: float) -> float:
    """Std of (white - gaussian(white, sigma)) relative to the white std (measured)."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((256, 256))
    return float(np.std(w - ndimage.gaussian_filter(w, sigma_px)))


def estimate_noise_hu(hu: npt.NDArray[np.generic], max_slices: int = 12) -> float:
    """Estimate the scanner noise (HU std) from homogeneous soft tissue.

    Uses the robust (MAD) spread of the in-plane high-pass residual over soft
    tissue voxels (-100..150 HU, eroded) of a few central slices, corrected
    for the high-pass filter's own attenuation of white noise.
    """
    nz = hu.shape[0]
    zs = np.linspace(nz * 0.3, nz * 0.7, num=min(max_slices, nz)).astype(int)
    residuals = []
    for z in np.unique(zs):
        sl = np.asarray(hu[z], dtype=np.float32)
        tissue = ndimage.binary_erosion((sl > -100) & (sl < 150), iterations=3)
        if tissue.sum() < 100:
            continue
        r = sl - ndimage.gaussian_filter(sl, 1.0)
        residuals.append(r[tissue])
    if not residuals:
        return 20.0
    res = np.concatenate(residuals)
    mad = float(np.median(np.abs(res - np.median(res)))) * 1.4826
    return mad / _noise_factor(1.0)


@dataclass
class LungBackground:
    """A real CT volume prepared for insertion.

    Attributes
    ----------
    hu : numpy.ndarray
        ``(z, y, x)`` float32 HU volume (not modified by insertion).
    geometry : VolumeGeometry
        Index <-> patient mapping.
    lung : numpy.ndarray
        ``(z, y, x)`` bool lung mask.
    noise_hu : float
        Estimated scanner noise std (HU).
    """

    hu: npt.NDArray[np.float32]
    geometry: VolumeGeometry
    lung: npt.NDArray[np.bool_]
    noise_hu: float
    dist_to_pleura_mm: npt.NDArray[np.float32] = field(repr=False)
    dist_to_vessel_mm: npt.NDArray[np.float32] = field(repr=False)
    image: sitk.Image = field(repr=False)

    @classmethod
    def from_image(
        cls, image: sitk.Image, lung_mask: npt.NDArray[np.bool_] | None = None
    ) -> LungBackground:
        """Prepare a background from a HU image and (optionally) its lung mask.

        Without ``lung_mask`` the HU fallback :func:`parenchyma_mask` is used.
        """
        hu = sitk.GetArrayFromImage(image).astype(np.float32)
        lung = parenchyma_mask(hu) if lung_mask is None else np.asarray(lung_mask, dtype=bool)
        if lung.shape != hu.shape:
            raise ValueError(f"lung mask shape {lung.shape} differs from image {hu.shape}")
        if not lung.any():
            raise ValueError("lung mask is empty: cannot insert nodules")
        sx, sy, sz = image.GetSpacing()
        sampling = (sz, sy, sx)
        dist_pleura = _coarse_edt(lung, sampling)
        vessels = lung & (hu > VESSEL_HU) & (dist_pleura > 3.0)
        vessels = ndimage.binary_opening(vessels)
        dist_vessel = _coarse_edt(~vessels, sampling, roi=lung)
        return cls(
            hu=hu,
            geometry=VolumeGeometry.of(image),
            lung=lung,
            noise_hu=estimate_noise_hu(hu),
            dist_to_pleura_mm=dist_pleura,
            dist_to_vessel_mm=dist_vessel,
            image=image,
        )

    def to_image(self, hu: npt.NDArray[np.floating]) -> sitk.Image:
        """Wrap a modified ``(z, y, x)`` HU array with this background's geometry."""
        img = sitk.GetImageFromArray(np.asarray(hu, dtype=np.float32))
        img.CopyInformation(self.image)
        return img

    def z_of_slices(self) -> npt.NDArray[np.float64]:
        """Patient z (mm) of each slice centre (axial volumes)."""
        nz = self.hu.shape[0]
        idx = np.zeros((nz, 3))
        idx[:, 2] = np.arange(nz)
        return self.geometry.index_to_physical(idx)[:, 2]


def _coarse_edt(
    mask: npt.NDArray[np.bool_],
    sampling: tuple[float, float, float],
    roi: npt.NDArray[np.bool_] | None = None,
    pad_mm: float = 40.0,
) -> npt.NDArray[np.float32]:
    """Euclidean distance (mm) to the nearest ``False`` voxel, on a coarse grid.

    Computed inside the bounding box of ``roi`` (default ``mask``) padded by
    ``pad_mm``, with in-plane voxels pooled to at least ~1.4 mm, then expanded
    back (nearest neighbour).  Accurate to about one coarse voxel, enough to
    place nodules; outside the box the distance is 0.
    """
    out = np.zeros(mask.shape, dtype=np.float32)
    region = mask if roi is None else roi
    if not region.any():
        return out
    nz = np.argwhere(region)
    pad = [int(np.ceil(pad_mm / s)) for s in sampling]
    lo = np.maximum(nz.min(axis=0) - pad, 0)
    hi = np.minimum(nz.max(axis=0) + 1 + np.asarray(pad), mask.shape)
    f = max(1, round(1.4 / max(sampling[1], sampling[2])))
    box = tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))
    sub = mask[box][:, ::f, ::f]
    d = ndimage.distance_transform_edt(
        sub, sampling=(sampling[0], sampling[1] * f, sampling[2] * f)
    ).astype(np.float32)
    full = np.repeat(np.repeat(d, f, axis=1), f, axis=2)
    shp = mask[box].shape
    out[box] = full[:, : shp[1], : shp[2]]
    return out


def _random_rotation(rng: np.random.Generator) -> npt.NDArray[np.float64]:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _correlated_noise(
    shape: tuple[int, ...], sigma_vox: Sequence[float], rng: np.random.Generator
) -> npt.NDArray[np.float32]:
    w = rng.standard_normal(shape).astype(np.float32)
    f = ndimage.gaussian_filter(w, sigma_vox, mode="wrap")
    std = float(f.std())
    out: npt.NDArray[np.float32] = f / np.float32(std) if std > 0 else f
    return out


def render_nodule(
    out_hu: npt.NDArray[np.float32],
    background: LungBackground,
    center_mm: Sequence[float] | npt.NDArray[np.float64],
    diameter_mm: float,
    kind: NoduleKind,
    rng: np.random.Generator,
) -> float:
    """Blend one synthetic nodule into ``out_hu`` (in place).

    Parameters
    ----------
    out_hu : numpy.ndarray
        ``(z, y, x)`` float32 HU volume to modify (same geometry as
        ``background``).
    background : LungBackground
        Geometry and noise level.
    center_mm : sequence of 3 float
        Centre, patient LPS mm.
    diameter_mm : float
        Volume-equivalent diameter.
    kind : NoduleKind
        Attenuation type.
    rng : numpy.random.Generator
        Source of randomness.

    Returns
    -------
    float
        The mean HU of the rendered lesion (occupancy-weighted).
    """
    geom = background.geometry
    spacing_xyz = geom.spacing
    r = diameter_mm / 2.0
    axes = np.array([1.0, rng.uniform(0.75, 1.0), rng.uniform(0.65, 1.0)])
    axes = axes / np.cbrt(np.prod(axes)) * r  # keep the volume-equivalent radius
    rot = _random_rotation(rng)
    lob_dirs = rng.standard_normal((3, 3))
    lob_dirs /= np.linalg.norm(lob_dirs, axis=1, keepdims=True)
    lob_amp = rng.uniform(0.0, 0.08, size=3)
    lob_freq = rng.integers(2, 5, size=3)

    # Bounding box in index space (z, y, x).
    c_idx = geom.physical_to_index(np.asarray(center_mm, dtype=np.float64))[0]  # x, y, z
    half = (axes.max() * 1.25 + 2.0) / spacing_xyz
    lo = np.floor(c_idx - half).astype(int)[::-1]
    hi = np.ceil(c_idx + half).astype(int)[::-1] + 1
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, np.asarray(out_hu.shape))
    if np.any(hi <= lo):
        return float("nan")
    shape = tuple(int(v) for v in (hi - lo))

    # Sub-voxel sample positions (3 per axis) -> occupancy fraction.
    sub = (np.arange(3) - 1) / 3.0
    kz, ky, kx = (np.arange(lo[i], hi[i]) for i in range(3))
    occ = np.zeros(shape, dtype=np.float32)
    core_occ = np.zeros(shape, dtype=np.float32)
    core_r = r * rng.uniform(*CORE_FRACTION)
    core_shift = rot @ (rng.uniform(-0.3, 0.3, size=3) * (r - core_r))
    inv_axes = 1.0 / axes
    for dz in sub:
        for dy in sub:
            for dx in sub:
                gz, gy, gx = np.meshgrid(kz + dz, ky + dy, kx + dx, indexing="ij")
                idx = np.stack([gx.ravel(), gy.ravel(), gz.ravel()], axis=1)
                p = geom.index_to_physical(idx) - np.asarray(center_mm)
                local = p @ rot  # coordinates in the ellipsoid frame
                q = local * inv_axes
                rho = np.linalg.norm(q, axis=1)
                u = q / np.maximum(rho, 1e-9)[:, None]
                mod = 1.0 + sum(
                    a * np.cos(f * np.arccos(np.clip(u @ v, -1, 1)))
                    for a, f, v in zip(lob_amp, lob_freq, lob_dirs, strict=True)
                )
                occ += (rho <= mod).reshape(shape)
                if kind is NoduleKind.PART_SOLID:
                    dc = np.linalg.norm(p - core_shift, axis=1)
                    core_occ += (dc <= core_r).reshape(shape)
    occ /= 27.0
    core_occ /= 27.0
    # Point-spread function: ~0.5 voxel in-plane, a third of a slice in z.
    psf = (0.35, 0.5, 0.5)
    occ = ndimage.gaussian_filter(occ, psf)
    core_occ = np.minimum(ndimage.gaussian_filter(core_occ, psf), occ)

    # Lesion attenuation with correlated texture.
    tex_sigma_vox = [1.0 / spacing_xyz[2], 1.0 / spacing_xyz[1], 1.0 / spacing_xyz[0]]
    texture = _correlated_noise(shape, tex_sigma_vox, rng)
    solid_hu = rng.uniform(*SOLID_HU)
    ggn_hu = rng.uniform(*GGN_HU)
    if kind is NoduleKind.SOLID:
        lesion = solid_hu + rng.uniform(10, 25) * texture
    elif kind is NoduleKind.GROUND_GLASS:
        lesion = ggn_hu + rng.uniform(30, 60) * texture
    else:
        lesion = ggn_hu + rng.uniform(30, 60) * texture
        frac = np.divide(core_occ, occ, out=np.zeros_like(occ), where=occ > 1e-6)
        lesion = lesion * (1 - frac) + (solid_hu + 15 * texture) * frac

    # Scanner-like noise: slightly correlated in-plane, at the background's level.
    noise = _correlated_noise(shape, (0.0, 0.6, 0.6), rng) * background.noise_hu
    region = out_hu[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    a = occ
    blended = region * (1 - a) + lesion * a + noise * np.sqrt(np.clip(a * (2 - a), 0, 1))
    region[...] = np.maximum(region, blended)
    w = float(a.sum())
    return float((lesion * a).sum() / w) if w > 0 else float("nan")


def _sample_center(
    background: LungBackground,
    placement: Placement,
    r: float,
    rng: np.random.Generator,
    allowed: npt.NDArray[np.bool_],
    taken: Sequence[tuple[npt.NDArray[np.float64], float]],
    attempts: int = 40,
) -> npt.NDArray[np.float64] | None:
    dp = background.dist_to_pleura_mm
    dv = background.dist_to_vessel_mm
    if placement is Placement.PARENCHYMAL:
        cond = (dp >= r + 2.0) & (dv >= 0.6 * r)
    elif placement is Placement.JUXTAPLEURAL:
        cond = (dp >= 0.3 * r) & (dp <= max(0.7 * r, 1.5))
    else:
        cond = (dv >= 0.4 * r) & (dv <= max(0.9 * r, 2.0)) & (dp >= r + 1.0)
    cond &= allowed
    flat = np.flatnonzero(cond)
    if flat.size == 0:
        return None
    for _ in range(attempts):
        z, y, x = np.unravel_index(int(flat[rng.integers(flat.size)]), cond.shape)
        c = background.geometry.index_to_physical(np.array([[x, y, z]], dtype=np.float64))[0]
        if all(np.linalg.norm(c - tc) > r + tr + MIN_GAP_MM for tc, tr in taken):
            return np.asarray(c)
    return None


def allowed_region(
    background: LungBackground,
    z_range_mm: tuple[float, float] | None,
    exclusions: Sequence[ExclusionZone],
    margin_mm: float,
) -> npt.NDArray[np.bool_]:
    """Lung voxels inside ``z_range_mm`` and farther than ``margin_mm`` from exclusions."""
    allowed = background.lung.copy()
    if z_range_mm is not None:
        z = background.z_of_slices()
        outside = (z < z_range_mm[0]) | (z > z_range_mm[1])
        allowed[outside] = False
    for zone in exclusions:
        c_idx = background.geometry.physical_to_index(np.asarray(zone.center_mm))[0]
        reach = (zone.radius_mm + margin_mm) / background.geometry.spacing
        lo = np.maximum(np.floor(c_idx - reach).astype(int)[::-1], 0)
        hi = np.minimum(np.ceil(c_idx + reach).astype(int)[::-1] + 1, allowed.shape)
        if np.any(hi <= lo):
            continue
        kz, ky, kx = (np.arange(lo[i], hi[i]) for i in range(3))
        gz, gy, gx = np.meshgrid(kz, ky, kx, indexing="ij")
        pts = background.geometry.index_to_physical(
            np.stack([gx.ravel(), gy.ravel(), gz.ravel()], axis=1)
        )
        near = np.linalg.norm(pts - np.asarray(zone.center_mm), axis=1) <= (
            zone.radius_mm + margin_mm
        )
        sub = allowed[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
        sub[near.reshape(sub.shape)] = False
    return allowed


def insert_nodules(
    background: LungBackground,
    n: int,
    rng: np.random.Generator,
    *,
    diameter_range_mm: tuple[float, float] = (4.0, 30.0),
    z_range_mm: tuple[float, float] | None = None,
    exclusions: Sequence[ExclusionZone] = (),
    kind_weights: dict[NoduleKind, float] | None = None,
    placement_weights: dict[Placement, float] | None = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[npt.NDArray[np.float32], list[InsertedNodule]]:
    """Insert ``n`` non-overlapping synthetic nodules into a copy of the background.

    Parameters
    ----------
    background : LungBackground
        Real CT background.
    n : int
        Number of nodules requested (fewer when no valid place is left).
    rng : numpy.random.Generator
        Source of randomness (fixes the result).
    diameter_range_mm : (float, float)
        Log-uniform diameter range.
    z_range_mm : (float, float), optional
        Only place nodule centres with patient z in this range (held-out slabs).
    exclusions : sequence of ExclusionZone
        Spheres the nodules must stay clear of (e.g. a real nodule).
    kind_weights, placement_weights : dict, optional
        Mixes of types and placements.
    progress : callable, optional
        Called with 1 after each inserted nodule.

    Returns
    -------
    (numpy.ndarray, list of InsertedNodule)
        The modified ``(z, y, x)`` float32 HU volume and the ground truth.
    """
    kinds = kind_weights or DEFAULT_KIND_WEIGHTS
    places = placement_weights or DEFAULT_PLACEMENT_WEIGHTS
    kind_list, kind_p = list(kinds), np.array(list(kinds.values()), dtype=float)
    place_list, place_p = list(places), np.array(list(places.values()), dtype=float)
    lo_d, hi_d = diameter_range_mm
    max_r = hi_d / 2.0
    allowed = allowed_region(background, z_range_mm, exclusions, margin_mm=max_r + MIN_GAP_MM)
    out = background.hu.copy()
    truth: list[InsertedNodule] = []
    taken: list[tuple[npt.NDArray[np.float64], float]] = []
    for _ in range(n):
        d = float(np.exp(rng.uniform(np.log(lo_d), np.log(hi_d))))
        kind = kind_list[int(rng.choice(len(kind_list), p=kind_p / kind_p.sum()))]
        placement = place_list[int(rng.choice(len(place_list), p=place_p / place_p.sum()))]
        center = _sample_center(background, placement, d / 2.0, rng, allowed, taken)
        if center is None and placement is not Placement.PARENCHYMAL:
            placement = Placement.PARENCHYMAL
            center = _sample_center(background, placement, d / 2.0, rng, allowed, taken)
        if center is None:
            continue
        mean_hu = render_nodule(out, background, center, d, kind, rng)
        taken.append((center, d / 2.0))
        truth.append(
            InsertedNodule(
                center_mm=(float(center[0]), float(center[1]), float(center[2])),
                diameter_mm=d,
                kind=kind,
                placement=placement,
                mean_hu=mean_hu,
            )
        )
        if progress is not None:
            progress(1)
    return out, truth
