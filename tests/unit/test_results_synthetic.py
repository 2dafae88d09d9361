"""Result builders on small synthetic CT series (geometry and status edge cases).

The series are generated here (a 64x64-pixel phantom, a few slices) so the
tests are fast and every expected value is set by the test, not by the code.
"""

from __future__ import annotations

import copy
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from cad_node.config import ObjectKind, ResultsConfig
from cad_node.results import OBJECT_KINDS, build_results, validate
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
from cad_node.results.io import load_result, mask_sidecar_path, save_result
from cad_node.results.sc import CONTOUR_RGB, summary_lines
from cad_node.results.seg import build_seg
from cad_node.results.uids import UidFactory, input_fingerprint
from tests.conftest import DCIODVFY, dciodvfy, require_program

MODEL = ModelIdentity(name="phantom-model", version="2.0.0", device_uid="2.25.31337")
SETTINGS = ResultsConfig(use_dciodvfy=False)
N, SIZE = 6, 64
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)


def phantom(orientation: tuple[float, ...] = AXIAL, n: int = N) -> list[Dataset]:
    """A CT series of ``n`` slices 2 mm apart along the slice normal."""
    iop = np.asarray(orientation)
    normal = np.cross(iop[:3], iop[3:])
    out = []
    for k in range(n):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.7.{k + 1}"
        ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.5"
        ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.6"
        ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.8.498.4"
        ds.Modality = "CT"
        ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = (
            "P1",
            "Phantom^One",
            "",
            "O",
        )
        ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "S1", "A1", ""
        ds.StudyDate, ds.StudyTime = "20240102", "101112"
        ds.SeriesNumber, ds.InstanceNumber = 1, k + 1
        ds.Manufacturer = "test"
        ds.ImageOrientationPatient = list(orientation)
        ds.ImagePositionPatient = [float(v) for v in (-16.0, -16.0, -5.0) + normal * 2.0 * k]
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = 2.0
        ds.Rows = ds.Columns = SIZE
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.full((SIZE, SIZE), 100 * k, dtype=np.int16).tobytes()
        out.append(ds)
    return out


def _ball_mask(series: list[Dataset], fractional: bool = False) -> ImageMask:
    arr = np.zeros((3, SIZE, SIZE), np.float32 if fractional else np.bool_)
    arr[0, 5:8, 5:8] = 0.4 if fractional else True
    arr[1, 4:10, 4:9] = 1.0 if fractional else True
    uids = tuple(str(series[k].SOPInstanceUID) for k in (2, 3, 4))  # frame 2 stays empty
    return ImageMask(arr, uids)


def _result(series: list[Dataset], mask: ImageMask | None, **kw: object) -> AnalysisResult:
    finding = Finding(
        tracking_id="Lesion A",
        finding_type=FindingType.LESION,
        site=FindingSite.RIGHT_UPPER_LOBE,
        center_mm=(0.0, 0.0, 1.0),
        long_axis_mm=6.0,
        mask=mask,
    )
    args: dict[str, object] = {
        "pipeline": "phantom",
        "status": AnalysisStatus.COMPLETED,
        "series_instance_uid": str(series[0].SeriesInstanceUID),
        "findings": [finding],
        "model": MODEL,
    }
    args.update(kw)
    return AnalysisResult(**args)  # type: ignore[arg-type]


def test_uids_deterministic_and_model_sensitive() -> None:
    fp = input_fingerprint(["1.2.3", "1.2.4"])
    assert fp == input_fingerprint(["1.2.4", "1.2.3", "1.2.3"])
    a = UidFactory("1.2.9", fp, MODEL)
    assert a.uid("sr.instance", 1) == UidFactory("1.2.9", fp, MODEL).uid("sr.instance", 1)
    assert a.uid("sr.instance", 1) != a.uid("sr.instance", 2) != a.uid("sc.instance", 1)
    for changed in (
        UidFactory("1.2.9", fp, MODEL.model_copy(update={"version": "2.0.1"})),
        UidFactory("1.2.9", fp, MODEL.model_copy(update={"device_uid": "2.25.1"})),
        UidFactory("1.2.9", input_fingerprint(["1.2.3"]), MODEL),
        UidFactory("1.2.10", fp, MODEL),
    ):
        assert changed.uid("sr.instance", 1) != a.uid("sr.instance", 1)
    uid = a.uid("seg.series")
    assert uid.startswith("2.25.") and len(uid) <= 64 and pydicom.uid.UID(uid).is_valid


