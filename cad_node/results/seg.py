"""Segmentation IOD (PS3.3 A.51) from organ and finding masks.

Contract
--------
* One segment per structure: organ masks first (in :class:`FindingSite`
  order, e.g. right lung, left lung), then one per finding that has a mask, in
  finding order.  Segment numbers start at 1 (PS3.3 C.8.20.4).
* BINARY by default; FRACTIONAL (PROBABILITY, max 255) when any mask is a
  probability map (``ImageMask.is_fractional``); binary masks then map to
  0/255.
* Frames are placed by SOP Instance UID: frame ``k`` of an :class:`ImageMask`
  lands on the source image whose SOP Instance UID is
  ``mask.sop_instance_uids[k]``.  File order never matters.  Empty frames are
  omitted; all used source images are referenced.
* Messy series:
  - shuffled files: sorted along the slice normal, aligned by UID;
  - missing slice: every frame keeps its own source image's position, so
    the gap is simply there;
  - duplicated slice position (two instances with different SOP Instance UIDs
    at the same position): the instance the masks do not touch is left out;
    when masks draw on both copies a :class:`ValueError` names them;
  - non-axial series: handled through Image Orientation (Patient);
  - inconsistent geometry (size, orientation, spacing, frame of reference):
    refused by :func:`cad_node.imaging.geometry.sort_slices` when the
    context is built; a mask referencing an instance not received:
    :class:`ValueError`.
"""

from __future__ import annotations

import dataclasses

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from cad_node.imaging.geometry import SliceStack
from cad_node.results._common import (
    ALGORITHM_FAMILY,
    BuildContext,
    SeriesNumber,
    processing_equipment,
    series_description,
)
from cad_node.results.colours import finding_rgb
from cad_node.results.findings import FindingSite, ImageMask

__all__ = ["SegResult", "SegmentInfo", "build_seg"]

#: PS3.3 C.8.20.2.3: maximum stored value of a FRACTIONAL segmentation.
MAX_FRACTIONAL_VALUE = 255

#: CID 7150 Segmentation Property Categories.
CATEGORY_ANATOMY = codes.SCT.AnatomicalStructure
CATEGORY_FINDING = codes.SCT.MorphologicallyAbnormalStructure

#: Recommended display colours (CIELab via sRGB) for organs; findings use
#: :func:`cad_node.results.colours.finding_rgb`, as their SC and GSPS outlines.
_ORGAN_RGB = {
    FindingSite.RIGHT_LUNG: (128, 174, 128),
    FindingSite.LEFT_LUNG: (111, 184, 210),
    FindingSite.HEART: (206, 110, 84),
}
_OTHER_RGB = (220, 220, 120)


@dataclasses.dataclass(frozen=True)
class SegmentInfo:
    """One segment of a built SEG."""

    number: int
    label: str
    tracking_id: str | None
    #: SOP Instance UIDs of source images that carry this segment, sorted.
    source_uids: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class SegResult:
    """A built SEG and how its segments map to findings."""

    dataset: hd.seg.Segmentation
    segments: tuple[SegmentInfo, ...]

    def segment_for(self, tracking_id: str) -> SegmentInfo | None:
        """The segment of finding ``tracking_id``, if any."""
        for s in self.segments:
            if s.tracking_id == tracking_id:
                return s
        return None


def _segments(
    ctx: BuildContext,
) -> list[tuple[str, ImageMask, hd.seg.SegmentDescription, str | None]]:
    algo = hd.AlgorithmIdentificationSequence(
        name=ctx.model.name, family=ALGORITHM_FAMILY, version=ctx.model.version
    )
    out: list[tuple[str, ImageMask, hd.seg.SegmentDescription, str | None]] = []
    number = 1
    for site in FindingSite:
        mask = ctx.result.organ_masks.get(site)
        if mask is None:
            continue
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=site.meaning,
            segmented_property_category=CATEGORY_ANATOMY,
            segmented_property_type=Code(site.code, "SCT", site.meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            tracking_uid=ctx.uids.uid("organ.tracking", site.name),
            tracking_id=site.meaning,
            display_color=hd.color.CIELabColor.from_rgb(*_ORGAN_RGB.get(site, _OTHER_RGB)),
        )
        out.append((site.meaning, mask, desc, None))
        number += 1
    for index, finding in enumerate(ctx.result.findings):
        if finding.mask is None:
            continue
        ft = finding.finding_type
        desc = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=finding.tracking_id,
            segmented_property_category=CATEGORY_FINDING,
            segmented_property_type=Code(ft.code, "SCT", ft.meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algo,
            tracking_uid=ctx.tracking_uid(index),
            tracking_id=finding.tracking_id,
            anatomic_regions=(
                [Code(finding.site.code, "SCT", finding.site.meaning)] if finding.site else None
            ),
            display_color=hd.color.CIELabColor.from_rgb(*finding_rgb(index)),
        )
        out.append((finding.tracking_id, finding.mask, desc, finding.tracking_id))
        number += 1
    return out


