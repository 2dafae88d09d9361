"""Group DICOM instances into series and select series by routing rules.

Headers only are read here (``stop_before_pixels``); pixel data is decoded by
:func:`cad_node.imaging.volume.load_series` once a series is chosen.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from cad_node.config import RoutingRule, SeriesMatch
from cad_node.imaging.geometry import SeriesError, normal_vector

__all__ = [
    "LOCALIZER_IMAGE_TYPE",
    "MEDIA_STORAGE_DIRECTORY_SOP_CLASS",
    "Orientation",
    "SeriesInfo",
    "SeriesSelection",
    "Source",
    "group_series",
    "orientation_of",
    "select_series",
]

#: A source instance: a file path or an in-memory dataset.
Source = str | os.PathLike[str] | Dataset

#: ImageType (0008,0008) value 3 of a CT localizer/scout (PS3.3 C.8.2.1.1.1).
LOCALIZER_IMAGE_TYPE = "LOCALIZER"
#: Media Storage Directory Storage SOP Class (DICOMDIR, PS3.4 Annex F); never an image.
MEDIA_STORAGE_DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"
#: A plane is called axial/coronal/sagittal when its normal is within ~25 degrees
#: of the patient axis; otherwise it is oblique.
_ORIENTATION_COS_MIN = 0.9

Orientation = Literal["axial", "coronal", "sagittal", "oblique"]


def orientation_of(iop: Sequence[float] | None) -> Orientation | None:
    """Classify an Image Orientation (Patient) (0020,0037) (PS3.3 C.7.6.2.1.1).

    Parameters
    ----------
    iop : sequence of 6 float or None
        Row then column direction cosines in the LPS patient system.

    Returns
    -------
    str or None
        ``"axial"``, ``"coronal"``, ``"sagittal"`` or ``"oblique"``; None when
        ``iop`` is missing or malformed.
    """
    if iop is None or len(iop) != 6:
        return None
    try:
        normal = normal_vector(iop)
    except SeriesError:
        return None
    axis = int(np.argmax(np.abs(normal)))
    if abs(normal[axis]) < _ORIENTATION_COS_MIN:
        return "oblique"
    return ("sagittal", "coronal", "axial")[axis]


@dataclass
class SeriesInfo:
    """Summary of one series, built from headers only.

    Attributes
    ----------
    series_instance_uid, study_instance_uid : str
        Identifiers (0020,000E) and (0020,000D).
    modality : str
        Modality (0008,0060).
    sources : list
        The instances (paths or datasets), in the order they were given.
    """

    series_instance_uid: str
    study_instance_uid: str
    modality: str = ""
    series_description: str = ""
    series_number: int | None = None
    body_part: str = ""
    image_types: set[tuple[str, ...]] = field(default_factory=set)
    slice_thicknesses: set[float] = field(default_factory=set)
    orientations: set[Orientation | None] = field(default_factory=set)
    sizes: set[tuple[int, int]] = field(default_factory=set)
    view_positions: set[str] = field(default_factory=set)
    sources: list[Source] = field(default_factory=list)

    @property
    def n_instances(self) -> int:
        """Number of instances in the series."""
        return len(self.sources)

    @property
    def slice_thickness_mm(self) -> float | None:
        """The largest Slice Thickness (0018,0050) in the series, None if absent."""
        return max(self.slice_thicknesses) if self.slice_thicknesses else None

    @property
    def orientation(self) -> Orientation | None:
        """The orientation of all slices, None when missing or mixed."""
        return next(iter(self.orientations)) if len(self.orientations) == 1 else None

    @property
    def is_localizer(self) -> bool:
        """True when any instance's ImageType says LOCALIZER (a scout)."""
        return any(LOCALIZER_IMAGE_TYPE in t for t in self.image_types)

    def _add(self, ds: Dataset, source: Source) -> None:
        self.sources.append(source)
        self.modality = self.modality or str(ds.get("Modality", "") or "")
        self.series_description = self.series_description or str(
            ds.get("SeriesDescription", "") or ""
        )
        if self.series_number is None and ds.get("SeriesNumber") not in (None, ""):
            try:
                self.series_number = int(ds.SeriesNumber)
            except (TypeError, ValueError):
                pass
        self.body_part = self.body_part or str(ds.get("BodyPartExamined", "") or "")
        itype = ds.get("ImageType")
        if itype:
            values = [itype] if isinstance(itype, str) else list(itype)
            self.image_types.add(tuple(str(v).upper() for v in values))
        thickness = ds.get("SliceThickness")
        if thickness not in (None, ""):
            try:
                self.slice_thicknesses.add(float(thickness))
            except (TypeError, ValueError):
                pass
        iop = ds.get("ImageOrientationPatient")
        self.orientations.add(orientation_of([float(v) for v in iop] if iop else None))
        if "Rows" in ds and "Columns" in ds:
            self.sizes.add((int(ds.Rows), int(ds.Columns)))
        view = ds.get("ViewPosition")
        if view:
            self.view_positions.add(str(view).upper())


def _read_header(source: Source) -> Dataset:
    if isinstance(source, Dataset):
        return source
    return pydicom.dcmread(os.fspath(source), stop_before_pixels=True)