@pytest.mark.parametrize("orientation", [AXIAL, SAGITTAL], ids=["axial", "sagittal"])
def test_binary_seg_round_trip(orientation: tuple[float, ...]) -> None:
    series = phantom(orientation)
    mask = _ball_mask(series)
    shuffled = [series[k] for k in (4, 0, 5, 2, 1, 3)]
    seg = build_seg(BuildContext.create(_result(series, mask), shuffled, SETTINGS)).dataset
    assert seg.SegmentationType == "BINARY" and seg.NumberOfFrames == 2  # empty frame omitted
    read = hd.seg.Segmentation.from_dataset(seg)
    got = read.get_pixels_by_source_instance(
        source_sop_instance_uids=list(mask.sop_instance_uids[:2]), segment_numbers=[1]
    )[..., 0]
    np.testing.assert_array_equal(got.astype(bool), mask.array[:2])
    for item in seg.PerFrameFunctionalGroupsSequence:
        src = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        want = next(d for d in series if d.SOPInstanceUID == src).ImagePositionPatient
        got_pos = item.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in got_pos], [float(v) for v in want])


def test_fractional_seg() -> None:
    series = phantom()
    mask = _ball_mask(series, fractional=True)
    seg = build_seg(BuildContext.create(_result(series, mask), series, SETTINGS)).dataset
    assert seg.SegmentationType == "FRACTIONAL" and seg.MaximumFractionalValue == 255
    stored = hd.seg.Segmentation.from_dataset(seg).get_pixels_by_source_instance(
        source_sop_instance_uids=list(mask.sop_instance_uids[:2]),
        segment_numbers=[1],
        rescale_fractional=False,
    )[..., 0]
    np.testing.assert_array_equal(stored, np.round(mask.array[:2] * 255).astype(stored.dtype))


def test_seg_rejects_inconsistent_geometry_and_unknown_uids() -> None:
    series = phantom()
    tilted = copy.deepcopy(series)
    tilted[3].ImageOrientationPatient = list(SAGITTAL)
    with pytest.raises(ValueError, match="Image Orientation"):
        build_seg(BuildContext.create(_result(series, _ball_mask(series)), tilted, SETTINGS))
    small = copy.deepcopy(series)
    small[1].Rows = 8
    sizes = r"mixed image sizes in one series: 8x64 \(1 slices\), 64x64 \(5 slices\)"
    with pytest.raises(ValueError, match=sizes):
        build_seg(BuildContext.create(_result(series, _ball_mask(series)), small, SETTINGS))
    with pytest.raises(ValueError, match="not received"):
        build_seg(BuildContext.create(_result(series, _ball_mask(series)), series[:3], SETTINGS))


def _summary_code(sr: Dataset) -> str:
    for item in sr.ContentSequence:
        for sub in item.get("ContentSequence", []):
            if sub.ConceptNameCodeSequence[0].CodeValue == "111017":
                return str(sub.ConceptCodeSequence[0].CodeValue)
    raise AssertionError("no CAD Processing and Findings Summary")


def _groups(sr: Dataset) -> int:
    n = 0
    for item in sr.ContentSequence:
        if item.ConceptNameCodeSequence[0].CodeValue == "126010":
            n += len(item.get("ContentSequence", []))
    return n


def test_failed_analysis_is_reported_as_failure() -> None:
    series = phantom()
    failed = AnalysisResult(
        pipeline="phantom",
        status=AnalysisStatus.FAILED,
        failure_reason="lung segmentation found no lungs",
        series_instance_uid=str(series[0].SeriesInstanceUID),
        model=MODEL,
    )
    objs = build_results(failed, series, settings=SETTINGS, objects=("sr", "seg", "sc", "kos"))
    assert [(o.kind, o.role) for o in objs] == [
        ("sr", "TID 1500 measurement report"),
        ("sc", "summary page"),
    ]
    sr = objs[0].dataset
    assert _summary_code(sr) == "111245" and _groups(sr) == 0
    texts = [
        s.TextValue
        for i in sr.ContentSequence
        for s in i.get("ContentSequence", [])
        if s.ValueType == "TEXT"
    ]
    assert "Analysis failed: lung segmentation found no lungs" in texts
    assert "Not for diagnostic use" in texts
    ctx = BuildContext.create(failed, series, SETTINGS)
    assert "ANALYSIS FAILED: lung segmentation found no lungs" in summary_lines(ctx)
    for obj in objs:
        assert validate(obj, series, use_dciodvfy=False).ok


