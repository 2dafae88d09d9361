"""Secondary Capture overlays for viewers that only show images.

* **Key image** per finding: the source image at full resolution (same pixel
  grid as the source, so the overlay sits exactly on the finding), windowed
  (CT: lung window W1500/L-600; CR/DX: the image's own VOI window, else the
  0.5-99.5 percentile range), converted to RGB, with the finding's outline
  burned in (:data:`CONTOUR_RGB`) and a short label (:data:`LABEL_RGB`):
  the mask boundary (one pixel outside the mask) when a mask exists, else the
  2-D box/polygon, else a circle of the long-axis diameter around the centre.
  The key slice is the slice of the largest in-plane extent (the SR's planar
  group measures on it, :func:`cad_node.results.sr.key_slice_axes`), else the slice
  nearest the centre, else the region's image.
* **Summary page** per study: the findings table, algorithm name, version and
  Device UID, the analysis status (failure reason / "No findings") and the
  configured disclaimer.

Both are RGB Secondary Capture Image Storage (PS3.3 A.8.1), Burned In
Annotation YES, same study, one new series (Series Number 9003).
"""

from __future__ import annotations

import math

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import Dataset
from pydicom.pixels.processing import apply_modality_lut
from scipy import ndimage

from cad_node.imaging.geometry import ImagePlane, patient_orientation_letters
from cad_node.results._common import (
    BuildContext,
    SeriesNumber,
    ensure_character_set,
)
from cad_node.results.findings import AnalysisStatus, Finding
from cad_node.results.sr import key_slice_axes, region_polyline

__all__ = [
    "CONTOUR_RGB",
    "LABEL_RGB",
    "LUNG_WINDOW",
    "build_key_images",
    "build_summary_page",
    "key_slice_uid",
]

#: Lung window (width, level) in HU for CT key images.
LUNG_WINDOW = (1500.0, -600.0)
#: Colour of burned-in outlines; never produced by a grey image (R=G=B).
CONTOUR_RGB = (255, 255, 0)
#: Colour of burned-in labels.
LABEL_RGB = (0, 255, 255)
#: Image Laterality (0020,0062), PS3.3 C.7.6.1: "B" = both left and right.
#: Chest images show both lungs; it also satisfies General Series Laterality (2C).
IMAGE_LATERALITY_BOTH = "B"
#: Summary page size (rows, columns).
SUMMARY_SHAPE = (768, 1024)
#: Font sizes (px) of the summary page and key-image labels.
_FONT_PX = 18
_LABEL_PX = 14
#: Key-image labels are at least 1/40 of the image height tall.
_LABEL_FRACTION = 40


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):  # Pillow without FreeType
        return ImageFont.load_default()


def _window(ds: Dataset, is_ct: bool) -> np.ndarray:
    """Source pixels windowed to uint8 grey."""
    pixels = np.asarray(ds.pixel_array)
    if pixels.ndim == 3 and ds.get("SamplesPerPixel", 1) == 1:
        pixels = pixels[0]
    if pixels.ndim == 3:  # colour source: use luminance
        pixels = pixels[..., :3].mean(axis=-1)
    values = apply_modality_lut(pixels, ds).astype(np.float64)
    if is_ct:
        width, level = LUNG_WINDOW
    elif "WindowWidth" in ds and "WindowCenter" in ds:
        width = float(np.atleast_1d(ds.WindowWidth)[0])
        level = float(np.atleast_1d(ds.WindowCenter)[0])
    else:
        lo, hi = np.percentile(values, [0.5, 99.5])
        width, level = max(float(hi - lo), 1.0), float(hi + lo) / 2
    lo = level - width / 2
    grey = np.clip((values - lo) / width * 255.0, 0, 255)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        grey = 255.0 - grey
    return np.round(grey).astype(np.uint8)


def key_slice_uid(ctx: BuildContext, finding: Finding) -> str:
    """SOP Instance UID of the source image a finding's key image shows."""
    if finding.recist_axes_px is not None and finding.region is not None:
        return finding.region.sop_instance_uid  # the slice the RECIST axes were measured on
    if finding.mask is not None:
        found = key_slice_axes(ctx, finding)
        if found is not None:  # the slice the SR's planar group measures on
            return str(found[0].SOPInstanceUID)
    if finding.region is not None:
        return finding.region.sop_instance_uid
    if finding.center_mm is not None and ctx.source.stack is not None:
        return str(ctx.source.images[ctx.source.stack.nearest(finding.center_mm)].SOPInstanceUID)
    raise ValueError(f"finding {finding.tracking_id!r} has no location on a received image")


def _plane(ds: Dataset) -> ImagePlane:
    plane = ImagePlane.from_dataset(ds)
    if plane is None:
        raise ValueError(f"instance {ds.SOPInstanceUID} has no Image Position (Patient)")
    return plane


def _pixel_of(ds: Dataset, point_mm: tuple[float, float, float]) -> tuple[float, float]:
    """(column, row) of a patient point projected on image ``ds``."""
    return _plane(ds).patient_to_pixel(point_mm)


