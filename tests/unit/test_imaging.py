"""Series grouping, routing selection and volume geometry on the real LIDC-IDRI-0001 CT."""

from __future__ import annotations

import copy
import random
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from cad_node.config import RoutingRule, SeriesMatch, load_config
from cad_node.imaging import (
    SeriesError,
    group_series,
    index_to_lps,
    load_series,
    lps_to_index,
    select_series,
)
from tests.conftest import require_data


@pytest.fixture(scope="module")
def lidc_files(lidc_dir: Path) -> list[Path]:
    return sorted(lidc_dir.glob("*.dcm"))


@pytest.fixture(scope="module")
def lidc_loaded(lidc_files: list[Path]):
    return load_series(lidc_files)


@pytest.fixture(scope="module")
def stack12(lidc_files: list[Path]) -> list[Dataset]:
    """12 consecutive LIDC slices (by z read straight from the headers), in memory."""
    dss = [pydicom.dcmread(p) for p in lidc_files]
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    return dss[60:72]


def _copy(dss: list[Dataset]) -> list[Dataset]:
    return [copy.deepcopy(d) for d in dss]


def test_lidc_geometry_matches_every_source_slice(lidc_files, lidc_loaded) -> None:
    s = lidc_loaded
    assert s.shape == (133, 512, 512)
    assert s.image.GetSpacing() == pytest.approx((0.703125, 0.703125, 2.5))
    assert len(set(s.sop_instance_uids)) == 133
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
              for p in lidc_files}
    for k in (0, 1, 57, 132):
        ds = pydicom.dcmread(by_uid[s.sop_instance_uids[k]])
        ipp = np.array([float(v) for v in ds.ImagePositionPatient])
        # the voxel (k, 0, 0) is exactly this instance's first pixel
        assert np.abs(index_to_lps(s.image, [k, 0, 0]) - ipp).max() < 1e-3
        expected = ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)
        assert np.array_equal(s.array[k], expected)
    # z increases with k (sorted along the normal, not by Instance Number)
    zs = [float(d.ImagePositionPatient[2]) for d in s.datasets]
    assert zs == sorted(zs)
    assert [int(d.InstanceNumber) for d in s.datasets] != sorted(int(d.InstanceNumber)
                                                                for d in s.datasets)
    # LPS <-> index round trip
    pt = index_to_lps(s.image, [[10.5, 200.0, 300.25]])
    assert np.allclose(lps_to_index(s.image, pt), [[10.5, 200.0, 300.25]])
    assert s.array.dtype == np.int16
    assert "PixelData" not in s.datasets[0]


def test_shuffled_files_give_identical_volume(lidc_files, lidc_loaded) -> None:
    shuffled = list(lidc_files)
    random.Random(7).shuffle(shuffled)
    s = load_series(shuffled)
    assert s.sop_instance_uids == lidc_loaded.sop_instance_uids
    assert s.image.GetOrigin() == lidc_loaded.image.GetOrigin()
    assert np.array_equal(s.array, lidc_loaded.array)


def test_missing_middle_slice_is_rejected(lidc_loaded, lidc_files) -> None:
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p
              for p in lidc_files}
    drop = by_uid[lidc_loaded.sop_instance_uids[70]]
    with pytest.raises(SeriesError, match=r"missing slice.*gap of 5\.000 mm"):
        load_series([p for p in lidc_files if p != drop])


def test_missing_end_slice_stays_aligned(stack12) -> None:
    s = load_series(_copy(stack12[1:]))
    assert s.sop_instance_uids == tuple(d.SOPInstanceUID for d in stack12[1:])
    first = np.array([float(v) for v in stack12[1].ImagePositionPatient])
    assert np.abs(index_to_lps(s.image, [0, 0, 0]) - first).max() < 1e-3


def test_duplicate_position_with_new_uid_is_rejected(stack12) -> None:
    dss = _copy(stack12)
    dup = copy.deepcopy(dss[5])
    dup.SOPInstanceUID = generate_uid()
    with pytest.raises(SeriesError, match="duplicate slice position"):
        load_series([*dss, dup])


def test_same_instance_twice_is_ignored(stack12) -> None:
    dss = _copy(stack12)
    s = load_series([*dss, copy.deepcopy(dss[3])])
    assert s.shape[0] == 12
    assert any("repeated instance" in n for n in s.notes)


def test_gantry_tilt_is_rejected(stack12) -> None:
    dss = _copy(stack12)
    for k, d in enumerate(dss):
        ipp = [float(v) for v in d.ImagePositionPatient]
        d.ImagePositionPatient = [ipp[0], ipp[1] + 0.5 * k, ipp[2]]  # ~11 degree shear
    with pytest.raises(SeriesError, match="gantry tilt"):
        load_series(dss)


