"""The generic TID 1410 planar-group builder (cad_node.results.planar) on synthetic images."""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage

from cad_node.results.planar import (
    LONG_AXIS,
    SHORT_AXIS,
    LinearMeasurement,
    PlanarRegion,
    PlanarTool,
    bidirectional_axes,
    key_frame,
    planar_group,
    polyline_length_mm,
)


def _image(rows: int = 64, cols: int = 80, spacing: tuple[float, float] = (0.7, 0.7)) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    ds.Modality = "CT"
    ds.Rows, ds.Columns = rows, cols
    ds.PixelSpacing = list(spacing)
    return ds


def _ellipse(rows: int, cols: int, cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    y, x = np.mgrid[:rows, :cols]
    return ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 <= 1.0


def test_axes_of_an_axis_aligned_ellipse() -> None:
    # semi-axes 20 px (columns) and 10 px (rows): 41 and 21 pixel centres wide
    mask = _ellipse(64, 80, 30, 40, 10, 20)
    axes = bidirectional_axes(mask, (0.5, 0.5))
    assert axes is not None
    assert axes.long_axis.value_mm == pytest.approx(41 * 0.5, abs=1e-6)
    assert axes.short_axis.value_mm == pytest.approx(21 * 0.5, abs=1e-6)
    la, sa = axes.long_axis.points, axes.short_axis.points
    # lengths agree with the polylines; the axes are perpendicular
    assert polyline_length_mm(la, (0.5, 0.5)) == pytest.approx(axes.long_axis.value_mm, abs=0.01)
    assert polyline_length_mm(sa, (0.5, 0.5)) == pytest.approx(axes.short_axis.value_mm, abs=0.01)
    assert abs(float(np.dot(la[1] - la[0], sa[1] - sa[0]))) < 1e-3
    # the outline encloses every mask pixel centre
    outline = axes.outline.points
    assert outline[0].tolist() == outline[-1].tolist()
    assert outline[:, 0].min() == pytest.approx(20) and outline[:, 0].max() == pytest.approx(61)


def test_axes_on_anisotropic_pixels_are_in_mm() -> None:
    mask = np.zeros((20, 20), bool)
    mask[5, 3:13] = True  # 10 pixels along a row
    axes = bidirectional_axes(mask, (2.0, 0.5))
    assert axes is not None
    assert axes.long_axis.value_mm == pytest.approx(10 * 0.5 + (0.5 + 2.0) / 2 - 0.5, abs=0.01)
    assert polyline_length_mm(axes.long_axis.points, (2.0, 0.5)) == pytest.approx(
        axes.long_axis.value_mm, abs=0.01
    )


def test_key_frame_is_the_largest_extent_first_on_ties() -> None:
    stack = np.zeros((4, 40, 40), bool)
    stack[1] = _ellipse(40, 40, 20, 20, 4, 4)
    stack[2] = _ellipse(40, 40, 20, 20, 3, 12)  # longest, smaller area than a big disc
    stack[3] = _ellipse(40, 40, 20, 20, 3, 12)
    assert key_frame(stack, (1.0, 1.0)) == 2
    assert key_frame(np.zeros((2, 5, 5), bool), (1.0, 1.0)) is None


def test_group_puts_each_polyline_inside_its_length_num() -> None:
    image = _image()
    axes = bidirectional_axes(_ellipse(64, 80, 30, 40, 10, 20), (0.7, 0.7))
    assert axes is not None
    group = planar_group(
        identifier="Lesion 1",
        tracking_uid="1.2.826.0.1.3680043.8.498.2",
        image=image,
        region=axes.outline,
        finding_type=codes.SCT.Lesion,
        lengths=[axes.long_axis, axes.short_axis],
    )
    container = group[0]
    items = list(container.ContentSequence)
    assert items[0].TextValue == "Cornerstone3DTools@^0.1.0:Bidirectional:Lesion 1"
    nums = [it for it in items if it.ValueType == "NUM"]
    assert [n.ConceptNameCodeSequence[0].CodeValue for n in nums[:2]] == [
        LONG_AXIS.value, SHORT_AXIS.value]
    for num in nums[:2]:
        (sc,) = [c for c in num.ContentSequence if c.ValueType == "SCOORD"]
        assert sc.RelationshipType == "INFERRED FROM"
        ref = sc.ContentSequence[0]
        assert ref.RelationshipType == "SELECTED FROM"
        assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == image.SOPInstanceUID
    (region,) = [it for it in items if it.ValueType == "SCOORD"]
    assert region.ConceptNameCodeSequence[0].CodeValue == "111030"
    # highdicom parses the group back, lengths included
    parsed = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations.from_sequence([container])
    values = {m.name.value: m.value for m in parsed.get_measurements()}
    assert values[LONG_AXIS.value] == pytest.approx(axes.long_axis.value_mm)


def test_tool_defaults_and_plain_identifiers() -> None:
    image = _image()
    line = LinearMeasurement(codes.SCT.Length, 7.0, np.asarray([[10, 10], [20, 10]]))
    g = planar_group(identifier="CTR", tracking_uid="1.2.3.4", image=image,
                     region=PlanarRegion(hd.sr.GraphicTypeValues.POLYLINE, line.points),
                     finding_type=codes.SCT.Lesion, lengths=[line])
    assert g[0].ContentSequence[0].TextValue.endswith(":Length:CTR")
    box = planar_group(identifier="Box", tracking_uid="1.2.3.5", image=image,
                       region=PlanarRegion.box((1, 2), (30, 40)), finding_type=codes.SCT.Lesion)
    assert ":RectangleROI:" in box[0].ContentSequence[0].TextValue
    poly = planar_group(identifier="Outline", tracking_uid="1.2.3.6", image=image,
                        region=PlanarRegion.polygon([[1, 1], [9, 1], [9, 9], [1, 9], [0, 5]]),
                        finding_type=codes.SCT.Lesion)
    assert poly[0].ContentSequence[0].TextValue == "Outline"
    assert PlanarTool.PROBE.value == "Probe"


def test_builder_rejects_inconsistent_input() -> None:
    image = _image()
    line = LinearMeasurement(codes.SCT.Length, 9.0, np.asarray([[10, 10], [20, 10]]))
    with pytest.raises(ValueError, match="disagrees with its polyline"):
        planar_group(identifier="x", tracking_uid="1.2.3", image=image,
                     region=PlanarRegion.box((1, 1), (5, 5)), finding_type=codes.SCT.Lesion,
                     lengths=[line])
    with pytest.raises(ValueError, match="outside"):
        planar_group(identifier="x", tracking_uid="1.2.3", image=image,
                     region=PlanarRegion.box((1, 1), (500, 5)), finding_type=codes.SCT.Lesion)
    with pytest.raises(ValueError, match="not allowed for SCOORD"):
        PlanarRegion(hd.sr.GraphicTypeValues3D.POLYGON, np.zeros((4, 2)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        LinearMeasurement(codes.SCT.Length, 0.0, np.zeros((2, 2)))
    no_spacing = _image()
    del no_spacing.PixelSpacing
    with pytest.raises(ValueError, match="Pixel Spacing"):
        planar_group(identifier="x", tracking_uid="1.2.3", image=no_spacing,
                     region=PlanarRegion.box((1, 1), (5, 5)), finding_type=codes.SCT.Lesion,
                     lengths=[LinearMeasurement(codes.SCT.Length, 7.0,
                                                np.asarray([[10, 10], [20, 10]]))])
