# mypy: disallow-untyped-calls=False
"""LIDC-IDRI reader annotations: XML parsing, per-reader masks, clustering, LUNA16 consensus.

The LIDC XML (``LidcReadMessage``, namespace ``http://www.nih.gov``) holds one
``readingSession`` per radiologist.  Each session lists

* ``unblindedReadNodule`` marks of nodules >= 3 mm, with a contour (``roi`` /
  ``edgeMap``) on every slice and subjective ``characteristics`` (malignancy,
  texture, spiculation ...);
* ``unblindedReadNodule`` marks of nodules < 3 mm, with a single ``edgeMap``
  point (their approximate centre) per ROI and no characteristics;
* ``nonNodule`` marks (a ``locus`` point) of findings the reader judged not to
  be nodules.

Edge-map convention
-------------------
ROIs are mapped to slices by ``imageSOP_UID``; :func:`remap_rois_by_z` maps
those whose UID is not in the series by ``imageZposition`` instead.

LIDC readers drew each outline *just outside* the nodule, so the contour pixels
themselves are not part of the nodule.  :func:`rasterize_nodule` follows that
convention (the same one ``pylidc.Annotation.boolean_mask`` uses by default,
``include_contour_points=False``): the polygon through the edge-map points is
filled with :func:`skimage.draw.polygon` and the edge-map pixels are then
removed.  Exclusion ROIs (``inclusion`` FALSE, holes) are filled the same way
and subtracted, including their own contour pixels.  Degenerate ROIs (fewer
than three points, i.e. the single point of a < 3 mm nodule) rasterise to the
marked pixels themselves.

Consensus (LUNA16)
------------------
:func:`cluster_nodules` groups the >= 3 mm marks of different readers that
describe the same lesion.  A cluster's centre is the mean of its members'
centroids (each the centroid of the member's filled mask in LPS mm), and its
diameter the mean of the members' *equivalent-sphere* diameters: the diameter
of the sphere whose volume is the member's filled voxel count times the voxel
volume (pixel area x slice spacing).  On LIDC-IDRI-0001 this gives 23.1 mm for
the main nodule against 23.35 mm in the LUNA16 annotations, whereas the
greatest axial contour diameter (``pylidc.Annotation.diameter``, available
here as :func:`nodule_max_axial_diameter_mm`) gives 32.8 mm; LUNA16's
diameters therefore behave like volume-equivalent diameters.  LUNA16 counts a cluster as a reference
nodule when at least 3 readers marked it and its diameter is >= 3 mm; every
other mark (smaller or less agreed clusters, < 3 mm nodules, non-nodules) is an
"irrelevant finding" that counts as neither a hit nor a false positive
(:func:`luna16_consensus`).
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from skimage.draw import polygon as draw_polygon

__all__ = [
    "AXIAL_ORIENTATION",
    "LIDC_NAMESPACE",
    "LUNA16_MIN_DIAMETER_MM",
    "LUNA16_MIN_READERS",
    "ConsensusFinding",
    "LidcAnnotation",
    "LidcNodule",
    "LidcNonNodule",
    "LidcNotCtReadingError",
    "LidcParseError",
    "LidcReadingSession",
    "LidcRoi",
    "LidcSeriesMismatchError",
    "NoduleCluster",
    "SeriesHeaders",
    "check_axial_orientation",
    "cluster_nodules",
    "equivalent_sphere_diameter_mm",
    "find_lidc_xml",
    "luna16_consensus",
    "nodule_centroid_mm",
    "nodule_equivalent_diameter_mm",
    "nodule_max_axial_diameter_mm",
    "parse_lidc_xml",
    "rasterize_nodule",
    "read_series_headers",
    "remap_rois_by_z",
    "slice_spacing_mm",
]

#: XML namespace of LIDC ``LidcReadMessage`` documents.
LIDC_NAMESPACE = "http://www.nih.gov"
#: LUNA16 reference standard: nodules >= 3 mm ...
LUNA16_MIN_DIAMETER_MM = 3.0
#: ... accepted by at least 3 of the 4 readers.
LUNA16_MIN_READERS = 3

_NS = {"l": LIDC_NAMESPACE}


class LidcParseError(ValueError):
    """An LIDC XML file is unreadable or malformed (the message names the file)."""


class LidcNotCtReadingError(LidcParseError):
    """A well-formed LIDC XML that is not a CT reading (a radiograph's ``IdriReadMessage``)."""


class LidcSeriesMismatchError(ValueError):
    """An LIDC XML file annotates a different series than the one expected."""


@dataclass(frozen=True)
class LidcRoi:
    """One reader's outline of a nodule on one slice.

    Attributes
    ----------
    sop_instance_uid : str
        SOP Instance UID of the annotated slice (``imageSOP_UID``).
    z_position : float
        ``imageZposition`` in mm (the slice's ImagePositionPatient z).
    inclusion : bool
        True for an outline of nodule tissue, False for a hole to exclude.
    edge_map : tuple of (int, int)
        Contour pixels as ``(x=column, y=row)``.
    """

    sop_instance_uid: str
    z_position: float
    inclusion: bool
    edge_map: tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class LidcNodule:
    """One reader's mark of one nodule (``unblindedReadNodule``).

    Attributes
    ----------
    reader_index : int
        Index of the reading session (0-based) the mark belongs to.
    nodule_id : str
        The reader's ``noduleID``.
    rois : tuple of LidcRoi
        Outlines, one or more per slice.
    characteristics : dict of str to int
        Subjective ratings (``malignancy``, ``texture``, ``spiculation`` ...);
        empty for < 3 mm nodules.
    """

    reader_index: int
    nodule_id: str
    rois: tuple[LidcRoi, ...]
    characteristics: dict[str, int] = field(default_factory=dict, hash=False, compare=False)

    @property
    def is_small(self) -> bool:
        """True for a < 3 mm mark (no characteristics, single-point ROIs)."""
        return not self.characteristics and all(len(r.edge_map) <= 1 for r in self.rois)

    @property
    def sop_instance_uids(self) -> frozenset[str]:
        """SOP Instance UIDs of all slices this mark touches."""
        return frozenset(r.sop_instance_uid for r in self.rois)


@dataclass(frozen=True)
class LidcNonNodule:
    """A reader's ``nonNodule`` mark: a point judged not to be a nodule."""

    reader_index: int
    non_nodule_id: str
    sop_instance_uid: str
    z_position: float
    locus: tuple[int, int]  # (x=column, y=row)


@dataclass(frozen=True)
class LidcReadingSession:
    """One radiologist's reading (``readingSession``)."""

    index: int
    servicing_radiologist_id: str | None
    nodules: tuple[LidcNodule, ...]
    small_nodules: tuple[LidcNodule, ...]
    non_nodules: tuple[LidcNonNodule, ...]


@dataclass(frozen=True)
class LidcAnnotation:
    """A parsed LIDC XML file."""

    path: Path
    series_instance_uid: str
    study_instance_uid: str | None
    sessions: tuple[LidcReadingSession, ...]

    @property
    def nodules(self) -> tuple[LidcNodule, ...]:
        """All >= 3 mm marks of all readers."""
        return tuple(n for s in self.sessions for n in s.nodules)

    def check_series(self, series_instance_uid: str) -> None:
        """Raise :class:`LidcSeriesMismatchError` unless this XML annotates the series."""
        if self.series_instance_uid != series_instance_uid:
            raise LidcSeriesMismatchError(
                f"{self.path}: LIDC XML annotates series {self.series_instance_uid}, "
                f"not {series_instance_uid}"
            )


@dataclass(frozen=True)
class NoduleCluster:
    """Marks of different readers describing the same nodule.

    Attributes
    ----------
    members : tuple of LidcNodule
        At most one mark per reader.
    n_readers : int
        Number of distinct readers among the members.
    center_mm : tuple of float
        Mean of the members' mask centroids, LPS mm (x, y, z).
    diameter_mm : float
        Mean of the members' equivalent-sphere diameters, mm.
    """

    members: tuple[LidcNodule, ...]
    n_readers: int
    center_mm: tuple[float, float, float]
    diameter_mm: float


@dataclass(frozen=True)
class ConsensusFinding:
    """A LUNA16 reference nodule or irrelevant finding (LPS mm)."""

    center_mm: tuple[float, float, float]
    diameter_mm: float
    n_readers: int
    kind: str  # "nodule" | "irrelevant"
    source: str  # "cluster" | "small-nodule" | "non-nodule"


# --------------------------------------------------------------------------- parsing


def _text(elem: ET.Element | None) -> str | None:
    if elem is None or elem.text is None:
        return None
    value = elem.text.strip()
    return value or None


def _required(elem: ET.Element, tag: str, path: Path, what: str) -> str:
    value = _text(elem.find(f"l:{tag}", _NS))
    if value is None:
        raise LidcParseError(f"{path}: {what} has no <{tag}>")
    return value


def _float(value: str, path: Path, what: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise LidcParseError(f"{path}: {what}: {value!r} is not a number") from None


def _int(value: str, path: Path, what: str) -> int:
    try:
        return int(value)
    except ValueError:
        try:
            f = float(value)
        except ValueError:
            raise LidcParseError(f"{path}: {what}: {value!r} is not an integer") from None
        if not f.is_integer():
            raise LidcParseError(f"{path}: {what}: {value!r} is not an integer") from None
        return int(f)


def _point(elem: ET.Element, path: Path, what: str) -> tuple[int, int]:
    x = _int(_required(elem, "xCoord", path, what), path, what)
    y = _int(_required(elem, "yCoord", path, what), path, what)
    return (x, y)


def _parse_roi(elem: ET.Element, path: Path, what: str) -> LidcRoi:
    sop = _required(elem, "imageSOP_UID", path, what)
    z = _float(_required(elem, "imageZposition", path, what), path, what)
    inclusion_text = (_text(elem.find("l:inclusion", _NS)) or "TRUE").upper()
    if inclusion_text not in {"TRUE", "FALSE"}:
        raise LidcParseError(f"{path}: {what}: <inclusion> is {inclusion_text!r}")
    points = tuple(_point(e, path, what) for e in elem.findall("l:edgeMap", _NS))
    if not points:
        raise LidcParseError(f"{path}: {what} has no <edgeMap> points")
    return LidcRoi(sop, z, inclusion_text == "TRUE", points)


def _parse_nodule(elem: ET.Element, reader: int, path: Path) -> LidcNodule:
    nodule_id = _required(elem, "noduleID", path, f"reading session {reader} nodule")
    what = f"reading session {reader} nodule {nodule_id!r}"
    characteristics: dict[str, int] = {}
    chars = elem.find("l:characteristics", _NS)
    if chars is not None:
        for child in chars:
            value = _text(child)
            if value is None:
                continue
            name = child.tag.split("}", 1)[-1]
            characteristics[name] = _int(value, path, f"{what} <{name}>")
    rois = tuple(_parse_roi(r, path, what) for r in elem.findall("l:roi", _NS))
    if not rois:
        raise LidcParseError(f"{path}: {what} has no <roi>")
    return LidcNodule(reader, nodule_id, rois, characteristics)


def _parse_non_nodule(elem: ET.Element, reader: int, path: Path) -> LidcNonNodule:
    nid = _text(elem.find("l:nonNoduleID", _NS)) or ""
    what = f"reading session {reader} non-nodule {nid!r}"
    sop = _required(elem, "imageSOP_UID", path, what)
    z = _float(_required(elem, "imageZposition", path, what), path, what)
    locus = elem.find("l:locus", _NS)
    if locus is None:
        raise LidcParseError(f"{path}: {what} has no <locus>")
    return LidcNonNodule(reader, nid, sop, z, _point(locus, path, what))


def parse_lidc_xml(path: str | Path, *, series_instance_uid: str | None = None) -> LidcAnnotation:
    """Parse an LIDC ``LidcReadMessage`` XML file.

    Parameters
    ----------
    path : str or Path
        The XML file (e.g. ``069.xml`` beside the series' DICOM files).
    series_instance_uid : str, optional
        When given, the XML must annotate this series.

    Returns
    -------
    LidcAnnotation

    Raises
    ------
    LidcParseError
        The file is not well-formed XML or not an LIDC read message; the
        message names the file.
    LidcSeriesMismatchError
        ``series_instance_uid`` is given and differs from the XML's.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise LidcParseError(f"{path}: not well-formed LIDC XML ({exc})") from exc
    except OSError as exc:
        raise LidcParseError(f"{path}: cannot read LIDC XML ({exc})") from exc
    if root.tag.rsplit("}", 1)[-1] == "IdriReadMessage":
        raise LidcNotCtReadingError(
            f"{path}: IdriReadMessage (chest radiograph reading), not a CT LidcReadMessage"
        )
    if root.tag != f"{{{LIDC_NAMESPACE}}}LidcReadMessage":
        raise LidcParseError(
            f"{path}: root element is {root.tag!r}, expected LidcReadMessage in {LIDC_NAMESPACE}"
        )
    header = root.find("l:ResponseHeader", _NS)
    if header is None:
        raise LidcParseError(f"{path}: no <ResponseHeader>")
    series = _text(header.find("l:SeriesInstanceUid", _NS))
    if series is None:
        raise LidcParseError(f"{path}: <ResponseHeader> has no <SeriesInstanceUid>")
    study = _text(header.find("l:StudyInstanceUID", _NS))
    sessions: list[LidcReadingSession] = []
    for index, sess in enumerate(root.findall("l:readingSession", _NS)):
        marks = [_parse_nodule(n, index, path) for n in sess.findall("l:unblindedReadNodule", _NS)]
        sessions.append(
            LidcReadingSession(
                index=index,
                servicing_radiologist_id=_text(sess.find("l:servicingRadiologistID", _NS)),
                nodules=tuple(m for m in marks if not m.is_small),
                small_nodules=tuple(m for m in marks if m.is_small),
                non_nodules=tuple(
                    _parse_non_nodule(n, index, path) for n in sess.findall("l:nonNodule", _NS)
                ),
            )
        )
    annotation = LidcAnnotation(path, series, study, tuple(sessions))
    if series_instance_uid is not None:
        annotation.check_series(series_instance_uid)
    return annotation


def find_lidc_xml(series_dir: Path, series_instance_uid: str) -> Path | None:
    """Return the LIDC XML file in ``series_dir`` annotating ``series_instance_uid``.

    XML files that are not LIDC read messages or that annotate another series
    are skipped; ``None`` when there is none.
    """
    for candidate in sorted(series_dir.glob("*.xml")):
        try:
            parse_lidc_xml(candidate, series_instance_uid=series_instance_uid)
        except (LidcParseError, LidcSeriesMismatchError):
            continue
        return candidate
    return None


@dataclass(frozen=True)
class SeriesHeaders:
    """Geometry of a CT series read from its DICOM headers (no pixel data).

    Attributes
    ----------
    series_instance_uid, study_instance_uid : str
    files_by_sop_uid : dict of str to Path
    positions_by_sop_uid : dict of str to (float, float, float)
        ImagePositionPatient (LPS mm) of each slice.
    pixel_spacing : (float, float)
        PixelSpacing (row spacing, column spacing), mm.
    rows, cols : int
    """

    series_instance_uid: str
    study_instance_uid: str
    files_by_sop_uid: dict[str, Path]
    positions_by_sop_uid: dict[str, tuple[float, float, float]]
    pixel_spacing: tuple[float, float]
    rows: int
    cols: int


#: ImageOrientationPatient of the axial LIDC-IDRI CTs (PS3.3 C.7.6.2.1.1): rows
#: along +x (patient left), columns along +y (posterior).  The pixel -> LPS
#: mapping of this module (:func:`_pixel_to_lps`) assumes it.
AXIAL_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
#: Largest per-component deviation from :data:`AXIAL_ORIENTATION` accepted.
ORIENTATION_TOL = 1e-3


def check_axial_orientation(iop: Iterable[object] | None, where: object) -> None:
    """Raise ValueError naming ``where`` unless ``iop`` is :data:`AXIAL_ORIENTATION`.

    Edge-map pixels are mapped to patient coordinates as ``IPP + (x * column
    spacing, y * row spacing, 0)``, which is right only for this orientation;
    any other series would give silently wrong centres.
    """
    try:
        values = [float(v) for v in iop] if iop is not None else []  # type: ignore[arg-type]
    except (TypeError, ValueError):
        values = []
    if len(values) != len(AXIAL_ORIENTATION) or any(
        abs(a - b) > ORIENTATION_TOL for a, b in zip(values, AXIAL_ORIENTATION, strict=True)
    ):
        raise ValueError(
            f"{where}: ImageOrientationPatient {values or iop} is not the axial "
            f"{list(AXIAL_ORIENTATION)} that LIDC annotations are mapped with"
        )


def read_series_headers(series_dir: Path) -> SeriesHeaders:
    """Read the headers of every ``*.dcm`` in ``series_dir`` (``stop_before_pixels``).

    Raises
    ------
    ValueError
        No DICOM files, several series in the folder, or a header without
        geometry; the message names the folder or file.
    """
    import pydicom  # local: keep ``import trainer.lidc`` light

    files = sorted(series_dir.glob("*.dcm"))
    if not files:
        raise ValueError(f"{series_dir}: no *.dcm files")
    by_sop: dict[str, Path] = {}
    positions: dict[str, tuple[float, float, float]] = {}
    series: set[str] = set()
    study = ""
    spacing: tuple[float, float] | None = None
    rows = cols = 0
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            sop = str(ds.SOPInstanceUID)
            check_axial_orientation(ds.get("ImageOrientationPatient"), f)
            ipp = ds.ImagePositionPatient
            positions[sop] = (float(ipp[0]), float(ipp[1]), float(ipp[2]))
            if spacing is None:
                spacing = (float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1]))
                rows, cols = int(ds.Rows), int(ds.Columns)
                study = str(ds.StudyInstanceUID)
            series.add(str(ds.SeriesInstanceUID))
        except ValueError as exc:
            if str(f) in str(exc):
                raise
            raise ValueError(f"{f}: unreadable CT header ({exc})") from exc
        except Exception as exc:  # pydicom raises many types on bad files
            raise ValueError(f"{f}: unreadable CT header ({exc})") from exc
        by_sop[sop] = f
    if len(series) != 1:
        raise ValueError(f"{series_dir}: {len(series)} series in one folder")
    assert spacing is not None
    return SeriesHeaders(series.pop(), study, by_sop, positions, spacing, rows, cols)


#: Largest |imageZposition - slice z| (mm) for mapping an ROI to a slice by position.
Z_MATCH_TOL_MM = 0.01


def remap_rois_by_z(
    annotation: LidcAnnotation,
    positions_by_sop_uid: Mapping[str, tuple[float, float, float]],
    *,
    tol_mm: float = Z_MATCH_TOL_MM,
) -> tuple[LidcAnnotation, int]:
    """Map ROIs whose SOP Instance UID is not in the series to a slice by z position.

    ROIs are matched by ``imageSOP_UID`` first.  An ROI whose UID is unknown
    is moved to the one slice whose ImagePositionPatient z lies within
    ``tol_mm`` of its ``imageZposition``; with no such slice (or several) it
    is left unchanged and later ignored.

    Returns
    -------
    annotation : LidcAnnotation
        A copy with remapped ROIs (the same object when nothing changed).
    n_remapped : int
    """
    zs = [(p[2], uid) for uid, p in positions_by_sop_uid.items()]
    count = 0

    def fix(roi: LidcRoi) -> LidcRoi:
        nonlocal count
        if roi.sop_instance_uid in positions_by_sop_uid:
            return roi
        near = [uid for z, uid in zs if abs(z - roi.z_position) <= tol_mm]
        if len(near) != 1:
            return roi
        count += 1
        return LidcRoi(near[0], roi.z_position, roi.inclusion, roi.edge_map)

    def fix_nodule(n: LidcNodule) -> LidcNodule:
        return LidcNodule(n.reader_index, n.nodule_id, tuple(fix(r) for r in n.rois),
                          n.characteristics)

    def fix_non(n: LidcNonNodule) -> LidcNonNodule:
        if n.sop_instance_uid in positions_by_sop_uid:
            return n
        near = [uid for z, uid in zs if abs(z - n.z_position) <= tol_mm]
        if len(near) != 1:
            return n
        nonlocal count
        count += 1
        return LidcNonNodule(n.reader_index, n.non_nodule_id, near[0], n.z_position, n.locus)

    sessions = tuple(
        LidcReadingSession(
            s.index, s.servicing_radiologist_id,
            tuple(fix_nodule(n) for n in s.nodules),
            tuple(fix_nodule(n) for n in s.small_nodules),
            tuple(fix_non(n) for n in s.non_nodules),
        )
        for s in annotation.sessions
    )
    if count == 0:
        return annotation, 0
    return LidcAnnotation(annotation.path, annotation.series_instance_uid,
                          annotation.study_instance_uid, sessions), count


# --------------------------------------------------------------------------- masks


def _fill_roi(roi: LidcRoi, rows: int, cols: int) -> np.ndarray:
    mask = np.zeros((rows, cols), dtype=bool)
    pts = np.asarray(roi.edge_map, dtype=np.int64)
    xs, ys = pts[:, 0], pts[:, 1]
    inside = (xs >= 0) & (xs < cols) & (ys >= 0) & (ys < rows)
    if len(pts) < 3:
        mask[ys[inside], xs[inside]] = True
        return mask
    rr, cc = draw_polygon(ys, xs, shape=(rows, cols))
    mask[rr, cc] = True
    # LIDC outlines lie just outside the nodule: drop the contour pixels.
    mask[ys[inside], xs[inside]] = False
    return mask


def rasterize_nodule(nodule: LidcNodule, rows: int, cols: int) -> dict[str, np.ndarray]:
    """Rasterise a reader's mark into per-slice 2-D masks.

    Parameters
    ----------
    nodule : LidcNodule
    rows, cols : int
        Image matrix size (DICOM Rows, Columns).

    Returns
    -------
    dict of str to ndarray
        SOP Instance UID -> ``(rows, cols)`` bool mask: the union of the filled
        inclusion ROIs minus the filled exclusion ROIs of that slice (see the
        module docstring for the edge-map convention).
    """
    masks: dict[str, np.ndarray] = {}
    for roi in nodule.rois:
        if roi.inclusion:
            filled = _fill_roi(roi, rows, cols)
            if roi.sop_instance_uid in masks:
                masks[roi.sop_instance_uid] |= filled
            else:
                masks[roi.sop_instance_uid] = filled
    for roi in nodule.rois:
        if not roi.inclusion and roi.sop_instance_uid in masks:
            hole = _fill_roi(roi, rows, cols)
            pts = np.asarray(roi.edge_map, dtype=np.int64)
            ok = (pts[:, 0] >= 0) & (pts[:, 0] < cols) & (pts[:, 1] >= 0) & (pts[:, 1] < rows)
            hole[pts[ok, 1], pts[ok, 0]] = True
            masks[roi.sop_instance_uid] &= ~hole
    return masks


# --------------------------------------------------------------------------- geometry


def _pixel_to_lps(
    x: np.ndarray, y: np.ndarray, position: tuple[float, float, float], spacing: tuple[float, float]
) -> np.ndarray:
    """Axial slices (:data:`AXIAL_ORIENTATION`, checked by :func:`check_axial_orientation`):
    column -> +x, row -> +y."""
    row_spacing, col_spacing = spacing
    return np.stack(
        [
            position[0] + x * col_spacing,
            position[1] + y * row_spacing,
            np.full(x.shape, position[2], dtype=float),
        ],
        axis=1,
    )


def nodule_centroid_mm(
    nodule: LidcNodule,
    positions_by_sop_uid: Mapping[str, tuple[float, float, float]],
    pixel_spacing: tuple[float, float],
    *,
    rows: int = 512,
    cols: int = 512,
) -> tuple[float, float, float] | None:
    """Centroid (LPS mm) of a mark's filled mask, or ``None`` if no slice is in the series.

    ROIs whose SOP Instance UID is not in ``positions_by_sop_uid`` are ignored.
    Marks whose filled mask is empty (tiny outlines) fall back to the mean of
    their edge-map points.
    """
    pts: list[np.ndarray] = []
    for sop, mask in rasterize_nodule(nodule, rows, cols).items():
        if sop not in positions_by_sop_uid:
            continue
        ys, xs = np.nonzero(mask)
        if len(xs):
            pts.append(_pixel_to_lps(xs.astype(float), ys.astype(float), positions_by_sop_uid[sop],
                                     pixel_spacing))
    if not pts:
        for roi in nodule.rois:
            if roi.sop_instance_uid in positions_by_sop_uid and roi.inclusion:
                e = np.asarray(roi.edge_map, dtype=float)
                pts.append(_pixel_to_lps(e[:, 0], e[:, 1],
                                         positions_by_sop_uid[roi.sop_instance_uid],
                                         pixel_spacing))
    if not pts:
        return None
    c = np.concatenate(pts).mean(axis=0)
    return (float(c[0]), float(c[1]), float(c[2]))


def slice_spacing_mm(positions_by_sop_uid: Mapping[str, tuple[float, float, float]]) -> float:
    """Median distance (mm) between consecutive slice positions (1.0 for one slice)."""
    zs = np.unique(np.round([p[2] for p in positions_by_sop_uid.values()], 4))
    if len(zs) < 2:
        return 1.0
    return float(np.median(np.diff(zs)))


def nodule_equivalent_diameter_mm(
    nodule: LidcNodule,
    positions_by_sop_uid: Mapping[str, tuple[float, float, float]],
    pixel_spacing: tuple[float, float],
    *,
    rows: int = 512,
    cols: int = 512,
) -> float:
    """Equivalent-sphere diameter (mm) of a mark's filled mask within the series."""
    count = sum(
        int(m.sum())
        for sop, m in rasterize_nodule(nodule, rows, cols).items()
        if sop in positions_by_sop_uid
    )
    voxel = pixel_spacing[0] * pixel_spacing[1] * slice_spacing_mm(positions_by_sop_uid)
    return equivalent_sphere_diameter_mm(count, voxel)


def nodule_max_axial_diameter_mm(nodule: LidcNodule, pixel_spacing: tuple[float, float]) -> float:
    """Greatest distance (mm) between two edge-map points of one inclusion contour."""
    row_spacing, col_spacing = pixel_spacing
    best = 0.0
    for roi in nodule.rois:
        if not roi.inclusion or len(roi.edge_map) < 2:
            continue
        e = np.asarray(roi.edge_map, dtype=float)
        xy = np.stack([e[:, 0] * col_spacing, e[:, 1] * row_spacing], axis=1)
        d = np.sqrt(((xy[:, None, :] - xy[None, :, :]) ** 2).sum(-1))
        best = max(best, float(d.max()))
    return best


# --------------------------------------------------------------------------- clustering


@dataclass
class _Member:
    nodule: LidcNodule
    center: np.ndarray
    diameter: float


def cluster_nodules(
    annotation: LidcAnnotation,
    positions_by_sop_uid: Mapping[str, tuple[float, float, float]],
    pixel_spacing: tuple[float, float],
    *,
    rows: int = 512,
    cols: int = 512,
) -> list[NoduleCluster]:
    """Group the readers' >= 3 mm marks that describe the same nodule.

    Agglomerative, closest pairs first: two groups merge when the distance
    between a pair of their members' centroids is below the larger of the
    two members' equivalent-sphere radii (at least 3 mm) and the merged group still holds at
    most one mark per reader.

    Parameters
    ----------
    annotation : LidcAnnotation
    positions_by_sop_uid : mapping
        SOP Instance UID -> ImagePositionPatient (LPS mm) of each slice of
        the series.  Marks none of whose ROIs are in the series are dropped.
    pixel_spacing : (float, float)
        DICOM PixelSpacing (row spacing, column spacing), mm.
    rows, cols : int
        Image matrix size.

    Returns
    -------
    list of NoduleCluster
        Sorted by descending number of readers, then by position.
    """
    members: list[_Member] = []
    for nodule in annotation.nodules:
        c = nodule_centroid_mm(nodule, positions_by_sop_uid, pixel_spacing, rows=rows, cols=cols)
        if c is None:
            continue
        members.append(_Member(nodule, np.asarray(c), nodule_equivalent_diameter_mm(
            nodule, positions_by_sop_uid, pixel_spacing, rows=rows, cols=cols)))
    groups: list[set[int]] = [{i} for i in range(len(members))]
    owner = list(range(len(members)))
    pairs: list[tuple[float, int, int]] = []
    for i in range(len(members)):
        for j in range(i + 1, len(members)):
            if members[i].nodule.reader_index == members[j].nodule.reader_index:
                continue
            d = float(np.linalg.norm(members[i].center - members[j].center))
            limit = max(members[i].diameter / 2, members[j].diameter / 2, LUNA16_MIN_DIAMETER_MM)
            if d < limit:
                pairs.append((d, i, j))
    for _, i, j in sorted(pairs):
        gi, gj = owner[i], owner[j]
        if gi == gj:
            continue
        readers_i = {members[k].nodule.reader_index for k in groups[gi]}
        readers_j = {members[k].nodule.reader_index for k in groups[gj]}
        if readers_i & readers_j:
            continue
        groups[gi] |= groups[gj]
        for k in groups[gj]:
            owner[k] = gi
        groups[gj] = set()
    clusters: list[NoduleCluster] = []
    for g in groups:
        if not g:
            continue
        ms = [members[k] for k in sorted(g)]
        center = np.mean([m.center for m in ms], axis=0)
        clusters.append(
            NoduleCluster(
                members=tuple(m.nodule for m in ms),
                n_readers=len({m.nodule.reader_index for m in ms}),
                center_mm=(float(center[0]), float(center[1]), float(center[2])),
                diameter_mm=float(np.mean([m.diameter for m in ms])),
            )
        )
    clusters.sort(key=lambda c: (-c.n_readers, c.center_mm))
    return clusters


def _point_lps(
    sop: str,
    point: tuple[int, int],
    positions_by_sop_uid: Mapping[str, tuple[float, float, float]],
    pixel_spacing: tuple[float, float],
) -> tuple[float, float, float] | None:
    if sop not in positions_by_sop_uid:
        return None
    p = _pixel_to_lps(np.array([float(point[0])]), np.array([float(point[1])]),
                      positions_by_sop_uid[sop], pixel_spacing)[0]
    return (float(p[0]), float(p[1]), float(p[2]))


def luna16_consensus(
    annotation: LidcAnnotation,
    clusters: Iterable[NoduleCluster],
    positions_by_sop_uid: Mapping[str, tuple[float, float, float]],
    pixel_spacing: tuple[float, float],
    *,
    min_readers: int = LUNA16_MIN_READERS,
    min_diameter_mm: float = LUNA16_MIN_DIAMETER_MM,
) -> list[ConsensusFinding]:
    """LUNA16 reference nodules and irrelevant findings of one series.

    Clusters with ``n_readers >= min_readers`` and ``diameter_mm >=
    min_diameter_mm`` become ``kind="nodule"``; every other cluster, every
    < 3 mm mark and every non-nodule mark becomes ``kind="irrelevant"``
    (LUNA16's ``annotations_excluded``; < 3 mm marks and non-nodules get
    diameter -1, which the FROC evaluation treats as LUNA16 does).
    """
    out: list[ConsensusFinding] = []
    for c in clusters:
        accepted = c.n_readers >= min_readers and c.diameter_mm >= min_diameter_mm
        out.append(ConsensusFinding(c.center_mm, c.diameter_mm, c.n_readers,
                                    "nodule" if accepted else "irrelevant", "cluster"))
    for s in annotation.sessions:
        for n in s.small_nodules:
            for roi in n.rois[:1]:
                p = _point_lps(roi.sop_instance_uid, roi.edge_map[0], positions_by_sop_uid,
                               pixel_spacing)
                if p is not None:
                    out.append(ConsensusFinding(p, -1.0, 1, "irrelevant", "small-nodule"))
        for nn in s.non_nodules:
            p = _point_lps(nn.sop_instance_uid, nn.locus, positions_by_sop_uid, pixel_spacing)
            if p is not None:
                out.append(ConsensusFinding(p, -1.0, 1, "irrelevant", "non-nodule"))
    return out


def equivalent_sphere_diameter_mm(voxel_count: int, voxel_volume_mm3: float) -> float:
    """Diameter of the sphere with the volume of ``voxel_count`` voxels."""
    return float((6.0 * voxel_count * voxel_volume_mm3 / math.pi) ** (1.0 / 3.0))
