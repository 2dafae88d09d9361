"""Comprehensive 3D SR with a TID 1500 Measurement Report.

Content tree (PS3.16 TID 1500)::

    Imaging Measurement Report
    ├─ Language, Observation Context: device observer = the model bundle
    │    (Device Observer UID = ModelIdentity.device_uid, name, manufacturer)
    ├─ Procedure reported: CT of chest / plain chest X-ray (the imaging, not the AI)
    ├─ Imaging Measurements
    │    └─ one Measurement Group per finding (TID 1410 planar / TID 1411 volumetric):
    │         Tracking Identifier + Tracking UID, Finding (type), Finding Site,
    │         Referenced Segment (TID 1411, when a SEG is built),
    │         Volume surface SCOORD3D POINT = centre (CT), or Image Region
    │         SCOORD POLYLINE on the referenced image (CR/DX or one slice),
    │         Measurements (long/short axis mm, volume mm3, mean HU,
    │         certainty, probability of cancer), each with TID 4019 algorithm id
    └─ Qualitative Evaluations (TID 1500 row 12)
         ├─ CAD Processing and Findings Summary (DCM 111017): all algorithms
         │    succeeded with findings (111242) / without findings (111241) /
         │    no algorithms succeeded (111245, failed analysis)
         └─ Comment: failure reason, study-level results, notes, disclaimer

Failed analysis (IHE AIR: the consumer must be able to tell "no result" from
"negative result"): an SR is still produced, with no Measurement Group, the
summary code 111245 "No algorithms succeeded; without findings" and the
failure reason as a comment.  "No findings" is 111241 and the comment "No
findings.".  Both omit the Imaging Measurements container: TID 1500 needs at
least one of row 6 (Imaging Measurements), row 10 (Derived Imaging
Measurements) and row 12 (Qualitative Evaluations), and row 12 is present.

The document is COMPLETE, UNVERIFIED (VerificationFlag, PS3.3 C.17.2), in the
source study and a new series; Contributing Equipment lists the algorithm.
"""

from __future__ import annotations

import enum
from typing import Any

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from cad_node.imaging.radiograph import radiograph_geometry
from cad_node.results._common import (
    BuildContext,
    SeriesNumber,
    processing_equipment,
    series_description,
)
from cad_node.results.findings import AnalysisStatus, Finding, Region2D
from cad_node.results.operating_point import (
    BELOW_OPERATING_POINT,
    CAD_OPERATING_POINT,
    PRESENTATION_OPTIONAL,
    RENDERING_INTENT,
)
from cad_node.results.planar import (
    LONG_AXIS,
    SHORT_AXIS,
    Bidirectional,
    PlanarRegion,
    bidirectional_axes,
    key_frame,
    planar_group,
)
from cad_node.results.seg import SegResult

__all__ = [
    "CARDIOTHORACIC_RATIO",
    "LOCAL_CODING_SCHEME",
    "ProcedureReported",
    "SummaryCode",
    "build_sr",
    "classification_groups",
    "key_slice_axes",
    "procedure_reported",
    "radiograph_groups",
    "recist_group",
    "region_polyline",
]


class ProcedureReported:
    """CID 100-style codes for the imaging procedure the report is about (SNOMED CT)."""

    CT_CHEST = Code("169069000", "SCT", "Computed tomography of chest")
    CHEST_XRAY = Code("399208008", "SCT", "Plain chest X-ray")


#: Modality (0008,0060) defined terms (PS3.3 C.7.3.1.1.1) -> Procedure Reported.
_PROCEDURE_BY_MODALITY = {
    "CT": ProcedureReported.CT_CHEST,
    "CR": ProcedureReported.CHEST_XRAY,
    "DX": ProcedureReported.CHEST_XRAY,
}


#: Pipelines whose procedure is not the modality's default (ct-lesion: CT of any region).
_PROCEDURE_BY_PIPELINE = {
    "ct-lesion": Code("77477000", "SCT", "Computed tomography"),
}


