"""Cross-sectional series geometry: the one place that parses it (PS3.3 C.7.6.2).

Every consumer of 3-D patient geometry uses this module: the pipelines'
volume loader (:func:`cad_node.imaging.volume.load_series`) and every result
builder (:mod:`cad_node.results`), so a series is analysed and described
under the same rules.  The shape follows highdicom's ``spatial.py``
(``sort_datasets``, ``get_normal_vector``, the pixel <-> frame-of-reference
transforms).  2-D radiograph geometry (Pixel Spacing, Imager Pixel Spacing,
Estimated Radiographic Magnification Factor) lives in
:mod:`cad_node.imaging.radiograph`, not here.

Conventions
-----------
Image Orientation (Patient) (0020,0037) gives the row direction ``r`` (the
direction of increasing column index) and the column direction ``c``
(increasing row index), both in the LPS patient system; the slice normal is
``n = r x c``, normalised.  Pixel Spacing (0028,0030) is ``(row spacing,
column spacing)``: the distance between rows, then between columns.  The
centre of pixel ``(row i, column j)`` of an image is
``IPP + j * column_spacing * r + i * row_spacing * c``.  Slices are sorted by
``n . IPP``, never by Instance Number; equal positions sort by SOP Instance
UID, so the order never depends on the order the files arrived in.

Messy-series policy (decided once, here; tested in tests/unit/test_geometry.py)
----------------------------------------------------------------------------
==============================================  ===============================
case                                            decision
==============================================  ===============================
same SOP Instance UID twice, same plane         one copy kept (the first given),
                                                a note says how many were dropped
same SOP Instance UID twice, different plane    refused (:class:`SeriesError`):
(position or orientation)                       which one was analysed is unknown
mixed Image Orientation (Patient)               refused (no majority vote)
mixed Pixel Spacing / image size / Frame of     refused
Reference UID
some instances with Image Position (Patient),   refused
some without
Image Position without usable Orientation or    refused, naming the instance
Pixel Spacing
two instances at one position (different UIDs)  sorting and result building keep
                                                both (a result builder may leave
                                                the unused copy out); a *volume*
                                                refuses them
missing slice (gap > 1.5 x median gap)          sorting keeps the gap (each image
                                                keeps its own position); a volume
                                                refuses it
varying slice spacing (> 5 % of the median)     a volume refuses it
sheared stack (gantry tilt > 0.5 degrees)       a volume refuses it
single slice                                    a volume refuses it
==============================================  ===============================

:func:`sort_slices` applies the rows that concern every consumer;
:func:`regular_grid` adds the ones a voxel grid needs.  Positions are
compared along the normal with :data:`DUPLICATE_POSITION_TOL_MM`.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import numpy.typing as npt
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

__all__ = [
    "DUPLICATE_POSITION_TOL_MM",
    "MISSING_SLICE_FACTOR",
    "ORIENTATION_TOL",
    "PIXEL_SPACING_TOL_MM",
    "SPACING_REL_TOL",
    "TILT_TOL_DEG",
    "ImagePlane",
    "SeriesError",
    "SliceStack",
    "VolumeGrid",
    "index_to_lps",
    "lps_to_index",
    "normal_vector",
    "patient_orientation_letters",
    "regular_grid",
    "sort_slices",
    "unique_instances",
]

FloatArray = npt.NDArray[np.float64]

#: Two slices closer than this along the normal occupy the same position, mm.
DUPLICATE_POSITION_TOL_MM = 0.01
#: Allowed relative deviation of a slice gap from the median gap (volumes).
SPACING_REL_TOL = 0.05
#: Largest angle between the stacking direction and the slice normal (a larger
#: angle is a sheared stack, e.g. from gantry tilt (0018,1120)) (volumes).
TILT_TOL_DEG = 0.5
#: Relative gap above which slices are considered missing (gap > 1.5 x median).
MISSING_SLICE_FACTOR = 1.5
#: Largest difference of a direction cosine for "same orientation".
ORIENTATION_TOL = 1e-4
#: Largest difference of a Pixel Spacing value for "same spacing", mm.
PIXEL_SPACING_TOL_MM = 1e-4
#: Smallest |row x column| of a usable Image Orientation (Patient) (unit vectors
#: at right angles give 1; parallel or zero vectors give 0).
_MIN_NORMAL_LENGTH = 0.5


class SeriesError(ValueError):
    """Instances do not form one unambiguous geometry; ``str(exc)`` is the reason."""


def _numbers(ds: Dataset, keyword: str, count: int) -> list[float] | None:
    value = ds.get(keyword)
    if value is None:
        return None
    values = list(value) if isinstance(value, MultiValue | list | tuple) else [value]
    try:
        out = [float(v) for v in values]
    except (TypeError, ValueError):
        return None
    return out if len(out) == count and all(np.isfinite(out)) else None


def normal_vector(orientation: Sequence[float] | npt.ArrayLike) -> FloatArray:
    """Unit slice normal ``r x c`` of an Image Orientation (Patient).

    Raises
    ------
    SeriesError
        Row and column directions are (nearly) parallel or zero.
    """
    iop = np.asarray(orientation, dtype=np.float64)
    n = np.cross(iop[:3], iop[3:])
    length = float(np.linalg.norm(n))
    if length < _MIN_NORMAL_LENGTH:
        raise SeriesError("Image Orientation (Patient) row and column are parallel or zero")
    return np.asarray(n / length)


@dataclasses.dataclass(frozen=True, eq=False)
class ImagePlane:
    """The Image Plane module (PS3.3 C.7.6.2) of one single-frame image.

    Attributes
    ----------
    sop_instance_uid : str
    name : str
        How messages name the instance (a file path or ``instance <UID>``).
    position : numpy.ndarray, shape (3,)
        Image Position (Patient): centre of the first pixel, LPS mm.
    orientation : numpy.ndarray, shape (6,)
        Image Orientation (Patient), row then column direction cosines.
    pixel_spacing : tuple of float
        ``(row spacing, column spacing)`` in mm.
    rows, columns : int
    frame_of_reference_uid : str or None
    """

    sop_instance_uid: str
    name: str
    position: FloatArray
    orientation: FloatArray
    pixel_spacing: tuple[float, float]
    rows: int
    columns: int
    frame_of_reference_uid: str | None

    @classmethod
    def from_dataset(cls, ds: Dataset, name: str | None = None) -> ImagePlane | None:
        """Parse the plane of ``ds``; None when it has no Image Position (Patient).

        Raises
        ------
        SeriesError
            Image Position (Patient) is present but malformed, or comes without a
            usable Image Orientation (Patient) (six numbers, non-parallel row and
            column) or Pixel Spacing (two positive numbers); the message names
            the instance.
        """
        label = name or f"source instance {ds.get('SOPInstanceUID') or '?'}"
        if ds.get("ImagePositionPatient") is None:
            return None
        ipp = _numbers(ds, "ImagePositionPatient", 3)
        if ipp is None:
            raise SeriesError(f"{label} has an invalid Image Position (Patient)")
        iop = _numbers(ds, "ImageOrientationPatient", 6)
        if iop is None or np.linalg.norm(np.cross(iop[:3], iop[3:])) < _MIN_NORMAL_LENGTH:
            raise SeriesError(
                f"{label} has Image Position (Patient) but no usable Image Orientation (Patient)"
            )
        spacing = _numbers(ds, "PixelSpacing", 2)
        if spacing is None or min(spacing) <= 0:
            raise SeriesError(f"{label} has Image Position (Patient) but no usable Pixel Spacing")
        for_uid = ds.get("FrameOfReferenceUID")
        return cls(
            sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
            name=label,
            position=np.asarray(ipp, dtype=np.float64),
            orientation=np.asarray(iop, dtype=np.float64),
            pixel_spacing=(spacing[0], spacing[1]),
            rows=int(ds.get("Rows", 0) or 0),
            columns=int(ds.get("Columns", 0) or 0),
            frame_of_reference_uid=str(for_uid) if for_uid else None,
        )

    @property
    def row_direction(self) -> FloatArray:
        """Direction of increasing column index (first three IOP values)."""
        return self.orientation[:3]

    @property
    def column_direction(self) -> FloatArray:
        """Direction of increasing row index (last three IOP values)."""
        return self.orientation[3:]

    @property
    def normal(self) -> FloatArray:
        """Unit slice normal."""
        return normal_vector(self.orientation)

    def same_plane(self, other: ImagePlane) -> bool:
        """Same position (within :data:`DUPLICATE_POSITION_TOL_MM`) and orientation."""
        return bool(
            np.linalg.norm(self.position - other.position) <= DUPLICATE_POSITION_TOL_MM
            and np.abs(self.orientation - other.orientation).max() <= ORIENTATION_TOL
        )

    def pixel_to_patient(self, rows: npt.ArrayLike, columns: npt.ArrayLike) -> FloatArray:
        """LPS mm of (continuous) pixel indices ``(rows, columns)``, shape ``(..., 3)``."""
        dr, dc = self.pixel_spacing
        r = np.asarray(rows, dtype=np.float64)[..., None]
        c = np.asarray(columns, dtype=np.float64)[..., None]
        return np.asarray(
            self.position + c * dc * self.row_direction + r * dr * self.column_direction
        )

    def patient_to_pixel(self, point_mm: Sequence[float]) -> tuple[float, float]:
        """``(column, row)`` of a patient point projected on this plane."""
        dr, dc = self.pixel_spacing
        d = np.asarray(point_mm) - self.position
        col = float(np.dot(d, self.row_direction) / dc)
        return col, float(np.dot(d, self.column_direction) / dr)


def unique_instances(
    datasets: Sequence[Dataset], names: Sequence[str] | None = None
) -> tuple[list[int], list[str]]:
    """Indices of the instances to keep, one per SOP Instance UID, and notes.

    The first copy of a repeated SOP Instance UID is kept when every copy has
    the same plane (or none has one); otherwise :class:`SeriesError`.

    Raises
    ------
    SeriesError
        An instance without SOP Instance UID, or one UID with different planes.
    """
    labels = list(names) if names is not None else [
        f"source instance {ds.get('SOPInstanceUID') or f'#{k + 1}'}"
        for k, ds in enumerate(datasets)
    ]
    first: dict[str, tuple[int, ImagePlane | None]] = {}
    keep: list[int] = []
    for k, ds in enumerate(datasets):
        uid = str(ds.get("SOPInstanceUID", "") or "")
        if not uid:
            raise SeriesError(f"{labels[k]}: no SOP Instance UID (0008,0018)")
        plane = ImagePlane.from_dataset(ds, labels[k])
        prev = first.get(uid)
        if prev is None:
            first[uid] = (k, plane)
            keep.append(k)
            continue
        p = prev[1]
        if (p is None) != (plane is None) or (
            p is not None and plane is not None and not p.same_plane(plane)
        ):
            raise SeriesError(f"SOP Instance UID {uid} occurs twice with different positions")
    notes = []
    if len(keep) < len(datasets):
        notes.append(
            f"{len(datasets) - len(keep)} repeated instance(s) (same SOP Instance UID) ignored"
        )
    return keep, notes


@dataclasses.dataclass(frozen=True, eq=False)
class SliceStack:
    """Planes of one series sorted along their shared slice normal.

    Attributes
    ----------
    planes : tuple of ImagePlane
        Sorted by ``normal . position``, then SOP Instance UID.
    order : tuple of int
        ``planes[k]`` is input item ``order[k]``.
    normal : numpy.ndarray, shape (3,)
    distances : numpy.ndarray, shape (n,)
        ``normal . position`` of each sorted plane, mm.
    """

    planes: tuple[ImagePlane, ...]
    order: tuple[int, ...]
    normal: FloatArray
    distances: FloatArray

    @property
    def first(self) -> ImagePlane:
        """The plane at the lowest position along the normal."""
        return self.planes[0]

    def nearest(self, point_mm: Sequence[float]) -> int:
        """Index (in sorted order) of the plane nearest to ``point_mm`` along the normal."""
        target = float(np.dot(self.normal, np.asarray(point_mm, dtype=np.float64)))
        return int(np.argmin(np.abs(self.distances - target)))

    def position_groups(self) -> list[list[int]]:
        """Sorted indices grouped by slice position (more than one: duplicates)."""
        groups: list[list[int]] = []
        for k, d in enumerate(self.distances):
            if groups and d - self.distances[groups[-1][-1]] < DUPLICATE_POSITION_TOL_MM:
                groups[-1].append(k)
            else:
                groups.append([k])
        return groups


def sort_slices(planes: Sequence[ImagePlane]) -> SliceStack:
    """Check that ``planes`` share one geometry and sort them along the normal.

    Raises
    ------
    SeriesError
        No planes; mixed image sizes, orientations, pixel spacings or Frame
        of Reference UIDs (see the module's policy table).
    """
    if not planes:
        raise SeriesError("series has no instances")
    sizes = Counter((p.rows, p.columns) for p in planes)
    if len(sizes) > 1:
        desc = ", ".join(f"{r}x{c} ({n} slices)" for (r, c), n in sorted(sizes.items()))
        raise SeriesError(f"mixed image sizes in one series: {desc}")
    by_uid = sorted(planes, key=lambda p: p.sop_instance_uid)
    ref = by_uid[0]
    for p in by_uid[1:]:
        if np.abs(p.orientation - ref.orientation).max() > ORIENTATION_TOL:
            raise SeriesError(
                f"mixed Image Orientation (Patient) values: {p.name} differs from {ref.name}"
            )
        if max(abs(a - b) for a, b in zip(p.pixel_spacing, ref.pixel_spacing, strict=True)) > (
            PIXEL_SPACING_TOL_MM
        ):
            raise SeriesError(f"mixed Pixel Spacing values: {p.name} differs from {ref.name}")
        if p.frame_of_reference_uid != ref.frame_of_reference_uid:
            raise SeriesError(
                f"mixed Frame of Reference UID values: {p.name} differs from {ref.name}"
            )
    normal = normal_vector(ref.orientation)
    dist = np.stack([p.position for p in planes]) @ normal
    order = sorted(range(len(planes)), key=lambda i: (dist[i], planes[i].sop_instance_uid))
    return SliceStack(
        planes=tuple(planes[i] for i in order),
        order=tuple(order),
        normal=normal,
        distances=dist[order],
    )


class _ImageLike(Protocol):
    """What :func:`index_to_lps` needs of an image (e.g. a ``SimpleITK.Image``)."""

    def GetOrigin(self) -> tuple[float, ...]: ...  # noqa: N802 - SimpleITK's names
    def GetSpacing(self) -> tuple[float, ...]: ...  # noqa: N802
    def GetDirection(self) -> tuple[float, ...]: ...  # noqa: N802


@dataclasses.dataclass(frozen=True, eq=False)
class VolumeGrid:
    """A regular voxel grid in LPS: what a SimpleITK image of the stack carries.

    Attributes
    ----------
    origin : numpy.ndarray, shape (3,)
        Image Position (Patient) of the first sorted slice.
    spacing : tuple of float
        ``(column spacing, row spacing, slice spacing)`` (x, y, z) in mm.
    direction : numpy.ndarray, shape (3, 3)
        Columns ``(r, c, n)``.
    """

    origin: FloatArray
    spacing: tuple[float, float, float]
    direction: FloatArray

    def index_to_lps(self, index_zyx: npt.ArrayLike) -> FloatArray:
        """Continuous ``(z, y, x)`` array indices to LPS mm, shape ``(..., 3)``."""
        idx = np.asarray(index_zyx, dtype=np.float64)[..., ::-1]
        scaled = idx * np.asarray(self.spacing, dtype=np.float64)
        return np.asarray(self.origin + scaled @ self.direction.T)

    def lps_to_index(self, points_mm: npt.ArrayLike) -> FloatArray:
        """Inverse of :meth:`index_to_lps`: LPS mm ``(..., 3)`` to continuous ``(z, y, x)``."""
        pts = np.asarray(points_mm, dtype=np.float64) - self.origin
        ijk = (pts @ self.direction) / np.asarray(self.spacing, dtype=np.float64)
        return np.asarray(ijk[..., ::-1])

    @classmethod
    def of_image(cls, image: _ImageLike) -> VolumeGrid:
        """The grid of an image with SimpleITK's ``GetOrigin``/``GetSpacing``/``GetDirection``."""
        sx, sy, sz = (float(v) for v in image.GetSpacing())
        return cls(
            origin=np.asarray(image.GetOrigin(), dtype=np.float64),
            spacing=(sx, sy, sz),
            direction=np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3),
        )


