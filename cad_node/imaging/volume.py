# mypy: disallow-untyped-calls=False
"""Load one DICOM series into a SimpleITK volume with exact LPS geometry.

Geometry (PS3.3 C.7.6.2.1.1): Image Orientation (Patient) gives the row
direction ``r`` (increasing column index) and column direction ``c``
(increasing row index); the slice normal is ``n = r x c``.  Slices are sorted
by ``n . IPP`` (Image Position (Patient)), never by Instance Number.  The
SimpleITK image has origin ``IPP`` of the first sorted slice, spacing
``(PixelSpacing[1], PixelSpacing[0], slice spacing)`` and direction matrix
columns ``(r, c, n)``, so ``TransformIndexToPhysicalPoint((0, 0, k))`` is the
IPP of the slice whose SOP Instance UID is ``sop_instance_uids[k]``.

Rejected with :class:`SeriesError` (never silently shifted): missing slices,
two different images at one position, varying slice spacing, a sheared stack
(gantry tilt), mixed sizes/orientations/pixel spacings, a single slice, a
localizer, multi-frame instances, colour images.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pydicom
import SimpleITK as sitk  # noqa: N813 - conventional alias
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut

from cad_node.imaging.series import LOCALIZER_IMAGE_TYPE, SeriesInfo, Source

__all__ = [
    "DUPLICATE_POSITION_TOL_MM",
    "SPACING_REL_TOL",
    "TILT_TOL_DEG",
    "LoadedSeries",
    "SeriesError",
    "index_to_lps",
    "load_series",
    "lps_to_index",
]

#: Two slices closer than this along the normal occupy the same position.
DUPLICATE_POSITION_TOL_MM = 0.01
#: Allowed relative deviation of a slice gap from the median gap.
SPACING_REL_TOL = 0.05
#: Largest angle between the stacking direction and the slice normal (a larger
#: angle is a sheared stack, e.g. from gantry tilt (0018,1120)).
TILT_TOL_DEG = 0.5
#: Relative gap above which slices are considered missing (gap > 1.5 x median).
MISSING_SLICE_FACTOR = 1.5
_IOP_TOL = 1e-4


class SeriesError(ValueError):
    """A series cannot be turned into a volume; ``str(exc)`` is the reason."""


@dataclass(frozen=True)
class LoadedSeries:
    """A series as a volume, with the slice-to-instance mapping.

    Attributes
    ----------
    image : SimpleITK.Image
        Rescaled values (Hounsfield units for CT), ``int16`` when the modality
        LUT is integral and fits, else ``float32``; LPS geometry.
    sop_instance_uids : tuple of str
        ``sop_instance_uids[k]`` is the instance of volume slice ``k``
        (array index ``[k, :, :]``).
    datasets : tuple of Dataset
        Headers (Pixel Data removed) in volume order.
    notes : tuple of str
        Things the loader handled (e.g. duplicate instances dropped).
    """

    image: sitk.Image
    sop_instance_uids: tuple[str, ...]
    datasets: tuple[Dataset, ...]
    study_instance_uid: str
    series_instance_uid: str
    modality: str
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def array(self) -> npt.NDArray[np.generic]:
        """A read-only ``(z, y, x)`` view of the voxel values."""
        view = sitk.GetArrayViewFromImage(self.image)
        return view

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(slices, rows, columns)``."""
        x, y, z = self.image.GetSize()
        return (z, y, x)


def _direction(image: sitk.Image) -> npt.NDArray[np.float64]:
    return np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)