def _circle_radius_px(finding: Finding, ds: Dataset) -> float:
    """Radius of the circle drawn for a finding without outline: half its long
    axis (10 mm when unknown) in columns of ``ds``, at least 4 pixels."""
    return max((finding.long_axis_mm or 10.0) / 2 / _plane(ds).pixel_spacing[1], 4.0)


def _draw_recist(rgb: np.ndarray, finding: Finding, uid: str) -> None:
    """Burn the RECIST long and short axes (if any) of ``finding`` on image ``uid``."""
    if finding.recist_axes_px is None or finding.region is None:
        return
    if finding.region.sop_instance_uid != uid:
        return
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    p = [(float(x) - 0.5, float(y) - 0.5) for x, y in finding.recist_axes_px]
    draw.line(p[0:2], fill=CONTOUR_RGB, width=1)
    draw.line(p[2:4], fill=CONTOUR_RGB, width=1)
    rgb[...] = np.asarray(image)


def _draw_finding(
    rgb: np.ndarray, ctx: BuildContext, finding: Finding, ds: Dataset
) -> tuple[float, float]:
    """Burn the finding's outline into ``rgb``; return a label anchor (x, y)."""
    uid = str(ds.SOPInstanceUID)
    if finding.mask is not None and uid in finding.mask.sop_instance_uids:
        frame = finding.mask.array[finding.mask.sop_instance_uids.index(uid)]
        inside = np.asarray(frame) >= 0.5 if finding.mask.is_fractional else np.asarray(frame, bool)
        if inside.any():
            ring = ndimage.binary_dilation(inside) & ~inside
            rgb[ring] = CONTOUR_RGB
            _draw_recist(rgb, finding, uid)
            rows, cols = np.nonzero(inside)
            return float(cols.min()), float(rows.min())
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    if finding.region is not None and finding.region.sop_instance_uid == uid:
        pts = [(float(x), float(y)) for x, y in region_polyline(finding.region)]
        draw.line(pts, fill=CONTOUR_RGB, width=2)
        anchor = (min(p[0] for p in pts), min(p[1] for p in pts))
    elif finding.center_mm is not None:
        cx, cy = _pixel_of(ds, finding.center_mm)
        radius = _circle_radius_px(finding, ds)
        draw.ellipse(
            [cx - radius, cy - radius, cx + radius, cy + radius], outline=CONTOUR_RGB, width=2
        )
        anchor = (cx - radius, cy - radius)
    else:
        raise ValueError(f"finding {finding.tracking_id!r} cannot be drawn on {uid}")
    rgb[...] = np.asarray(image)
    return anchor


def _label(finding: Finding) -> str:
    text = finding.tracking_id
    if finding.long_axis_mm is not None:
        text += f" {finding.long_axis_mm:.1f} mm"
    if finding.probability is not None:
        text += f" p={finding.probability:.2f}"
    return text


def _patient_orientation(ds: Dataset) -> tuple[str, str]:
    if "ImageOrientationPatient" in ds:
        return patient_orientation_letters([float(v) for v in ds.ImageOrientationPatient])
    po = ds.get("PatientOrientation")
    if po is not None and len(po) == 2 and all(po):
        return str(po[0]), str(po[1])
    # Chest radiographs are displayed with the patient's left on the image right
    # and the feet at the bottom (PS3.3 C.7.6.1.1.1).
    return "L", "F"


def _sc(
    ctx: BuildContext, pixels: np.ndarray, ref: Dataset, index: int, spacing: bool
) -> hd.sc.SCImage:
    kwargs = ctx.common_kwargs()
    first = ctx.source.first
    sc = hd.sc.SCImage(
        pixel_array=pixels,
        photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8,
        coordinate_system=hd.CoordinateSystemNames.PATIENT,
        study_instance_uid=ctx.source.study_instance_uid,
        series_instance_uid=ctx.uids.uid("sc.series"),
        series_number=int(SeriesNumber.SC),
        sop_instance_uid=ctx.uids.uid("sc.instance", index),
        instance_number=index,
        manufacturer=ctx.settings.manufacturer,
        patient_id=first.get("PatientID"),
        patient_name=first.get("PatientName"),
        patient_birth_date=first.get("PatientBirthDate"),
        patient_sex=first.get("PatientSex") or None,
        accession_number=first.get("AccessionNumber"),
        study_id=first.get("StudyID"),
        study_date=first.get("StudyDate"),
        study_time=first.get("StudyTime"),
        referring_physician_name=first.get("ReferringPhysicianName"),
        pixel_spacing=(
            tuple(float(v) for v in ref.PixelSpacing)  # type: ignore[arg-type]
            if spacing and "PixelSpacing" in ref
            else None
        ),
        patient_orientation=_patient_orientation(ref),
        contributing_equipment=[],
        series_description=f"CAD key images {ctx.model.name} {ctx.model.version}"[:64],
        manufacturer_model_name=ctx.model.name,
        software_versions=ctx.model.version,
        **kwargs,
    )
    from cad_node.results._common import processing_equipment

    sc.ContributingEquipmentSequence = [processing_equipment(ctx.model, ctx.when)]
    sc.BurnedInAnnotation = "YES"
    sc.ImageLaterality = IMAGE_LATERALITY_BOTH
    sc.ImageComments = ctx.settings.disclaimer
    ctx.finalize(sc, f"sc.{index}")
    return sc


