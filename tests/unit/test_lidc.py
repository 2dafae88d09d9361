"""LIDC XML parsing, rasterisation and clustering (real LIDC-IDRI-0001 + hand-built XML)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from trainer.lidc import (
    LidcNodule,
    LidcParseError,
    LidcRoi,
    LidcSeriesMismatchError,
    cluster_nodules,
    luna16_consensus,
    parse_lidc_xml,
    rasterize_nodule,
    read_series_headers,
)

SERIES_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
STUDY_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.298806137288633453246975630178"
# LUNA16-style row for this series (luna16_style_annotations.csv).
LUNA16_CENTER = (56.20840547, 86.34341278, -115.8675792)
LUNA16_DIAMETER = 23.35064438


@pytest.fixture(scope="module")
def real(lidc_dir: Path):
    headers = read_series_headers(lidc_dir)
    annotation = parse_lidc_xml(lidc_dir / "069.xml", series_instance_uid=SERIES_UID)
    clusters = cluster_nodules(annotation, headers.positions_by_sop_uid, headers.pixel_spacing)
    return headers, annotation, clusters


def test_real_sessions_and_marks(real) -> None:
    headers, annotation, _ = real
    assert annotation.series_instance_uid == SERIES_UID
    assert annotation.study_instance_uid == STUDY_UID
    assert len(annotation.sessions) == 4
    # Counts read off 069.xml with grep: session 1 has 4 unblindedReadNodule
    # (1 contoured + 3 single-point) and 4 nonNodule, session 2 1+0 and 1,
    # session 3 4 (1+3) and 8, session 4 4 (1+3) and 0.
    assert [len(s.nodules) for s in annotation.sessions] == [1, 1, 1, 1]
    assert [len(s.small_nodules) for s in annotation.sessions] == [3, 0, 3, 3]
    assert [len(s.non_nodules) for s in annotation.sessions] == [4, 1, 8, 0]
    first = annotation.sessions[0].nodules[0]
    assert first.nodule_id == "Nodule 001"
    assert first.characteristics["malignancy"] == 5
    assert first.characteristics["texture"] == 5
    assert first.characteristics["spiculation"] == 4
    assert annotation.sessions[0].servicing_radiologist_id == "540461523"
    roi = first.rois[0]
    assert roi.z_position == -125.0 and roi.inclusion
    assert roi.edge_map[0] == (312, 355)  # first <xCoord>/<yCoord> pair of 069.xml
    # every ROI references one of the 133 slices
    assert len(headers.positions_by_sop_uid) == 133
    for n in annotation.nodules:
        assert n.sop_instance_uids <= headers.positions_by_sop_uid.keys()


def test_real_main_nodule_consensus(real) -> None:
    headers, annotation, clusters = real
    main = clusters[0]
    assert main.n_readers == 4
    assert {m.reader_index for m in main.members} == {0, 1, 2, 3}
    dist = float(np.linalg.norm(np.subtract(main.center_mm, LUNA16_CENTER)))
    assert dist < 2.0, (main.center_mm, dist)
    assert abs(main.diameter_mm - LUNA16_DIAMETER) / LUNA16_DIAMETER < 0.15, main.diameter_mm
    findings = luna16_consensus(annotation, clusters, headers.positions_by_sop_uid,
                                headers.pixel_spacing)
    nodules = [f for f in findings if f.kind == "nodule"]
    assert len(nodules) == 1
    # 9 small-nodule marks + 13 non-nodule marks are irrelevant findings
    assert sum(f.source == "small-nodule" for f in findings) == 9
    assert sum(f.source == "non-nodule" for f in findings) == 13


def test_real_mask_lies_on_dense_tissue(real, lidc_dir: Path) -> None:
    """The filled mask of reader 1's largest slice covers soft tissue, its ring is lung."""
    import pydicom

    headers, annotation, _ = real
    nodule = annotation.sessions[0].nodules[0]
    masks = rasterize_nodule(nodule, headers.rows, headers.cols)
    sop, mask = max(masks.items(), key=lambda kv: kv[1].sum())
    ds = pydicom.dcmread(headers.files_by_sop_uid[sop])
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert hu[mask].mean() > -300
    # the contour pixels themselves are excluded from the mask
    roi = next(r for r in nodule.rois if r.sop_instance_uid == sop)
    assert not any(mask[y, x] for x, y in roi.edge_map)


