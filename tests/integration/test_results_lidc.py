"""Result objects for the real LIDC-IDRI-0001 CT, checked with tools we did not write.

The consensus nodule of the four LIDC readers (``trainer.lidc``) becomes a
Finding whose mask is the **>= 2-reader vote** of the readers' filled
contours (the usual LIDC "50 % consensus" for four readers).  Its centre is
the centroid of that mask in patient coordinates, computed here from the DICOM
geometry; it must agree with the LUNA16 annotation of the same nodule.
Crude lung masks (HU < -400 inside the body, split at the image midline) give
two organ segments so the SEG carries large segments too.
"""

from __future__ import annotations

import copy
import csv
import io
import random
import re
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from scipy import ndimage

from cad_node.config import ResultsConfig
from cad_node.results import ResultObject, build_results, validate
from cad_node.results._common import BuildContext
from cad_node.results.findings import (
    AnalysisResult,
    AnalysisStatus,
    Finding,
    FindingSite,
    FindingType,
    ImageMask,
    ModelIdentity,
)
from cad_node.results.sc import CONTOUR_RGB
from cad_node.results.seg import build_seg
from tests.conftest import DSRDUMP, REPO_ROOT, dciodvfy, require_data, require_program
from trainer import lidc  # our own module: an ImportError must fail, never skip

MODEL = ModelIdentity(name="lung-nodule-test", version="1.2.3", device_uid="2.25.424242")
SETTINGS = ResultsConfig(use_dciodvfy=False)
WARNINGS_FILE = REPO_ROOT / "tests" / "fixtures" / "results" / "dciodvfy_warnings.tsv"
KINDS = ("sr", "seg", "sc", "gsps", "kos")
LUNA_SERIES = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


def _justified_warnings() -> list[tuple[re.Pattern[str], str]]:
    out = []
    for line in WARNINGS_FILE.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        pattern, justification = line.split("\t", 1)
        assert justification.strip(), f"warning {pattern!r} has no justification"
        out.append((re.compile(pattern), justification))
    return out