def index_to_lps(image: sitk.Image, index_zyx: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Map continuous ``(z, y, x)`` array indices to LPS millimetres.

    Parameters
    ----------
    image : SimpleITK.Image
    index_zyx : array_like, shape (..., 3)

    Returns
    -------
    numpy.ndarray, shape (..., 3)
        ``(x, y, z)`` patient coordinates in mm.
    """
    idx = np.asarray(index_zyx, dtype=np.float64)[..., ::-1]
    scaled = idx * np.asarray(image.GetSpacing(), dtype=np.float64)
    return np.asarray(image.GetOrigin(), dtype=np.float64) + scaled @ _direction(image).T


def lps_to_index(image: sitk.Image, points_mm: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Inverse of :func:`index_to_lps`: LPS mm ``(..., 3)`` to continuous ``(z, y, x)``."""
    pts = np.asarray(points_mm, dtype=np.float64) - np.asarray(image.GetOrigin(), dtype=np.float64)
    ijk = (pts @ _direction(image)) / np.asarray(image.GetSpacing(), dtype=np.float64)
    return np.asarray(ijk[..., ::-1])


def _name(source: Source, ds: Dataset | None = None) -> str:
    if isinstance(source, Dataset):
        uid = source.get("SOPInstanceUID", "?")
        return f"instance {uid}"
    return os.fspath(source)


def _floats(ds: Dataset, keyword: str, n: int, source: Source) -> npt.NDArray[np.float64]:
    value = ds.get(keyword)
    if value is None or len(value) != n:
        raise SeriesError(f"{_name(source)}: {keyword} missing or malformed")
    try:
        return np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        raise SeriesError(f"{_name(source)}: {keyword} is not numeric") from None


def _check_headers(headers: Sequence[Dataset], sources: Sequence[Source]) -> None:
    if not headers:
        raise SeriesError("series has no instances")
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in headers}
    if len(uids) > 1:
        raise SeriesError(f"instances from {len(uids)} different series were given")
    for ds, src in zip(headers, sources, strict=True):
        itype = ds.get("ImageType")
        values = [itype] if isinstance(itype, str) else list(itype or [])
        if LOCALIZER_IMAGE_TYPE in {str(v).upper() for v in values}:
            raise SeriesError(f"{_name(src)}: localizer/scout image (ImageType LOCALIZER)")
        if "PixelData" not in ds and "FloatPixelData" not in ds and "Rows" not in ds:
            raise SeriesError(f"{_name(src)}: no pixel data (not an image)")
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise SeriesError(
                f"{_name(src)}: multi-frame instance ({frames} frames) is not supported"
            )
        if int(ds.get("SamplesPerPixel", 1)) != 1:
            raise SeriesError(f"{_name(src)}: colour image (SamplesPerPixel > 1)")
    sizes = Counter((int(ds.get("Rows", 0)), int(ds.get("Columns", 0))) for ds in headers)
    if len(sizes) > 1:
        desc = ", ".join(f"{r}x{c} ({n} slices)" for (r, c), n in sorted(sizes.items()))
        raise SeriesError(f"mixed image sizes in one series: {desc}")


def _read_headers(sources: Sequence[Source]) -> list[Dataset]:
    out = []
    for src in sources:
        if isinstance(src, Dataset):
            out.append(src)
            continue
        try:
            # one read per file: pixel data stays encoded until it is decoded below
            out.append(pydicom.dcmread(os.fspath(src)))
        except Exception as exc:
            raise SeriesError(f"{_name(src)}: cannot read DICOM header: {exc}") from None
    return out


def _geometry(
    headers: Sequence[Dataset], sources: Sequence[Source]
) -> tuple[list[int], npt.NDArray[np.float64], tuple[float, float, float], list[str]]:
    """Sort order, direction matrix, spacing and notes; raises SeriesError."""
    iops = [_floats(ds, "ImageOrientationPatient", 6, s) for ds, s in zip(headers, sources,
                                                                          strict=True)]
    ipps = np.stack([_floats(ds, "ImagePositionPatient", 3, s) for ds, s in zip(headers, sources,
                                                                               strict=True)])
    spacings = [_floats(ds, "PixelSpacing", 2, s) for ds, s in zip(headers, sources, strict=True)]
    if any(np.abs(i - iops[0]).max() > _IOP_TOL for i in iops):
        raise SeriesError("slices have different Image Orientation (Patient) values")
    if any(np.abs(p - spacings[0]).max() > 1e-4 for p in spacings):
        raise SeriesError("slices have different Pixel Spacing values")
    row, col = iops[0][:3], iops[0][3:]
    normal = np.cross(row, col)
    if np.linalg.norm(normal) < 1e-6:
        raise SeriesError("Image Orientation (Patient) row and column are parallel")
    normal /= np.linalg.norm(normal)
    direction = np.stack([row, col, normal], axis=1)

    notes: list[str] = []
    n = len(headers)
    if n < 2:
        raise SeriesError("single-slice series: a volume needs at least 2 slices")
    dist = ipps @ normal
    order = sorted(range(n), key=lambda i: (dist[i], i))
    d_sorted = dist[order]
    gaps = np.diff(d_sorted)
    dup = np.nonzero(gaps < DUPLICATE_POSITION_TOL_MM)[0]
    if dup.size:
        i, j = order[dup[0]], order[dup[0] + 1]
        raise SeriesError(
            f"{dup.size} duplicate slice position(s), first at {d_sorted[dup[0]]:.3f} mm along "
            f"the normal: {_name(sources[i])} and {_name(sources[j])}"
        )
    median = float(np.median(gaps))
    big = np.nonzero(gaps > MISSING_SLICE_FACTOR * median)[0]
    if big.size:
        k = int(big[0])
        missing = round(gaps[k] / median) - 1
        raise SeriesError(
            f"missing slice(s): gap of {gaps[k]:.3f} mm (about {missing} slice(s)) between "
            f"{d_sorted[k]:.3f} and {d_sorted[k + 1]:.3f} mm along the normal, where the "
            f"spacing is {median:.3f} mm"
        )
    if np.abs(gaps - median).max() > max(SPACING_REL_TOL * median, DUPLICATE_POSITION_TOL_MM):
        raise SeriesError(
            f"varying slice spacing: gaps range {gaps.min():.3f}-{gaps.max():.3f} mm"
        )
    stack = ipps[order[-1]] - ipps[order[0]]
    cos = float(np.clip(stack @ normal / np.linalg.norm(stack), -1.0, 1.0))
    angle = float(np.degrees(np.arccos(cos)))
    if angle > TILT_TOL_DEG:
        tilt = headers[0].get("GantryDetectorTilt")
        raise SeriesError(
            f"sheared slice stack (gantry tilt): positions deviate {angle:.2f} degrees from "
            f"the slice normal (GantryDetectorTilt={tilt}); resample to an orthogonal grid first"
        )
    slice_spacing = float((d_sorted[-1] - d_sorted[0]) / (n - 1))
    ps = spacings[0]
    return order, direction, (float(ps[1]), float(ps[0]), slice_spacing), notes