def _square_roi(x0: int, y0: int, x1: int, y1: int, *, inclusion: bool = True,
                sop: str = "1.2.3") -> LidcRoi:
    pts = [(x, y0) for x in range(x0, x1 + 1)] + [(x1, y) for y in range(y0 + 1, y1 + 1)]
    pts += [(x, y1) for x in range(x1 - 1, x0 - 1, -1)] + [(x0, y) for y in range(y1 - 1, y0, -1)]
    return LidcRoi(sop, 0.0, inclusion, tuple(pts))


def test_rasterize_excludes_contour_pixels_and_holes() -> None:
    outer = _square_roi(2, 2, 10, 10)  # contour on columns/rows 2 and 10
    hole = _square_roi(5, 5, 7, 7, inclusion=False)  # hole contour on 5 and 7
    masks = rasterize_nodule(LidcNodule(0, "n", (outer, hole)), 16, 16)
    m = masks["1.2.3"]
    # Interior of the outer square: rows/cols 3..9 -> 7 x 7 = 49 pixels.
    # The hole removes its filled square incl. its contour: 5..7 -> 3 x 3 = 9.
    # 49 - 9 = 40.
    assert int(m.sum()) == 40
    assert not m[2, 2] and not m[10, 6] and m[3, 3] and m[9, 9]
    assert not m[6, 6] and not m[5, 5] and m[4, 4]
    # x is the column, y the row: a wide, short rectangle
    wide = rasterize_nodule(LidcNodule(0, "w", (_square_roi(1, 1, 9, 4),)), 8, 12)["1.2.3"]
    # interior columns 2..8 (7), rows 2..3 (2) -> 14 pixels
    assert int(wide.sum()) == 14 and wide[2, 8] and not wide[2, 9]


def test_single_point_roi_marks_the_point() -> None:
    roi = LidcRoi("9.9", -10.0, True, ((4, 3),))
    m = rasterize_nodule(LidcNodule(1, "small", (roi,)), 8, 8)["9.9"]
    assert int(m.sum()) == 1 and m[3, 4]


def _xml(series: str, body: str) -> str:
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<LidcReadMessage xmlns="http://www.nih.gov">'
        f"<ResponseHeader><SeriesInstanceUid>{series}</SeriesInstanceUid>"
        "<StudyInstanceUID>1.2</StudyInstanceUID></ResponseHeader>"
        f"{body}</LidcReadMessage>"
    )


def _nodule_xml(nid: str, sop: str, z: float, x0: int, y0: int, size: int) -> str:
    roi = _square_roi(x0, y0, x0 + size, y0 + size)
    edges = "".join(f"<edgeMap><xCoord>{x}</xCoord><yCoord>{y}</yCoord></edgeMap>"
                    for x, y in roi.edge_map)
    return (f"<unblindedReadNodule><noduleID>{nid}</noduleID><characteristics>"
            "<malignancy>3</malignancy></characteristics>"
            f"<roi><imageZposition>{z}</imageZposition><imageSOP_UID>{sop}</imageSOP_UID>"
            f"<inclusion>TRUE</inclusion>{edges}</roi></unblindedReadNodule>")


def test_clustering_and_unknown_sop_uids(tmp_path: Path) -> None:
    # 1 mm pixels; slices "s0" at z=0 and "s1" at z=1.
    pos = {"s0": (0.0, 0.0, 0.0), "s1": (0.0, 0.0, 1.0)}
    body = (
        "<readingSession>" + _nodule_xml("a", "s0", 0.0, 10, 10, 10)
        + _nodule_xml("far", "s0", 0.0, 60, 60, 10) + "</readingSession>"
        "<readingSession>" + _nodule_xml("b", "s1", 1.0, 11, 10, 10)
        + _nodule_xml("ghost", "not-in-series", 5.0, 10, 10, 10) + "</readingSession>"
        "<readingSession>" + _nodule_xml("c", "s0", 0.0, 10, 11, 10) + "</readingSession>"
    )
    path = tmp_path / "a.xml"
    path.write_text(_xml("1.2.3", body))
    ann = parse_lidc_xml(path)
    clusters = cluster_nodules(ann, pos, (1.0, 1.0), rows=100, cols=100)
    # "ghost" references a slice outside the series and is dropped.
    assert sorted(len(c.members) for c in clusters) == [1, 3]
    big = clusters[0]
    assert {m.nodule_id for m in big.members} == {"a", "b", "c"}
    # Interior of a 10-pixel square outline at x0: x0+1 .. x0+9, centre x0+5.
    # a: (15, 15, 0); b: (16, 15, 1); c: (15, 16, 0) -> mean (15.333, 15.333, 0.333)
    np.testing.assert_allclose(big.center_mm, (46 / 3, 46 / 3, 1 / 3), atol=1e-9)
    # 81 voxels of 1 mm^3 -> equivalent sphere d = (6*81/pi)^(1/3) = 5.3681 mm
    assert big.diameter_mm == pytest.approx((6 * 81 / np.pi) ** (1 / 3), rel=1e-9)