def test_varying_spacing_is_rejected(stack12) -> None:
    dss = _copy(stack12)
    for k, d in enumerate(dss):
        ipp = [float(v) for v in d.ImagePositionPatient]
        d.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + (0.4 if k >= 6 else 0.0)]
    with pytest.raises(SeriesError, match="varying slice spacing"):
        load_series(dss)


def test_mixed_sizes_single_slice_localizer_are_rejected(stack12) -> None:
    dss = _copy(stack12)
    small = dss[4]
    arr = small.pixel_array[::2, ::2].copy()
    small.PixelData = arr.tobytes()
    small.Rows, small.Columns = arr.shape
    with pytest.raises(SeriesError, match=r"mixed image sizes.*256x256 \(1 slices\)"):
        load_series(dss)
    with pytest.raises(SeriesError, match="single-slice"):
        load_series(_copy(stack12[:1]))
    loc = _copy(stack12)
    loc[0].ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    with pytest.raises(SeriesError, match="localizer"):
        load_series(loc)


def test_float_rescale_is_applied(stack12) -> None:
    dss = _copy(stack12)
    for d in dss:
        d.RescaleSlope = 0.5
        d.RescaleIntercept = -1000.25
    s = load_series(dss)
    assert s.array.dtype == np.float32
    expected = stack12[0].pixel_array.astype(np.float64) * 0.5 - 1000.25
    assert np.allclose(s.array[0], expected)


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_pixel_data_is_decoded(stack12, tmp_path: Path, syntax) -> None:
    paths = []
    for k, d in enumerate(_copy(stack12[:4])):
        d.compress(syntax)
        p = tmp_path / f"{k}.dcm"
        d.save_as(p)
        paths.append(p)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    s = load_series(paths)
    ref = load_series(_copy(stack12[:4]))
    assert np.array_equal(s.array, ref.array)


def test_group_and_select_by_default_rule(lidc_files, stack12) -> None:
    mr = require_data("pydicom-test-files", "MR_small.dcm")
    ct_small = require_data("pydicom-test-files", "CT_small.dcm")
    scout = _copy(stack12[:2])
    scout_uid = generate_uid()
    for d in scout:
        d.SeriesInstanceUID = scout_uid
        d.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    errors: list[str] = []
    series = group_series([*lidc_files, mr, ct_small, Path(__file__), *scout],
                          on_error=lambda s, r: errors.append(r))
    assert len(series) == 4
    assert len(errors) == 1 and "not a readable DICOM" in errors[0]
    rule = next(r for r in load_config().routing.rules if r.pipeline == "ct-chest")
    chosen = select_series(series, rule)
    lidc_uid = pydicom.dcmread(lidc_files[0], stop_before_pixels=True).SeriesInstanceUID
    assert [s.series_instance_uid for s in chosen] == [lidc_uid]
    assert "Modality MR" in chosen.rejected[pydicom.dcmread(mr).SeriesInstanceUID]
    assert "localizer" in chosen.rejected[scout_uid]
    assert len(chosen.rejected) == 3


def test_best_series_is_thinnest(stack12) -> None:
    thick = _copy(stack12)
    thin = _copy(stack12)
    uid_thin = generate_uid()
    for d in thin:
        d.SeriesInstanceUID = uid_thin
        d.SliceThickness = 1.0
    rule = RoutingRule(name="r", pipeline="ct-chest",
                       match=SeriesMatch(modality=["CT"], orientation="axial"))
    chosen = select_series(group_series([*thick, *thin]), rule)
    assert [s.series_instance_uid for s in chosen] == [uid_thin]
    assert "thinner" in chosen.rejected[thick[0].SeriesInstanceUID]
    rule_all = RoutingRule(name="r", pipeline="ct-chest", series="all")
    assert len(select_series(group_series([*thick, *thin]), rule_all)) == 2


def test_mirrored_orientation_maps_to_the_same_patient_points(stack12) -> None:
    """Rows running right-to-left (normal pointing feet-wards): same voxels, same LPS points."""
    ref = load_series(_copy(stack12))
    dss = _copy(stack12)
    for d in dss:
        ps = float(d.PixelSpacing[1])
        ipp = [float(v) for v in d.ImagePositionPatient]
        d.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
        d.ImagePositionPatient = [ipp[0] + (int(d.Columns) - 1) * ps, ipp[1], ipp[2]]
        d.PixelData = d.pixel_array[:, ::-1].copy().tobytes()
    flipped = load_series(dss)
    # the slice normal now points to the feet: volume order is reversed
    assert flipped.sop_instance_uids == ref.sop_instance_uids[::-1]
    rng = np.random.default_rng(0)
    idx = np.stack([rng.integers(0, n, 50) for n in ref.shape], axis=1)
    points = index_to_lps(ref.image, idx)
    back = np.round(lps_to_index(flipped.image, points)).astype(int)
    assert np.array_equal(flipped.array[tuple(back.T)], ref.array[tuple(idx.T)])