def _lps(ds: Dataset, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    dr, dc = (float(v) for v in ds.PixelSpacing)
    ipp = np.asarray([float(v) for v in ds.ImagePositionPatient])
    return ipp + np.outer(cols * dc, iop[:3]) + np.outer(rows * dr, iop[3:])


@pytest.fixture(scope="module")
def source(lidc_dir: Path) -> list[Dataset]:
    return [pydicom.dcmread(p) for p in sorted(lidc_dir.glob("*.dcm"))]


@pytest.fixture(scope="module")
def nodule(lidc_dir: Path, source: list[Dataset]) -> dict[str, object]:
    """Consensus nodule: vote mask by SOP UID, centre and size."""
    ann = lidc.parse_lidc_xml(lidc_dir / "069.xml")
    hdrs = lidc.read_series_headers(lidc_dir)
    clusters = [
        c
        for c in lidc.cluster_nodules(ann, hdrs.positions_by_sop_uid, hdrs.pixel_spacing)
        if c.n_readers >= 3
    ]
    assert len(clusters) == 1
    votes: dict[str, np.ndarray] = {}
    for member in clusters[0].members:
        for uid, m in lidc.rasterize_nodule(member, 512, 512).items():
            votes[uid] = votes.get(uid, np.zeros((512, 512), np.int8)) + m.astype(np.int8)
    masks = {uid: v >= 2 for uid, v in votes.items() if (v >= 2).any()}
    by_uid = {str(d.SOPInstanceUID): d for d in source}
    pts = np.concatenate([_lps(by_uid[u], *np.nonzero(m)) for u, m in masks.items()], axis=0)
    dr, dc = (float(v) for v in source[0].PixelSpacing)
    return {
        "masks": masks,
        "center": tuple(float(v) for v in pts.mean(axis=0)),
        "diameter": float(clusters[0].diameter_mm),
        "volume": float(len(pts) * dr * dc * float(source[0].SliceThickness)),
    }


def _lungs(source: list[Dataset]) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    right = np.zeros((len(source), 512, 512), bool)
    left = np.zeros_like(right)
    for k, ds in enumerate(source):
        hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
        body = ndimage.binary_fill_holes(ndimage.binary_opening(hu > -500, iterations=2))
        lung = body & (hu < -400)
        right[k, :, :256] = lung[:, :256]  # image left = patient right (axial, LPS)
        left[k, :, 256:] = lung[:, 256:]
    return right, left, tuple(str(d.SOPInstanceUID) for d in source)


@pytest.fixture(scope="module")
def result(source: list[Dataset], nodule: dict[str, object]) -> AnalysisResult:
    masks: dict[str, np.ndarray] = nodule["masks"]  # type: ignore[assignment]
    uids = tuple(sorted(masks))
    mask = ImageMask(np.stack([masks[u] for u in uids]), uids)
    right, left, all_uids = _lungs(source)
    finding = Finding(
        tracking_id="Nodule 1",
        finding_type=FindingType.NODULE,
        site=FindingSite.LEFT_LUNG,
        center_mm=nodule["center"],  # type: ignore[arg-type]
        long_axis_mm=nodule["diameter"],  # type: ignore[arg-type]
        short_axis_mm=15.0,
        volume_mm3=nodule["volume"],  # type: ignore[arg-type]
        mean_hu=-12.5,
        probability=0.93,
        mask=mask,
    )
    return AnalysisResult(
        pipeline="ct-lung",
        status=AnalysisStatus.COMPLETED,
        series_instance_uid=str(source[0].SeriesInstanceUID),
        findings=[finding],
        organ_masks={
            FindingSite.RIGHT_LUNG: ImageMask(right, all_uids),
            FindingSite.LEFT_LUNG: ImageMask(left, all_uids),
        },
        model=MODEL,
    )


@pytest.fixture(scope="module")
def built(
    result: AnalysisResult, source: list[Dataset], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, list[tuple[ResultObject, Path]]]:
    out_dir = tmp_path_factory.mktemp("lidc-results")
    objs = build_results(result, source, settings=SETTINGS, objects=KINDS)
    out: dict[str, list[tuple[ResultObject, Path]]] = {}
    for obj in objs:
        path = out_dir / obj.filename
        obj.dataset.save_as(path, enforce_file_format=True)
        out.setdefault(obj.kind, []).append((obj, path))
    return out


def test_consensus_nodule_matches_luna16(nodule: dict[str, object]) -> None:
    """The test input itself agrees with the independent LUNA16 annotation."""
    csv_path = require_data("lidc-idri-0001", "luna16_style_annotations.csv")
    with csv_path.open() as fh:
        rows = [r for r in csv.reader(fh) if r and r[0] == LUNA_SERIES]
    assert len(rows) == 1
    luna = np.asarray([float(v) for v in rows[0][1:4]])
    assert np.linalg.norm(np.asarray(nodule["center"]) - luna) < 2.0


def test_all_objects_pass_dciodvfy(built: dict[str, list[tuple[ResultObject, Path]]]) -> None:
    justified = _justified_warnings()
    assert set(KINDS) <= set(built)
    for kind, items in built.items():
        for _, path in items:
            errors, warnings = dciodvfy(path)
            assert errors == [], f"{kind} {path.name}: {errors}"
            for w in warnings:
                assert any(p.search(w) for p, _ in justified), f"{kind}: unjustified warning {w}"


def test_validate_gate_accepts_all(
    built: dict[str, list[tuple[ResultObject, Path]]], source: list[Dataset]
) -> None:
    objs = [o for items in built.values() for o, _ in items]
    for obj in objs:
        report = validate(obj, source, others=objs, use_dciodvfy=True)
        assert report.ok, (obj.kind, obj.role, report.errors)
        assert report.dciodvfy_ran


def test_dsrdump_prints_tid1500_tree(built: dict[str, list[tuple[ResultObject, Path]]]) -> None:
    exe = require_program(DSRDUMP)
    ((obj, path),) = built["sr"]
    out = subprocess.run(
        [exe, str(path)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert '"Imaging Measurement Report"' in out
    assert '"Tracking Identifier")="Nodule 1"' in out
    m = re.search(r'"Tracking Unique Identifier"\)="([0-9.]+)"', out)
    seg_obj = built["seg"][0][0]
    seg_tracking = {
        str(d.TrackingUID)
        for d in seg_obj.dataset.SegmentSequence
        if d.get("TrackingID") == "Nodule 1"
    }
    # The SR and the SEG segment share the finding's (derived) tracking UID.
    assert m and m.group(1).startswith("2.25.") and {m.group(1)} == seg_tracking
    assert obj.dataset.SOPInstanceUID != seg_obj.dataset.SOPInstanceUID
    assert re.search(r'"Long Axis"\)="23\.1\d*" \(mm', out), out
    assert re.search(r'"Volume"\)="[0-9.]+" \(mm3', out)
    assert '"Referenced Segment"' in out
    assert '(169069000,SCT,"Computed tomography of chest")' in out
    assert "UNVERIFIED" in out


def _scoord3d_points(ds: Dataset) -> list[np.ndarray]:
    out = []
    for item in ds.get("ContentSequence", []):
        if item.ValueType == "SCOORD3D":
            out.append(np.asarray(item.GraphicData, float).reshape(-1, 3))
        out += _scoord3d_points(item)
    return out


def test_sr_center_within_1mm(
    built: dict[str, list[tuple[ResultObject, Path]]], nodule: dict[str, object]
) -> None:
    ((_, path),) = built["sr"]
    ds = pydicom.dcmread(path)
    assert ds.VerificationFlag == "UNVERIFIED"
    equipment = ds.ContributingEquipmentSequence
    assert any(e.get("DeviceUID") == MODEL.device_uid for e in equipment)
    (points,) = _scoord3d_points(ds)
    assert np.linalg.norm(points[0] - np.asarray(nodule["center"])) <= 1.0


def test_seg_reads_back_voxel_for_voxel(
    built: dict[str, list[tuple[ResultObject, Path]]],
    result: AnalysisResult,
    source: list[Dataset],
) -> None:
    ((_, path),) = built["seg"]
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    labels = {d.SegmentNumber: d.SegmentLabel for d in seg.SegmentSequence}
    assert labels == {1: "Right lung", 2: "Left lung", 3: "Nodule 1"}
    all_uids = [str(d.SOPInstanceUID) for d in source]
    expected = {
        1: result.organ_masks[FindingSite.RIGHT_LUNG],
        2: result.organ_masks[FindingSite.LEFT_LUNG],
        3: result.findings[0].mask,
    }
    referenced = {str(u) for _, _, u in seg.get_source_image_uids()}
    for number, mask in expected.items():
        assert mask is not None
        want = {u: mask.array[k] for k, u in enumerate(mask.sop_instance_uids)}
        uids = [u for u in all_uids if u in referenced]
        got = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=uids, segment_numbers=[number]
        )[..., 0]
        for k, u in enumerate(uids):
            np.testing.assert_array_equal(
                got[k].astype(bool), want.get(u, np.zeros((512, 512), bool))
            )
        # Slices outside the SEG must be empty in the input mask.
        for u in set(all_uids) - referenced:
            assert not want.get(u, np.zeros(1, bool)).any()
    # Empty frames are omitted: only frames with content are stored.
    n_nonempty = sum(
        int(m.array[k].any())
        for m in expected.values()
        if m is not None
        for k in range(m.array.shape[0])
    )
    assert seg.NumberOfFrames == n_nonempty


def test_sc_key_image_contour_at_finding(
    built: dict[str, list[tuple[ResultObject, Path]]], result: AnalysisResult
) -> None:
    key, summary = built["sc"]
    assert key[0].role == "key image Nodule 1" and summary[0].role == "summary page"
    ds = pydicom.dcmread(key[1])
    assert ds.PhotometricInterpretation == "RGB" and ds.BurnedInAnnotation == "YES"
    rgb = ds.pixel_array
    mask = result.findings[0].mask
    assert mask is not None
    ref_uid = str(ds.SourceImageSequence[0].ReferencedSOPInstanceUID)
    frame = mask.array[mask.sop_instance_uids.index(ref_uid)]
    # The key slice is the one with the largest nodule cross-section.
    assert frame.sum() == max(int(f.sum()) for f in mask.array)
    contour = np.all(rgb == np.asarray(CONTOUR_RGB, np.uint8), axis=-1)
    ring = ndimage.binary_dilation(frame) & ~frame
    assert contour.sum() > 20
    np.testing.assert_array_equal(contour, ring)
    # The pixels inside the contour are the source pixels in the lung window.
    assert rgb[frame][:, 0].std() > 5
    sds = pydicom.dcmread(summary[1])
    assert sds.Rows == 768 and sds.StudyInstanceUID == ds.StudyInstanceUID


def _uids(objs: list[ResultObject]) -> list[str]:
    out = []
    for o in objs:
        out += [str(o.dataset.SOPInstanceUID), str(o.dataset.SeriesInstanceUID)]
    return out


def test_same_input_same_bytes_new_model_new_uids(
    result: AnalysisResult, source: list[Dataset], built: dict[str, list[tuple[ResultObject, Path]]]
) -> None:
    shuffled = list(source)
    random.Random(7).shuffle(shuffled)
    again = build_results(result, shuffled, settings=SETTINGS, objects=KINDS)
    first = [o for items in built.values() for o, _ in items]
    assert sorted(_uids(again)) == sorted(_uids(first))
    by_name = {o.filename: p.read_bytes() for items in built.values() for o, p in items}
    for obj in again:
        buf = io.BytesIO()
        obj.dataset.save_as(buf, enforce_file_format=True)
        assert buf.getvalue() == by_name[obj.filename], f"{obj.filename} differs on rebuild"
    other = result.model_copy(update={"model": MODEL.model_copy(update={"version": "1.2.4"})})
    changed = build_results(other, source, settings=SETTINGS, objects=("sr", "seg", "sc"))
    assert not set(_uids(changed)) & set(_uids(first))


# --- messy series ---------------------------------------------------------


def _nodule_only(result: AnalysisResult) -> AnalysisResult:
    return result.model_copy(update={"organ_masks": {}})


def _seg_pixels(seg_ds: Dataset, uids: list[str]) -> np.ndarray:
    seg = hd.seg.Segmentation.from_dataset(seg_ds)
    return seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1])[
        ..., 0
    ]