def _dedupe(
    sources: Sequence[Source], headers: Sequence[Dataset]
) -> tuple[list[Source], list[Dataset], list[str]]:
    seen: dict[str, int] = {}
    out_s: list[Source] = []
    out_h: list[Dataset] = []
    for src, ds in zip(sources, headers, strict=True):
        uid = str(ds.get("SOPInstanceUID", "") or "")
        if not uid:
            raise SeriesError(f"{_name(src)}: no SOP Instance UID (0008,0018)")
        if uid in seen:
            continue
        seen[uid] = len(out_s)
        out_s.append(src)
        out_h.append(ds)
    notes = []
    if len(out_s) < len(sources):
        notes.append(f"{len(sources) - len(out_s)} repeated instance(s) (same SOP Instance UID) "
                     "ignored")
    return out_s, out_h, notes


def _integral_rescale(headers: Sequence[Dataset]) -> bool:
    for ds in headers:
        if "ModalityLUTSequence" in ds:
            return False
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        if slope != 1.0 or intercept != round(intercept):
            return False
    return True


def load_series(sources: Iterable[Source] | SeriesInfo) -> LoadedSeries:
    """Load one series as a volume in LPS geometry.

    Parameters
    ----------
    sources : iterable of path or Dataset, or SeriesInfo
        The instances of one series, in any order.

    Returns
    -------
    LoadedSeries

    Raises
    ------
    SeriesError
        The instances do not form one unambiguous volume; the message says why
        and names the file or instance where possible.
    """
    items = list(sources.sources if isinstance(sources, SeriesInfo) else sources)
    headers = _read_headers(items)  # files are read once, with their (encoded) pixel data
    _check_headers(headers, items)
    items, headers, notes = _dedupe(items, headers)
    order, direction, spacing, geo_notes = _geometry(headers, items)
    notes += geo_notes
    rows, cols = int(headers[0].Rows), int(headers[0].Columns)
    as_int16 = _integral_rescale(headers)
    volume = np.empty((len(order), rows, cols), dtype=np.int16 if as_int16 else np.float32)
    sorted_headers: list[Dataset] = []
    for k, i in enumerate(order):
        src = items[i]
        try:
            ds = headers[i]
            raw = ds.pixel_array
        except Exception as exc:
            raise SeriesError(f"{_name(src)}: cannot decode pixel data: {exc}") from None
        if raw.shape != (rows, cols):
            raise SeriesError(f"{_name(src)}: pixel array shape {raw.shape} != {(rows, cols)}")
        if as_int16:
            intercept = round(float(ds.get("RescaleIntercept", 0) or 0))
            vals = raw.astype(np.int32) + intercept
            if vals.min() < np.iinfo(np.int16).min or vals.max() > np.iinfo(np.int16).max:
                volume = volume.astype(np.float32)
                as_int16 = False
            volume[k] = vals
        else:
            volume[k] = apply_modality_lut(raw, ds).astype(np.float32)
        header = ds
        if not isinstance(src, Dataset):
            for kw in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
                if kw in header:
                    del header[kw]
        sorted_headers.append(header)
    image = sitk.GetImageFromArray(volume)
    del volume
    first = sorted_headers[0]
    image.SetOrigin(tuple(float(v) for v in first.ImagePositionPatient))
    image.SetSpacing(spacing)
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    return LoadedSeries(
        image=image,
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in sorted_headers),
        datasets=tuple(sorted_headers),
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=str(first.get("SeriesInstanceUID", "")),
        modality=str(first.get("Modality", "")),
        notes=tuple(notes),
    )
