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
from typing import Any

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
    series_description,
)
from cad_node.results.colours import finding_rgb
from cad_node.results.findings import AnalysisStatus, Finding
from cad_node.results.sr import key_slice_axes, operating_point_texts, region_polyline

__all__ = [
    "CONTOUR_RGB",
    "LABEL_RGB",
    "LUNG_WINDOW",
    "STRUCTURE_RGB",
    "attribution_key_image",
    "build_key_images",
    "build_summary_page",
    "key_slice_uid",
]

#: Lung window (width, level) in HU for CT key images.
LUNG_WINDOW = (1500.0, -600.0)
#: Colour of the first finding's burned-in outline; finding k gets
#: :func:`cad_node.results.colours.finding_rgb` (k), never grey (R=G=B).
CONTOUR_RGB = finding_rgb(0)
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


def _draw_recist(rgb: np.ndarray, finding: Finding, uid: str,
                 colour: tuple[int, int, int] = CONTOUR_RGB) -> None:
    """Burn the RECIST long and short axes (if any) of ``finding`` on image ``uid``."""
    if finding.recist_axes_px is None or finding.region is None:
        return
    if finding.region.sop_instance_uid != uid:
        return
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    p = [(float(x) - 0.5, float(y) - 0.5) for x, y in finding.recist_axes_px]
    draw.line(p[0:2], fill=colour, width=1)
    draw.line(p[2:4], fill=colour, width=1)
    rgb[...] = np.asarray(image)


def _draw_finding(
    rgb: np.ndarray, ctx: BuildContext, finding: Finding, ds: Dataset,
    colour: tuple[int, int, int] = CONTOUR_RGB,
) -> tuple[float, float]:
    """Burn the finding's outline into ``rgb`` in ``colour``; return a label anchor (x, y)."""
    uid = str(ds.SOPInstanceUID)
    if finding.mask is not None and uid in finding.mask.sop_instance_uids:
        frame = finding.mask.array[finding.mask.sop_instance_uids.index(uid)]
        inside = np.asarray(frame) >= 0.5 if finding.mask.is_fractional else np.asarray(frame, bool)
        if inside.any():
            ring = ndimage.binary_dilation(inside) & ~inside
            rgb[ring] = colour
            _draw_recist(rgb, finding, uid, colour)
            rows, cols = np.nonzero(inside)
            return float(cols.min()), float(rows.min())
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    if finding.region is not None and finding.region.sop_instance_uid == uid:
        pts = [(float(x), float(y)) for x, y in region_polyline(finding.region)]
        draw.line(pts, fill=colour, width=2)
        anchor = (min(p[0] for p in pts), min(p[1] for p in pts))
    elif finding.center_mm is not None:
        cx, cy = _pixel_of(ds, finding.center_mm)
        radius = _circle_radius_px(finding, ds)
        draw.ellipse(
            [cx - radius, cy - radius, cx + radius, cy + radius], outline=colour, width=2
        )
        anchor = (cx - radius, cy - radius)
    else:
        raise ValueError(f"finding {finding.tracking_id!r} cannot be drawn on {uid}")
    rgb[...] = np.asarray(image)
    return anchor


def _label(finding: Finding) -> str:
    """Key-image label: what the finding is, its size, and each probability named."""
    text = finding.tracking_id
    if finding.long_axis_mm is not None:
        text += f" {finding.long_axis_mm:.1f} mm"
    if finding.probability is not None:
        text += f", detection certainty {finding.probability:.2f}"
    if finding.malignancy_probability is not None:
        text += f", malignancy risk (Brock) {finding.malignancy_probability:.2f}"
    return text