def group_series(
    sources: Iterable[Source],
    *,
    on_error: Callable[[Source, str], None] | None = None,
) -> list[SeriesInfo]:
    """Group instances by Series Instance UID, reading headers only.

    Parameters
    ----------
    sources : iterable of path or Dataset
        DICOM files or in-memory datasets.  A directory is not expanded.
    on_error : callable, optional
        Called with ``(source, reason)`` for every item that is not a usable
        image instance (not DICOM, a DICOMDIR, no Series Instance UID).  Such
        items are skipped.

    Returns
    -------
    list of SeriesInfo
        One entry per series, ordered by Study then Series Instance UID.
    """
    by_uid: dict[str, SeriesInfo] = {}
    for source in sources:
        try:
            ds = _read_header(source)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            if on_error is not None:
                on_error(source, f"not a readable DICOM file: {exc}")
            continue
        sop_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
        if sop_class == MEDIA_STORAGE_DIRECTORY_SOP_CLASS:
            if on_error is not None:
                on_error(source, "DICOMDIR, not an image")
            continue
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not series_uid:
            if on_error is not None:
                on_error(source, "no Series Instance UID (0020,000E)")
            continue
        info = by_uid.get(series_uid)
        if info is None:
            info = SeriesInfo(series_uid, str(ds.get("StudyInstanceUID", "") or ""))
            by_uid[series_uid] = info
        info._add(ds, source)
    return sorted(by_uid.values(), key=lambda s: (s.study_instance_uid, s.series_instance_uid))


class SeriesSelection(list[SeriesInfo]):
    """The series a rule selected; ``rejected`` maps every other UID to its reason."""

    def __init__(self, selected: Iterable[SeriesInfo], rejected: dict[str, str]) -> None:
        super().__init__(selected)
        self.rejected: dict[str, str] = rejected


def _mismatch(info: SeriesInfo, match: SeriesMatch) -> str | None:
    """Why ``info`` does not meet ``match``; None when it does."""
    if info.is_localizer:
        return "localizer/scout series (ImageType contains LOCALIZER)"
    if match.modality is not None and info.modality.upper() not in {
        m.upper() for m in match.modality
    }:
        return f"Modality {info.modality or '(missing)'} not in {match.modality}"
    if match.body_part is not None and info.body_part.upper() not in {
        b.upper() for b in match.body_part
    }:
        return f"BodyPartExamined {info.body_part or '(missing)'} not in {match.body_part}"
    if match.series_description is not None and not re.search(
        match.series_description, info.series_description, flags=re.IGNORECASE
    ):
        return f"SeriesDescription {info.series_description!r} does not match"
    if match.slice_thickness_mm is not None:
        lo, hi = match.slice_thickness_mm
        thickness = info.slice_thickness_mm
        if thickness is None:
            return "SliceThickness (0018,0050) missing"
        if not lo <= thickness <= hi:
            return f"slice thickness {thickness:g} mm outside [{lo:g}, {hi:g}] mm"
    if match.image_type is not None:
        required = {v.upper() for v in match.image_type}
        if not info.image_types or any(not required <= set(t) for t in info.image_types):
            return f"ImageType lacks {sorted(required)}"
    if match.orientation is not None and info.orientation != match.orientation:
        found = sorted(str(o) for o in info.orientations)
        return f"orientation {'/'.join(found)} is not {match.orientation}"
    # An empty string in ``view_position`` admits instances without View Position.
    if match.view_position is not None and not (
        (info.view_positions or {""}) <= {v.upper() for v in match.view_position}
    ):
        return f"ViewPosition {sorted(info.view_positions)} not in {match.view_position}"
    if info.n_instances < match.min_instances:
        return f"{info.n_instances} instance(s), fewer than {match.min_instances}"
    if match.same_size and len(info.sizes) > 1:
        return f"mixed image sizes {sorted(info.sizes)}"
    return None


def _best_key(info: SeriesInfo) -> tuple[float, int, str]:
    thickness = info.slice_thickness_mm
    return (thickness if thickness is not None else float("inf"), -info.n_instances,
            info.series_instance_uid)


def select_series(series: Iterable[SeriesInfo], rule: RoutingRule) -> SeriesSelection:
    """Select the series a routing rule applies to.

    Parameters
    ----------
    series : iterable of SeriesInfo
        Candidates, e.g. from :func:`group_series`.
    rule : RoutingRule
        ``rule.match`` conditions all must hold; with ``rule.series == "best"``
        only the thinnest (then most complete) matching series is kept.

    Returns
    -------
    SeriesSelection
        The selected series (a list); ``.rejected`` gives, for every other
        Series Instance UID, the reason it was not selected.
    """
    matching: list[SeriesInfo] = []
    rejected: dict[str, str] = {}
    for info in series:
        reason = _mismatch(info, rule.match)
        if reason is None:
            matching.append(info)
        else:
            rejected[info.series_instance_uid] = f"rule {rule.name!r}: {reason}"
    if rule.series == "best" and len(matching) > 1:
        matching.sort(key=_best_key)
        for other in matching[1:]:
            rejected[other.series_instance_uid] = (
                f"rule {rule.name!r}: series {matching[0].series_instance_uid} is thinner "
                "or more complete"
            )
        matching = matching[:1]
    return SeriesSelection(matching, rejected)


def sources_of(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand files and directories (recursively) into a sorted list of files."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        else:
            out.append(p)
    return out
