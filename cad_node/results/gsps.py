"""Grayscale Softcopy Presentation State (PS3.3 A.33.1) with the CAD graphics.

The same outlines as the SC key images, but as toggleable annotations on the
original images: one graphic layer per finding (``CAD``, ``CAD2``, ... in the
finding's colour, :func:`cad_node.results.colours.finding_rgb`, as its SEG
segment and SC outline), per annotated image a closed POLYLINE (mask boundary from
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

from cad_node.results._common import (
    BuildContext,
    SeriesNumber,
    processing_equipment,
    series_description,
)
from cad_node.results.colours import finding_rgb
from cad_node.results.findings import Finding
from cad_node.results.sc import (
    LUNG_WINDOW,
    _circle_radius_px,
    _pixel_of,
    key_slice_uid,
)
from cad_node.results.sr import region_polyline

__all__ = ["GRAPHIC_LAYER", "build_gsps"]

#: Name of the first finding's graphic layer; finding k >= 2 is on ``CAD<k>``.
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
    # One layer per finding, in the finding's colour (as its SEG segment and SC outline).
    layers = [
        hd.pr.GraphicLayer(
            layer_name=GRAPHIC_LAYER if index == 0 else f"{GRAPHIC_LAYER}{index + 1}",
            order=index + 1,
            description=f"CAD {finding.tracking_id}"[:64],
            display_color=hd.color.CIELabColor.from_rgb(*finding_rgb(index)),
        )
        for index, finding in enumerate(ctx.result.findings)
    ]
    per_image: dict[
        tuple[str, int], tuple[list[hd.pr.GraphicObject], list[hd.pr.TextObject]]
    ] = {}
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
            graphics, texts = per_image.setdefault((uid, index), ([], []))
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
    if ctx.result.radiograph is not None:
        # The radiograph's anatomy (lung and heart outlines, CTR lines) gets a layer of its
        # own after the findings' layers.
        anatomy = len(layers)
        layers.append(
            hd.pr.GraphicLayer(
                layer_name=f"{GRAPHIC_LAYER}{anatomy + 1}",
                order=anatomy + 1,
                description="CAD lungs, heart and cardiothoracic ratio",
            )
        )
        graphics_, texts_ = radiograph_graphics(ctx)
        if graphics_:
            graphics, texts = per_image.setdefault(
                (ctx.result.radiograph.sop_instance_uid, anatomy), ([], [])
            )
            graphics.extend(graphics_)
            texts.extend(texts_)
    if not per_image:
        raise ValueError("no finding can be drawn on the received images")
    position = {str(d.SOPInstanceUID): k for k, d in enumerate(ctx.source.images)}
    annotations = [
        hd.pr.GraphicAnnotation(
            referenced_images=[ctx.source.by_uid[uid]],
            graphic_layer=layers[index],
            graphic_objects=per_image[(uid, index)][0],
            text_objects=per_image[(uid, index)][1],
        )
        for uid, index in sorted(per_image, key=lambda key: (position[key[0]], key[1]))
    ]
    used = sorted({index for _, index in per_image})
    layers = [layers[i] for i in used]
    drawn = {uid for uid, _ in per_image}
    ordered = [d for d in ctx.source.images if str(d.SOPInstanceUID) in drawn]
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
        series_number=ctx.series_number(SeriesNumber.GSPS),
        sop_instance_uid=ctx.uids.uid("gsps.instance", 1),
        instance_number=1,
        manufacturer=ctx.settings.manufacturer,
        manufacturer_model_name=ctx.model.name,
        software_versions=ctx.model.version,
        device_serial_number=ctx.model.device_uid,
        content_label="CAD_FINDINGS",
        content_description=f"CAD {ctx.model.name} {ctx.model.version}"[:64],
        graphic_annotations=annotations,
        graphic_layers=layers,
        voi_lut_transformations=voi,
        contributing_equipment=[processing_equipment(ctx.model, ctx.when)],
        series_description=series_description("annotations", ctx.model),
        **kwargs,
    )
    # General Series Laterality is 2C for paired body parts; naming the body
    # part (the source's, else the chest every pipeline analyses) settles it.
    gsps.BodyPartExamined = str(ctx.source.first.get("BodyPartExamined") or BODY_PART_CHEST)
    ctx.finalize(gsps, "gsps")
    return gsps


def radiograph_graphics(
    ctx: BuildContext,
) -> tuple[list[hd.pr.GraphicObject], list[hd.pr.TextObject]]:
    """Closed outlines of the lungs and heart and the two CTR lines of a radiograph (PIXEL)."""
    meas = ctx.result.radiograph
    if meas is None:
        return [], []
    graphics: list[hd.pr.GraphicObject] = []
    texts: list[hd.pr.TextObject] = []
    named = (("Right lung", meas.right_lung_outline), ("Left lung", meas.left_lung_outline),
             ("Heart", meas.heart_outline))
    for name, poly in named:
        if not poly:
            continue
        pts = np.asarray([*poly, poly[0]], dtype=np.float32)
        graphics.append(hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.POLYLINE, graphic_data=pts,
            units=hd.pr.AnnotationUnitsValues.PIXEL, tracking_id=name,
            tracking_uid=ctx.uids.uid("cxr.tracking", name.upper().replace(" ", "_"))))
        x0, y0 = float(pts[:, 0].min()), float(pts[:, 1].min())
        texts.append(hd.pr.TextObject(
            text_value=name, units=hd.pr.AnnotationUnitsValues.PIXEL,
            anchor_point=(x0, max(y0 - 4.0, 0.0)), anchor_point_visible=False))
    for line in (meas.heart_line, meas.thorax_line):
        if line is None:
            continue
        graphics.append(hd.pr.GraphicObject(
            graphic_type=hd.pr.GraphicTypeValues.POLYLINE,
            graphic_data=np.asarray(line, dtype=np.float32),
            units=hd.pr.AnnotationUnitsValues.PIXEL))
    if meas.ctr is not None and meas.thorax_line is not None:
        (x0, y0), _ = meas.thorax_line
        texts.append(hd.pr.TextObject(
            text_value=f"CTR {meas.ctr:.2f}", units=hd.pr.AnnotationUnitsValues.PIXEL,
            anchor_point=(x0, max(y0 - 8.0, 0.0)), anchor_point_visible=False))
    return graphics, texts