def _text_width(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> float:
    return float(font.getlength(text))


def wrap_text(
    text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: float
) -> list[str]:
    """Greedy word wrap of ``text`` into lines at most ``width`` pixels wide.

    A single word wider than ``width`` is cut into pieces that fit.
    """
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if _text_width(font, candidate) <= width:
            current = candidate
            continue
        if current:
            lines.append(current)
        while _text_width(font, word) > width and len(word) > 1:
            cut = len(word)
            while cut > 1 and _text_width(font, word[:cut]) > width:
                cut -= 1
            lines.append(word[:cut])
            word = word[cut:]
        current = word
    if current:
        lines.append(current)
    return lines or [""]


def place_label(
    text: str, anchor: tuple[float, float], image_size: tuple[int, int], px: int,
    min_px: int = 9,
) -> tuple[ImageFont.ImageFont | ImageFont.FreeTypeFont, int, list[str], tuple[float, float]]:
    """Font, line height, wrapped lines and top-left corner of a label inside the image.

    The label is wrapped to at most half the image width, shrinking the font
    down to ``min_px`` when that needs more than 3 lines, then to the whole
    width; on an image too small even for that, the lines that do not fit are
    cut ("...").  It goes above the anchor when there is room, else below it,
    shifted left/up so that every line ends inside the image.
    """
    width, height = image_size
    size = px
    for max_w in (max(width / 2 - 4, 8.0), max(width - 4.0, 8.0)):
        size = px
        while True:
            font = _font(size)
            lines = wrap_text(text, font, max_w)
            if len(lines) <= 3 or size <= min_px:
                break
            size -= 1
        if len(lines) <= 3:
            break
    line_h = size + 3
    fit = max(int((height - 4) // line_h), 1)
    if len(lines) > fit:  # a tiny image: keep what fits, and say that text is cut
        lines = [*lines[: fit - 1], wrap_text(lines[fit - 1] + "...", font, max_w)[0]]
    block_h = line_h * len(lines)
    block_w = max(_text_width(font, ln) for ln in lines)
    ax, ay = anchor
    y = ay - block_h - 4 if ay > block_h + 6 else ay + 4
    y = min(max(y, 2.0), height - block_h - 2)
    x = min(max(ax, 2.0), width - block_w - 2)
    return font, line_h, lines, (max(x, 0.0), max(y, 0.0))


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
        series_number=ctx.series_number(SeriesNumber.SC),
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
        series_description=series_description("key images", ctx.model),
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


def _derived_sc(ctx: BuildContext, pixels: np.ndarray, ref: Dataset, index: int,
                description: str) -> hd.sc.SCImage:
    """An SC image derived from the one source image ``ref`` (with its pixel spacing).

    It references ``ref`` in the Source Image Sequence and says how it was derived
    (Derivation Description, LT: at most 1024 characters; PS3.3 C.7.6.1.1.3).
    """
    sc = _sc(ctx, pixels, ref, index, spacing=True)
    item = Dataset()
    item.ReferencedSOPClassUID = ref.SOPClassUID
    item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
    sc.SourceImageSequence = [item]
    sc.DerivationDescription = description[:1024]
    ensure_character_set(sc)
    return sc


def _draw_footer(draw: ImageDraw.ImageDraw, text: str, size: tuple[int, int], px: int,
                 **style: Any) -> None:
    """Draw ``text`` (the disclaimer) wrapped along the bottom edge of a ``size`` image."""
    foot, foot_h, foot_lines, _ = place_label(text, (4, 0), size, px)
    fy = size[1] - 4 - len(foot_lines) * foot_h
    for k, line in enumerate(foot_lines):
        draw.text((4, fy + k * foot_h), line, fill=LABEL_RGB, font=foot, **style)


def build_key_images(ctx: BuildContext) -> list[tuple[str, hd.sc.SCImage]]:
    """One RGB key image per finding, instance numbers 1..n.

    Returns
    -------
    list of (tracking id, SCImage)
    """
    if ctx.result.status is not AnalysisStatus.COMPLETED:
        return []
    out: list[tuple[str, hd.sc.SCImage]] = []
    if ctx.result.radiograph is not None:
        out.append(("Lungs and heart", radiograph_key_image(ctx, 1)))
    if ctx.result.attribution is not None:
        out.append(("Attribution heatmap", attribution_key_image(ctx, len(out) + 1)))
    first = len(out) + 1
    for index, finding in enumerate(ctx.result.findings, start=first):
        uid = key_slice_uid(ctx, finding)
        ds = ctx.source.by_uid.get(uid)
        if ds is None:
            raise ValueError(f"key image {uid} of finding {finding.tracking_id!r} was not received")
        if "PixelData" not in ds:
            raise ValueError(f"source instance {uid} has no pixel data for a key image")
        grey = _window(ds, ctx.source.is_ct)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        colour = finding_rgb(index - first)  # the finding's SEG/GSPS colour
        ax, ay = _draw_finding(rgb, ctx, finding, ds, colour)
        # the outline stays on top of the label wherever they cross
        outline = np.all(rgb == np.asarray(colour, np.uint8), axis=-1)
        image = Image.fromarray(rgb)
        draw = ImageDraw.Draw(image)
        px = max(_LABEL_PX, rgb.shape[0] // _LABEL_FRACTION)
        size = (rgb.shape[1], rgb.shape[0])
        font, line_h, lines, (tx, ty) = place_label(_label(finding), (ax, ay), size, px)
        for k, line in enumerate(lines):
            draw.text((tx, ty + k * line_h), line, fill=LABEL_RGB, font=font)
        _draw_footer(draw, ctx.settings.disclaimer, size, px)
        pixels = np.array(image)
        pixels[outline] = colour
        sc = _derived_sc(ctx, pixels, ds, index,
                         f"{finding.tracking_id} outline burned in by {ctx.model.name}")
        out.append((finding.tracking_id, sc))
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


#: x offsets (px) of the summary table's columns (headers fit at 18 px).
_TABLE_X = (16, 150, 230, 330, 420, 510, 600, 780)
#: Column headers: every probability says what it is (issue #13).
_TABLE_HEADER = ("ID", "Type", "Site", "Long mm", "Short mm", "Vol mm3",
                 "Detection certainty", "Malignancy risk (Brock)")
#: Legend printed under the table.
PROBABILITY_LEGEND = (
    "Detection certainty: how sure the algorithm is that this is a finding (not a risk of "
    "cancer). Malignancy risk (Brock): PanCan/Brock model probability of cancer."
)


def _row(f: Finding) -> tuple[str, ...]:
    return (
        f.tracking_id[:14],
        f.finding_type.meaning[:8],
        f.site.meaning if f.site else "-",
        _fmt(f.long_axis_mm, ".1f"),
        _fmt(f.short_axis_mm, ".1f"),
        _fmt(f.volume_mm3, ".0f"),
        _fmt(f.probability, ".2f"),
        _fmt(f.malignancy_probability, ".2f"),
    )


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
    elif not result.findings and ctx.operating_point.threshold is None:
        lines.append("No findings.")
    elif result.findings:
        lines.append(f"{len(result.findings)} finding(s):")
        lines.append(_TABLE_HEADER)
        for f in result.findings:
            lines.append(_row(f))
            if f.center_mm is not None:
                x, y, z = f.center_mm
                lines.append(("", f"centre (LPS) {x:.1f}, {y:.1f}, {z:.1f} mm"))
    if result.status is not AnalysisStatus.FAILED:
        lines += [c.describe() for c in result.classifications]
        lines += operating_point_texts(ctx)
        below = ctx.operating_point.reported_below
        if below:
            lines.append("Below the operating point (candidates, NOT findings):")
            lines.append(_TABLE_HEADER)
            lines += [_row(f) for f in below]
        if result.findings or below:
            lines.append(PROBABILITY_LEGEND)
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
            y += math.ceil(_FONT_PX * 1.4)
            continue
        for part in wrap_text(line, font, cols - 32):
            if y > rows - 3 * _FONT_PX:
                break
            draw.text((16, y), part, fill=(255, 255, 255), font=font)
            y += math.ceil(_FONT_PX * 1.4)
    draw.text((16, rows - 2 * _FONT_PX), ctx.settings.disclaimer, fill=(255, 64, 64), font=font)
    sc = _sc(ctx, np.asarray(image), ctx.source.first, index, spacing=False)
    sc.DerivationDescription = "CAD summary page"
    ensure_character_set(sc)
    return sc


# -- chest radiograph overview: outlines, CTR lines, legend ---------------------------

#: Outline colours of the radiograph overview key image.
STRUCTURE_RGB = {
    "right lung": (0, 220, 0),
    "left lung": (0, 170, 255),
    "heart": (255, 70, 70),
}
#: Colour of the cardiothoracic-ratio lines.
CTR_LINE_RGB = (255, 0, 255)


def radiograph_key_image(ctx: BuildContext, index: int) -> hd.sc.SCImage:
    """Key image of a chest radiograph: lung and heart outlines, CTR lines, legend.

    The source is rendered for display as the pipeline read it
    (:func:`cad_node.imaging.radiograph.display_pixels`: VOI, MONOCHROME1).

    Raises
    ------
    ValueError
        No radiograph measurements, or their image was not received.
    """
    from cad_node.imaging.radiograph import RadiographRefusedError, display_pixels

    meas = ctx.result.radiograph
    if meas is None:
        raise ValueError("the result has no radiograph measurements")
    ds = ctx.source.by_uid.get(meas.sop_instance_uid)
    if ds is None or "PixelData" not in ds:
        raise ValueError(f"radiograph {meas.sop_instance_uid} was not received with pixels")
    try:
        grey01, _ = display_pixels(ds)
        grey = np.round(grey01 * 255.0).astype(np.uint8)
    except RadiographRefusedError:
        grey = _window(ds, False)
    image = Image.fromarray(np.repeat(grey[..., None], 3, axis=2))
    draw = ImageDraw.Draw(image)
    width = max(2, grey.shape[0] // 400)
    for name, poly in (("right lung", meas.right_lung_outline),
                       ("left lung", meas.left_lung_outline),
                       ("heart", meas.heart_outline)):
        if poly:
            draw.line([*poly, poly[0]], fill=STRUCTURE_RGB[name], width=width)
    for line in (meas.heart_line, meas.thorax_line):
        if line is not None:
            draw.line(list(line), fill=CTR_LINE_RGB, width=width)
    px = max(_LABEL_PX, grey.shape[0] // _LABEL_FRACTION)
    font = _font(px)
    legend = []
    for name, area in (("right lung", meas.right_lung_area_cm2),
                       ("left lung", meas.left_lung_area_cm2)):
        legend.append((f"{name}" + (f" {area:.0f} cm2" if area is not None else ""),
                       STRUCTURE_RGB[name]))
    legend.append(("heart", STRUCTURE_RGB["heart"]))
    if meas.ctr is not None:
        legend.append((f"CTR {meas.ctr:.2f}", CTR_LINE_RGB))
    else:
        legend.append((f"CTR {meas.ctr_not_assessable}", CTR_LINE_RGB))
    if meas.heart_width_mm is None:
        legend.append(("no pixel spacing: no mm values", LABEL_RGB))
    y = 4.0
    for text, colour in legend:
        draw.text((4, y), text, fill=colour, font=font)
        y += px * 1.3
    draw.text((4, grey.shape[0] - px - 4), ctx.settings.disclaimer, fill=LABEL_RGB, font=font)
    return _derived_sc(ctx, np.asarray(image), ds, index,
                       "lung and heart outlines and cardiothoracic ratio lines "
                       f"burned in by {ctx.model.name}")


# -- chest radiograph attribution heatmap: colour overlay, legend, disclaimer ----------

#: Matplotlib colour map of the heatmap overlay (perceptually ordered, no grey).
HEATMAP_COLORMAP = "inferno"
#: Heat below this fraction of the maximum is not coloured (the film shows through).
HEATMAP_FLOOR = 0.1
#: Opacity of the overlay at the maximum heat.
HEATMAP_ALPHA = 0.6
#: What the heatmap is, printed on the overlay (it is not a lesion outline).
HEATMAP_EXPLANATION = ("Attribution heatmap: the pixels that drove the abnormality score, "
                       "restricted to the lungs. Not a lesion outline.")


def heatmap_rgb(heat: np.ndarray) -> np.ndarray:
    """``(rows, cols, 3)`` uint8 colours of heat values in ``[0, 1]``."""
    from matplotlib import colormaps

    rgba = colormaps[HEATMAP_COLORMAP](np.clip(heat, 0.0, 1.0))
    return np.round(np.asarray(rgba)[..., :3] * 255.0).astype(np.uint8)


def _legend_corner(block: tuple[float, float], size: tuple[int, int], foot_y: float,
                   boxes: list[tuple[float, float, float, float]]) -> tuple[int, int]:
    """Top-left corner of the heatmap legend: top left, top right, bottom left or bottom
    right (above the disclaimer starting at ``foot_y``), the first that covers no drawn
    box (``x0, y0, x1, y1``), else the one covering the least box area."""
    (w, h), (cols, _) = block, size
    corners = [(4.0, 4.0), (cols - w - 4, 4.0), (4.0, foot_y - h - 4),
               (cols - w - 4, foot_y - h - 4)]

    def covered(c: tuple[float, float]) -> float:
        return sum(max(0.0, min(c[0] + w, b[2]) - max(c[0], b[0]))
                   * max(0.0, min(c[1] + h, b[3]) - max(c[1], b[1])) for b in boxes)

    best = min(corners, key=lambda c: (covered(c) > 0, covered(c), corners.index(c)))
    return int(max(0.0, best[0])), int(max(0.0, best[1]))


def attribution_key_image(ctx: BuildContext, index: int) -> hd.sc.SCImage:
    """Key image of the attribution heatmap: colour overlay, boxes, legend and disclaimer.

    The radiograph is rendered as :func:`radiograph_key_image` renders it; heat
    at or above :data:`HEATMAP_FLOOR` is blended in :data:`HEATMAP_COLORMAP`
    (opacity growing with the heat up to :data:`HEATMAP_ALPHA`); the reported
    boxes are drawn in their findings' colours; a colour bar ("low" to
    "high"), the method and :data:`HEATMAP_EXPLANATION` are printed in a corner
    clear of the boxes (:func:`_legend_corner`; top left when it is), the
    disclaimer at the bottom.

    Raises
    ------
    ValueError
        No heatmap, or its image was not received with pixels.
    """
    from cad_node.imaging.radiograph import RadiographRefusedError, display_pixels

    heat_mask = ctx.result.attribution
    if heat_mask is None or len(heat_mask.sop_instance_uids) != 1:
        raise ValueError("the result has no single-frame attribution heatmap")
    uid = heat_mask.sop_instance_uids[0]
    ds = ctx.source.by_uid.get(uid)
    if ds is None or "PixelData" not in ds:
        raise ValueError(f"heatmap image {uid} was not received with pixels")
    try:
        grey01, _ = display_pixels(ds)
        grey = np.round(grey01 * 255.0).astype(np.uint8)
    except RadiographRefusedError:
        grey = _window(ds, False)
    heat = np.asarray(heat_mask.array[0], dtype=np.float64)
    if heat.shape != grey.shape:
        raise ValueError(f"the heatmap is {heat.shape}, the radiograph {grey.shape}")
    base = np.repeat(grey[..., None], 3, axis=2).astype(np.float64)
    alpha = np.where(heat >= HEATMAP_FLOOR, HEATMAP_ALPHA * heat, 0.0)[..., None]
    rgb = np.round(base * (1 - alpha) + heatmap_rgb(heat) * alpha).astype(np.uint8)
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    width = max(2, grey.shape[0] // 400)
    drawn: list[tuple[float, float, float, float]] = []
    for k, finding in enumerate(ctx.result.findings):
        if finding.region is not None and finding.region.sop_instance_uid == uid:
            pts = [(float(x), float(y)) for x, y in region_polyline(finding.region)]
            draw.line(pts, fill=finding_rgb(k), width=width)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            drawn.append((min(xs) - width, min(ys) - width, max(xs) + width, max(ys) + width))
    px = max(_LABEL_PX, grey.shape[0] // _LABEL_FRACTION)
    font = _font(px)
    bar_w, bar_h = max(grey.shape[1] // 4, 64), max(px, 8)
    ramp = heatmap_rgb(np.tile(np.linspace(0.0, 1.0, bar_w), (bar_h, 1)))
    size = (rgb.shape[1], rgb.shape[0])
    texts = [place_label(text, (4, 0), size, px)
             for text in (ctx.result.attribution_method or "attribution", HEATMAP_EXPLANATION)]
    _, foot_h, foot_lines, _ = place_label(ctx.settings.disclaimer, (4, 0), size, px)
    fy = rgb.shape[0] - 4 - len(foot_lines) * foot_h  # where _draw_footer starts
    x0, y0 = _legend_corner(
        (max([float(bar_w)] + [_text_width(f, ln) for f, _, lines, _ in texts for ln in lines]),
         bar_h + px * 1.5 + sum(h * len(lines) for _, h, lines, _ in texts)),
        size, fy, drawn)
    image.paste(Image.fromarray(ramp), (x0, y0))
    draw.text((x0, y0 + bar_h + 2), "low", fill=LABEL_RGB, font=font, stroke_width=2,
              stroke_fill=(0, 0, 0))
    draw.text((x0 + bar_w - _text_width(font, "high"), y0 + bar_h + 2), "high",
              fill=LABEL_RGB, font=font, stroke_width=2,
              stroke_fill=(0, 0, 0))
    y = y0 + bar_h + px * 1.5
    for tfont, line_h, lines, _ in texts:
        for line in lines:
            draw.text((x0, y), line, fill=LABEL_RGB, font=tfont, stroke_width=2,
                      stroke_fill=(0, 0, 0))
            y += line_h
    _draw_footer(draw, ctx.settings.disclaimer, size, px, stroke_width=2, stroke_fill=(0, 0, 0))
    return _derived_sc(ctx, np.asarray(image), ds, index,
                       f"attribution heatmap ({ctx.result.attribution_method}) "
                       f"blended in by {ctx.model.name}")
