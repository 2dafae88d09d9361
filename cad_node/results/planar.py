"""TID 1410 planar measurement groups on one referenced image, in the form viewers rehydrate.

Any pipeline that measures on a 2-D image (a CT key slice, a chest X-ray)
describes its finding with :class:`PlanarRegion` (the outline, box or point)
and :class:`LinearMeasurement` items (lengths with the polyline they were
measured along), and :func:`planar_group` turns them into a highdicom
``PlanarROIMeasurementsAndQualitativeEvaluations`` (PS3.16 TID 1410)::

    Measurement Group
    ├─ Tracking Identifier (TID 4108)        "Cornerstone3DTools@^0.1.0:Bidirectional:Nodule 1"
    ├─ Tracking Unique Identifier            same UID as the finding's other groups
    ├─ Finding, Finding Site, Algorithm
    ├─ Image Region (DCM 111030) SCOORD      the region, SELECTED FROM the image
    ├─ NUM Long Axis (mm)                    first NUM of the group
    │    └─ INFERRED FROM SCOORD POLYLINE    the 2 end points, SELECTED FROM the image
    ├─ NUM Short Axis (mm)
    │    └─ INFERRED FROM SCOORD POLYLINE
    └─ further NUMs (volume, certainty, ...) and qualitative evaluations

Why this shape (what OHIF 3.x reads; checked in the ``@ohif/app`` 3.13 build,
``@cornerstonejs/adapters`` ``MeasurementReport.generateToolState``):

* the SR display set merges the groups sharing a Tracking UID and places the
  finding on the image of the *first top-level SCOORD* of the merged content,
  so the planar group comes before a volumetric one and its region is a
  top-level "Image Region";
* a group becomes a tracked measurement (measurements panel) only when its
  Tracking Identifier names a Cornerstone tool
  (``Cornerstone3DTools@^0.1.0:<Tool>``, a prefix match) or, without one, when
  its first graphic is a rectangle (``RectangleROI``) or a point (``Probe``);
* the tool reads its geometry from the SCOORD *inside the first NUM* of the
  group (``getSpatialCoordinatesState``; "No spatial coordinates group found"
  otherwise), so the first NUM is a length with its POLYLINE child, and
  ``Bidirectional`` takes the "Long Axis"/"Short Axis" NUMs by code meaning,
  with the NUM values as its cached length and width.

The tool prefix is therefore part of the Tracking Identifier text, followed by
the human-readable identifier; the Tracking UID is what links the groups of a
finding.  TID 1400 / TID 300 leave the Concept Name of a NUM's SCOORD child
unspecified (PS3.3 C.17.3.2.1 makes it optional); it is "Image Region" here
because highdicom reads and writes only named content items.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Sequence

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from scipy.spatial import ConvexHull, QhullError

from cad_node.imaging.geometry import ImagePlane
from cad_node.imaging.radiograph import radiograph_geometry

__all__ = [
    "CORNERSTONE_3D_TAG",
    "LONG_AXIS",
    "SHORT_AXIS",
    "Bidirectional",
    "LinearMeasurement",
    "PlanarRegion",
    "PlanarTool",
    "bidirectional_axes",
    "key_frame",
    "planar_group",
    "tracking_text",
]

#: CID 7470 "Linear Measurements" concepts with PS3.16's code meanings: OHIF's
#: Bidirectional tool finds its NUMs by the exact meanings "Long Axis" and
#: "Short Axis" (pydicom's ``codes.SCT.LongAxis`` spells "Long axis").
LONG_AXIS = Code("103339001", "SCT", "Long Axis")
SHORT_AXIS = Code("103340004", "SCT", "Short Axis")
#: Prefix of Tracking Identifiers that Cornerstone3D's SR adapters map to a tool.
CORNERSTONE_3D_TAG = "Cornerstone3DTools@^0.1.0"
#: Lengths are reported to 0.01 mm (well inside the 0.05 mm polyline tolerance).
_DECIMALS = 2
#: Value Type (0040,A040) and Relationship Type (0040,A010) literals (PS3.3 C.17.3).
_SCOORD = "SCOORD"
_INFERRED_FROM = hd.sr.RelationshipTypeValues.INFERRED_FROM
#: Graphic types allowed for SCOORD (PS3.3 C.18.6.1.2); POLYGON is SCOORD3D only,
#: a closed polygon is a POLYLINE whose last point repeats the first.
_GRAPHIC_TYPES = frozenset(
    {
        hd.sr.GraphicTypeValues.POINT,
        hd.sr.GraphicTypeValues.MULTIPOINT,
        hd.sr.GraphicTypeValues.POLYLINE,
        hd.sr.GraphicTypeValues.CIRCLE,
        hd.sr.GraphicTypeValues.ELLIPSE,
    }
)


class PlanarTool(enum.Enum):
    """Cornerstone3D tool names whose SR adapters OHIF maps to measurements."""

    BIDIRECTIONAL = "Bidirectional"
    LENGTH = "Length"
    RECTANGLE_ROI = "RectangleROI"
    PROBE = "Probe"


def tracking_text(identifier: str, tool: PlanarTool | None) -> str:
    """Tracking Identifier text: ``<Cornerstone3D tag>:<tool>:<identifier>``, or as given."""
    if tool is None:
        return identifier
    return f"{CORNERSTONE_3D_TAG}:{tool.value}:{identifier}"


def _points(value: npt.ArrayLike, what: str) -> npt.NDArray[np.float32]:
    arr = np.asarray(value, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 1:
        raise ValueError(f"{what} needs (n, 2) image coordinates (column, row), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} has non-finite coordinates")
    return arr.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class PlanarRegion:
    """The finding's region on the referenced image (SCOORD, PS3.3 C.18.6).

    Parameters
    ----------
    graphic_type : highdicom.sr.GraphicTypeValues
        POINT, MULTIPOINT, POLYLINE (closed for an outline or box), CIRCLE or ELLIPSE.
    points : array_like, shape (n, 2)
        ``(column, row)`` image coordinates; (0, 0) is the top-left corner of
        the top-left pixel.
    """

    graphic_type: hd.sr.GraphicTypeValues
    points: npt.NDArray[np.float32]

    def __post_init__(self) -> None:
        if self.graphic_type not in _GRAPHIC_TYPES:
            raise ValueError(
                f"graphic type {self.graphic_type.value} is not allowed for SCOORD; "
                "use a closed POLYLINE for a polygon"
            )
        object.__setattr__(self, "points", _points(self.points, "PlanarRegion.points"))

    @classmethod
    def polygon(cls, vertices: npt.ArrayLike) -> PlanarRegion:
        """A closed POLYLINE through ``vertices`` (>= 3, not repeated)."""
        pts = _points(vertices, "polygon")
        if len(pts) < 3:
            raise ValueError("a polygon needs at least 3 vertices")
        return cls(hd.sr.GraphicTypeValues.POLYLINE, np.vstack([pts, pts[:1]]))

    @classmethod
    def box(cls, top_left: tuple[float, float], bottom_right: tuple[float, float]) -> PlanarRegion:
        """A rectangle as a closed 5-point POLYLINE (OHIF: ``RectangleROI``)."""
        (x0, y0), (x1, y1) = top_left, bottom_right
        if not (x1 > x0 and y1 > y0):
            raise ValueError("box corners must be (x0, y0) top-left and (x1, y1) bottom-right")
        return cls(
            hd.sr.GraphicTypeValues.POLYLINE,
            np.asarray([(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)], dtype=np.float32),
        )


@dataclasses.dataclass(frozen=True)
class LinearMeasurement:
    """A length NUM with the POLYLINE it was measured along (TID 1400).

    Parameters
    ----------
    name : pydicom.sr.coding.Code
        E.g. :data:`LONG_AXIS`, :data:`SHORT_AXIS`, ``codes.SCT.Length``.
    value_mm : float
        The length in mm; must agree with the polyline on the image's pixel
        spacing (the viewer measures the polyline again).
    points : array_like, shape (n >= 2, 2)
        ``(column, row)`` image coordinates.
    """

    name: Code
    value_mm: float
    points: npt.NDArray[np.float32]

    def __post_init__(self) -> None:
        if not (np.isfinite(self.value_mm) and self.value_mm > 0):
            raise ValueError(f"{self.name.meaning} must be a positive length, got {self.value_mm}")
        pts = _points(self.points, f"{self.name.meaning} polyline")
        if len(pts) < 2:
            raise ValueError(f"{self.name.meaning} polyline needs at least 2 points")
        object.__setattr__(self, "points", pts)


@dataclasses.dataclass(frozen=True)
class Bidirectional:
    """RECIST-style long and short axis on one image, and the outline they span."""

    long_axis: LinearMeasurement
    short_axis: LinearMeasurement
    outline: PlanarRegion


def _pixel_spacing(image: Dataset) -> tuple[float, float]:
    """``(row, column)`` spacing in mm from the one geometry of each kind of image.

    A cross-sectional image's from its plane (:class:`cad_node.imaging.geometry.ImagePlane`),
    a radiograph's from :func:`cad_node.imaging.radiograph.radiograph_geometry` (Pixel
    Spacing, else Imager Pixel Spacing corrected by the magnification factor).
    """
    plane = ImagePlane.from_dataset(image)
    spacing = plane.pixel_spacing if plane is not None else radiograph_geometry(image).spacing_mm
    if spacing is None:
        raise ValueError(f"image {image.SOPInstanceUID} has no Pixel Spacing for lengths in mm")
    return spacing


def polyline_length_mm(points: npt.ArrayLike, spacing_rc: tuple[float, float]) -> float:
    """Length (mm) of a polyline of ``(column, row)`` points on a grid of ``spacing_rc``."""
    pts = np.asarray(points, dtype=np.float64)
    steps = np.diff(pts, axis=0) * np.asarray([spacing_rc[1], spacing_rc[0]])
    return float(np.linalg.norm(steps, axis=1).sum())


def bidirectional_axes(
    slice_mask: npt.NDArray[np.bool_], spacing_rc: tuple[float, float]
) -> Bidirectional | None:
    """Long axis, longest perpendicular short axis and outline of a 2-D mask.

    The definition the CT nodule measurements use (Lung-RADS v2022): the long
    axis is the longest distance between pixel centres plus one pixel, the
    short axis the extent perpendicular to it plus one pixel.  Here the axes
    also get their end points: the long axis joins the two farthest pixel
    centres, extended by half a pixel at each end; the short axis crosses it
    at right angles, at the position along the long axis midway between the
    two pixels that bound the perpendicular extent.  The outline is the
    convex hull of the mask's pixel corners.

    Parameters
    ----------
    slice_mask : numpy.ndarray of bool, shape (rows, columns)
    spacing_rc : (float, float)
        Pixel Spacing (row spacing, column spacing) in mm.

    Returns
    -------
    Bidirectional or None
        None for an empty mask.
    """
    rows, cols = np.nonzero(slice_mask)
    if rows.size == 0:
        return None
    dr, dc = spacing_rc
    # pixel centres in mm, (x = column, y = row)
    pts = np.stack([(cols + 0.5) * dc, (rows + 0.5) * dr], axis=1)
    try:
        hull = pts[ConvexHull(pts).vertices] if len(pts) >= 3 else pts
    except QhullError:
        hull = pts
    d = np.linalg.norm(hull[:, None, :] - hull[None, :, :], axis=2)
    i, j = np.unravel_index(int(np.argmax(d)), d.shape)
    pix = float(np.mean(spacing_rc))
    if d[i, j] == 0:
        u = np.array([1.0, 0.0])
        a, b = hull[i] - u * pix / 2, hull[i] + u * pix / 2
    else:
        u = (hull[j] - hull[i]) / d[i, j]
        a, b = hull[i] - u * pix / 2, hull[j] + u * pix / 2
    v = np.array([-u[1], u[0]])
    proj_v = (pts - a) @ v
    lo, hi = int(np.argmin(proj_v)), int(np.argmax(proj_v))
    along = float(((pts[lo] - a) @ u + (pts[hi] - a) @ u) / 2.0)
    base = a + u * along
    c = base + v * (float(proj_v[lo]) - pix / 2)
    e = base + v * (float(proj_v[hi]) + pix / 2)
    long_mm = float(np.linalg.norm(b - a))
    short_mm = min(float(np.linalg.norm(e - c)), long_mm)
    if short_mm < float(np.linalg.norm(e - c)):  # perpendicular extent longer: clip to long
        mid = (c + e) / 2
        c, e = mid - v * short_mm / 2, mid + v * short_mm / 2
    scale = np.asarray([1.0 / dc, 1.0 / dr])
    corners = np.concatenate(
        [np.stack([cols + dx, rows + dy], axis=1) for dx in (0, 1) for dy in (0, 1)]
    ).astype(np.float64)
    try:
        outline = corners[ConvexHull(corners).vertices]
    except QhullError:  # pragma: no cover - corners of >= 1 pixel always span an area
        outline = corners
    return Bidirectional(
        long_axis=LinearMeasurement(
            LONG_AXIS, round(long_mm, _DECIMALS), np.stack([a, b]) * scale
        ),
        short_axis=LinearMeasurement(
            SHORT_AXIS, round(short_mm, _DECIMALS), np.stack([c, e]) * scale
        ),
        outline=PlanarRegion.polygon(outline),
    )


def key_frame(masks: npt.NDArray[np.bool_], spacing_rc: tuple[float, float]) -> int | None:
    """Index of the key slice of a stack of 2-D masks: the largest in-plane extent.

    Largest long axis (:func:`bidirectional_axes`), ties broken by the lower
    index: the slice the CT nodule measurements report their axes on.  None
    when every mask is empty.
    """
    best = 0.0
    best_k: int | None = None
    for k in range(masks.shape[0]):
        axes = bidirectional_axes(masks[k], spacing_rc)
        if axes is not None and axes.long_axis.value_mm > best:
            best, best_k = axes.long_axis.value_mm, k
    return best_k


def _scoord_child(
    points: npt.NDArray[np.float32], image: Dataset, frames: list[int] | None,
    graphic_type: hd.sr.GraphicTypeValues = hd.sr.GraphicTypeValues.POLYLINE,
) -> hd.sr.ScoordContentItem:
    """INFERRED FROM SCOORD "Image Region" SELECTED FROM ``image``."""
    item = hd.sr.ScoordContentItem(
        name=codes.DCM.ImageRegion,
        graphic_type=graphic_type,
        graphic_data=points,
        relationship_type=_INFERRED_FROM,
    )
    item.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.SourceImageForRegion.from_source_image(image, frames)]
    )
    return item


def planar_group(
    *,
    identifier: str,
    tracking_uid: str,
    image: Dataset,
    region: PlanarRegion,
    finding_type: Code,
    lengths: Sequence[LinearMeasurement] = (),
    measurements: Sequence[hd.sr.Measurement] = (),
    qualitative_evaluations: Sequence[hd.sr.QualitativeEvaluation] = (),
    algorithm: hd.sr.AlgorithmIdentification | None = None,
    finding_sites: Sequence[hd.sr.FindingSite] = (),
    frame_number: int | None = None,
    tool: PlanarTool | None = None,
    length_tolerance_mm: float = 0.05,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """A TID 1410 group: region and lengths (with their polylines) on one image.

    Parameters
    ----------
    identifier : str
        Human-readable Tracking Identifier, e.g. ``"Nodule 1"``.
    tracking_uid : str
        Tracking Unique Identifier shared with the finding's other groups.
    image : pydicom.Dataset
        The referenced image (SOP Class/Instance UID, Pixel Spacing).
    region : PlanarRegion
        The finding's region, written as the top-level "Image Region".
    finding_type : pydicom.sr.coding.Code
    lengths : sequence of LinearMeasurement
        Lengths, each a NUM with its POLYLINE child, first in the group (the
        first is the one OHIF's tools read).  Without lengths, a box or point
        region (``RECTANGLE_ROI``/``PROBE``) is also put inside the first NUM
        of ``measurements``, for the same reason.
    measurements : sequence of highdicom.sr.Measurement
        Further NUMs (area, volume, probabilities), after the lengths.
    qualitative_evaluations : sequence of highdicom.sr.QualitativeEvaluation
    algorithm : highdicom.sr.AlgorithmIdentification, optional
        Added to the group and to every length NUM (TID 4019).
    finding_sites : sequence of highdicom.sr.FindingSite
    frame_number : int, optional
        1-based frame of a multi-frame image.
    tool : PlanarTool, optional
        The viewer tool to rehydrate as; default ``BIDIRECTIONAL`` for a
        "Long Axis" + "Short Axis" pair, ``LENGTH`` for one length,
        ``RECTANGLE_ROI``/``PROBE`` for a 5-point box or a point without
        lengths, else none (plain identifier).
    length_tolerance_mm : float
        Largest allowed difference between a length value and its polyline.

    Raises
    ------
    ValueError
        A length that disagrees with its polyline, points outside the image,
        a bidirectional tool without both axes, an image without Pixel Spacing.
    """
    frames = [frame_number] if frame_number is not None else None
    rows, cols = int(image.Rows), int(image.Columns)
    spacing = _pixel_spacing(image) if lengths else (1.0, 1.0)
    for pts, what in [(region.points, "region"), *[(m.points, m.name.meaning) for m in lengths]]:
        if (pts[:, 0] < 0).any() or (pts[:, 1] < 0).any() or (pts[:, 0] > cols).any() or (
            pts[:, 1] > rows
        ).any():
            raise ValueError(f"{identifier}: {what} lies outside the {cols}x{rows} image")
    for m in lengths:
        measured = polyline_length_mm(m.points, spacing)
        if abs(measured - m.value_mm) > length_tolerance_mm:
            raise ValueError(
                f"{identifier}: {m.name.meaning} {m.value_mm:.3f} mm disagrees with its "
                f"polyline ({measured:.3f} mm on Pixel Spacing {spacing})"
            )
    meanings = [m.name.meaning for m in lengths]
    if tool is None:
        if {LONG_AXIS.meaning, SHORT_AXIS.meaning} <= set(meanings):
            tool = PlanarTool.BIDIRECTIONAL
        elif len(lengths) == 1:
            tool = PlanarTool.LENGTH
        elif not lengths and region.graphic_type is hd.sr.GraphicTypeValues.POINT:
            tool = PlanarTool.PROBE
        elif not lengths and len(region.points) == 5:
            tool = PlanarTool.RECTANGLE_ROI
    if tool is PlanarTool.BIDIRECTIONAL and meanings[:2] != [
        LONG_AXIS.meaning,
        SHORT_AXIS.meaning,
    ]:
        raise ValueError(f"{identifier}: a bidirectional group starts with Long Axis, Short Axis")
    numeric: list[hd.sr.Measurement] = [
        hd.sr.Measurement(
            name=m.name, value=float(m.value_mm), unit=codes.UCUM.Millimeter, algorithm_id=algorithm
        )
        for m in lengths
    ]
    numeric.extend(measurements)
    image_region = hd.sr.ImageRegion(
        graphic_type=region.graphic_type,
        graphic_data=region.points,
        source_image=hd.sr.SourceImageForRegion.from_source_image(image, frames),
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=tracking_uid, identifier=tracking_text(identifier, tool)
        ),
        referenced_region=image_region,
        finding_type=finding_type,
        algorithm_id=algorithm,
        finding_sites=list(finding_sites) or None,
        measurements=numeric or None,
        qualitative_evaluations=list(qualitative_evaluations) or None,
    )
    # The polylines go in after construction: highdicom's writer refuses
    # coordinates inside the NUMs of a TID 1410 group (TID 1419 inherits them
    # from the group's region), but OHIF's tools read them only from there.
    children = [(num, m.points, hd.sr.GraphicTypeValues.POLYLINE)
                for num, m in zip(numeric, lengths, strict=False)]
    if not lengths and numeric and tool in (PlanarTool.RECTANGLE_ROI, PlanarTool.PROBE):
        # the tool takes its graphic from the first NUM: the region it was measured in
        children.append((numeric[0], region.points, region.graphic_type))
    for num, points, graphic_type in children:
        item = num[0]  # highdicom templates are lists of content items
        if "ContentSequence" not in item:
            item.ContentSequence = hd.sr.ContentSequence([])
        item.ContentSequence.append(_scoord_child(points, image, frames, graphic_type))
    return group