def regular_grid(stack: SliceStack, gantry_tilt: object = None) -> VolumeGrid:
    """The voxel grid of ``stack``, or :class:`SeriesError` when it is not regular.

    Parameters
    ----------
    stack : SliceStack
        From :func:`sort_slices`.
    gantry_tilt : object, optional
        Gantry/Detector Tilt (0018,1120) of the series, quoted in the message.

    Raises
    ------
    SeriesError
        A single slice, two slices at one position, missing slices, varying
        slice spacing or a sheared stack (module policy table).
    """
    n = len(stack.planes)
    if n < 2:
        raise SeriesError("single-slice series: a volume needs at least 2 slices")
    d_sorted = stack.distances
    gaps = np.diff(d_sorted)
    dup = np.nonzero(gaps < DUPLICATE_POSITION_TOL_MM)[0]
    if dup.size:
        a, b = stack.planes[dup[0]], stack.planes[dup[0] + 1]
        raise SeriesError(
            f"{dup.size} duplicate slice position(s), first at {d_sorted[dup[0]]:.3f} mm along "
            f"the normal: {a.name} and {b.name}"
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
    first, last = stack.planes[0], stack.planes[-1]
    along = last.position - first.position
    cos = float(np.clip(along @ stack.normal / np.linalg.norm(along), -1.0, 1.0))
    angle = float(np.degrees(np.arccos(cos)))
    if angle > TILT_TOL_DEG:
        raise SeriesError(
            f"sheared slice stack (gantry tilt): positions deviate {angle:.2f} degrees from "
            f"the slice normal (GantryDetectorTilt={gantry_tilt}); resample to an orthogonal "
            "grid first"
        )
    slice_spacing = float((d_sorted[-1] - d_sorted[0]) / (n - 1))
    dr, dc = first.pixel_spacing
    return VolumeGrid(
        origin=first.position,
        spacing=(float(dc), float(dr), slice_spacing),
        direction=np.stack([first.row_direction, first.column_direction, stack.normal], axis=1),
    )


def index_to_lps(image: _ImageLike, index_zyx: npt.ArrayLike) -> FloatArray:
    """Map continuous ``(z, y, x)`` array indices of ``image`` to LPS mm.

    Parameters
    ----------
    image : SimpleITK.Image
        Or anything with SimpleITK's geometry getters.
    index_zyx : array_like, shape (..., 3)

    Returns
    -------
    numpy.ndarray, shape (..., 3)
        ``(x, y, z)`` patient coordinates in mm.
    """
    return VolumeGrid.of_image(image).index_to_lps(index_zyx)


def lps_to_index(image: _ImageLike, points_mm: npt.ArrayLike) -> FloatArray:
    """Inverse of :func:`index_to_lps`: LPS mm ``(..., 3)`` to continuous ``(z, y, x)``."""
    return VolumeGrid.of_image(image).lps_to_index(points_mm)


def patient_orientation_letters(orientation: Sequence[float]) -> tuple[str, str]:
    """Patient Orientation (0020,0020) letters of a row and column direction.

    PS3.3 C.7.6.1.1.1: each direction is written with the letters of its
    dominant axes (L/R, P/A, H/F), strongest first, leaving out components
    below 0.25.
    """
    pos, neg = ("L", "P", "H"), ("R", "A", "F")

    def letters(v: Sequence[float]) -> str:
        order = sorted(range(3), key=lambda i: -abs(v[i]))
        return "".join((pos[i] if v[i] > 0 else neg[i]) for i in order if abs(v[i]) > 0.25) or "L"

    return letters(list(orientation[:3])), letters(list(orientation[3:]))
