"""Grayscale Softcopy Presentation State (PS3.3 A.33.1) with the CAD graphics.

The same outlines as the SC key images, but as toggleable annotations on the
original images: one graphic layer ``CAD`` (yellow), per finding and per
annotated image a closed POLYLINE (mask boundary from
:func:`skimage.measure.find_contours`, or the 2-D box/polygon, or a CIRCLE of
the long-axis diameter around the centre on the nearest slice) plus a text
label, all in PIXEL units (PS3.3 C.10.5.1.2: (0, 0) is the top-left corner of
the top-left pixel, hence the +0.5 on pixel-centre contour coordinates).  CT
presentation states carry the lung window (W1500/L-600).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom import Dataset
from skimage import measure

from cad_node.results._common import BuildContext, SeriesNumber, processing_equipment
from cad_node.results.findings import Finding
from cad_node.results.sc import (
    CONTOUR_RGB,
    LUNG_WINDOW,
    _circle_radius_px,
    _pixel_of,
    key_slice_uid,
)
from cad_node.results.sr import region_polyline

__all__ = ["GRAPHIC_LAYER", "build_gsps"]

#: Name of the graphic layer that holds all CAD annotations (toggle it off to hide them).
GRAPHIC_LAYER = "CAD"
#: Body Part Examined (0018,0015) defined term (PS3.16 Annex L) for chest studies.
BODY_PART_CHEST = "CHEST"
#: PS3.3 C.10.5.1.2: contour vertices from pixel centres shift by half a pixel.
_HALF_PIXEL = 0.5
#: Contours shorter than this many vertices are noise and not drawn.
_MIN_VERTICES = 3


def _mask_polylines(finding: Finding, uid: str) -> list[np.ndarray]:
    mask = finding.mask
    if mask is None or uid not in mask.sop_instance_uids:
        return []
    frame = np.asarray(mask.array[mask.sop_instance_uids.index(uid)], dtype=np.float32)
    if not frame.any():
        return []
    padded = np.pad(frame, 1)
    out = []
    for contour in measure.find_contours(padded, 0.5):  # type: ignore[no-untyped-call]
        if len(contour) < _MIN_VERTICES:
            continue
        # (row, col) of the padded image -> (column, row) PIXEL coordinates.
        xy = contour[:, ::-1] - 1.0 + _HALF_PIXEL
        out.append(np.asarray(xy, dtype=np.float32))
    return out


def _graphics(
    ctx: BuildContext, finding: Finding, index: int, ds: Dataset
) -> tuple[list[hd.pr.GraphicObject], tuple[float, float] | None]:
    uid = str(ds.SOPInstanceUID)
    tid, tuid = finding.tracking_id, ctx.tracking_uid(index)
    objects = [
        hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
            graphic_data=xy,
            units=hd.pr.AnnotationUnitsValues.PIXEL,
            tracking_id=tid,
            tracking_uid=tuid,
        )
        for xy in _mask_polylines(finding, uid)
    ]
    if not objects and finding.region is not None and finding.region.sop_instance_uid == uid:
        objects.append(
            hd.pr.GraphicObject(
                graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
                graphic_data=region_polyline(finding.region),
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                tracking_id=tid,
                tracking_uid=tuid,
            )
        )
    if not objects and finding.center_mm is not None and "ImageOrientationPatient" in ds:
        cx, cy = _pixel_of(ds, finding.center_mm)
        radius = _circle_radius_px(finding, ds)
        objects.append(
            hd.pr.GraphicObject(
                graphic_type=hd.pr.GraphicTypeValues.CIRCLE,
                graphic_data=np.asarray([[cx, cy], [cx + radius, cy]], dtype=np.float32),
                units=hd.pr.AnnotationUnitsValues.PIXEL,
                tracking_id=tid,
                tracking_uid=tuid,
            )
        )
    if not objects:
        return [], None
    pts = np.concatenate([np.asarray(o.GraphicData, float).reshape(-1, 2) for o in objects])
    return objects, (float(pts[:, 0].min()), float(pts[:, 1].min()))


def build_gsps(ctx: BuildContext) -> hd.pr.GrayscaleSoftcopyPresentationState:
    """Build one GSPS annotating every finding on the images it lies on.

    Raises
    ------
    ValueError
        No finding can be drawn on any received image.
    """
    layer = hd.pr.GraphicLayer(
        layer_name=GRAPHIC_LAYER,
        order=1,
        description="CAD findings",
        display_color=hd.color.CIELabColor.from_rgb(*CONTOUR_RGB),
    )
    per_image: dict[str, tuple[list[hd.pr.GraphicObject], list[hd.pr.TextObject]]] = {}
    for index, finding in enumerate(ctx.result.findings):
        uids: list[str]
        if finding.mask is not None:
            uids = [
                u
                for k, u in enumerate(finding.mask.sop_instance_uids)
                if np.asarray(finding.mask.array[k]).any()
            ]
        else:
            uids = [key_slice_uid(ctx, finding)]
        for uid in uids:
            ds = ctx.source.by_uid.get(uid)
            if ds is None:
                raise ValueError(f"finding {finding.tracking_id!r} lies on {uid}, not received")
            objects, anchor = _graphics(ctx, finding, index, ds)
            if not objects or anchor is None:
                continue
            graphics, texts = per_image.setdefault(uid, ([], []))
            graphics.extend(objects)
            texts.append(
                hd.pr.TextObject(
                    text_value=finding.tracking_id,
                    units=hd.pr.AnnotationUnitsValues.PIXEL,
                    anchor_point=(anchor[0], max(anchor[1] - 4.0, 0.0)),
                    anchor_point_visible=False,
                    tracking_id=finding.tracking_id,
                    tracking_uid=ctx.tracking_uid(index),
                )
            )
    if not per_image:
        raise ValueError("no finding can be drawn on the received images")
    ordered = [d for d in ctx.source.images if str(d.SOPInstanceUID) in per_image]
    annotations = [
        hd.pr.GraphicAnnotation(
            referenced_images=[ds],
            graphic_layer=layer,
            graphic_objects=per_image[str(ds.SOPInstanceUID)][0],
            text_objects=per_image[str(ds.SOPInstanceUID)][1],
        )
        for ds in ordered
    ]
    voi = None
    if ctx.source.is_ct:
        width, level = LUNG_WINDOW
        voi = [
            hd.pr.SoftcopyVOILUTTransformation(
                window_center=level, window_width=width, window_explanation="LUNG"
            )
        ]
    kwargs = ctx.common_kwargs()
    # GSPS has Presentation Creation Date/Time instead of Content Date/Time.
    kwargs.pop("content_date")
    kwargs.pop("content_time")
    gsps = hd.pr.GrayscaleSoftcopyPresentationState(
        referenced_images=ordered,
        series_instance_uid=ctx.uids.uid("gsps.series"),
        series_number=int(SeriesNumber.GSPS),
        sop_instance_uid=ctx.uids.uid("gsps.instance", 1),
        instance_number=1,
        manufacturer=ctx.settings.manufacturer,
        manufacturer_model_name=ctx.model.name,
        software_versions=ctx.model.version,
        device_serial_number=ctx.model.device_uid,
        content_label="CAD_FINDINGS",
        content_description=f"CAD {ctx.model.name} {ctx.model.version}"[:64],
        graphic_annotations=annotations,
        graphic_layers=[layer],
        voi_lut_transformations=voi,
        contributing_equipment=[processing_equipment(ctx.model, ctx.when)],
        series_description=f"CAD annotations {ctx.model.name} {ctx.model.version}"[:64],
        **kwargs,
    )
    # General Series Laterality is 2C for paired body parts; naming the body
    # part (the source's, else the chest every pipeline analyses) settles it.
    gsps.BodyPartExamined = str(ctx.source.first.get("BodyPartExamined") or BODY_PART_CHEST)
    ctx.finalize(gsps, "gsps")
    return gsps