def procedure_reported(modality: str) -> Code:
    """TID 1500 row 4 Procedure Reported for the source ``modality``.

    Raises
    ------
    ValueError
        A modality the node does not analyse (no chest procedure to report).
    """
    try:
        return _PROCEDURE_BY_MODALITY[modality]
    except KeyError:
        raise ValueError(
            f"no Procedure Reported for source Modality {modality!r}; "
            f"expected one of {sorted(_PROCEDURE_BY_MODALITY)}"
        ) from None


class SummaryCode(enum.Enum):
    """CID 6047 "CAD Processing and Findings Summary" values (PS3.16)."""

    WITH_FINDINGS = codes.DCM.AllAlgorithmsSucceededWithFindings
    WITHOUT_FINDINGS = codes.DCM.AllAlgorithmsSucceededWithoutFindings
    FAILED = codes.DCM.NoAlgorithmsSucceededWithoutFindings


#: Value Type (0040,A040) of a 3-D spatial coordinate content item (PS3.3 C.17.3.2.1).
SCOORD3D_VALUE_TYPE = "SCOORD3D"
#: TID 1500 row 12 container.
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
#: Measurement concepts.
ATTENUATION_COEFFICIENT = Code("112031", "DCM", "Attenuation Coefficient")
CERTAINTY_OF_FINDING = codes.DCM.CertaintyOfFinding
PROBABILITY_OF_CANCER = codes.DCM.ProbabilityOfCancer
#: UCUM units.
UNIT_MM = codes.UCUM.Millimeter
UNIT_MM3 = codes.UCUM.CubicMillimeter
UNIT_HU = codes.UCUM.HounsfieldUnit
UNIT_NONE = codes.UCUM.NoUnits


def region_polyline(region: Region2D) -> np.ndarray:
    """Closed SCOORD POLYLINE (PS3.3 C.18.6.1.1) of a box or polygon, (n, 2) float."""
    if region.kind == "box":
        (x0, y0), (x1, y1) = region.points
        pts = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    else:
        pts = [*region.points, region.points[0]]
    return np.asarray(pts, dtype=np.float32)


def _measurements(finding: Finding, algo: hd.sr.AlgorithmIdentification) -> list[hd.sr.Measurement]:
    out: list[hd.sr.Measurement] = []

    def add(name: Code, value: float | None, unit: Code, derivation: Code | None = None) -> None:
        if value is not None:
            out.append(
                hd.sr.Measurement(
                    name=name,
                    value=float(value),
                    unit=unit,
                    derivation=derivation,
                    algorithm_id=algo,
                )
            )

    add(LONG_AXIS, finding.long_axis_mm, UNIT_MM)
    add(SHORT_AXIS, finding.short_axis_mm, UNIT_MM)
    add(codes.SCT.Volume, finding.volume_mm3, UNIT_MM3)
    add(ATTENUATION_COEFFICIENT, finding.mean_hu, UNIT_HU, codes.SCT.Mean)
    add(CERTAINTY_OF_FINDING, finding.probability, UNIT_NONE)
    add(PROBABILITY_OF_CANCER, finding.malignancy_probability, UNIT_NONE)
    return out


def _referenced_segment(
    ctx: BuildContext, seg: SegResult, number: int, source_uids: tuple[str, ...]
) -> hd.sr.ReferencedSegment:
    """TID 1411 Referenced Segment: SEG instance, segment number and source images.

    No Referenced Frame Number: the SR image reference (PS3.3 Image Reference
    Macro) allows Referenced Segment Number only when frame numbers are
    absent, and dciodvfy enforces it.
    Built directly rather than with ``ReferencedSegment.from_segmentation``,
    which (highdicom 0.28) fails when the SEG has a single segment and keeps
    the Segment Identification in the shared functional groups.
    """
    ds = seg.dataset
    images = [ctx.source.by_uid[u] for u in source_uids]
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        segment_number=number,
        source_images=[
            hd.sr.SourceImageForSegmentation(str(d.SOPClassUID), str(d.SOPInstanceUID))
            for d in sorted(images, key=ctx.source.images.index)
        ],
    )


