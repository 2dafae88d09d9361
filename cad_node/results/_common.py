"""Shared pieces of the result builders: source series, codes, timestamps.

Contract of :class:`SourceSeries`: it takes the received instances of the
analysed series in any order (duplicates by SOP Instance UID allowed), checks
that they form one consistent image series, and offers them sorted along the
slice normal.  Geometry and its messy-series policy are
:mod:`cad_node.imaging.geometry`'s, the same code the volume loader uses, so
a result describes the geometry that was analysed.  It never reorders a mask:
masks are mapped to instances by SOP Instance UID only.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import re
from collections.abc import Iterator, Sequence
from typing import Any

import highdicom as hd
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.coding import Code
from pydicom.uid import PYDICOM_ROOT_UID

from cad_node.config import ResultsConfig
from cad_node.imaging.geometry import (
    ImagePlane,
    SeriesError,
    SliceStack,
    sort_slices,
    unique_instances,
)
from cad_node.results.findings import AnalysisResult, Finding, ModelIdentity
from cad_node.results.operating_point import OperatingPoint
from cad_node.results.uids import UidFactory, input_fingerprint

__all__ = [
    "ALGORITHM_FAMILY",
    "PURPOSE_PROCESSING_ALGORITHM",
    "BuildContext",
    "SeriesNumber",
    "SourceSeries",
    "deterministic_datetime",
    "ensure_character_set",
    "make_deterministic",
    "processing_equipment",
    "result_series_number",
    "series_description",
]

#: IHE AIR (RAD TF Suppl. AI Results, "Contributing Equipment Sequence"): the
#: algorithm that produced a result is the Contributing Equipment item whose
#: Purpose of Reference is AIR's ``(Newcode1, 99IHE, "Processing Algorithm")``.
#: DICOM has not (yet) added that concept to CID 7005 "Contributing Equipment
#: Purposes of Reference" (Baseline, so other codes are allowed); DCM 109102
#: "Processing Equipment" would not tell the algorithm from highdicom's own
#: library item, which uses it.  See :func:`processing_equipment`.
PURPOSE_PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")
#: CID 7005 concept highdicom accepts when building the item; replaced by
#: :data:`PURPOSE_PROCESSING_ALGORITHM` afterwards.
_PURPOSE_PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")

#: CID 7162 "Surface Processing Algorithm Families": artificial intelligence.
ALGORITHM_FAMILY = Code("123110", "DCM", "Artificial Intelligence")

#: Description stored in the algorithm's Contributing Equipment item.
ALGORITHM_CONTRIBUTION = "Processing Algorithm"

#: Manufacturer string highdicom writes into its own Contributing Equipment item.
_HIGHDICOM_MANUFACTURER = "Highdicom open-source contributors"

#: Fallback when a source carries no date at all (the DICOM epoch of PS3.5 DA).
_EPOCH = datetime.datetime(1970, 1, 1)


class SeriesNumber(enum.IntEnum):
    """Series Number (0020,0011) of each output series, per object kind.

    These are the numbers used after a source series numbered below 9000;
    after a higher one, the results follow it (:meth:`BuildContext.series_number`),
    so viewers that sort by Series Number never show them first.
    """

    SEG = 9001
    SR = 9002
    SC = 9003
    GSPS = 9004
    KOS = 9005
    PM = 9006


#: Largest Series Number (VR IS: a signed 32-bit integer, PS3.5 6.2).
_MAX_IS = 2**31 - 1


def result_series_number(kind: SeriesNumber, source_series_number: int | None) -> int:
    """Series Number of a result series: after the source's, never before it.

    ``kind`` (9001-9006) when the source's number is below 9001, else the
    source's number plus ``kind - 9000``; capped at the largest IS value.
    """
    source = max(int(source_series_number or 0), 0)
    if source < SeriesNumber.SEG:
        return int(kind)
    return min(source + int(kind) - 9000, _MAX_IS)


def series_description(what: str, model: ModelIdentity) -> str:
    """Series Description (0008,103E) of a result series, e.g.
    ``"AI measurement report - ct-nodule-scorer 1.0.1 - not for diagnosis"``,
    shortened to the 64 characters of VR LO (the tail goes first)."""
    text = f"AI {what} - {model.name} {model.version} - not for diagnosis"
    if len(text) > 64:
        text = f"AI {what} - {model.name} {model.version}"
    return text[:64]


@dataclasses.dataclass(frozen=True)
class SourceSeries:
    """The analysed source instances of one series, checked and sorted.

    Attributes
    ----------
    images : tuple of pydicom.Dataset
        Unique instances (by SOP Instance UID); for cross-sectional images
        sorted along the slice normal (:func:`cad_node.imaging.geometry.sort_slices`),
        otherwise by Instance Number then SOP Instance UID.
    by_uid : dict
        SOP Instance UID -> dataset.
    stack : SliceStack or None
        The sorted image planes (``stack.planes[k]`` is ``images[k]``'s); None
        for images without patient geometry (e.g. radiographs).
    """

    images: tuple[Dataset, ...]
    by_uid: dict[str, Dataset]
    stack: SliceStack | None = None

    @classmethod
    def from_datasets(
        cls, source: Sequence[Dataset], series_instance_uid: str | None = None
    ) -> SourceSeries:
        """Check and sort ``source``.

        Parameters
        ----------
        source : sequence of pydicom.Dataset
            Received instances, any order.  Instances of other series are
            ignored when ``series_instance_uid`` is given.
        series_instance_uid : str, optional
            The analysed series.

        Raises
        ------
        ValueError
            Empty input, several studies, no instance of the analysed series,
            or a geometry :mod:`cad_node.imaging.geometry` refuses
            (:class:`~cad_node.imaging.geometry.SeriesError`: e.g. the same SOP
            Instance UID with different positions, mixed orientations).
        """
        if not source:
            raise ValueError("no source instances given")
        chosen: list[Dataset] = []
        for number, ds in enumerate(source, start=1):
            if not isinstance(ds, Dataset):
                raise TypeError(f"source item {number} is a {type(ds).__name__}, not a Dataset")
            if (
                series_instance_uid is not None
                and ds.get("SeriesInstanceUID") != series_instance_uid
            ):
                continue
            _check_instance(ds, number)
            chosen.append(ds)
        if not chosen:
            raise ValueError(f"no source instance belongs to series {series_instance_uid}")
        keep, _ = unique_instances(chosen)
        unique = [chosen[k] for k in keep]
        by_uid = {str(ds.SOPInstanceUID): ds for ds in unique}
        studies = {str(ds.StudyInstanceUID) for ds in unique}
        if len(studies) != 1:
            raise ValueError(f"source instances span {len(studies)} studies: {sorted(studies)}")
        planes = [ImagePlane.from_dataset(ds) for ds in unique]
        with_plane = [p for p in planes if p is not None]
        if with_plane and len(with_plane) < len(planes):
            raise SeriesError(
                f"{len(planes) - len(with_plane)} of {len(planes)} source instances lack "
                "Image Position (Patient) that the others carry"
            )
        if with_plane:
            stack = sort_slices(with_plane)
            return cls(
                images=tuple(unique[k] for k in stack.order), by_uid=by_uid, stack=stack
            )
        images = sorted(
            unique, key=lambda d: (int(d.get("InstanceNumber") or 0), str(d.SOPInstanceUID))
        )
        return cls(images=tuple(images), by_uid=by_uid)

    @property
    def first(self) -> Dataset:
        """The first image (lowest position)."""
        return self.images[0]

    @property
    def study_instance_uid(self) -> str:
        """Study Instance UID shared by all images."""
        return str(self.first.StudyInstanceUID)

    @property
    def is_ct(self) -> bool:
        """True for a cross-sectional CT series with patient geometry."""
        return str(self.first.get("Modality", "")) == "CT" and self.stack is not None

    @property
    def has_geometry(self) -> bool:
        """True when every image has Image Position/Orientation (Patient)."""
        return self.stack is not None

    def plane(self, uid: str) -> ImagePlane | None:
        """The image plane of source instance ``uid`` (None without geometry)."""
        if self.stack is None:
            return None
        for p in self.stack.planes:
            if p.sop_instance_uid == uid:
                return p
        return None


#: Attributes every source instance must carry (SOP Common, General Study,
#: General Series and Image Pixel modules, PS3.3 C.12.1, C.7.2.1, C.7.3.1, C.7.6.3).
_REQUIRED_SOURCE_ATTRIBUTES = (
    "SOPClassUID",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Rows",
    "Columns",
)


def _check_instance(ds: Dataset, number: int) -> None:
    """Raise ValueError naming the instance when it cannot be used as a source.

    Required: :data:`_REQUIRED_SOURCE_ATTRIBUTES`, and a plane that
    :meth:`cad_node.imaging.geometry.ImagePlane.from_dataset` accepts.
    """
    name = str(ds.get("SOPInstanceUID") or f"#{number}")
    missing = [kw for kw in _REQUIRED_SOURCE_ATTRIBUTES if not ds.get(kw)]
    if missing:
        raise ValueError(f"source instance {name} lacks {', '.join(missing)}")
    ImagePlane.from_dataset(ds, f"source instance {name}")


def _parse_da(value: object) -> datetime.date | None:
    text = str(value or "").strip()
    if len(text) < 8:
        return None
    try:
        return datetime.datetime.strptime(text[:8], "%Y%m%d").date()
    except ValueError:
        return None


def _parse_tm(value: object) -> datetime.time:
    text = str(value or "").strip().split(".")[0]
    digits = "".join(ch for ch in text if ch.isdigit())[:6].ljust(6, "0")
    try:
        return datetime.datetime.strptime(digits, "%H%M%S").time()
    except ValueError:
        return datetime.time(0, 0, 0)


def deterministic_datetime(source: SourceSeries) -> datetime.datetime:
    """Content Date/Time used for every output object.

    The node must emit byte-identical objects for the same input, so no object
    carries the wall-clock time.  We take the acquisition timestamp of the
    source study: Study Date/Time of the first image, else its Series,
    Content or Acquisition Date/Time, else 1970-01-01 00:00:00.  A missing time
    reads as midnight.  The result therefore sorts with (not before) the
    images it describes, which is also what viewers show next to them.
    """
    ds = source.first
    for date_kw, time_kw in (
        ("StudyDate", "StudyTime"),
        ("SeriesDate", "SeriesTime"),
        ("ContentDate", "ContentTime"),
        ("AcquisitionDate", "AcquisitionTime"),
    ):
        date = _parse_da(ds.get(date_kw))
        if date is not None:
            return datetime.datetime.combine(date, _parse_tm(ds.get(time_kw)))
    return _EPOCH


def processing_equipment(model: ModelIdentity, when: datetime.datetime) -> hd.ContributingEquipment:
    """Contributing Equipment item for the algorithm (IHE AIR).

    Purpose of Reference :data:`PURPOSE_PROCESSING_ALGORITHM`, Manufacturer,
    Manufacturer's Model Name (model name), Software Versions (model version)
    and Device UID (0018,1002) = ``model.device_uid``.
    """
    # highdicom only accepts CID 7005 codes; build with one, then set AIR's.
    item = hd.ContributingEquipment(
        manufacturer=model.manufacturer,
        purpose_of_reference=_PURPOSE_PROCESSING_EQUIPMENT,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        contribution_datetime=when,
        contribution_description=ALGORITHM_CONTRIBUTION,
    )
    item.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept(
            PURPOSE_PROCESSING_ALGORITHM.value,
            PURPOSE_PROCESSING_ALGORITHM.scheme_designator,
            PURPOSE_PROCESSING_ALGORITHM.meaning,
        )
    ]
    item.DeviceUID = model.device_uid
    return item


#: PS3.5 6.2 Age String: nnnD, nnnW, nnnM or nnnY.
_AGE_RE = re.compile(r"[0-9]{3}[DWMY]")

#: Roots of UIDs that highdicom/pydicom generate at random (``hd.UID()``,
#: ``pydicom.uid.generate_uid()``), e.g. Dimension Organization UID.
_RANDOM_UID_ROOTS = ("1.2.826.0.1.3680043.10.511.", PYDICOM_ROOT_UID)


def _remap_random_uids(
    ds: Dataset, uids: UidFactory, kind: str, keep: set[str], mapping: dict[str, str]
) -> None:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                _remap_random_uids(item, uids, kind, keep, mapping)
        elif elem.VR == "UI" and elem.VM == 1 and elem.value:
            value = str(elem.value)
            if value.startswith(_RANDOM_UID_ROOTS) and value not in keep:
                if value not in mapping:
                    mapping[value] = uids.uid(f"{kind}.generated", len(mapping))
                elem.value = mapping[value]


#: Specific Character Set (0008,0005) defined terms (PS3.3 C.12.1.1.2) we decide
#: between: the default repertoire (absent / ISO_IR 6), Latin-1 and UTF-8.
CHARSET_DEFAULT = "ISO_IR 6"
CHARSET_LATIN1 = "ISO_IR 100"
CHARSET_UTF8 = "ISO_IR 192"
#: Python codecs of the single-byte sets above.
_CODEC = {CHARSET_DEFAULT: "ascii", CHARSET_LATIN1: "latin-1"}
#: Value Representations whose values use the Specific Character Set (PS3.5 6.1.2.3).
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})


def _texts(ds: Dataset) -> Iterator[str]:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _texts(item)
        elif elem.VR in _TEXT_VRS and elem.value is not None:
            values = elem.value if isinstance(elem.value, MultiValue | list) else [elem.value]
            yield from (str(v) for v in values)


def ensure_character_set(ds: Dataset) -> None:
    """Declare UTF-8 when the object's text does not fit its Specific Character Set.

    Tracking IDs, the configured disclaimer, failure reasons and notes may hold
    any character; copied from a source without Specific Character Set (default
    repertoire) or with Latin-1, they would make the object invalid (PS3.5
    6.1.2.2).  Other declared sets (ISO 2022 code extensions, UTF-8) are kept.
    """
    declared = ds.get("SpecificCharacterSet") or []
    terms = [str(declared)] if isinstance(declared, str) else [str(v) for v in declared]
    if len(terms) > 1:
        return  # ISO 2022 code extensions: kept as the source declared them
    codec = _CODEC.get((terms[0] if terms else "") or CHARSET_DEFAULT)
    if codec is None:
        return
    for text in _texts(ds):
        try:
            text.encode(codec)
        except UnicodeEncodeError:
            ds.SpecificCharacterSet = CHARSET_UTF8
            return


def make_deterministic(
    ds: Dataset,
    when: datetime.datetime,
    uids: UidFactory | None = None,
    kind: str = "",
    keep: set[str] | None = None,
) -> None:
    """Replace every wall-clock timestamp and random UID highdicom writes.

    Timestamps: Instance Creation Date/Time (SOP Common), Contribution
    DateTime of highdicom's own Contributing Equipment item, Date/Time of
    Secondary Capture (SC Equipment) and Presentation Creation Date/Time
    (GSPS) become ``when``.  UIDs: when ``uids`` is given, every UID under
    highdicom's or pydicom's random-UID root (e.g. the SEG's Dimension
    Organization UID) that is not in ``keep`` (the source's UIDs) is replaced
    by a derived one, in order of appearance.
    """
    ensure_character_set(ds)
    if uids is not None:
        _remap_random_uids(ds, uids, kind, keep or set(), {})
    age = ds.get("PatientAge")
    if age is not None and not _AGE_RE.fullmatch(str(age)):
        # Copied from a source with an invalid AS value (e.g. "62"); Patient's
        # Age is Type 3 (PS3.3 C.7.2.2), so we leave it out rather than guess.
        del ds.PatientAge
    da = when.strftime("%Y%m%d")
    tm = when.strftime("%H%M%S")
    ds.InstanceCreationDate = da
    ds.InstanceCreationTime = tm
    for item in ds.get("ContributingEquipmentSequence", []):
        if item.get("Manufacturer") == _HIGHDICOM_MANUFACTURER:
            item.ContributionDateTime = da + tm
    if "DateOfSecondaryCapture" in ds:
        ds.DateOfSecondaryCapture = da
        ds.TimeOfSecondaryCapture = tm
    if "PresentationCreationDate" in ds:
        ds.PresentationCreationDate = da
        ds.PresentationCreationTime = tm


@dataclasses.dataclass(frozen=True)
class BuildContext:
    """Everything every builder needs, computed once per :func:`build_results` call."""

    result: AnalysisResult
    source: SourceSeries
    settings: ResultsConfig
    model: ModelIdentity
    uids: UidFactory
    when: datetime.datetime
    #: Threshold and sub-threshold candidates (``result`` holds the reported findings).
    operating_point: OperatingPoint = dataclasses.field(default_factory=OperatingPoint)

    @classmethod
    def create(
        cls,
        result: AnalysisResult,
        source: Sequence[Dataset],
        settings: ResultsConfig,
        fingerprint: str | None = None,
        operating_point: OperatingPoint | None = None,
    ) -> BuildContext:
        """Check inputs and derive the UID factory and timestamp."""
        if result.model is None:
            raise ValueError(
                "AnalysisResult.model is required: results must name the model bundle (IHE AIR)"
            )
        series = SourceSeries.from_datasets(source, result.series_instance_uid)
        fp = fingerprint or input_fingerprint(series.by_uid)
        return cls(
            result=result,
            source=series,
            settings=settings,
            model=result.model,
            uids=UidFactory(series.study_instance_uid, fp, result.model),
            when=deterministic_datetime(series),
            operating_point=operating_point or OperatingPoint(),
        )

    def finalize(self, ds: Dataset, kind: str) -> None:
        """Make ``ds`` deterministic: timestamps and random UIDs (:func:`make_deterministic`)."""
        keep: set[str] = set()
        for src in self.source.images:
            for kw in (
                "SOPInstanceUID",
                "SeriesInstanceUID",
                "StudyInstanceUID",
                "FrameOfReferenceUID",
            ):
                if kw in src:
                    keep.add(str(src[kw].value))
        # UIDs the caller chose (a pipeline's tracking UIDs, the bundle's Device
        # UID) are kept even under a random-UID root: every object must carry
        # the same value, so they are never remapped per object.
        keep.add(self.model.device_uid)
        keep.update(self.tracking_uid(i) for i in range(len(self.result.findings)))
        keep.update(self.tracking_uid_of(f) for f in self.operating_point.reported_below)
        make_deterministic(ds, self.when, self.uids, kind, keep)

    def series_number(self, kind: SeriesNumber) -> int:
        """Series Number of the ``kind`` result series, after the analysed series'."""
        value = self.source.first.get("SeriesNumber")
        try:
            source = int(value) if value not in (None, "") else None
        except (TypeError, ValueError):
            source = None
        return result_series_number(kind, source)

    def tracking_uid(self, index: int) -> str:
        """Tracking UID of finding ``index`` (given one, else derived)."""
        return self.tracking_uid_of(self.result.findings[index])

    def tracking_uid_of(self, finding: Finding) -> str:
        """Tracking UID of ``finding`` (given one, else derived from its tracking id)."""
        return finding.tracking_uid or self.uids.uid("tracking", finding.tracking_id)

    def common_kwargs(self) -> dict[str, Any]:
        """Keyword arguments shared by highdicom SOP constructors."""
        date = self.when.date()
        time = self.when.time()
        kw: dict[str, Any] = {
            "content_date": date,
            "content_time": time,
            "series_date": date,
            "series_time": time,
        }
        if self.settings.institution_name:
            kw["institution_name"] = self.settings.institution_name
        return kw
