# mypy: disallow-untyped-calls=False
"""Load one DICOM series into a SimpleITK volume with exact LPS geometry.

The geometry (sorting along the slice normal, orientation, pixel and slice
spacing, the policy for messy series) is :mod:`cad_node.imaging.geometry`'s,
the same code the result builders use: the volume's origin is the Image
Position (Patient) of the first sorted slice, its spacing ``(PixelSpacing[1],
PixelSpacing[0], slice spacing)`` and its direction matrix columns
``(r, c, n)``, so ``TransformIndexToPhysicalPoint((0, 0, k))`` is the IPP of
the slice whose SOP Instance UID is ``sop_instance_uids[k]``.

Rejected with :class:`SeriesError` (never silently shifted): everything
:func:`~cad_node.imaging.geometry.sort_slices` and
:func:`~cad_node.imaging.geometry.regular_grid` refuse (missing slices, two
different images at one position, varying slice spacing, a sheared stack,
mixed sizes/orientations/pixel spacings, a single slice), plus a localizer,
multi-frame instances and colour images.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import pydicom
import SimpleITK as sitk  # noqa: N813 - conventional alias
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut

from cad_node.imaging.geometry import (
    DUPLICATE_POSITION_TOL_MM,
    SPACING_REL_TOL,
    TILT_TOL_DEG,
    ImagePlane,
    SeriesError,
    VolumeGrid,
    index_to_lps,
    lps_to_index,
    regular_grid,
    sort_slices,
    unique_instances,
)
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


def _name(source: Source, ds: Dataset | None = None) -> str:
    if isinstance(source, Dataset):
        uid = source.get("SOPInstanceUID", "?")
        return f"instance {uid}"
    return os.fspath(source)


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
) -> tuple[list[int], VolumeGrid]:
    """Sort order and voxel grid (:mod:`cad_node.imaging.geometry`); raises SeriesError."""
    planes: list[ImagePlane] = []
    for ds, src in zip(headers, sources, strict=True):
        plane = ImagePlane.from_dataset(ds, _name(src))
        if plane is None:
            raise SeriesError(f"{_name(src)}: ImagePositionPatient missing")
        planes.append(plane)
    stack = sort_slices(planes)
    grid = regular_grid(stack, headers[0].get("GantryDetectorTilt"))
    return list(stack.order), grid


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
    keep, notes = unique_instances(headers, [_name(src) for src in items])
    items, headers = [items[k] for k in keep], [headers[k] for k in keep]
    order, grid = _geometry(headers, items)
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
    image.SetOrigin(tuple(float(v) for v in grid.origin))
    image.SetSpacing(grid.spacing)
    image.SetDirection(tuple(float(v) for v in grid.direction.ravel()))
    return LoadedSeries(
        image=image,
        sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in sorted_headers),
        datasets=tuple(sorted_headers),
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=str(first.get("SeriesInstanceUID", "")),
        modality=str(first.get("Modality", "")),
        notes=tuple(notes),
    )