def _row_column_spacing(ctx: BuildContext, image: Dataset) -> tuple[float, float]:
    """Pixel spacing ``(row, column)`` of a source image, in mm.

    A cross-sectional image's comes from its plane (:mod:`cad_node.imaging.geometry`),
    a radiograph's from :func:`cad_node.imaging.radiograph.radiograph_geometry`.

    Raises
    ------
    ValueError
        The image has no millimetre scale.
    """
    plane = ctx.source.plane(str(image.SOPInstanceUID))
    if plane is not None:
        return plane.pixel_spacing
    spacing = radiograph_geometry(image).spacing_mm
    if spacing is None:
        raise ValueError(f"image {image.SOPInstanceUID} has no Pixel Spacing for lengths in mm")
    return spacing


def key_slice_axes(ctx: BuildContext, finding: Finding) -> tuple[Dataset, Bidirectional] | None:
    """The key slice of a masked finding and its long/short axes and outline on it.

    The key slice is the source image whose mask frame has the largest
    in-plane extent (:func:`cad_node.results.planar.key_frame`), frames taken
    in source order.  None for a finding without a mask on a received image.
    """
    mask = finding.mask
    if mask is None:
        return None
    frames = [
        (ctx.source.images.index(ctx.source.by_uid[u]), k)
        for k, u in enumerate(mask.sop_instance_uids)
        if u in ctx.source.by_uid
    ]
    if not frames:
        return None
    frames.sort()
    # the SC outline's rule: fractional masks at >= 0.5
    binary = np.stack([
        np.asarray(mask.array[k]) >= 0.5 if mask.is_fractional else np.asarray(mask.array[k], bool)
        for _, k in frames
    ])
    first = ctx.source.images[frames[0][0]]
    best = key_frame(binary, _row_column_spacing(ctx, first))
    if best is None:
        return None
    image = ctx.source.images[frames[best][0]]
    axes = bidirectional_axes(binary[best], _row_column_spacing(ctx, image))
    assert axes is not None
    return image, axes


def _planar_ct_group(
    ctx: BuildContext,
    index: int,
    finding: Finding,
    algo: hd.sr.AlgorithmIdentification,
    common: dict[str, object],
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | None:
    """TID 1410 group of a CT finding on its key slice (bidirectional axes, outline)."""
    found = key_slice_axes(ctx, finding)
    if found is None:
        return None
    image, axes = found
    others = [
        m
        for m in _measurements(finding, algo)
        if m[0].ConceptNameCodeSequence[0].CodeValue
        not in (LONG_AXIS.value, SHORT_AXIS.value)
    ]
    return planar_group(
        identifier=finding.tracking_id,
        tracking_uid=ctx.tracking_uid(index),
        image=image,
        region=axes.outline,
        finding_type=common["finding_type"],  # type: ignore[arg-type]
        lengths=[axes.long_axis, axes.short_axis],
        measurements=others,
        algorithm=algo,
        finding_sites=common["finding_sites"] or (),  # type: ignore[arg-type]
    )


def _groups(ctx: BuildContext, index: int, finding: Finding, seg: SegResult | None) -> list[Any]:
    """The measurement groups of one finding: planar (key slice) first, then volumetric.

    OHIF merges groups that share a Tracking UID and places the finding on the
    first top-level SCOORD, so the planar group of a CT finding comes first.
    """
    group = _group(ctx, index, finding, seg)
    if not isinstance(group, hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations):
        return [group]
    algo = _algorithm(ctx)
    planar = _planar_ct_group(ctx, index, finding, algo, _common_items(ctx, index, finding, algo))
    return [group] if planar is None else [planar, group]


def _algorithm(ctx: BuildContext) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=ctx.model.name, version=ctx.model.version, manufacturer=ctx.model.manufacturer
    )


def _common_items(
    ctx: BuildContext, index: int, finding: Finding, algo: hd.sr.AlgorithmIdentification
) -> dict[str, object]:
    ft = finding.finding_type
    return {
        "finding_type": Code(ft.code, "SCT", ft.meaning),
        "finding_sites": (
            [hd.sr.FindingSite(Code(finding.site.code, "SCT", finding.site.meaning))]
            if finding.site
            else None
        ),
    }