def test_corrupt_and_foreign_xml(tmp_path: Path) -> None:
    bad = tmp_path / "broken.xml"
    bad.write_text(_xml("1.2.3", "<readingSession>")[:-30])
    with pytest.raises(LidcParseError, match=r"broken\.xml"):
        parse_lidc_xml(bad)
    other = tmp_path / "other.xml"
    other.write_text(_xml("9.9.9", "<readingSession></readingSession>"))
    with pytest.raises(LidcSeriesMismatchError, match=r"other\.xml.*9\.9\.9"):
        parse_lidc_xml(other, series_instance_uid="1.2.3")
    wrong_root = tmp_path / "notlidc.xml"
    wrong_root.write_text("<foo/>")
    with pytest.raises(LidcParseError, match=r"notlidc\.xml"):
        parse_lidc_xml(wrong_root)
    no_coord = tmp_path / "nocoord.xml"
    no_coord.write_text(_xml("1.2.3", "<readingSession><unblindedReadNodule><noduleID>x</noduleID>"
                                      "<roi><imageZposition>1</imageZposition><imageSOP_UID>s"
                                      "</imageSOP_UID><edgeMap><xCoord>1</xCoord></edgeMap></roi>"
                                      "</unblindedReadNodule></readingSession>"))
    with pytest.raises(LidcParseError, match=r"nocoord\.xml.*yCoord"):
        parse_lidc_xml(no_coord)


def test_radiograph_reading_is_recognised(tmp_path: Path) -> None:
    from trainer.lidc import LidcNotCtReadingError

    cxr = tmp_path / "cxr.xml"
    cxr.write_text('<?xml version="1.0"?><IdriReadMessage xmlns="http://www.nih.gov">'
                   "</IdriReadMessage>")
    with pytest.raises(LidcNotCtReadingError, match=r"cxr\.xml.*IdriReadMessage"):
        parse_lidc_xml(cxr)


def test_rois_mapped_by_z_when_the_uid_is_unknown(tmp_path: Path) -> None:
    from trainer.lidc import remap_rois_by_z

    pos = {"s0": (0.0, 0.0, 0.0), "s1": (0.0, 0.0, 2.5)}
    body = ("<readingSession>" + _nodule_xml("a", "stale-uid", 2.5, 10, 10, 10)
            + _nodule_xml("b", "other-uid", 7.5, 10, 10, 10) + "</readingSession>")
    path = tmp_path / "z.xml"
    path.write_text(_xml("1.2.3", body))
    ann, n = remap_rois_by_z(parse_lidc_xml(path), pos)
    # "a" lies at z = 2.5 -> slice s1; "b" at z = 7.5 matches no slice and stays unknown
    assert n == 1
    a, b = ann.sessions[0].nodules
    assert a.rois[0].sop_instance_uid == "s1"
    assert b.rois[0].sop_instance_uid == "other-uid"
    clusters = cluster_nodules(ann, pos, (1.0, 1.0), rows=64, cols=64)
    assert len(clusters) == 1 and clusters[0].center_mm[2] == 2.5


def test_non_axial_series_is_refused(tmp_path: Path) -> None:
    # Edge-map pixels map to LPS as IPP + (x * col spacing, y * row spacing):
    # right only for IOP [1,0,0,0,1,0].  A flipped series used to give centres
    # mirrored about the first pixel without any error.
    import pydicom

    from trainer.lidc import check_axial_orientation
    from trainer.synthetic import make_phantom, write_dicom_series

    ph = make_phantom((8, 16, 16), (2.0, 1.0, 1.0), seed=0, vessels=False, noise_hu=0)
    files = write_dicom_series(ph.volume_hu, ph.spacing, ph.origin, tmp_path / "s")
    assert len(read_series_headers(tmp_path / "s").positions_by_sop_uid) == 8
    ds = pydicom.dcmread(files[3])
    ds.ImageOrientationPatient = [-1, 0, 0, 0, -1, 0]
    ds.save_as(files[3])
    with pytest.raises(ValueError, match=r"0004\.dcm: ImageOrientationPatient .* not the axial"):
        read_series_headers(tmp_path / "s")
    check_axial_orientation(["1", "0", "0.0000001", "0", "1", "0"], "ok")
    for bad in (None, [1, 0, 0], [0, 1, 0, 0, 0, -1], ["a"] * 6):
        with pytest.raises(ValueError, match="where"):
            check_axial_orientation(bad, "where")
