"""Typed findings: the contract between pipelines and result builders.

A pipeline returns one :class:`AnalysisResult` per analysed series.  It holds
ranked :class:`Finding` records and optional :class:`ImageMask` masks.  The
result builders (``cad_node.results.sr``, ``.seg``, ``.sc``) turn them into
DICOM objects; ``cad-node report --findings F.json`` reads the JSON form.

Masks are aligned to source instances by SOP Instance UID, never by file order
or index alone: ``ImageMask.array[k]`` is the frame of the source image whose
SOP Instance UID is ``ImageMask.sop_instance_uids[k]``.  Builders therefore
cannot misalign a mask with its images, whatever order the files came in.

Coded concepts are SNOMED CT (scheme designator ``SCT``), as TID 1500 and
IHE AIR expect (PS3.16 CID 7151 / CID 6000-series for finding types and sites).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    field_validator,
    model_validator,
)

__all__ = [
    "AnalysisResult",
    "AnalysisStatus",
    "ChestRadiographMeasurements",
    "Finding",
    "FindingSite",
    "FindingType",
    "ImageClassification",
    "ImageMask",
    "ModelIdentity",
    "NoduleType",
    "Region2D",
]


class _SnomedConcept(enum.Enum):
    """Base of enums whose values are SNOMED CT ``(code value, code meaning)`` pairs."""

    @property
    def code(self) -> str:
        """SNOMED CT code value."""
        return str(self.value[0])

    @property
    def meaning(self) -> str:
        """Code meaning."""
        return str(self.value[1])


class FindingType(_SnomedConcept):
    """Finding types as SNOMED CT concepts ``(code value, code meaning)``."""

    NODULE = ("27925004", "Nodule")
    MASS = ("4147007", "Mass")
    LESION = ("52988006", "Lesion")
    #: Qualitative "abnormal" for whole-image chest X-ray classification.
    ABNORMAL = ("263654008", "Abnormal")
    #: Enlarged cardiac silhouette (chest X-ray: cardiothoracic ratio > 0.50 on PA).
    CARDIOMEGALY = ("287272002", "Cardiomegaly")
    #: Whole-image tuberculosis screening (chest X-ray, the ``cxr-tb`` bundle).
    TUBERCULOSIS = ("56717001", "Tuberculosis")


class FindingSite(_SnomedConcept):
    """Anatomic sites (SNOMED CT) a finding or organ segment may lie in."""

    LUNG = ("39607008", "Lung")
    RIGHT_LUNG = ("3341006", "Right lung")
    LEFT_LUNG = ("44029006", "Left lung")
    RIGHT_UPPER_LOBE = ("45653009", "Upper lobe of right lung")
    RIGHT_MIDDLE_LOBE = ("72481006", "Middle lobe of right lung")
    RIGHT_LOWER_LOBE = ("266005", "Lower lobe of right lung")
    LEFT_UPPER_LOBE = ("44714003", "Upper lobe of left lung")
    LEFT_LOWER_LOBE = ("41224006", "Lower lobe of left lung")
    HEART = ("80891009", "Heart")
    THORAX = ("816094009", "Thorax")
    # DeepLesion coarse lesion types as finding sites (ct-lesion; pydicom's SCT codes)
    BONE = ("272673000", "Bone")
    ABDOMEN = ("818981001", "Abdomen")
    MEDIASTINUM = ("72410000", "Mediastinum")
    LIVER = ("10200004", "Liver")
    KIDNEY = ("64033007", "Kidney")
    SOFT_TISSUE = ("87784001", "Soft tissue")
    PELVIS = ("816092008", "Pelvis")


class NoduleType(enum.Enum):
    """Nodule attenuation type (Lung-RADS v2022 / Fleischner terminology)."""

    SOLID = "solid"
    PART_SOLID = "part-solid"
    GROUND_GLASS = "ground-glass"


class AnalysisStatus(enum.Enum):
    """Outcome of a pipeline run. A failure is never reported as "no findings"."""

    COMPLETED = "completed"
    FAILED = "failed"


@dataclass(frozen=True)
class ImageMask:
    """A mask aligned to source instances by SOP Instance UID.

    Parameters
    ----------
    array : numpy.ndarray
        Shape ``(n, rows, columns)``; ``bool`` for a binary mask or
        ``float32`` in ``[0, 1]`` for a probability (FRACTIONAL) map.
    sop_instance_uids : tuple of str
        ``n`` SOP Instance UIDs; frame ``k`` of ``array`` belongs to the source
        image ``sop_instance_uids[k]``.  UIDs must be unique.
    """

    array: npt.NDArray[np.bool_] | npt.NDArray[np.float32]
    sop_instance_uids: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not isinstance(self.array, np.ndarray) or self.array.ndim != 3:
            raise ValueError("ImageMask.array must be a 3-D numpy array (n, rows, columns)")
        if self.array.dtype != np.bool_ and self.array.dtype != np.float32:
            raise TypeError(f"ImageMask.array must be bool or float32, not {self.array.dtype}")
        if self.array.dtype == np.float32 and (
            not np.isfinite(self.array).all() or self.array.min() < 0 or self.array.max() > 1
        ):
            raise ValueError("fractional ImageMask values must lie in [0, 1]")
        if len(self.sop_instance_uids) != self.array.shape[0]:
            raise ValueError(
                f"ImageMask has {self.array.shape[0]} frames but "
                f"{len(self.sop_instance_uids)} SOP Instance UIDs"
            )
        if len(set(self.sop_instance_uids)) != len(self.sop_instance_uids):
            raise ValueError("ImageMask.sop_instance_uids must be unique")

    @property
    def is_fractional(self) -> bool:
        """True for a probability map (FRACTIONAL segmentation)."""
        return bool(self.array.dtype == np.float32)


_E = TypeVar("_E", FindingType, FindingSite)


def _coded_parser(enum_cls: type[_E]) -> Any:
    """Accept a member, its name, its code value or ``[code, meaning]`` (JSON forms)."""

    def parse(value: object) -> object:
        if isinstance(value, enum_cls):
            return value
        if isinstance(value, str):
            for member in enum_cls:
                if value in (member.name, member.code):
                    return member
        if isinstance(value, (list, tuple)) and len(value) == 2:
            for member in enum_cls:
                if tuple(value) == member.value:
                    return member
        return value  # pydantic then reports a clear enum error

    return BeforeValidator(parse)


def _by_name(member: enum.Enum) -> str:
    return member.name


#: JSON form of coded enums: the member name (e.g. ``"NODULE"``); parsed back
#: from the name, the SNOMED code or ``[code, meaning]``.
CodedFindingType = Annotated[
    FindingType, _coded_parser(FindingType), PlainSerializer(_by_name, when_used="json")
]
CodedFindingSite = Annotated[
    FindingSite, _coded_parser(FindingSite), PlainSerializer(_by_name, when_used="json")
]


#: A DICOM UID (PS3.5 9.1): dot-separated numeric components without leading
#: zeros, at most 64 characters (checked by the fields using it).
UID_PATTERN = r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)


Point3D = tuple[float, float, float]
Point2D = tuple[float, float]


class Region2D(_Model):
    """A 2-D region on one referenced image (CR/DX, or one CT slice).

    Coordinates are ``(column, row)`` in pixels, image-relative as in SR
    SCOORD (PS3.3 C.18.6.1.1): the top-left corner of the top-left pixel is
    ``(0, 0)``.
    """

    sop_instance_uid: str
    #: 1-based frame number for multi-frame images, None for single-frame.
    frame_number: int | None = Field(None, ge=1)
    kind: Literal["box", "polygon"]
    #: box: ``[(x0, y0), (x1, y1)]`` corners; polygon: >= 3 vertices (open, not repeated).
    points: list[Point2D]

    @model_validator(mode="after")
    def _check(self) -> Region2D:
        if self.kind == "box":
            if len(self.points) != 2:
                raise ValueError("a box needs exactly 2 corner points")
            (x0, y0), (x1, y1) = self.points
            if not (x1 > x0 and y1 > y0):
                raise ValueError("box corners must be (x0, y0) top-left and (x1, y1) bottom-right")
        elif len(self.points) < 3:
            raise ValueError("a polygon needs at least 3 points")
        return self


class Finding(_Model):
    """One finding of a pipeline, with its location, measurements and mask.

    CT findings carry ``center_mm`` (patient LPS, mm) and optionally an
    ellipsoid/polygon outline; CR/DX findings carry ``region``.
    """

    #: Human-readable tracking identifier, unique within a result (e.g. "Nodule 1").
    tracking_id: str = Field(min_length=1, max_length=64)
    #: Tracking UID; when None the builders derive one deterministically.
    tracking_uid: str | None = Field(None, max_length=64, pattern=UID_PATTERN)
    finding_type: CodedFindingType
    site: CodedFindingSite | None = None
    #: Centre in patient coordinates (LPS, mm).
    center_mm: Point3D | None = None
    #: Optional closed planar outline in patient coordinates (e.g. the
    #: contour on the slice through the centre), >= 3 points.
    outline_mm: list[Point3D] | None = None
    #: Optional 2-D region on a referenced image.
    region: Region2D | None = None
    long_axis_mm: float | None = Field(None, gt=0)
    short_axis_mm: float | None = Field(None, gt=0)
    volume_mm3: float | None = Field(None, gt=0)
    mean_hu: float | None = None
    #: Probability / confidence of the finding in [0, 1].
    probability: float | None = Field(None, ge=0.0, le=1.0)
    nodule_type: NoduleType | None = None
    #: Brock/PanCan malignancy probability in [0, 1] (McWilliams 2013).
    malignancy_probability: float | None = Field(None, ge=0.0, le=1.0)
    #: Per-finding mask (excluded from JSON; give masks separately).
    mask: ImageMask | None = Field(None, exclude=True)
    #: RECIST end points on ``region``'s image, ``(column, row)`` pixels as
    #: ``region.points``: long axis (2 points) then short axis (2 points).
    recist_axes_px: list[Point2D] | None = None

    @field_validator("outline_mm")
    @classmethod
    def _outline(cls, v: list[Point3D] | None) -> list[Point3D] | None:
        if v is not None and len(v) < 3:
            raise ValueError("outline_mm needs at least 3 points")
        return v

    @model_validator(mode="after")
    def _located(self) -> Finding:
        if self.center_mm is None and self.region is None:
            raise ValueError(f"finding {self.tracking_id!r} needs center_mm or region")
        if self.recist_axes_px is not None:
            if len(self.recist_axes_px) != 4:
                raise ValueError("recist_axes_px needs 4 points (long axis, then short axis)")
            if self.region is None:
                raise ValueError("recist_axes_px needs the region (key slice) they lie on")
        if (
            self.long_axis_mm is not None
            and self.short_axis_mm is not None
            and self.short_axis_mm > self.long_axis_mm
        ):
            raise ValueError("short_axis_mm must not exceed long_axis_mm")
        return self


class ModelIdentity(_Model):
    """Identity of the model bundle that produced a result (IHE AIR).

    ``device_uid`` must change whenever the weights change; the trainer derives
    it from the weights' sha256.
    """

    name: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=64)
    device_uid: str = Field(min_length=3, max_length=64, pattern=r"^[0-9]+(\.[0-9]+)+$")
    manufacturer: str = Field("cad-node", min_length=1, max_length=64)
    weights_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")


class ChestRadiographMeasurements(_Model):
    """Lung areas and the cardiothoracic ratio measured on one frontal radiograph.

    Coordinates are ``(column, row)`` on the *stored* source image
    (image-relative, as :class:`Region2D`).  Millimetre quantities are None
    when the image has no pixel spacing (``geometry_note`` says why); the
    pixel widths and the ratio are always given when measurable.
    """

    sop_instance_uid: str
    #: Outlines (closed polygons, >= 3 vertices, not repeated) of the masks.
    right_lung_outline: list[Point2D] | None = None
    left_lung_outline: list[Point2D] | None = None
    heart_outline: list[Point2D] | None = None
    right_lung_area_cm2: float | None = Field(None, gt=0)
    left_lung_area_cm2: float | None = Field(None, gt=0)
    #: Widest horizontal heart extent and widest inner thoracic extent: the
    #: two end points of each line.
    heart_line: tuple[Point2D, Point2D] | None = None
    thorax_line: tuple[Point2D, Point2D] | None = None
    heart_width_px: float | None = Field(None, gt=0)
    thorax_width_px: float | None = Field(None, gt=0)
    heart_width_mm: float | None = Field(None, gt=0)
    thorax_width_mm: float | None = Field(None, gt=0)
    #: Heart width / thorax width (PA only); None when not assessable.
    ctr: float | None = Field(None, gt=0)
    #: Why the CTR is missing (e.g. "not assessable on an AP view").
    ctr_not_assessable: str | None = None
    #: How the mm scale was obtained, or why there is none.
    geometry_note: str = ""

    @model_validator(mode="after")
    def _ctr(self) -> ChestRadiographMeasurements:
        if self.ctr is None and not self.ctr_not_assessable:
            raise ValueError("a missing CTR needs ctr_not_assessable (the reason)")
        if self.ctr is not None and (self.heart_line is None or self.thorax_line is None):
            raise ValueError("a CTR needs its heart and thorax lines")
        for name in ("right_lung_outline", "left_lung_outline", "heart_outline"):
            v = getattr(self, name)
            if v is not None and len(v) < 3:
                raise ValueError(f"{name} needs at least 3 vertices")
        return self


class ImageClassification(_Model):
    """A whole-image probability and its decision at a model's operating point.

    Chest X-ray part 2 (issue #12): "Abnormal" (the ``cxr-abnormal`` bundle)
    and "Tuberculosis" (``cxr-tb``).  ``threshold`` is the bundle's stored
    operating threshold; ``positive`` is ``probability >= threshold``.
    """

    finding_type: CodedFindingType
    probability: float = Field(ge=0.0, le=1.0)
    #: Operating threshold of the model (stored in its bundle); None: no decision.
    threshold: float | None = Field(None, ge=0.0, le=1.0)
    #: How the threshold was chosen, with its measured figure (for the report).
    operating_rule: str | None = None
    #: The model bundle that produced the probability.
    model: ModelIdentity

    @property
    def positive(self) -> bool | None:
        """The decision at the operating point (None without a threshold)."""
        return None if self.threshold is None else self.probability >= self.threshold

    def describe(self) -> str:
        """One line for the report, e.g. ``"Abnormal probability 0.73 (...): positive"``."""
        text = f"{self.finding_type.meaning} probability {self.probability:.3f}"
        text += f" ({self.model.name} {self.model.version})"
        if self.threshold is not None:
            verdict = "POSITIVE" if self.positive else "negative"
            text += f": {verdict} at the operating threshold {self.threshold:.4g}"
            if self.operating_rule:
                text += f" ({self.operating_rule})"
        return text


class AnalysisResult(_Model):
    """Everything one pipeline run over one series produced.

    ``status == FAILED`` with ``failure_reason`` is a failed analysis; a
    completed analysis with no findings is an explicit negative result.
    """

    pipeline: str
    status: AnalysisStatus
    failure_reason: str | None = None
    #: Series the findings were computed on.
    series_instance_uid: str
    findings: list[Finding] = Field(default_factory=list)
    #: Organ masks by site, e.g. ``{FindingSite.LEFT_LUNG: mask}``.
    organ_masks: dict[FindingSite, ImageMask] = Field(default_factory=dict, exclude=True)
    #: Study-level measurements, e.g. ``{"left_lung_volume_ml": 2510.0}``.
    measurements: dict[str, float] = Field(default_factory=dict)
    #: Study-level qualitative results, e.g. ``{"lung_rads": "4B"}``.
    qualitative: dict[str, str] = Field(default_factory=dict)
    #: Inputs a score could not use (e.g. "patient age missing for Brock").
    notes: list[str] = Field(default_factory=list)
    model: ModelIdentity | None = None
    #: Chest radiograph lung areas and cardiothoracic ratio (pipeline ``cxr``).
    radiograph: ChestRadiographMeasurements | None = None
    #: Whole-image probabilities with their decisions (chest X-ray: abnormal, TB).
    classifications: list[ImageClassification] = Field(default_factory=list)
    #: Attribution heatmap in [0, 1] on the source image (one frame), zero outside
    #: the lungs (pipeline ``cxr``; excluded from JSON like the masks).
    attribution: ImageMask | None = Field(None, exclude=True)
    #: How the heatmap was computed (method, model), for the SC legend and the PM.
    attribution_method: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> AnalysisResult:
        if self.status is AnalysisStatus.FAILED:
            if not self.failure_reason:
                raise ValueError("a failed analysis needs a failure_reason")
            if self.findings:
                raise ValueError("a failed analysis carries no findings")
        ids = [f.tracking_id for f in self.findings]
        if len(set(ids)) != len(ids):
            raise ValueError("tracking_id values must be unique within a result")
        return self