def _group(
    ctx: BuildContext, index: int, finding: Finding, seg: SegResult | None
) -> (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
):
    if finding.recist_axes_px is not None and finding.region is not None:
        return recist_group(ctx, index, finding)
    algo = _algorithm(ctx)
    tracking = hd.sr.TrackingIdentifier(uid=ctx.tracking_uid(index), identifier=finding.tracking_id)
    ft = finding.finding_type
    common: dict[str, object] = {
        "tracking_identifier": tracking,
        "finding_type": Code(ft.code, "SCT", ft.meaning),
        "algorithm_id": algo,
        "measurements": _measurements(finding, algo) or None,
        "finding_sites": (
            [hd.sr.FindingSite(Code(finding.site.code, "SCT", finding.site.meaning))]
            if finding.site
            else None
        ),
    }
    src = ctx.source
    first = src.first
    for_uid = first.get("FrameOfReferenceUID")
    if finding.center_mm is not None and for_uid and src.has_geometry:
        surface = hd.sr.VolumeSurface(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=np.asarray([finding.center_mm], dtype=np.float64),
            frame_of_reference_uid=str(for_uid),
            source_series=hd.sr.SourceSeriesForSegmentation(str(first.SeriesInstanceUID)),
        )
        info = seg.segment_for(finding.tracking_id) if seg is not None else None
        if info is None:
            return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                referenced_volume_surface=surface,
                **common,  # type: ignore[arg-type]
            )
        assert seg is not None
        ref = _referenced_segment(ctx, seg, info.number, info.source_uids)
        group = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_segment=ref,
            **common,  # type: ignore[arg-type]
        )
        # The finding centre as SCOORD3D, for viewers without SEG.  Only the
        # SCOORD3D item: its "Source Series for Segmentation" sibling must not
        # sit next to the segment's "Source Image for Segmentation" items (TID
        # 1411 takes one or the other; readers such as highdicom reject both).
        group[0].ContentSequence.extend(
            item for item in surface if item.ValueType == SCOORD3D_VALUE_TYPE
        )
        return group
    if finding.region is None:
        raise ValueError(
            f"finding {finding.tracking_id!r} has a centre but the source has no patient "
            "geometry (Frame of Reference); give a 2-D region instead"
        )
    region = finding.region
    image = src.by_uid.get(region.sop_instance_uid)
    if image is None:
        raise ValueError(
            f"finding {finding.tracking_id!r} references SOP Instance {region.sop_instance_uid}, "
            "which was not received"
        )
    planar = (
        PlanarRegion.box(region.points[0], region.points[1])
        if region.kind == "box"
        else PlanarRegion.polygon(region.points)
    )
    return planar_group(
        identifier=finding.tracking_id,
        tracking_uid=ctx.tracking_uid(index),
        image=image,
        region=planar,
        finding_type=common["finding_type"],  # type: ignore[arg-type]
        measurements=common["measurements"] or (),  # type: ignore[arg-type]
        algorithm=algo,
        finding_sites=common["finding_sites"] or (),  # type: ignore[arg-type]
        frame_number=region.frame_number,
    )


def _below_group(ctx: BuildContext, finding: Finding) -> Any:
    """A candidate below the operating point: volumetric group only, labelled.

    No planar group (OHIF would list it with the findings) and no SEG segment;
    its Tracking Identifier says "(below operating point)", and two
    qualitative evaluations say it in codes: Rendering Intent "Presentation
    Optional" (CID 6034, as CAD SR marks sub-threshold marks) and CAD
    Operating Point "Below operating point".
    """
    algo = _algorithm(ctx)
    common = _common_items(ctx, 0, finding, algo)
    src = ctx.source
    for_uid = src.first.get("FrameOfReferenceUID")
    tracking = hd.sr.TrackingIdentifier(
        uid=ctx.tracking_uid_of(finding),
        identifier=f"{finding.tracking_id} (below operating point)",
    )
    qualitative = [
        hd.sr.QualitativeEvaluation(name=RENDERING_INTENT, value=PRESENTATION_OPTIONAL),
        hd.sr.QualitativeEvaluation(name=CAD_OPERATING_POINT, value=BELOW_OPERATING_POINT),
    ]
    kwargs: dict[str, Any] = {
        "tracking_identifier": tracking,
        "finding_type": common["finding_type"],
        "algorithm_id": algo,
        "measurements": _measurements(finding, algo) or None,
        "finding_sites": common["finding_sites"],
        "qualitative_evaluations": qualitative,
    }
    if finding.center_mm is not None and for_uid and src.has_geometry:
        surface = hd.sr.VolumeSurface(
            graphic_type=hd.sr.GraphicTypeValues3D.POINT,
            graphic_data=np.asarray([finding.center_mm], dtype=np.float64),
            frame_of_reference_uid=str(for_uid),
            source_series=hd.sr.SourceSeriesForSegmentation(str(src.first.SeriesInstanceUID)),
        )
        return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            referenced_volume_surface=surface, **kwargs
        )
    if finding.region is None or finding.region.sop_instance_uid not in src.by_uid:
        raise ValueError(f"candidate {finding.tracking_id!r} has no location on a received image")
    region = finding.region
    frames = [region.frame_number] if region.frame_number is not None else None
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=region_polyline(region),
            source_image=hd.sr.SourceImageForRegion.from_source_image(
                src.by_uid[region.sop_instance_uid], frames
            ),
        ),
        **kwargs,
    )


