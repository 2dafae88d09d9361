# mypy: disallow-untyped-calls=False
"""Patch extraction: sample isotropic patches around candidate centres.

Patches are sampled directly from the source volume with trilinear
interpolation (:func:`scipy.ndimage.map_coordinates` on a small crop around
each centre), so the whole volume is never resampled.  The patch grid is
aligned with the patient LPS axes; patch voxel ``[i, j, k]`` (array order
``z, y, x``) lies at

``centre + ((k - (W-1)/2) * sx, (j - (H-1)/2) * sy, (i - (D-1)/2) * sz)``

in patient coordinates (mm).  Voxels outside the scanned volume get
``outside_hu`` (air).  The same function serves training (trainer) and
inference (:class:`~cad_node.models.scorer.CandidateScorer`), so both see
identical inputs.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813
from scipy import ndimage

__all__ = [
    "VolumeGeometry",
    "extract_patches",
    "extract_patches_array",
    "normalize_hu",
]


class VolumeGeometry:
    """Index <-> patient (LPS, mm) mapping of a volume, as SimpleITK defines it.

    Parameters
    ----------
    origin : sequence of 3 float
        Patient position of voxel ``(0, 0, 0)``, ``(x, y, z)`` mm.
    spacing : sequence of 3 float
        Voxel spacing ``(x, y, z)`` mm.
    direction : sequence of 9 float
        Row-major 3x3 direction cosine matrix (columns are the index axes).
    """

    def __init__(
        self, origin: Sequence[float], spacing: Sequence[float], direction: Sequence[float]
    ) -> None:
        self.origin = np.asarray(origin, dtype=np.float64)
        self.spacing = np.asarray(spacing, dtype=np.float64)
        self.direction = np.asarray(direction, dtype=np.float64).reshape(3, 3)
        self._index_to_phys = self.direction @ np.diag(self.spacing)
        self._phys_to_index = np.linalg.inv(self._index_to_phys)

    @classmethod
    def of(cls, image: sitk.Image) -> VolumeGeometry:
        """Geometry of a SimpleITK image."""
        return cls(image.GetOrigin(), image.GetSpacing(), image.GetDirection())

    def physical_to_index(self, points_mm: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Continuous ``(x, y, z)`` index of ``(N, 3)`` patient points."""
        pts = np.asarray(points_mm, dtype=np.float64).reshape(-1, 3)
        return (pts - self.origin) @ self._phys_to_index.T

    def index_to_physical(self, index_xyz: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Patient points of ``(N, 3)`` continuous ``(x, y, z)`` indices."""
        idx = np.asarray(index_xyz, dtype=np.float64).reshape(-1, 3)
        return idx @ self._index_to_phys.T + self.origin


def normalize_hu(
    patches: npt.NDArray[np.floating], hu_window: tuple[float, float]
) -> npt.NDArray[np.float32]:
    """Clip HU to ``hu_window`` and scale linearly to ``[0, 1]`` (float32)."""
    lo, hi = float(hu_window[0]), float(hu_window[1])
    out = np.clip(patches.astype(np.float32, copy=False), lo, hi)
    out -= lo
    out /= hi - lo
    return out


def _offsets(
    patch_size: Sequence[int], spacing_mm: Sequence[float]
) -> npt.NDArray[np.float64]:
    """Patient-space offsets ``(D*H*W, 3)`` (x, y, z) of the patch grid."""
    d, h, w = (int(s) for s in patch_size)
    sx, sy, sz = (float(s) for s in spacing_mm)
    zz = (np.arange(d) - (d - 1) / 2.0) * sz
    yy = (np.arange(h) - (h - 1) / 2.0) * sy
    xx = (np.arange(w) - (w - 1) / 2.0) * sx
    gz, gy, gx = np.meshgrid(zz, yy, xx, indexing="ij")
    return np.stack([gx.ravel(), gy.ravel(), gz.ravel()], axis=1)


def extract_patches_array(
    volume_zyx: npt.NDArray[np.generic],
    geometry: VolumeGeometry,
    centers_mm: npt.ArrayLike,
    patch_size: Sequence[int],
    spacing_mm: Sequence[float],
    outside_hu: float = -1024.0,
) -> npt.NDArray[np.float32]:
    """Sample HU patches from a ``(z, y, x)`` array.

    Parameters
    ----------
    volume_zyx : numpy.ndarray
        HU volume in SimpleITK array order ``(z, y, x)``.
    geometry : VolumeGeometry
        Its index <-> patient mapping.
    centers_mm : array-like, shape (N, 3)
        Patch centres, patient LPS ``(x, y, z)`` mm.
    patch_size : sequence of 3 int
        ``(D, H, W)`` voxels.
    spacing_mm : sequence of 3 float
        Patch spacing ``(x, y, z)`` mm.
    outside_hu : float
        Value of voxels outside the volume.

    Returns
    -------
    numpy.ndarray
        ``(N, D, H, W)`` float32 HU patches (not normalised).
    """
    centers = np.asarray(centers_mm, dtype=np.float64).reshape(-1, 3)
    if not np.isfinite(centers).all():
        raise ValueError("centers_mm must be finite")
    d, h, w = (int(s) for s in patch_size)
    n = centers.shape[0]
    out = np.empty((n, d, h, w), dtype=np.float32)
    if n == 0:
        return out
    perm = _axis_permutation(geometry)
    if perm is not None:
        _extract_separable(volume_zyx, geometry, centers, patch_size, spacing_mm, outside_hu,
                           perm, out)
        return out
    offsets = _offsets(patch_size, spacing_mm)
    # Index offsets relative to the centre's index; linear map, so compute once.
    off_idx = offsets @ geometry._phys_to_index.T  # (P, 3) x, y, z index units
    centre_idx = geometry.physical_to_index(centers)  # (N, 3)
    shape_zyx = np.asarray(volume_zyx.shape)
    lo_off = off_idx.min(axis=0)
    hi_off = off_idx.max(axis=0)
    for n_i in range(n):
        idx = off_idx + centre_idx[n_i]  # (P, 3) as x, y, z
        lo = np.floor(centre_idx[n_i] + lo_off).astype(np.int64)[::-1] - 1  # z, y, x
        hi = np.ceil(centre_idx[n_i] + hi_off).astype(np.int64)[::-1] + 2
        lo_c = np.clip(lo, 0, shape_zyx)
        hi_c = np.clip(hi, 0, shape_zyx)
        if np.any(hi_c - lo_c < 1):
            out[n_i] = outside_hu
            continue
        crop = np.asarray(
            volume_zyx[lo_c[0] : hi_c[0], lo_c[1] : hi_c[1], lo_c[2] : hi_c[2]],
            dtype=np.float32,
        )
        coords = idx[:, ::-1].T - lo_c[:, None]  # (3, P) as z, y, x in crop
        vals = ndimage.map_coordinates(
            crop, coords, order=1, mode="constant", cval=outside_hu, prefilter=False
        )
        out[n_i] = vals.reshape(d, h, w)
    return out


def _axis_permutation(geometry: VolumeGeometry) -> npt.NDArray[np.int64] | None:
    """Index axis of each patient axis when the grid is axis-aligned, else None.

    Axis-aligned means the direction cosines form a signed permutation matrix
    (axial, coronal or sagittal acquisitions without tilt or obliquity).
    """
    p = geometry._phys_to_index
    mag = np.abs(p)
    tol = 1e-6 * mag.max()
    if not np.all((mag > tol).sum(axis=0) == 1) or not np.all((mag > tol).sum(axis=1) == 1):
        return None
    # Index axis (0 = i/x, 1 = j/y, 2 = k/z) of patient x, y, z.
    return np.asarray(np.argmax(mag, axis=0), dtype=np.int64)


def _linear_weights(
    coords: npt.NDArray[np.float64],
) -> tuple[npt.NDArray[np.float32], int, int]:
    """1-D linear-interpolation matrix for samples at continuous ``coords``.

    Returns ``(W, lo, hi)``: ``W[s, t]`` weighs voxel ``lo + t`` for sample
    ``s``; the needed voxel range is ``[lo, hi)`` (may extend beyond
    ``[0, size)``, where the caller pads with the outside value).
    """
    i0 = np.floor(coords).astype(np.int64)
    frac = (coords - i0).astype(np.float32)
    lo = int(i0.min())
    hi = int(i0.max()) + 2
    weights = np.zeros((coords.size, hi - lo), dtype=np.float32)
    rows = np.arange(coords.size)
    weights[rows, i0 - lo] += 1.0 - frac
    weights[rows, i0 + 1 - lo] += frac
    return weights, lo, hi


def _extract_separable(
    volume_zyx: npt.NDArray[np.generic],
    geometry: VolumeGeometry,
    centers: npt.NDArray[np.float64],
    patch_size: Sequence[int],
    spacing_mm: Sequence[float],
    outside_hu: float,
    perm: npt.NDArray[np.int64],
    out: npt.NDArray[np.float32],
) -> None:
    """Trilinear sampling on an axis-aligned grid as three 1-D interpolations.

    Equivalent to trilinear interpolation with the volume extended by
    ``outside_hu`` (``grid-constant``), but a few small matrix products per
    patch instead of a gather of every voxel.
    """
    sizes_phys = (int(patch_size[2]), int(patch_size[1]), int(patch_size[0]))  # x, y, z
    p2i = geometry._phys_to_index
    shape = volume_zyx.shape
    # Patient axis a lies along array axis 2 - perm[a] (array order is k, j, i).
    phys_of_array = [0, 0, 0]
    for a in range(3):
        phys_of_array[2 - int(perm[a])] = a
    transpose = [phys_of_array.index(p) for p in (2, 1, 0)]
    offsets = [
        (np.arange(sizes_phys[a]) - (sizes_phys[a] - 1) / 2.0) * float(spacing_mm[a])
        for a in range(3)
    ]
    centre_idx = geometry.physical_to_index(centers)  # (N, 3) as i, j, k
    for n_i in range(centers.shape[0]):
        mats: list[npt.NDArray[np.float32]] = []
        slices: list[tuple[int, int]] = []
        for ax in range(3):
            a = phys_of_array[ax]
            m = int(perm[a])
            coords = centre_idx[n_i, m] + p2i[m, a] * offsets[a]
            wts, lo, hi = _linear_weights(coords)
            mats.append(wts)
            slices.append((lo, hi))
        crop = np.full([hi - lo for lo, hi in slices], outside_hu, dtype=np.float32)
        src = tuple(slice(max(lo, 0), min(hi, shape[ax])) for ax, (lo, hi) in enumerate(slices))
        dst = tuple(
            slice(s.start - lo, s.stop - lo) for s, (lo, _) in zip(src, slices, strict=True)
        )
        if all(s.stop > s.start for s in src):
            crop[dst] = volume_zyx[src]
        # Contract the last (largest, contiguous) axis first: (i, j, k) -> (i, j, c)
        # -> (i, b, c) -> (a, b, c).
        r = crop @ mats[2].T
        r = np.matmul(mats[1], r)
        r = (mats[0] @ r.reshape(r.shape[0], -1)).reshape(mats[0].shape[0], *r.shape[1:])
        out[n_i] = r.transpose(transpose)


def extract_patches(
    image: sitk.Image,
    centers_mm: npt.ArrayLike,
    patch_size: Sequence[int],
    spacing_mm: Sequence[float],
    hu_window: tuple[float, float] | None = None,
    outside_hu: float = -1024.0,
) -> npt.NDArray[np.float32]:
    """Sample patches from a SimpleITK HU image around patient-space centres.

    Parameters
    ----------
    image : SimpleITK.Image
        3-D HU image (any pixel type).
    centers_mm : array-like, shape (N, 3)
        Centres, patient LPS ``(x, y, z)`` mm.
    patch_size, spacing_mm, outside_hu
        See :func:`extract_patches_array`.
    hu_window : (float, float), optional
        When given, patches are clipped and scaled to ``[0, 1]``.

    Returns
    -------
    numpy.ndarray
        ``(N, D, H, W)`` float32.
    """
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3-D image, got {image.GetDimension()}-D")
    volume = sitk.GetArrayViewFromImage(image)
    patches = extract_patches_array(
        volume, VolumeGeometry.of(image), centers_mm, patch_size, spacing_mm, outside_hu
    )
    if hu_window is not None:
        patches = normalize_hu(patches, hu_window)
    return patches