def test_no_findings_is_explicit() -> None:
    series = phantom()
    negative = _result(series, None, findings=[])
    objs = build_results(negative, series, settings=SETTINGS)
    assert [o.kind for o in objs] == ["sr", "sc"]
    assert _summary_code(objs[0].dataset) == "111241" and _groups(objs[0].dataset) == 0
    assert "No findings." in summary_lines(BuildContext.create(negative, series, SETTINGS))


def test_ct_finding_with_mask_gets_segment_reference_and_center() -> None:
    series = phantom()
    objs = build_results(_result(series, _ball_mask(series)), series, settings=SETTINGS)
    seg = next(o for o in objs if o.kind == "seg").dataset
    sr = next(o for o in objs if o.kind == "sr").dataset

    def items(ds: Dataset) -> list[Dataset]:
        out = []
        for it in ds.get("ContentSequence", []):
            out.append(it)
            out += items(it)
        return out

    refs = [i for i in items(sr) if i.ValueType == "IMAGE" and "ReferencedSOPSequence" in i]
    seg_refs = [
        r for r in refs if r.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == seg.SOPInstanceUID
    ]
    assert len(seg_refs) == 1
    assert seg_refs[0].ReferencedSOPSequence[0].ReferencedSegmentNumber == 1
    (point,) = [i for i in items(sr) if i.ValueType == "SCOORD3D"]
    np.testing.assert_allclose([float(v) for v in point.GraphicData], [0.0, 0.0, 1.0])
    assert validate(sr, series, others=[seg], use_dciodvfy=False).ok
    # Without the SEG among the known objects, the reference does not resolve.
    report = validate(sr, series, use_dciodvfy=False)
    assert not report.ok and "neither received nor built" in report.errors[0]


@pytest.mark.parametrize("case", ["failed", "negative", "single-segment"])
def test_edge_case_objects_pass_dciodvfy(case: str, tmp_path: Path) -> None:
    series = phantom()
    if case == "failed":
        result = AnalysisResult(
            pipeline="phantom",
            status=AnalysisStatus.FAILED,
            failure_reason="timeout",
            series_instance_uid=str(series[0].SeriesInstanceUID),
            model=MODEL,
        )
    else:
        result = _result(series, None if case == "negative" else _ball_mask(series))
        if case == "negative":
            result = result.model_copy(update={"findings": []})
    objs = build_results(result, series, settings=SETTINGS, objects=OBJECT_KINDS)
    for obj in objs:
        path = tmp_path / obj.filename
        obj.dataset.save_as(path, enforce_file_format=True)
        errors, _ = dciodvfy(path)
        assert errors == [], (case, obj.filename, errors)


def test_validate_rejects_missing_air_items() -> None:
    series = phantom()
    objs = build_results(_result(series, None), series, settings=SETTINGS, objects=("sr",))
    good = objs[0].dataset
    assert validate(good, series, use_dciodvfy=False).ok
    tampered = copy.deepcopy(good)
    tampered.VerificationFlag = "VERIFIED"
    for item in tampered.ContributingEquipmentSequence:
        if "DeviceUID" in item:
            del item.DeviceUID
    tampered.StudyInstanceUID = "1.2.3.4"
    errors = " | ".join(validate(tampered, series, use_dciodvfy=False).errors)
    assert "UNVERIFIED" in errors and "Device UID" in errors and "Study Instance UID" in errors
    same_series = copy.deepcopy(good)
    same_series.SeriesInstanceUID = series[0].SeriesInstanceUID
    assert "new series" in validate(same_series, series, use_dciodvfy=False).errors[0]


def test_json_sidecar_round_trip(tmp_path: Path) -> None:
    series = phantom()
    organ = ImageMask(np.ones((N, SIZE, SIZE), bool), tuple(str(d.SOPInstanceUID) for d in series))
    result = _result(
        series, _ball_mask(series, fractional=True), organ_masks={FindingSite.LUNG: organ}
    )
    path = tmp_path / "F.json"
    save_result(result, path)
    assert mask_sidecar_path(path).name == "F.masks.npz"
    back = load_result(path)
    assert back.model_dump() == result.model_dump()
    mask = back.findings[0].mask
    assert mask is not None and mask.is_fractional
    np.testing.assert_array_equal(mask.array, _ball_mask(series, fractional=True).array)
    np.testing.assert_array_equal(back.organ_masks[FindingSite.LUNG].array, organ.array)
    np.savez(
        mask_sidecar_path(path),
        **{"finding:Nope": organ.array, "finding:Nope:uids": np.asarray(organ.sop_instance_uids)},
    )
    with pytest.raises(ValueError, match="'finding:Nope' names no finding"):
        load_result(path)