def recist_group(
    ctx: BuildContext, index: int, finding: Finding
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """TID 1410 planar group of a finding measured on its key slice (``recist_axes_px``).

    Built with :func:`cad_node.results.planar.planar_group` (Bidirectional):
    the Image Region is the finding's ``region`` (its box on the key slice),
    the Long Axis and Short Axis NUMs come first, each with the 2-point SCOORD
    POLYLINE of the axis INFERRED FROM; their values are the polylines'
    lengths on the key slice's Pixel Spacing; type as Finding Site,
    probability as Certainty of Finding (after the axes).

    Raises
    ------
    ValueError
        The key slice was not received, or a point lies outside it.
    """
    from cad_node.results.planar import LinearMeasurement, PlanarRegion, polyline_length_mm

    assert finding.region is not None and finding.recist_axes_px is not None
    image = ctx.source.by_uid.get(finding.region.sop_instance_uid)
    if image is None:
        raise ValueError(
            f"finding {finding.tracking_id!r} references SOP Instance "
            f"{finding.region.sop_instance_uid}, which was not received"
        )
    spacing = (float(image.PixelSpacing[0]), float(image.PixelSpacing[1]))
    pts = np.asarray(finding.recist_axes_px, dtype=np.float32)
    lengths = [
        LinearMeasurement(name, round(polyline_length_mm(p, spacing), 2), p)
        for name, p in ((codes.SCT.LongAxis, pts[0:2]), (codes.SCT.ShortAxis, pts[2:4]))
    ]
    algo = _algorithm(ctx)
    common = _common_items(ctx, index, finding, algo)
    others = [
        m
        for m in _measurements(finding, algo)
        if m[0].ConceptNameCodeSequence[0].CodeValue
        not in (codes.SCT.LongAxis.value, codes.SCT.ShortAxis.value)
    ]
    (x0, y0), (x1, y1) = finding.region.points[:2]
    region = (PlanarRegion.box((x0, y0), (x1, y1)) if finding.region.kind == "box"
              else PlanarRegion.polygon(finding.region.points))
    return planar_group(
        identifier=finding.tracking_id,
        tracking_uid=ctx.tracking_uid(index),
        image=image,
        region=region,
        finding_type=common["finding_type"],  # type: ignore[arg-type]
        lengths=lengths,
        measurements=others,
        algorithm=algo,
        finding_sites=common["finding_sites"] or (),  # type: ignore[arg-type]
    )


def operating_point_texts(ctx: BuildContext) -> list[str]:
    """What the report says about the operating point (SR comments, summary page)."""
    op = ctx.operating_point
    if op.threshold is None or ctx.result.status is AnalysisStatus.FAILED:
        return []
    out = [f"Operating point: {op.describe()} (findings below it are not reported as findings)."]
    if not ctx.result.findings:
        kind = op.below[0].finding_type.meaning.lower() if op.below else "finding"
        out.append(f"No {kind} found at the operating point ({op.describe()}).")
    n = len(op.below)
    if n:
        shown = "listed separately, labelled 'below operating point'" if op.include_below else (
            "not reported")
        out.append(f"{n} candidate(s) below the operating point: {shown}.")
    return out


def _qualitative(ctx: BuildContext) -> hd.sr.ContainerContentItem:
    result = ctx.result
    if result.status is AnalysisStatus.FAILED:
        summary = SummaryCode.FAILED
    elif result.findings:
        summary = SummaryCode.WITH_FINDINGS
    else:
        summary = SummaryCode.WITHOUT_FINDINGS
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
    )
    items: list[hd.sr.ContentItem] = [
        hd.sr.CodeContentItem(
            name=codes.DCM.CADProcessingAndFindingsSummary,
            value=summary.value,
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        )
    ]
    texts: list[str] = []
    at_op = operating_point_texts(ctx)
    if result.status is AnalysisStatus.FAILED:
        texts.append(f"Analysis failed: {result.failure_reason}")
    elif not result.findings and not at_op:
        texts.append("No findings.")
    texts += at_op
    if result.status is AnalysisStatus.COMPLETED:
        texts += [c.describe() for c in result.classifications]
    texts += [f"{k}: {v}" for k, v in sorted(result.qualitative.items())]
    texts += [f"{k}: {v:g}" for k, v in sorted(result.measurements.items())]
    texts += list(result.notes)
    texts.append(ctx.settings.disclaimer)
    for text in texts:
        items.append(
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=text[:1024],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
        )
    container.ContentSequence = hd.sr.ContentSequence(items)
    return container


