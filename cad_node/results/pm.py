"""Parametric Map (PS3.3 A.75) of the chest X-ray attribution heatmap.

One single-frame, 32-bit float Parametric Map on the analysed radiograph's
pixel grid (same rows and columns, so a viewer that windows it can lay it on
the source), values in ``[0, 1]`` (:attr:`AnalysisResult.attribution`: 0
outside the lungs, 1 at the strongest attribution), with a Real World Value
Mapping (label :data:`LUT_LABEL`, unit "no units", identity slope/intercept)
and a shared VOI window of the full range.

Projection radiographs have no Frame of Reference, but the Parametric Map IOD
requires the Frame of Reference module and the Plane Position/Orientation
functional groups (PS3.3 A.75.3, A.75.4).  The map therefore gets a Frame of
Reference of its own (derived deterministically, :mod:`cad_node.results.uids`)
whose plane is the image: position ``(0, 0, 0)``, orientation from the
radiograph's Patient Orientation (a frontal PA/AP film: rows towards the
patient's left, columns towards the feet), the image's own pixel spacing (1 mm
when it states none) and slice thickness 1 mm.  Registration with the source
rests on the Derivation/Source Image references and the identical pixel grid,
never on patient coordinates.

Contract of :func:`build_pm`
----------------------------
* needs ``ctx.result.attribution`` (one frame, a received source image with
  pixels); raises :class:`ValueError` naming what is missing otherwise;
* deterministic UIDs (series ``pm.series``, instance ``pm.instance``, frame of
  reference ``pm.frame_of_reference``), Series Number
  :attr:`~cad_node.results._common.SeriesNumber.PM`;
* Contributing Equipment names the algorithm (IHE AIR), the disclaimer is the
  Image Comments.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes

from cad_node.results._common import (
    BuildContext,
    SeriesNumber,
    processing_equipment,
    series_description,
)

__all__ = ["LUT_LABEL", "PARAMETRIC_MAP_STORAGE", "build_pm", "orientation_of"]

#: Parametric Map Storage SOP Class UID (PS3.4 B.5).
PARAMETRIC_MAP_STORAGE = "1.2.840.10008.5.1.4.1.1.30"
#: LUT Label (0040,9210) of the real world value mapping (SH, <= 16 characters).
LUT_LABEL = "ATTRIBUTION"
#: Body Part Examined defined term (PS3.16 Annex L): settles General Series Laterality (2C).
BODY_PART_CHEST = "CHEST"
#: Unit axes of the patient directions of Patient Orientation (PS3.3 C.7.6.1.1.1).
_DIRECTIONS: dict[str, tuple[float, float, float]] = {
    "L": (1.0, 0.0, 0.0), "R": (-1.0, 0.0, 0.0),
    "P": (0.0, 1.0, 0.0), "A": (0.0, -1.0, 0.0),
    "H": (0.0, 0.0, 1.0), "F": (0.0, 0.0, -1.0),
}
#: Pixel Data, Float Pixel Data, Double Float Pixel Data (PS3.6): not copied.
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
#: A frontal chest film shown in the standard way: rows towards L, columns towards F.
_FRONTAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)


def orientation_of(ds: Dataset) -> tuple[float, float, float, float, float, float]:
    """Image Orientation (Patient) implied by a radiograph's Patient Orientation.

    The first letter of each value of Patient Orientation (0020,0020) gives the
    row and column directions; missing, oblique or inconsistent values give
    the standard frontal display (:data:`_FRONTAL`).
    """
    po = ds.get("PatientOrientation")
    if po is not None and len(po) == 2 and all(po):
        row, col = str(po[0])[:1], str(po[1])[:1]
        if row in _DIRECTIONS and col in _DIRECTIONS:
            r, c = _DIRECTIONS[row], _DIRECTIONS[col]
            if abs(float(np.dot(r, c))) < 1e-6:
                return (*r, *c)
    return _FRONTAL


def _geometry_source(ctx: BuildContext, ds: Dataset) -> Dataset:
    """A header copy of ``ds`` with the map's own plane (see the module docstring)."""
    # A new dataset holding the header elements: the received instance is never changed
    # (pydicom's copy.copy shares the element dictionary).
    src = Dataset()
    for elem in ds:
        if elem.tag not in _PIXEL_TAGS:
            src.add(elem)
    if "FrameOfReferenceUID" not in src or "ImageOrientationPatient" not in src:
        src.FrameOfReferenceUID = ctx.uids.uid("pm.frame_of_reference")
        src.ImageOrientationPatient = list(orientation_of(ds))
        src.ImagePositionPatient = [0.0, 0.0, 0.0]
    if "PixelSpacing" not in src:
        src.PixelSpacing = list(ds.get("ImagerPixelSpacing") or [1.0, 1.0])
    if "SliceThickness" not in src or src.SliceThickness in (None, ""):
        src.SliceThickness = 1.0
    return src


def build_pm(ctx: BuildContext) -> hd.pm.ParametricMap:
    """The attribution heatmap of ``ctx.result`` as a Parametric Map.

    Raises
    ------
    ValueError
        No heatmap, a heatmap on an image that was not received, or one whose
        size differs from the image.
    """
    heat = ctx.result.attribution
    if heat is None:
        raise ValueError("the result has no attribution heatmap for a Parametric Map")
    if len(heat.sop_instance_uids) != 1:
        raise ValueError("the attribution heatmap must have exactly one frame (one radiograph)")
    uid = heat.sop_instance_uids[0]
    ds = ctx.source.by_uid.get(uid)
    if ds is None:
        raise ValueError(f"the attribution heatmap lies on {uid}, which was not received")
    rows, cols = int(ds.Rows), int(ds.Columns)
    frame = np.asarray(heat.array[0], dtype=np.float32)
    if frame.shape != (rows, cols):
        raise ValueError(f"the heatmap is {frame.shape}, the radiograph {(rows, cols)}")
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=LUT_LABEL,
        lut_explanation=(ctx.result.attribution_method or "attribution")[:64],
        unit=codes.UCUM.NoUnits,
        value_range=(0.0, 1.0),
        slope=1.0,
        intercept=0.0,
    )
    kwargs = ctx.common_kwargs()
    pm = hd.pm.ParametricMap(
        source_images=[_geometry_source(ctx, ds)],
        pixel_array=frame,
        series_instance_uid=ctx.uids.uid("pm.series"),
        series_number=ctx.series_number(SeriesNumber.PM),
        sop_instance_uid=ctx.uids.uid("pm.instance", 1),
        instance_number=1,
        manufacturer=ctx.settings.manufacturer,
        manufacturer_model_name=ctx.model.name,
        software_versions=ctx.model.version,
        device_serial_number=ctx.model.device_uid,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(
            window_center=0.5, window_width=1.0, window_explanation="FULL RANGE")],
        content_description="CAD attribution heatmap",
        content_label="CAD_HEATMAP",
        contributing_equipment=[processing_equipment(ctx.model, ctx.when)],
        series_description=series_description("attribution heatmap", ctx.model),
        **kwargs,
    )
    pm.BodyPartExamined = str(ds.get("BodyPartExamined") or BODY_PART_CHEST)
    pm.ImageComments = ctx.settings.disclaimer[:10240]
    ctx.finalize(pm, "pm")
    return pm
