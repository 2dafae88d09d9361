# mypy: disallow-untyped-calls=False
"""Slice-profile harmonisation: make a thin-slice CT look like the scorer's training slices.

The ``ct-nodule-scorer`` bundles up to 1.0.2 saw one real background, reconstructed
with 2.5 mm slices.  A scan reconstructed with thinner slices shows crisper vessels
and bifurcations along z (and more noise) than anything the scorer was trained on.
A bundle whose input spec has ``harmonise_slice_thickness_mm`` (T_train) asks the
pipeline to smooth such a scan along z before candidate generation and scoring.

Method (fixed before it was measured, docs/benchmarks.md "slice-profile
harmonisation"): the slice sensitivity profile of a reconstruction is modelled as a
rectangle of width T, whose variance is T^2 / 12.  A Gaussian along z of variance
``(T_train^2 - T_scan^2) / 12`` mm^2 makes up the difference::

    sigma_z = sqrt((T_train**2 - T_scan**2) / 12)     (0.625 mm for 1.25 -> 2.5 mm)

T_scan is the series' Slice Thickness (0018,0050) or, when absent or not positive,
its slice spacing.  Scans with T_scan >= T_train, and bundles without the field, are
left exactly as they are.  The kernel is the discrete analogue of the Gaussian
(``exp(-t) I_n(t)``, modified Bessel functions), whose variance is exactly
``t = (sigma_z / slice spacing)^2`` voxels^2 even for sigma below one slice, where a
sampled Gaussian would fall short; edges replicate the first/last slice.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813 - conventional alias
from scipy import ndimage, special

from cad_node.imaging import LoadedSeries

__all__ = [
    "HarmonisationPlan",
    "discrete_gaussian_kernel",
    "harmonisation_sigma_mm",
    "harmonise_series",
    "plan_harmonisation",
    "scan_slice_thickness_mm",
    "smooth_along_z",
]

#: Rows (y) smoothed per block: bounds the float32 working copy to a slab.
_BLOCK_ROWS = 32
#: The kernel is cut where the remaining tail mass is below this (then renormalised).
_KERNEL_TAIL = 1e-7


def scan_slice_thickness_mm(series: LoadedSeries) -> float:
    """The series' reconstructed slice thickness, mm.

    Slice Thickness (0018,0050) of the first instance when present and positive,
    else the slice spacing of the volume (its z voxel size).
    """
    raw = series.datasets[0].get("SliceThickness") if series.datasets else None
    try:
        value = float(raw) if raw not in (None, "") else 0.0
    except (TypeError, ValueError):
        value = 0.0
    if value > 0 and math.isfinite(value):
        return value
    return float(series.image.GetSpacing()[2])


def harmonisation_sigma_mm(scan_mm: float, train_mm: float | None) -> float:
    """sigma_z (mm) of the Gaussian that turns a ``scan_mm`` slice profile into ``train_mm``.

    ``sqrt((train_mm^2 - scan_mm^2) / 12)``; 0 when ``train_mm`` is None or
    ``scan_mm >= train_mm``.

    Raises
    ------
    ValueError
        ``scan_mm`` or ``train_mm`` is not a positive finite number.
    """
    if not (scan_mm > 0 and math.isfinite(scan_mm)):
        raise ValueError(f"scan slice thickness must be positive, not {scan_mm}")
    if train_mm is None:
        return 0.0
    if not (train_mm > 0 and math.isfinite(train_mm)):
        raise ValueError(f"harmonise_slice_thickness_mm must be positive, not {train_mm}")
    if scan_mm >= train_mm:
        return 0.0
    return math.sqrt((train_mm**2 - scan_mm**2) / 12.0)


def discrete_gaussian_kernel(sigma_vox: float) -> npt.NDArray[np.float64]:
    """Normalised discrete Gaussian ``exp(-t) I_n(t)``, ``t = sigma_vox^2``, odd length.

    Raises
    ------
    ValueError
        ``sigma_vox`` is not positive.
    """
    if not sigma_vox > 0:
        raise ValueError(f"sigma must be positive, not {sigma_vox}")
    t = sigma_vox**2
    radius = 1
    while special.ive(radius, t) > _KERNEL_TAIL:
        radius += 1
    n = np.arange(-radius, radius + 1)
    k = special.ive(np.abs(n), t)
    return np.asarray(k / k.sum(), dtype=np.float64)


def smooth_along_z(image: sitk.Image, sigma_mm: float) -> sitk.Image:
    """A copy of ``image`` smoothed along its slice axis (index axis 2) by ``sigma_mm``.

    Same size, geometry and pixel type; integer images are rounded (and clipped
    to their type's range).  Works in blocks of rows, so the extra memory is one
    output volume plus a float32 slab.

    Raises
    ------
    ValueError
        ``sigma_mm`` is not positive or the image is not 3-D scalar.
    """
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("smooth_along_z needs a 3-D scalar image")
    kernel = discrete_gaussian_kernel(sigma_mm / float(image.GetSpacing()[2]))
    src = sitk.GetArrayViewFromImage(image)  # (z, y, x)
    out = np.empty(src.shape, dtype=src.dtype)
    integer = np.issubdtype(src.dtype, np.integer)
    lo, hi = ((np.iinfo(src.dtype).min, np.iinfo(src.dtype).max) if integer else (0, 0))
    for y0 in range(0, src.shape[1], _BLOCK_ROWS):
        block = np.asarray(src[:, y0:y0 + _BLOCK_ROWS], dtype=np.float32)
        smooth = ndimage.convolve1d(block, kernel.astype(np.float32), axis=0, mode="nearest")
        if integer:
            np.rint(smooth, out=smooth)
            np.clip(smooth, lo, hi, out=smooth)
        out[:, y0:y0 + _BLOCK_ROWS] = smooth
    result = sitk.GetImageFromArray(out)
    result.CopyInformation(image)
    return result


@dataclasses.dataclass(frozen=True)
class HarmonisationPlan:
    """What :func:`harmonise_series` does to one series for one bundle."""

    #: The scan's slice thickness (or spacing), mm.
    scan_mm: float
    #: The bundle's training slice thickness, mm (None: the bundle does not ask).
    train_mm: float | None
    #: Gaussian sigma along z, mm (0: the series is left as it is).
    sigma_mm: float

    @property
    def note(self) -> str | None:
        """A line for the result's notes when the series is smoothed, else None."""
        if self.sigma_mm <= 0 or self.train_mm is None:
            return None
        return (f"slice-profile harmonisation: slice thickness {self.scan_mm:g} mm < the "
                f"scorer's training {self.train_mm:g} mm, smoothed along z with a Gaussian "
                f"of sigma {self.sigma_mm:.3f} mm before candidates and scoring")


def plan_harmonisation(series: LoadedSeries, train_mm: float | None) -> HarmonisationPlan:
    """The :class:`HarmonisationPlan` of ``series`` for a bundle's ``train_mm``."""
    scan = scan_slice_thickness_mm(series)
    return HarmonisationPlan(scan, train_mm, harmonisation_sigma_mm(scan, train_mm))


def harmonise_series(series: LoadedSeries,
                     train_mm: float | None) -> tuple[LoadedSeries, HarmonisationPlan]:
    """``series`` with its image smoothed along z when its slices are thinner than ``train_mm``.

    Parameters
    ----------
    series : LoadedSeries
        An axial CT series (HU image).
    train_mm : float or None
        The bundle's ``harmonise_slice_thickness_mm``; None leaves every series alone.

    Returns
    -------
    tuple
        The series (the same object when nothing is done; else a copy with only
        the image replaced: same headers, UIDs and geometry) and the plan applied.
    """
    plan = plan_harmonisation(series, train_mm)
    if plan.sigma_mm <= 0:
        return series, plan
    return dataclasses.replace(series, image=smooth_along_z(series.image, plan.sigma_mm)), plan