def test_key_image_circle_at_center_without_mask() -> None:
    series = phantom()
    result = _result(series, None)
    finding = result.findings[0].model_copy(update={"center_mm": (0.0, 14.0, 1.0)})
    result = result.model_copy(update={"findings": [finding]})
    objs = build_results(result, series, settings=SETTINGS, objects=("sc",))
    key = objs[0].dataset
    # (0, 14, 1) mm lies on slice 3 (z = -5 + 2*3), column 16, row 30 of the phantom
    # (origin -16 mm, 1 mm pixels).
    assert key.SourceImageSequence[0].ReferencedSOPInstanceUID == series[3].SOPInstanceUID
    rgb = key.pixel_array
    rows, cols = np.nonzero(np.all(rgb == np.asarray(CONTOUR_RGB, np.uint8), axis=-1))
    assert len(rows) > 10
    assert abs(rows.mean() - 30) <= 1 and abs(cols.mean() - 16) <= 1
    radius = np.hypot(rows - 30, cols - 16)
    assert radius.min() >= 2 and radius.max() <= 6  # radius max(6 mm / 2, 4 px) = 4 px


def test_gate_reports_dciodvfy_errors(tmp_path: Path) -> None:
    require_program(DCIODVFY)
    series = phantom()
    seg = build_results(_result(series, _ball_mask(series)), series, settings=SETTINGS)[0]
    assert seg.kind == "seg"
    report = validate(seg, series, use_dciodvfy=True)
    assert report.dciodvfy_ran and report.ok, report.errors
    broken = copy.deepcopy(seg.dataset)
    del broken.SegmentSequence[0].SegmentAlgorithmType
    bad = validate(broken, series, use_dciodvfy=True)
    assert not bad.ok
    assert any(e.startswith("dciodvfy: Error") and "SegmentAlgorithmType" in e for e in bad.errors)


def test_algorithm_equipment_uses_ihe_air_processing_algorithm_purpose() -> None:
    # IHE AIR: the algorithm is the Contributing Equipment item whose Purpose of
    # Reference is (Newcode1, 99IHE, "Processing Algorithm") and which carries the
    # model's Device UID; highdicom's own library item must not look like it.
    series = phantom()
    objs = build_results(
        _result(series, _ball_mask(series)), series, settings=SETTINGS, objects=OBJECT_KINDS
    )
    # every kind but the Parametric Map (a chest X-ray heatmap: tests/integration/
    # test_results_cxr_part2.py checks its equipment through the same gate)
    assert {o.kind for o in objs} == set(OBJECT_KINDS) - {ObjectKind.PM}
    for obj in objs:
        algo = [
            item
            for item in obj.dataset.ContributingEquipmentSequence
            if [
                (c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning)
                for c in item.PurposeOfReferenceCodeSequence
            ]
            == [("Newcode1", "99IHE", "Processing Algorithm")]
        ]
        assert len(algo) == 1, obj.filename
        assert algo[0].DeviceUID == "2.25.31337"
        assert algo[0].ManufacturerModelName == "phantom-model"
        assert algo[0].SoftwareVersions == "2.0.0"
        others = [i for i in obj.dataset.ContributingEquipmentSequence if i is not algo[0]]
        assert all("DeviceUID" not in i for i in others)
        assert validate(obj, series, others=objs, use_dciodvfy=False).ok, obj.filename


def _elements(ds: Dataset, path: str = "") -> list[tuple[str, str, str]]:
    out = []
    for elem in ds:
        if elem.VR == "SQ":
            for i, item in enumerate(elem.value):
                out += _elements(item, f"{path}{elem.keyword}[{i}].")
        else:
            value = "" if elem.value is None else str(elem.value)
            out.append((f"{path}{elem.keyword}", elem.VR, value))
    return out