def build_seg(ctx: BuildContext) -> SegResult:
    """Build the Segmentation of all organ and finding masks.

    Parameters
    ----------
    ctx : BuildContext
        Result, source series, settings and UID factory.

    Returns
    -------
    SegResult
        The dataset and its segment table.

    Raises
    ------
    ValueError
        No masks, a series without patient geometry, or a messy series that
        cannot be segmented unambiguously (see the module docstring).
    """
    segs = _segments(ctx)
    if not segs:
        raise ValueError("the result carries no masks; there is nothing to segment")
    src = ctx.source
    if src.stack is None and len(src.images) != 1:
        # One projection radiograph needs no patient geometry (its SEG frame
        # is the image itself); several images without it cannot be ordered.
        raise ValueError("SEG needs source images with Image Position/Orientation (Patient)")
    images = src.images
    rows, cols = int(images[0].Rows), int(images[0].Columns)
    index_of = {str(ds.SOPInstanceUID): i for i, ds in enumerate(images)}
    fractional = any(m.is_fractional for _, m, _, _ in segs)

    # Which source frames each segment touches (by UID, never by order).
    touched: list[dict[int, np.ndarray]] = []
    for label, mask, _, _ in segs:
        if mask.array.shape[1:] != (rows, cols):
            raise ValueError(
                f"mask {label!r} frames are {mask.array.shape[1:]}, "
                f"source images are {(rows, cols)}"
            )
        frames: dict[int, np.ndarray] = {}
        for k, uid in enumerate(mask.sop_instance_uids):
            i = index_of.get(uid)
            if i is None:
                raise ValueError(
                    f"mask {label!r} references SOP Instance {uid}, which was not received"
                )
            frame = mask.array[k]
            if frame.any():
                frames[i] = frame
        touched.append(frames)
    used = (
        _resolve_duplicates(images, src.stack, touched)
        if src.stack is not None
        else {i for frames in touched for i in frames}
    )

    keep = sorted(used)
    new_index = {old: new for new, old in enumerate(keep)}
    dtype = np.float32 if fractional else np.bool_
    # Segment-major memory layout, viewed as (frames, rows, cols, segments):
    # highdicom's overlap check sums over the last axis, which is ~4x faster
    # when each segment is a contiguous plane stack.
    array: np.ndarray = np.zeros((len(segs), len(keep), rows, cols), dtype=dtype).transpose(
        1, 2, 3, 0
    )
    for s, frames in enumerate(touched):
        for i, frame in frames.items():
            array[new_index[i], :, :, s] = frame
    seg_type = (
        hd.seg.SegmentationTypeValues.FRACTIONAL
        if fractional
        else hd.seg.SegmentationTypeValues.BINARY
    )
    kwargs = ctx.common_kwargs()
    kwargs.pop("content_date")
    kwargs.pop("content_time")
    dataset = hd.seg.Segmentation(
        source_images=[images[i] for i in keep],
        pixel_array=array,
        segmentation_type=seg_type,
        segment_descriptions=[d for _, _, d, _ in segs],
        series_instance_uid=ctx.uids.uid("seg.series"),
        series_number=ctx.series_number(SeriesNumber.SEG),
        sop_instance_uid=ctx.uids.uid("seg.instance", 1),
        instance_number=1,
        manufacturer=ctx.settings.manufacturer,
        manufacturer_model_name=ctx.model.name,
        software_versions=ctx.model.version,
        device_serial_number=ctx.model.device_uid,
        max_fractional_value=MAX_FRACTIONAL_VALUE,
        content_description="CAD segmentation",
        content_label="CAD_SEG",
        series_description=series_description("segmentation", ctx.model),
        omit_empty_frames=True,
        contributing_equipment=[processing_equipment(ctx.model, ctx.when)],
        content_creator_name=None,
        **kwargs,
    )
    if src.stack is None:
        # A projection radiograph has no slice thickness; highdicom 0.28 writes a
        # Pixel Measures item with Pixel Spacing only and then refuses to read
        # it back (PixelMeasuresSequence.from_sequence needs Slice Thickness).
        # Without patient geometry the macro is not required (PS3.3 A.51.5), and
        # the referenced radiograph keeps its own Pixel Spacing.
        for group in dataset.SharedFunctionalGroupsSequence:
            if "PixelMeasuresSequence" in group and "SliceThickness" not in (
                    group.PixelMeasuresSequence[0]):
                del group.PixelMeasuresSequence
    if src.stack is None and "PatientOrientation" not in dataset:
        # General Image Module, Type 2C without patient geometry (PS3.3 C.7.6.1):
        # the radiograph's own value, possibly empty.
        dataset.PatientOrientation = src.first.get("PatientOrientation", "")
    setattr(dataset, "ContentDate", ctx.when.strftime("%Y%m%d"))  # noqa: B010 (typed as DA)
    setattr(dataset, "ContentTime", ctx.when.strftime("%H%M%S"))  # noqa: B010
    ctx.finalize(dataset, "seg")
    infos = tuple(
        SegmentInfo(
            number=n + 1,
            label=label,
            tracking_id=tid,
            source_uids=tuple(sorted(str(images[i].SOPInstanceUID) for i in touched[n])),
        )
        for n, (label, _, _, tid) in enumerate(segs)
    )
    return SegResult(dataset=dataset, segments=infos)


def _resolve_duplicates(
    images: tuple[Dataset, ...], stack: SliceStack, touched: list[dict[int, np.ndarray]]
) -> set[int]:
    """Indices of source images the SEG references, dropping unused duplicates.

    ``images[k]`` is the image of ``stack.planes[k]``; instances at one slice
    position are those :meth:`~cad_node.imaging.geometry.SliceStack.position_groups`
    groups.
    """
    used: set[int] = set()
    for group in stack.position_groups():
        if len(group) == 1:
            used.add(group[0])
            continue
        drawn = [i for i in group if any(i in frames for frames in touched)]
        if len(drawn) > 1:
            uids = ", ".join(str(images[i].SOPInstanceUID) for i in drawn)
            raise ValueError(
                f"masks draw on {len(drawn)} instances at the same slice position "
                f"({uids}); the segmentation would be ambiguous"
            )
        used.add(drawn[0] if drawn else group[0])
    return used