def build_sr(ctx: BuildContext, seg: SegResult | None = None) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 Comprehensive 3D SR of ``ctx.result``.

    Parameters
    ----------
    ctx : BuildContext
        Result, source series, settings and UID factory.
    seg : SegResult, optional
        The SEG built from the same result; segmented findings then reference
        their segment (TID 1411) and the SEG becomes evidence.

    Returns
    -------
    highdicom.sr.Comprehensive3DSR
    """
    model = ctx.model
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=model.device_uid,
        name=model.name,
        manufacturer_name=model.manufacturer,
        model_name=f"{model.name} {model.version}"[:64],
    )
    context = hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device
        )
    )
    groups: list[Any] = (
        [g for i, f in enumerate(ctx.result.findings) for g in _groups(ctx, i, f, seg)]
        if ctx.result.status is AnalysisStatus.COMPLETED
        else []
    )
    if ctx.result.status is AnalysisStatus.COMPLETED:
        groups += [_below_group(ctx, f) for f in ctx.operating_point.reported_below]
    if ctx.result.status is AnalysisStatus.COMPLETED and ctx.result.radiograph is not None:
        groups.extend(radiograph_groups(ctx))
    if ctx.result.status is AnalysisStatus.COMPLETED:
        groups.extend(classification_groups(ctx))
    procedure = _PROCEDURE_BY_PIPELINE.get(ctx.result.pipeline) or procedure_reported(
        str(ctx.source.first.get("Modality", "")))
    placeholder = not groups
    if placeholder:
        # highdicom insists on one measurement group; TID 1500 does not (rows
        # 6, 10 and 12 are "at least one of").  Build with a throw-away
        # TID 1501 group and drop the Imaging Measurements container below:
        # the Qualitative Evaluations container carries the statement.
        groups = [
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=ctx.uids.uid("sr.placeholder"), identifier="placeholder"
                )
            )
        ]
    report = hd.sr.MeasurementReport(
        observation_context=context,
        procedure_reported=procedure,
        imaging_measurements=groups,
    )
    root = report[0]
    if placeholder:
        root.ContentSequence = hd.sr.ContentSequence(
            [
                item
                for item in root.ContentSequence
                if item.ConceptNameCodeSequence[0].CodeValue != codes.DCM.ImagingMeasurements.value
            ]
        )
    root.ContentSequence.append(_qualitative(ctx))
    evidence = list(ctx.source.images)
    if seg is not None and any(
        seg.segment_for(f.tracking_id) is not None for f in ctx.result.findings
    ):
        evidence.append(seg.dataset)
    kwargs = ctx.common_kwargs()
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=root,
        series_instance_uid=ctx.uids.uid("sr.series"),
        series_number=ctx.series_number(SeriesNumber.SR),
        sop_instance_uid=ctx.uids.uid("sr.instance", 1),
        instance_number=1,
        manufacturer=ctx.settings.manufacturer,
        is_complete=True,
        is_final=True,
        is_verified=False,
        contributing_equipment=[processing_equipment(model, ctx.when)],
        series_description=series_description("measurement report", model),
        manufacturer_model_name=model.name,
        software_versions=model.version,
        **kwargs,
    )
    if ctx.result.radiograph is not None or ctx.result.classifications:
        sr.CodingSchemeIdentificationSequence = [_local_coding_scheme()]
    ctx.finalize(sr, "sr")
    return sr


# -- chest radiograph: lung areas and the cardiothoracic ratio (TID 1410) ----------

#: Coding scheme of the node's own concepts (PS3.16 8.2: "99" prefix = private),
#: declared in the Coding Scheme Identification Sequence (PS3.3 C.12.1.1.2).
LOCAL_CODING_SCHEME = "99CADNODE"
#: No standard code exists for the cardiothoracic ratio in SNOMED CT or DCM.
CARDIOTHORACIC_RATIO = Code("CTR", LOCAL_CODING_SCHEME, "Cardiothoracic ratio")
UNIT_CM2 = codes.UCUM.SquareCentimeter
UNIT_RATIO = codes.UCUM.Ratio


def _local_coding_scheme() -> Dataset:
    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_CODING_SCHEME
    item.CodingSchemeName = "cad-node local concepts"
    item.CodingSchemeResponsibleOrganization = "cad-node"
    return item


def _scoord_in(num: hd.sr.Measurement, points: Any, image: Dataset) -> None:
    """Put an INFERRED FROM SCOORD POLYLINE (SELECTED FROM ``image``) inside a NUM.

    OHIF's measurement tools read a planar NUM's geometry from there (see
    :mod:`cad_node.results.planar`).
    """
    item = hd.sr.ScoordContentItem(
        name=codes.DCM.ImageRegion,
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.asarray(points, dtype=np.float32),
        relationship_type=hd.sr.RelationshipTypeValues.INFERRED_FROM,
    )
    item.ContentSequence = hd.sr.ContentSequence(
        [hd.sr.SourceImageForRegion.from_source_image(image)]
    )
    content = num[0]
    if "ContentSequence" not in content:
        content.ContentSequence = hd.sr.ContentSequence([])
    content.ContentSequence.append(item)


def radiograph_groups(ctx: BuildContext) -> list[Any]:
    """TID 1410 groups of a chest radiograph's :class:`ChestRadiographMeasurements`.

    * one group per outlined structure (right lung, left lung, heart): the
      outline as the Image Region, the area (cm², only with a mm scale);
    * one "Cardiothoracic ratio" group (PA films): NUM Width (mm) of the
      heart and of the thorax, each qualified by its Finding Site and holding
      its POLYLINE, then NUM Cardiothoracic ratio.  Without a mm scale the
      widths are not reported and both POLYLINEs go inside the ratio NUM.

    Raises
    ------
    ValueError
        The measurements reference an image that was not received.
    """
    from cad_node.results.findings import FindingSite as Site
    from cad_node.results.planar import PlanarRegion, planar_group

    meas = ctx.result.radiograph
    if meas is None:
        return []
    image = ctx.source.by_uid.get(meas.sop_instance_uid)
    if image is None:
        raise ValueError(f"radiograph measurements reference {meas.sop_instance_uid}, "
                         "which was not received")
    algo = _algorithm(ctx)
    groups: list[Any] = []
    structures = (
        (Site.RIGHT_LUNG, meas.right_lung_outline, meas.right_lung_area_cm2),
        (Site.LEFT_LUNG, meas.left_lung_outline, meas.left_lung_area_cm2),
        (Site.HEART, meas.heart_outline, None),
    )
    for site, poly, area in structures:
        if poly is None:
            continue
        code = Code(site.code, "SCT", site.meaning)
        numeric = (
            [hd.sr.Measurement(name=codes.SCT.Area, value=round(float(area), 2), unit=UNIT_CM2,
                               algorithm_id=algo)]
            if area is not None else []
        )
        groups.append(planar_group(
            identifier=site.meaning,
            tracking_uid=ctx.uids.uid("cxr.tracking", site.name),
            image=image,
            region=PlanarRegion.polygon(poly),
            finding_type=code,
            measurements=numeric,
            algorithm=algo,
            finding_sites=[hd.sr.FindingSite(code)],
        ))
    if meas.ctr is None or meas.heart_line is None or meas.thorax_line is None:
        return groups
    heart = hd.sr.FindingSite(Code(Site.HEART.code, "SCT", Site.HEART.meaning))
    thorax = hd.sr.FindingSite(Code(Site.THORAX.code, "SCT", Site.THORAX.meaning))
    ratio = hd.sr.Measurement(name=CARDIOTHORACIC_RATIO, value=round(meas.ctr, 3),
                              unit=UNIT_RATIO, algorithm_id=algo)
    numeric = []
    lines: list[tuple[hd.sr.Measurement, Any]] = []
    if meas.heart_width_mm is not None and meas.thorax_width_mm is not None:
        hw = hd.sr.Measurement(name=codes.SCT.Width, value=round(meas.heart_width_mm, 2),
                               unit=UNIT_MM, finding_sites=[heart], algorithm_id=algo)
        tw = hd.sr.Measurement(name=codes.SCT.Width, value=round(meas.thorax_width_mm, 2),
                               unit=UNIT_MM, finding_sites=[thorax], algorithm_id=algo)
        numeric = [hw, tw, ratio]
        lines = [(hw, meas.heart_line), (tw, meas.thorax_line)]
    else:
        numeric = [ratio]
        lines = [(ratio, meas.heart_line), (ratio, meas.thorax_line)]
    groups.append(planar_group(
        identifier="Cardiothoracic ratio",
        tracking_uid=ctx.uids.uid("cxr.tracking", "CTR"),
        image=image,
        region=PlanarRegion(hd.sr.GraphicTypeValues.POLYLINE, np.asarray(meas.thorax_line)),
        finding_type=Code(Site.HEART.code, "SCT", Site.HEART.meaning),
        measurements=numeric,
        algorithm=algo,
        finding_sites=[heart],
    ))
    for num, points in lines:
        _scoord_in(num, points, image)
    return groups


# -- whole-image probabilities and decisions (chest X-ray part 2, TID 1501) ----------

#: The bundle's operating threshold of a whole-image probability (no standard code).
OPERATING_THRESHOLD = Code("OP-THRESHOLD", LOCAL_CODING_SCHEME, "Operating threshold")
#: Values of the decision at the operating point (SNOMED CT qualifiers).
PRESENT = codes.SCT.Present
ABSENT = codes.SCT.Absent


def classification_groups(ctx: BuildContext) -> list[Any]:
    """One TID 1501 group per whole-image probability (:class:`ImageClassification`).

    Tracking Identifier ``"<type> (whole image)"``, Finding = the type
    ("Abnormal", "Tuberculosis"), NUM Certainty of Finding = the probability,
    NUM Operating threshold (local concept) and the decision as a qualitative
    evaluation ``<type> = Present / Absent`` at that threshold; the algorithm
    is the classifying bundle (TID 4019), not the pipeline's segmenter.
    """
    groups: list[Any] = []
    for c in ctx.result.classifications:
        ft = Code(c.finding_type.code, "SCT", c.finding_type.meaning)
        algo = hd.sr.AlgorithmIdentification(
            name=c.model.name, version=c.model.version, manufacturer=c.model.manufacturer)
        numeric = [hd.sr.Measurement(name=CERTAINTY_OF_FINDING, value=round(c.probability, 5),
                                     unit=UNIT_NONE, algorithm_id=algo)]
        qualitative = []
        if c.threshold is not None:
            numeric.append(hd.sr.Measurement(name=OPERATING_THRESHOLD,
                                             value=round(c.threshold, 5), unit=UNIT_NONE,
                                             algorithm_id=algo))
            qualitative.append(hd.sr.QualitativeEvaluation(
                name=ft, value=PRESENT if c.positive else ABSENT))
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=ctx.uids.uid("cxr.tracking", "image", c.finding_type.name),
                identifier=f"{c.finding_type.meaning} (whole image)"),
            finding_type=ft,
            algorithm_id=algo,
            measurements=numeric,
            qualitative_evaluations=qualitative or None,
        ))
    return groups