def test_duplicated_slice_unused_copy_is_left_out(
    result: AnalysisResult, source: list[Dataset]
) -> None:
    res = _nodule_only(result)
    mask = res.findings[0].mask
    assert mask is not None
    dup = copy.deepcopy(source[40])
    dup.SOPInstanceUID = "2.25.99999999999999"
    seg = build_seg(BuildContext.create(res, [*source, dup], SETTINGS)).dataset
    got = _seg_pixels(seg, list(mask.sop_instance_uids))
    np.testing.assert_array_equal(got.astype(bool), mask.array)
    refs = {
        str(i.ReferencedSOPInstanceUID)
        for s in seg.ReferencedSeriesSequence
        for i in s.ReferencedInstanceSequence
    }
    assert dup.SOPInstanceUID not in refs


def test_duplicated_slice_drawn_twice_is_a_clear_error(
    result: AnalysisResult, source: list[Dataset]
) -> None:
    res = _nodule_only(result)
    mask = res.findings[0].mask
    assert mask is not None
    k = int(np.argmax(mask.array.reshape(len(mask.sop_instance_uids), -1).sum(axis=1)))
    uid = mask.sop_instance_uids[k]
    orig = next(d for d in source if d.SOPInstanceUID == uid)
    dup = copy.deepcopy(orig)
    dup.SOPInstanceUID = "2.25.88888888888888"
    twice = ImageMask(
        np.concatenate([mask.array, mask.array[k : k + 1]]),
        (*mask.sop_instance_uids, dup.SOPInstanceUID),
    )
    f = res.findings[0].model_copy(update={"mask": twice})
    bad = res.model_copy(update={"findings": [f]})
    with pytest.raises(ValueError, match="same slice position"):
        build_seg(BuildContext.create(bad, [*source, dup], SETTINGS))


