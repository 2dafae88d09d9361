"""What the radiologist reads (issue #13 item 3) on synthetic phantoms.

Colours per finding agree across SEG, SC and GSPS; result series sort after
the source series; every probability on the key images and the summary page
is named; labels stay inside the image.
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
import pytest
from PIL import ImageFont

from cad_node.config import ObjectKind
from cad_node.results import build_results
from cad_node.results._common import SeriesNumber, result_series_number
from cad_node.results.colours import FINDING_PALETTE, finding_rgb
from cad_node.results.findings import Finding, FindingType, ImageMask
from cad_node.results.sc import place_label, summary_lines, wrap_text
from tests.unit.test_results_synthetic import SETTINGS, SIZE, _result, phantom

KINDS = (ObjectKind.SR, ObjectKind.SEG, ObjectKind.SC, ObjectKind.GSPS, ObjectKind.KOS)


def _two_findings(series_number: int = 1) -> tuple[list, object]:
    series = phantom()
    for ds in series:
        ds.SeriesNumber = series_number
    findings = []
    for k, (r, c) in enumerate([(10, 10), (40, 44)]):
        arr = np.zeros((1, SIZE, SIZE), bool)
        arr[0, r:r + 6, c:c + 8] = True
        findings.append(Finding(
            tracking_id=f"Nodule {k + 1}", finding_type=FindingType.NODULE,
            center_mm=(c - 16.0 + 4, r - 16.0 + 3, 1.0), long_axis_mm=8.0, short_axis_mm=6.0,
            probability=0.9, malignancy_probability=0.12,
            mask=ImageMask(arr, (str(series[3].SOPInstanceUID),)),
        ))
    base = _result(series, None)
    return series, base.model_copy(update={"findings": findings})


def test_each_finding_has_its_own_colour_in_seg_sc_and_gsps() -> None:
    series, result = _two_findings()
    objs = build_results(result, series, settings=SETTINGS, objects=KINDS)
    seg = next(o.dataset for o in objs if o.kind == ObjectKind.SEG)
    lab = {str(s.SegmentLabel): tuple(s.RecommendedDisplayCIELabValue)
           for s in seg.SegmentSequence}
    keys = [o.dataset for o in objs if o.kind == ObjectKind.SC][:2]
    gsps = next(o.dataset for o in objs if o.kind == ObjectKind.GSPS)
    layers = {str(la.GraphicLayerDescription): tuple(la.GraphicLayerRecommendedDisplayCIELabValue)
              for la in gsps.GraphicLayerSequence}
    assert lab["Nodule 1"] != lab["Nodule 2"]
    for k, key in enumerate(keys):
        rgb = finding_rgb(k)
        expected = tuple(hd.color.CIELabColor.from_rgb(*rgb).value)
        assert lab[f"Nodule {k + 1}"] == expected
        assert layers[f"CAD Nodule {k + 1}"] == expected
        outline = np.all(key.pixel_array == np.asarray(rgb, np.uint8), axis=-1)
        assert outline.sum() > 10, f"key image {k + 1} has no outline in its SEG colour"
    assert all(len(set(c)) > 1 for c in FINDING_PALETTE)  # never grey


@pytest.mark.parametrize(("source", "expected"), [
    (1, {9001, 9002, 9003, 9004, 9005, 9006}),
    (3000566, {3000567, 3000568, 3000569, 3000570, 3000571, 3000572}),
    (2**31 - 2, {2**31 - 1}),
])
def test_result_series_sort_after_the_source(source: int, expected: set[int]) -> None:
    assert {result_series_number(k, source) for k in SeriesNumber} == expected
    series, result = _two_findings(source)
    for obj in build_results(result, series, settings=SETTINGS, objects=KINDS):
        assert int(obj.dataset.SeriesNumber) > source or source == 2**31 - 2
        description = str(obj.dataset.SeriesDescription)
        assert description.startswith("AI ") and "phantom-model 2.0.0" in description
        assert len(description) <= 64


def test_probabilities_are_named_on_labels_and_summary() -> None:
    series, result = _two_findings()
    objs = build_results(result, series, settings=SETTINGS, objects=(ObjectKind.SC,))
    assert len(objs) == 3
    from cad_node.results._common import BuildContext

    lines = summary_lines(BuildContext.create(result, series, SETTINGS))
    header = next(ln for ln in lines if isinstance(ln, tuple) and ln[0] == "ID")
    assert "Detection certainty" in header and "Malignancy risk (Brock)" in header
    assert "Prob" not in header
    legend = [ln for ln in lines if isinstance(ln, str) and ln.startswith("Detection certainty:")]
    assert legend and "not a risk of cancer" in legend[0]


def test_labels_wrap_and_stay_inside_the_image() -> None:
    font = ImageFont.load_default(size=14)
    text = "Nodule 10 34.8 mm, detection certainty 1.00, malignancy risk (Brock) 0.29"
    for width, height, anchor in [(512, 512, (480.0, 300.0)), (64, 64, (60.0, 2.0))]:
        fnt, line_h, lines, (x, y) = place_label(text, anchor, (width, height), 14)
        assert " ".join(lines).replace("  ", " ") == text or len(lines) > 1
        right = x + max(fnt.getlength(ln) for ln in lines)
        assert 0 <= x and right <= width, (width, x, right)
        assert 0 <= y and y + line_h * len(lines) <= height + line_h
    assert wrap_text("a" * 50, font, 40)[0] != "a" * 50  # a long word is cut


def _radiograph_like(notes: int = 0, note_chars: int = 100) -> tuple[list, object]:
    """Findings without axes, volume or Brock risk (as the chest X-ray pipeline's)."""
    series, result = _two_findings()
    findings = [f.model_copy(update={"long_axis_mm": None, "short_axis_mm": None,
                                     "malignancy_probability": None, "center_mm": None,
                                     "finding_type": FindingType.CARDIOMEGALY if k == 0
                                     else f.finding_type})
                for k, f in enumerate(result.findings)]
    extra = [f"note {k}: " + "word " * (note_chars // 5) for k in range(notes)]
    return series, result.model_copy(update={"findings": findings, "notes": extra})


def test_summary_columns_follow_the_findings() -> None:
    from cad_node.results._common import BuildContext

    series, ct = _two_findings()
    ct_header = next(ln for ln in summary_lines(BuildContext.create(ct, series, SETTINGS))
                     if isinstance(ln, tuple))
    assert ct_header == ("ID", "Type", "Site", "Long mm", "Short mm",  # no volume given
                         "Detection certainty", "Malignancy risk (Brock)")
    series, cxr = _radiograph_like()
    lines = summary_lines(BuildContext.create(cxr, series, SETTINGS))
    header = next(ln for ln in lines if isinstance(ln, tuple))
    assert header == ("ID", "Type", "Site", "Detection certainty")
    assert ("Cardiomegaly" in next(ln for ln in lines if isinstance(ln, tuple) and ln[0] ==
                                   "Nodule 1"))  # the type is not cut to 8 characters
    assert not any(isinstance(ln, str) and "Brock" in ln for ln in lines)


def test_summary_table_columns_never_overlap() -> None:
    from cad_node.results._common import BuildContext
    from cad_node.results.sc import SUMMARY_SHAPE, _layout_summary, _text_width

    for series, result in (_two_findings(), _radiograph_like()):
        lines = summary_lines(BuildContext.create(result, series, SETTINGS))
        font, _, drawn, tables = _layout_summary(lines, 18, SUMMARY_SHAPE[1])
        assert tables
        for start, xs in tables.items():
            n = start
            while n < len(drawn) and isinstance(drawn[n], tuple):
                for c, cell in enumerate(drawn[n][:-1]):
                    assert xs[c] + _text_width(font, cell) < xs[c + 1], (drawn[n], c)
                n += 1


def test_summary_page_shrinks_its_font_before_it_drops_a_line() -> None:
    from cad_node.results._common import BuildContext
    from cad_node.results.sc import (
        _SUMMARY_FONT_PX,
        SUMMARY_SHAPE,
        _layout_summary,
        build_summary_page,
    )

    rows, cols = SUMMARY_SHAPE

    def text_lines(page: np.ndarray) -> int:
        """Bands of pixel rows holding white (body) text; the disclaimer is red."""
        rows_with_text = np.all(page >= 250, axis=-1).any(axis=1).astype(np.int8)
        return int((np.diff(np.concatenate([[0], rows_with_text])) == 1).sum())

    series, result = _radiograph_like(notes=24)
    lines = summary_lines(BuildContext.create(result, series, SETTINGS))
    _, step, drawn, _ = _layout_summary(lines, _SUMMARY_FONT_PX[0], cols)
    assert 16 + len(drawn) * step > rows - 3 * _SUMMARY_FONT_PX[0]  # too long at 18 px
    page = build_summary_page(BuildContext.create(result, series, SETTINGS), 9).pixel_array
    assert text_lines(page) >= len(lines)  # every line is on the page, at a smaller size
    series, result = _radiograph_like(notes=200)
    page = build_summary_page(BuildContext.create(result, series, SETTINGS), 9).pixel_array
    assert text_lines(page) < len(summary_lines(BuildContext.create(result, series, SETTINGS)))