def build_key_images(ctx: BuildContext) -> list[tuple[str, hd.sc.SCImage]]:
    """One RGB key image per finding, instance numbers 1..n.

    Returns
    -------
    list of (tracking id, SCImage)
    """
    if ctx.result.status is not AnalysisStatus.COMPLETED:
        return []
    out: list[tuple[str, hd.sc.SCImage]] = []
    for index, finding in enumerate(ctx.result.findings, start=1):
        uid = key_slice_uid(ctx, finding)
        ds = ctx.source.by_uid.get(uid)
        if ds is None:
            raise ValueError(f"key image {uid} of finding {finding.tracking_id!r} was not received")
        if "PixelData" not in ds:
            raise ValueError(f"source instance {uid} has no pixel data for a key image")
        grey = _window(ds, ctx.source.is_ct)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        ax, ay = _draw_finding(rgb, ctx, finding, ds)
        image = Image.fromarray(rgb)
        draw = ImageDraw.Draw(image)
        px = max(_LABEL_PX, rgb.shape[0] // _LABEL_FRACTION)
        font = _font(px)
        label = _label(finding)
        ty = ay - px - 4 if ay > px + 6 else ay + 4
        draw.text((max(ax, 2.0), ty), label, fill=LABEL_RGB, font=font)
        draw.text((4, rgb.shape[0] - px - 4), ctx.settings.disclaimer, fill=LABEL_RGB, font=font)
        pixels = np.asarray(image)
        sc = _sc(ctx, pixels, ds, index, spacing=True)
        item = Dataset()
        item.ReferencedSOPClassUID = ds.SOPClassUID
        item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
        sc.SourceImageSequence = [item]
        sc.DerivationDescription = f"{finding.tracking_id} outline burned in by {ctx.model.name}"[
            :1024
        ]
        ensure_character_set(sc)
        out.append((finding.tracking_id, sc))
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


#: x offsets (px) of the summary table's columns.
_TABLE_X = (16, 176, 276, 526, 626, 726, 836)


def summary_lines(ctx: BuildContext) -> list[str | tuple[str, ...]]:
    """Lines of the summary page: text, or table rows as tuples of cells."""
    result, model = ctx.result, ctx.model
    lines: list[str | tuple[str, ...]] = [
        "CAD results",
        f"Algorithm: {model.name} {model.version}  (Device UID {model.device_uid})",
        f"Pipeline: {result.pipeline}   Series: {result.series_instance_uid}",
    ]
    if result.status is AnalysisStatus.FAILED:
        lines.append(f"ANALYSIS FAILED: {result.failure_reason}")
        lines.append("No result is available; this is not a negative result.")
    elif not result.findings:
        lines.append("No findings.")
    else:
        lines.append(f"{len(result.findings)} finding(s):")
        lines.append(("ID", "Type", "Site", "Long mm", "Short mm", "Vol mm3", "Prob"))
        for f in result.findings:
            lines.append(
                (
                    f.tracking_id[:16],
                    f.finding_type.meaning,
                    f.site.meaning if f.site else "-",
                    _fmt(f.long_axis_mm, ".1f"),
                    _fmt(f.short_axis_mm, ".1f"),
                    _fmt(f.volume_mm3, ".0f"),
                    _fmt(f.probability, ".2f"),
                )
            )
            if f.center_mm is not None:
                x, y, z = f.center_mm
                lines.append(("", f"centre (LPS) {x:.1f}, {y:.1f}, {z:.1f} mm"))
    for k, v in sorted(result.qualitative.items()):
        lines.append(f"{k}: {v}")
    for k, m in sorted(result.measurements.items()):
        lines.append(f"{k}: {m:g}")
    lines += list(result.notes)
    return lines


def build_summary_page(ctx: BuildContext, index: int) -> hd.sc.SCImage:
    """The study summary page as instance ``index`` of the SC series."""
    rows, cols = SUMMARY_SHAPE
    image = Image.new("RGB", (cols, rows), (0, 0, 0))
    draw = ImageDraw.Draw(image)
    font = _font(_FONT_PX)
    y = 16.0
    for line in summary_lines(ctx):
        if y > rows - 3 * _FONT_PX:
            draw.text((16, y), "...", fill=(255, 255, 255), font=font)
            break
        if isinstance(line, tuple):
            for x, cell in zip(_TABLE_X, line, strict=False):
                draw.text((x, y), cell, fill=(255, 255, 255), font=font)
        else:
            draw.text((16, y), line, fill=(255, 255, 255), font=font)
        y += math.ceil(_FONT_PX * 1.4)
    draw.text((16, rows - 2 * _FONT_PX), ctx.settings.disclaimer, fill=(255, 64, 64), font=font)
    sc = _sc(ctx, np.asarray(image), ctx.source.first, index, spacing=False)
    sc.DerivationDescription = "CAD summary page"
    ensure_character_set(sc)
    return sc