@pytest.mark.parametrize("status", ["completed", "failed"])
def test_no_wall_clock_time_or_random_uid_in_any_object(status: str) -> None:
    # Two builds within the same second would hide a wall-clock timestamp, so
    # instead every date/time must be the source study's (2024-01-02 10:11:12,
    # set in phantom()), and no UID may come from highdicom's or pydicom's
    # random generators (roots 1.2.826.0.1.3680043.10.511. and .8.498.).
    series = phantom()
    if status == "failed":
        result = AnalysisResult(
            pipeline="phantom",
            status=AnalysisStatus.FAILED,
            failure_reason="timeout",
            series_instance_uid=str(series[0].SeriesInstanceUID),
            model=MODEL,
        )
    else:
        result = _result(series, _ball_mask(series))
    source_uids = {
        str(d[kw].value)
        for d in series
        for kw in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "FrameOfReferenceUID")
    }
    for obj in build_results(result, series, settings=SETTINGS, objects=OBJECT_KINDS):
        for path, vr, value in _elements(obj.dataset):
            if vr == "DA" and value:
                assert value == "20240102", (obj.filename, path, value)
            elif vr == "TM" and value:
                assert value.startswith("101112"), (obj.filename, path, value)
            elif vr == "DT" and value:
                assert value.startswith("20240102101112"), (obj.filename, path, value)
            elif vr == "UI" and value not in source_uids:
                assert not value.startswith(
                    ("1.2.826.0.1.3680043.10.511.", "1.2.826.0.1.3680043.8.498.")
                ), (obj.filename, path, value)


def _drop(*keywords: str, index: int = 3) -> object:
    def mutate(series: list[Dataset]) -> None:
        for kw in keywords:
            delattr(series[index], kw)

    return mutate


def _set(keyword: str, value: object, index: int = 3) -> object:
    def mutate(series: list[Dataset]) -> None:
        setattr(series[index], keyword, value)

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_drop("SOPInstanceUID"), "source instance #4 lacks SOPInstanceUID"),
        (_drop("StudyInstanceUID"), r"498\.7\.4 lacks StudyInstanceUID"),
        (_drop("SOPClassUID"), r"498\.7\.4 lacks SOPClassUID"),
        (_drop("Rows"), r"498\.7\.4 lacks Rows"),
        (_drop("ImageOrientationPatient"), r"498\.7\.4 .*no usable Image Orientation"),
        (_set("ImageOrientationPatient", [0, 0, 0, 0, 0, 0]), r"no usable Image Orientation"),
        (_drop("PixelSpacing"), r"498\.7\.4 .*no usable Pixel Spacing"),
        (_set("ImagePositionPatient", [1.0, 2.0]), r"498\.7\.4 has an invalid Image Position"),
    ],
    ids=["sop-uid", "study-uid", "sop-class", "rows", "no-iop", "zero-iop", "spacing", "ipp"],
)
def test_incomplete_source_headers_are_clear_errors(mutate: object, message: str) -> None:
    # Before: AttributeError escaped from the builders (the report CLI and the
    # jobs engine expect ValueError/TypeError naming the instance).
    series = copy.deepcopy(phantom())
    mutate(series)  # type: ignore[operator]
    with pytest.raises(ValueError, match=message):
        build_results(
            _result(phantom(), _ball_mask(phantom())), series, settings=SETTINGS,
            objects=OBJECT_KINDS,
        )


def test_non_dataset_source_is_a_type_error() -> None:
    series = phantom()
    with pytest.raises(TypeError, match="source item 2 is a str"):
        build_results(
            _result(series, None), [series[0], "x.dcm"], settings=SETTINGS  # type: ignore[list-item]
        )


def test_corrupt_mask_sidecar_is_a_clear_error(tmp_path: Path) -> None:
    series = phantom()
    path = tmp_path / "F.json"
    save_result(_result(series, _ball_mask(series)), path)
    sidecar = mask_sidecar_path(path)
    good = sidecar.read_bytes()
    # Truncated download, a file that is no zip at all, and a damaged member.
    middle = len(good) // 2
    damaged = good[:middle] + bytes(b ^ 0xFF for b in good[middle : middle + 64]) + good[
        middle + 64 :
    ]
    for data in (good[:100], b"not a zip", damaged):
        sidecar.write_bytes(data)
        with pytest.raises(ValueError, match=r"F\.masks\.npz"):
            load_result(path)