def test_missing_slice(result: AnalysisResult, source: list[Dataset]) -> None:
    res = _nodule_only(result)
    mask = res.findings[0].mask
    assert mask is not None
    gone = mask.sop_instance_uids[1]
    partial = [d for d in source if d.SOPInstanceUID != gone]
    # The mask still draws on the missing slice: a clear error.
    with pytest.raises(ValueError, match="not received"):
        build_seg(BuildContext.create(res, partial, SETTINGS))
    # Without it, every remaining frame lands on its own image.
    keep = [k for k, u in enumerate(mask.sop_instance_uids) if u != gone]
    cut = ImageMask(mask.array[keep], tuple(mask.sop_instance_uids[k] for k in keep))
    f = res.findings[0].model_copy(update={"mask": cut})
    seg = build_seg(
        BuildContext.create(res.model_copy(update={"findings": [f]}), partial, SETTINGS)
    ).dataset
    got = _seg_pixels(seg, list(cut.sop_instance_uids))
    np.testing.assert_array_equal(got.astype(bool), cut.array)
    # Each SEG frame's position is its own source image's position.
    by_uid = {str(d.SOPInstanceUID): d for d in source}
    for item in seg.PerFrameFunctionalGroupsSequence:
        src_uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        pos = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(
            pos, [float(v) for v in by_uid[src_uid].ImagePositionPatient], atol=1e-3
        )


def test_shuffled_files_give_identical_seg(result: AnalysisResult, source: list[Dataset]) -> None:
    res = _nodule_only(result)
    a = build_seg(BuildContext.create(res, source, SETTINGS)).dataset
    shuffled = list(reversed(source))
    random.Random(3).shuffle(shuffled)
    b = build_seg(BuildContext.create(res, shuffled, SETTINGS)).dataset
    ba, bb = io.BytesIO(), io.BytesIO()
    a.save_as(ba, enforce_file_format=True)
    b.save_as(bb, enforce_file_format=True)
    assert ba.getvalue() == bb.getvalue()