def test_json_accepts_coded_forms(tmp_path: Path) -> None:
    series = phantom()
    path = tmp_path / "F.json"
    save_result(_result(series, None), path)
    raw = path.read_text()
    assert '"finding_type": "LESION"' in raw and '"site": "RIGHT_UPPER_LOBE"' in raw
    for finding_type, site in (
        ('"52988006"', '["45653009", "Upper lobe of right lung"]'),
        ('["52988006", "Lesion"]', '"45653009"'),
    ):
        path.write_text(
            raw.replace('"LESION"', finding_type).replace('"RIGHT_UPPER_LOBE"', site)
        )
        back = load_result(path).findings[0]
        assert back.finding_type is FindingType.LESION
        assert back.site is FindingSite.RIGHT_UPPER_LOBE
    path.write_text(raw.replace('"LESION"', '"99999"'))
    with pytest.raises(ValueError, match=r"F\.json: not a valid AnalysisResult"):
        load_result(path)


def test_validate_rejects_sr_without_procedure_or_device_observer() -> None:
    series = phantom()
    (sr,) = build_results(_result(series, None), series, settings=SETTINGS, objects=("sr",))
    for code, what in (("121058", "Procedure Reported"), ("121012", "Device Observer UID")):
        tampered = copy.deepcopy(sr.dataset)
        tampered.ContentSequence = [
            item
            for item in tampered.ContentSequence
            if item.ConceptNameCodeSequence[0].CodeValue != code
        ]
        errors = validate(tampered, series, use_dciodvfy=False).errors
        assert any(f"SR has no {what}" in e for e in errors), errors


def test_a_stray_orientation_is_refused_whatever_the_file_order() -> None:
    # One instance of the series is tilted (e.g. a localizer stored in it).  The
    # sort axis used to be the normal of whichever file came first, then of the
    # most common orientation, while the volume loader refused such a series:
    # results could describe a geometry no pipeline analysed.  The one policy
    # (cad_node.imaging.geometry) refuses it, naming the same instances for
    # every file order.
    series = phantom()
    series[2].ImageOrientationPatient = list(SAGITTAL)
    series[2].ImagePositionPatient = [30.0, -16.0, 20.0]
    result = _result(series, None)
    want = (
        r"mixed Image Orientation \(Patient\) values: source instance "
        r"1\.2\.826\.0\.1\.3680043\.8\.498\.7\.3 differs from source instance "
        r"1\.2\.826\.0\.1\.3680043\.8\.498\.7\.1$"
    )
    for order in ([0, 1, 2, 3, 4, 5], [2, 0, 1, 3, 4, 5], [5, 4, 3, 2, 1, 0]):
        with pytest.raises(ValueError, match=want):
            build_results(
                result, [series[k] for k in order], settings=SETTINGS, objects=("sr", "sc", "kos")
            )


def test_segmented_finding_reads_back_with_highdicom_and_gate_parses_groups() -> None:
    # The SR used to put "Source Series for Segmentation" (from the appended
    # volume surface) next to the segment's "Source Image for Segmentation"
    # items; highdicom then refused to read the Referenced Segment back.
    series = phantom()
    objs = build_results(_result(series, _ball_mask(series)), series, settings=SETTINGS)
    seg = next(o for o in objs if o.kind == "seg").dataset
    sr = next(o for o in objs if o.kind == "sr").dataset
    buf = BytesIO()
    sr.save_as(buf, enforce_file_format=True)
    read = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(BytesIO(buf.getvalue())))
    (group,) = read.content.get_volumetric_roi_measurement_groups()
    ref = group.referenced_segment
    assert ref is not None
    item = ref[0].ReferencedSOPSequence[0]
    assert item.ReferencedSOPInstanceUID == seg.SOPInstanceUID
    assert item.ReferencedSegmentNumber == 1
    # _ball_mask draws on series[2] and series[3]; its frame on series[4] is empty.
    sources = [
        i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for i in ref[1:]
        if i.ConceptNameCodeSequence[0].CodeMeaning == "Source Image for Segmentation"
    ]
    assert sorted(sources) == [
        str(series[2].SOPInstanceUID),
        str(series[3].SOPInstanceUID),
    ]
    assert validate(sr, series, others=[seg], use_dciodvfy=False).ok
    # The gate now reads the groups as a consumer would: the old layout fails it.
    broken = copy.deepcopy(sr)
    groups = broken.ContentSequence[-2].ContentSequence  # Imaging Measurements
    # groups: the finding's planar (TID 1410) group, then its volumetric one
    groups[-1].ContentSequence.append(
        hd.sr.SourceSeriesForSegmentation(str(series[0].SeriesInstanceUID))
    )
    report = validate(broken, series, others=[seg], use_dciodvfy=False)
    assert not report.ok and "cannot parse" in report.errors[0], report.errors