def test_gsps_outlines_on_mask_boundary_and_kos_key_slice(
    built: dict[str, list[tuple[ResultObject, Path]]], result: AnalysisResult
) -> None:
    mask = result.findings[0].mask
    assert mask is not None
    drawn = {u for k, u in enumerate(mask.sop_instance_uids) if mask.array[k].any()}
    ((_, gpath),) = built["gsps"]
    gsps = pydicom.dcmread(gpath)
    assert [la.GraphicLayer for la in gsps.GraphicLayerSequence] == ["CAD"]
    annotated = {
        str(a.ReferencedImageSequence[0].ReferencedSOPInstanceUID): a
        for a in gsps.GraphicAnnotationSequence
    }
    assert set(annotated) == drawn
    for uid, ann in annotated.items():
        frame = mask.array[mask.sop_instance_uids.index(uid)]
        edge = frame & ~ndimage.binary_erosion(frame)
        dist = ndimage.distance_transform_edt(~edge)
        for obj in ann.GraphicObjectSequence:
            assert obj.GraphicAnnotationUnits == "PIXEL"
            xy = np.asarray(obj.GraphicData, float).reshape(-1, 2)
            rows = np.clip(np.round(xy[:, 1] - 0.5).astype(int), 0, 511)
            cols = np.clip(np.round(xy[:, 0] - 0.5).astype(int), 0, 511)
            assert dist[rows, cols].max() <= 1.0, uid
    assert gsps.SoftcopyVOILUTSequence[0].WindowWidth == 1500
    ((_, kpath),) = built["kos"]
    kos = pydicom.dcmread(kpath)
    key_uid = max(drawn, key=lambda u: int(mask.array[mask.sop_instance_uids.index(u)].sum()))
    refs = [
        str(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for i in kos.ContentSequence
        if i.ValueType == "IMAGE"
    ]
    assert refs == [key_uid]


def test_sr_planar_and_volumetric_groups_per_finding(
    built: dict[str, list[tuple[ResultObject, Path]]], source: list[Dataset]
) -> None:
    """Each CT finding: a TID 1410 group on its key slice, then its TID 1411 group.

    Read back with highdicom's TID 1500 content API and printed by dsrdump;
    the planar long axis is the length of its own POLYLINE on the slice's
    Pixel Spacing, and the slice is the one of the largest in-plane extent.
    """
    ((_, path),) = built["sr"]
    sr = hd.sr.srread(path)
    planar = sr.content.get_planar_roi_measurement_groups()
    volumetric = sr.content.get_volumetric_roi_measurement_groups()
    assert len(planar) == len(volumetric) == 1
    (p,), (v,) = planar, volumetric
    assert p.tracking_uid == v.tracking_uid
    assert p.tracking_identifier == "Cornerstone3DTools@^0.1.0:Bidirectional:Nodule 1"
    assert v.tracking_identifier == "Nodule 1"
    assert p.reference_type == codes_dcm_image_region()
    by_uid = {str(d.SOPInstanceUID): d for d in source}
    (long_axis,) = p.get_measurements(name=hd.sr.CodedConcept("103339001", "SCT", "Long Axis"))
    num = next(
        it for it in p[0].ContentSequence
        if it.ValueType == "NUM" and it.ConceptNameCodeSequence[0].CodeValue == "103339001"
    )
    (scoord,) = [it for it in num.ContentSequence if it.ValueType == "SCOORD"]
    assert scoord.RelationshipType == "INFERRED FROM" and scoord.GraphicType == "POLYLINE"
    ref = scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    image = by_uid[str(ref)]
    pts = np.asarray(scoord.GraphicData, float).reshape(-1, 2)
    dr, dc = (float(x) for x in image.PixelSpacing)
    length = float(np.hypot((pts[1, 0] - pts[0, 0]) * dc, (pts[1, 1] - pts[0, 1]) * dr))
    assert abs(length - long_axis.value) < 0.05
    # the planar group's own region is on the same slice
    region = next(it for it in p[0].ContentSequence if it.ValueType == "SCOORD")
    assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == ref
    exe = require_program(DSRDUMP)
    out = subprocess.run(
        [exe, "+Pl", str(path)], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.count(f'"Tracking Unique Identifier")="{p.tracking_uid}"') == 2
    assert '"Tracking Identifier")="Cornerstone3DTools@^0.1.0:Bidirectional:Nodule 1"' in out
    assert re.search(r'<inferred from SCOORD:\(,,"Image Region"\)=\(POLYLINE', out)
    assert '"Referenced Segment"' in out and "SCOORD3D" in out


def codes_dcm_image_region() -> hd.sr.CodedConcept:
    return hd.sr.CodedConcept("111030", "DCM", "Image Region")