def _procedure_code(sr: Dataset) -> str:
    (code,) = [
        i.ConceptCodeSequence[0].CodeValue
        for i in sr.ContentSequence
        if i.ConceptNameCodeSequence[0].CodeValue == "121058"
    ]
    return str(code)


def test_procedure_reported_follows_the_source_modality() -> None:
    # Procedure Reported is the imaging procedure (TID 1500 row 4).  A CT series
    # without Image Position (Patient) used to be reported as a chest radiograph.
    series = phantom()
    for ds in series:
        del ds.ImagePositionPatient
    failed = AnalysisResult(
        pipeline="phantom",
        status=AnalysisStatus.FAILED,
        failure_reason="no geometry",
        series_instance_uid=str(series[0].SeriesInstanceUID),
        model=MODEL,
    )
    (sr,) = build_results(failed, series, settings=SETTINGS, objects=("sr",))
    assert _procedure_code(sr.dataset) == "169069000"  # SCT Computed tomography of chest
    for ds in series:
        ds.Modality = "DX"
    (sr,) = build_results(failed, series, settings=SETTINGS, objects=("sr",))
    assert _procedure_code(sr.dataset) == "399208008"  # SCT Plain chest X-ray
    for ds in series:
        ds.Modality = "MR"
    with pytest.raises(ValueError, match="Modality 'MR'"):
        build_results(failed, series, settings=SETTINGS, objects=("sr",))


def test_invalid_tracking_uid_is_rejected_by_the_model() -> None:
    # It used to pass into SR/SEG/GSPS and only fail dciodvfy in the gate.
    import pydantic

    for bad in ("abc", "1.02.3", "1.2.", "1." + "2" * 70):
        with pytest.raises(pydantic.ValidationError, match="tracking_uid"):
            Finding(
                tracking_id="x", tracking_uid=bad, finding_type=FindingType.NODULE,
                center_mm=(0.0, 0.0, 0.0),
            )
    ok = Finding(
        tracking_id="x", tracking_uid="2.25.7", finding_type=FindingType.NODULE,
        center_mm=(0.0, 0.0, 0.0),
    )
    assert ok.tracking_uid == "2.25.7"


@pytest.mark.filterwarnings("ignore:The string .* unlikely to represent")  # on purpose
def test_gate_survives_non_utf8_dciodvfy_output() -> None:
    # dciodvfy echoes values in the object's character set: an ISO_IR 100
    # Patient's Name "Müller" made the gate crash with UnicodeDecodeError.
    from tests.conftest import DCIODVFY, require_program

    require_program(DCIODVFY)
    series = phantom()
    for ds in series:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "M\u00fcller"
    (sr,) = build_results(_result(series, None), series, settings=SETTINGS, objects=("sr",))
    report = validate(sr, series, use_dciodvfy=True)
    assert report.dciodvfy_ran and report.ok, report.errors
    assert any("Patient's Name" in w and "ller" in w for w in report.warnings), report.warnings


def test_gate_fails_closed_when_dciodvfy_cannot_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    gate = importlib.import_module("cad_node.results.validate")  # the package exports validate()
    broken = tmp_path / "dciodvfy"
    broken.write_bytes(b"\x00not an executable format")
    broken.chmod(0o755)
    monkeypatch.setattr(gate, "DCIODVFY", str(broken))
    series = phantom()
    (sr,) = build_results(_result(series, None), series, settings=SETTINGS, objects=("sr",))
    report = validate(sr, series, use_dciodvfy=True)
    assert not report.ok and "could not be run" in report.errors[0], report.errors


def test_gate_fails_closed_when_dciodvfy_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    gate = importlib.import_module("cad_node.results.validate")
    # Not on its absolute path; a "dciodvfy" on PATH must not stand in for it.
    monkeypatch.setattr(gate, "DCIODVFY", str(tmp_path / "no-such-dir" / "dciodvfy"))
    monkeypatch.setenv("PATH", f"/usr/bin:{tmp_path}")
    series = phantom()
    (sr,) = build_results(_result(series, None), series, settings=SETTINGS, objects=("sr",))
    report = validate(sr, series, use_dciodvfy=True)
    assert not report.ok and not report.dciodvfy_ran
    assert "is not installed but results.use_dciodvfy is true" in report.errors[0]
    unchecked = validate(sr, series, use_dciodvfy=False)
    assert unchecked.ok and not unchecked.dciodvfy_ran


@pytest.mark.filterwarnings("ignore:The string .* unlikely to represent")  # on purpose
def test_non_ascii_text_gets_a_character_set_that_holds_it() -> None:
    # A tracking ID, a configured disclaimer or a note outside the source's
    # character repertoire used to give objects dciodvfy rejects (all quarantined).
    from tests.conftest import DCIODVFY, require_program

    require_program(DCIODVFY)
    settings = ResultsConfig(use_dciodvfy=False, disclaimer="Nicht f\u00fcr die Diagnose")
    series = phantom()  # no Specific Character Set: default repertoire
    result = _result(series, _ball_mask(series))
    finding = result.findings[0].model_copy(update={"tracking_id": "Kn\u00f6tchen 1"})
    result = result.model_copy(update={"findings": [finding], "notes": ["\u2265 6 mm"]})
    objs = build_results(result, series, settings=settings, objects=OBJECT_KINDS)
    for obj in objs:
        report = validate(obj, series, others=objs, use_dciodvfy=True)
        assert report.ok, (obj.filename, report.errors)
    sr = pydicom.dcmread(BytesIO(_encode(next(o for o in objs if o.kind == "sr").dataset)))
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    texts = {i.TextValue for e in sr.ContentSequence for i in e.get("ContentSequence", [])
             if i.ValueType == "TEXT"}
    assert {"\u2265 6 mm", "Nicht f\u00fcr die Diagnose"} <= texts
    # A Latin-1 source keeps its patient name intact when UTF-8 is needed.
    latin = phantom()
    for ds in latin:
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientName = "M\u00fcller"
    (sr_obj,) = build_results(
        result.model_copy(update={"findings": []}), latin, settings=settings, objects=("sr",)
    )
    back = pydicom.dcmread(BytesIO(_encode(sr_obj.dataset)))
    assert back.SpecificCharacterSet == "ISO_IR 192" and str(back.PatientName) == "M\u00fcller"
    assert validate(sr_obj, latin, use_dciodvfy=True).ok
    # Pure ASCII content keeps the source's (absent) declaration.
    (plain,) = build_results(_result(series, None), series, settings=SETTINGS, objects=("sr",))
    assert "SpecificCharacterSet" not in plain.dataset


def _encode(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_caller_chosen_uids_under_a_generator_root_are_kept_everywhere() -> None:
    # A pipeline's tracking UID or a bundle's Device UID made with
    # pydicom.uid.generate_uid() (root 1.2.826.0.1.3680043.8.498.) used to be
    # "de-randomised" per object: SEG, SR and GSPS then disagreed with each
    # other and with the bundle.
    tracking = "1.2.826.0.1.3680043.8.498.4242"
    device = "1.2.826.0.1.3680043.8.498.777"
    series = phantom()
    result = _result(series, _ball_mask(series))
    finding = result.findings[0].model_copy(update={"tracking_uid": tracking})
    model = MODEL.model_copy(update={"device_uid": device})
    result = result.model_copy(update={"findings": [finding], "model": model})
    objs = build_results(result, series, settings=SETTINGS, objects=OBJECT_KINDS)
    by_kind = {o.kind: o.dataset for o in objs}
    tracking_uids = {
        kind: {v for path, vr, v in _elements(ds) if path.endswith(("TrackingUID", "].UID"))}
        for kind, ds in by_kind.items()
        if kind in ("seg", "sr", "gsps")
    }
    assert tracking_uids["seg"] == {tracking}
    assert tracking in tracking_uids["sr"] and tracking_uids["gsps"] == {tracking}
    for obj in objs:
        equipment = obj.dataset.ContributingEquipmentSequence
        assert device in {item.get("DeviceUID") for item in equipment}, obj.filename


def test_derived_uids_are_well_formed_uuids() -> None:
    # PS3.5 B.2: a 2.25 UID is the integer of a UUID (ISO/IEC 9834-8); raw hash
    # bits had arbitrary version/variant fields.
    import uuid

    factory = UidFactory("1.2.9", input_fingerprint(["1.2.3"]), MODEL)
    for kind in ("sr.instance", "seg.series", "tracking", "sc.instance"):
        value = int(factory.uid(kind, 1).removeprefix("2.25."))
        u = uuid.UUID(int=value)
        assert u.variant == uuid.RFC_4122 and (value >> 76) & 0xF == 8, kind
