"""Synthetic phantom generator and CT DICOM series writer."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.conftest import dciodvfy
from trainer.synthetic import (
    GGO_HU,
    LUNG_HU,
    SOLID_NODULE_HU,
    NoduleSpec,
    make_phantom,
    random_nodule_specs,
    write_dicom_series,
)

SHAPE = (40, 96, 112)  # z, y, x
SPACING = (2.0, 1.5, 2.5)  # sz, sy, sx (anisotropic on purpose)


@pytest.fixture(scope="module")
def clean():
    """Noise-free, blur-free phantom: exact HU values can be checked."""
    specs = [
        NoduleSpec(20.0, center_vox=(20, 48, 30), kind="solid"),
        NoduleSpec(16.0, center_vox=(20, 48, 82), kind="part-solid"),
        NoduleSpec(10.0, center_vox=(12, 40, 30), kind="ground-glass", axes=(1.0, 1.5, 1.0)),
    ]
    return make_phantom(SHAPE, SPACING, specs, seed=7, noise_hu=0, blur_vox=0)


def test_phantom_structure(clean) -> None:
    v = clean.volume_hu
    assert v.dtype == np.int16 and v.shape == SHAPE
    assert clean.spacing == SPACING
    # lungs: two labels, right lung (label 1) at low x, left lung (2) at high x
    xs1 = np.nonzero(clean.lung_labels == 1)[2]
    xs2 = np.nonzero(clean.lung_labels == 2)[2]
    assert xs1.mean() < SHAPE[2] / 2 < xs2.mean()
    assert np.array_equal(clean.lung_mask, clean.lung_labels > 0)
    lung_only = clean.lung_mask.copy()
    for n in clean.nodules:
        lung_only &= ~n.mask
    values = v[lung_only]
    # parenchyma at LUNG_HU, vessels (+40) and airways (-1000) inside the lungs
    assert np.median(values) == LUNG_HU
    assert (values == 40).sum() > 50, "vessel trees are missing"
    assert v[0, 0, 0] == -1000
    assert (v == -100).any() and (v == 40).any()  # fat rim and soft tissue


def test_nodule_truth(clean) -> None:
    solid, part, ggo = clean.nodules
    sz, sy, sx = SPACING
    # centre: voxel (20, 48, 30) -> x = x0 + 30 * 2.5, y = y0 + 48 * 1.5, z = z0 + 20 * 2
    x0, y0, z0 = clean.origin
    assert solid.center_mm == pytest.approx((x0 + 75.0, y0 + 72.0, z0 + 40.0))
    assert solid.center_vox == pytest.approx((20, 48, 30))
    # volume of the voxelised 20 mm sphere ~ 4/3 pi 10^3 = 4188.8 mm^3
    vol_mm3 = solid.mask.sum() * sz * sy * sx
    assert vol_mm3 == pytest.approx(4 / 3 * math.pi * 10**3, rel=0.1)
    assert np.all(clean.volume_hu[solid.mask] == SOLID_NODULE_HU)
    # part-solid: ground glass outside, solid core of half the radius (4 mm) inside
    pv = clean.volume_hu[part.mask]
    core_vol = (pv == SOLID_NODULE_HU).sum() * sz * sy * sx
    assert core_vol == pytest.approx(4 / 3 * math.pi * 4**3, rel=0.3)
    assert (pv == GGO_HU).sum() > (pv == SOLID_NODULE_HU).sum()
    # ellipsoid elongated along y (axes 1, 1.5, 1): extent in y is 1.5x that in x
    _, yy, xx = np.nonzero(ggo.mask)
    assert (yy.max() - yy.min() + 1) * sy == pytest.approx(15.0, abs=2 * sy)
    assert (xx.max() - xx.min() + 1) * sx == pytest.approx(10.0, abs=2 * sx)
    assert np.all(clean.volume_hu[ggo.mask] == GGO_HU)


def test_center_mm_and_vox_agree() -> None:
    a = make_phantom(SHAPE, SPACING, [NoduleSpec(8.0, center_vox=(20, 50, 40))], seed=1,
                     vessels=False, noise_hu=0)
    mm = a.vox_to_mm((20, 50, 40))
    b = make_phantom(SHAPE, SPACING, [NoduleSpec(8.0, center_mm=mm)], seed=1, vessels=False,
                     noise_hu=0)
    assert np.array_equal(a.nodules[0].mask, b.nodules[0].mask)
    assert a.mm_to_vox(mm) == pytest.approx((20, 50, 40))


def test_juxtapleural_nodule_touches_the_wall() -> None:
    p = make_phantom(SHAPE, SPACING, [NoduleSpec(8.0, center_vox=(20, 48, 25), juxtapleural=True)],
                     seed=3, vessels=False, noise_hu=0, blur_vox=0)
    n = p.nodules[0]
    outside = n.mask & ~p.lung_mask
    inside = n.mask & p.lung_mask
    assert outside.any() and inside.any()
    assert n.center_vox[2] < 25  # moved laterally, towards the right chest wall (low x)


def test_determinism_and_noise() -> None:
    specs = [NoduleSpec(6.0, center_vox=(20, 48, 30))]
    a = make_phantom(SHAPE, SPACING, specs, seed=11, noise_hu=20)
    b = make_phantom(SHAPE, SPACING, specs, seed=11, noise_hu=20)
    c = make_phantom(SHAPE, SPACING, specs, seed=12, noise_hu=20)
    assert np.array_equal(a.volume_hu, b.volume_hu)
    assert not np.array_equal(a.volume_hu, c.volume_hu)
    # noise: std of the air outside the body (clipped at -1024 below) ~ 20 HU
    air = a.volume_hu[:, :4, :].astype(float)
    assert 8 < air.std() < 25


def test_random_nodule_specs_inside_lungs() -> None:
    specs = random_nodule_specs(SHAPE, SPACING, 3, seed=5, diameter_range_mm=(5, 8))
    p = make_phantom(SHAPE, SPACING, specs, seed=5, vessels=False, noise_hu=0)
    for n in p.nodules:
        assert p.lung_mask[tuple(round(c) for c in n.center_vox)]
        assert (n.mask & p.lung_mask).sum() == n.mask.sum()


def test_dicom_series_roundtrip(clean, tmp_path: Path) -> None:
    paths = write_dicom_series(clean.volume_hu, clean.spacing, clean.origin, tmp_path / "s",
                               seed=4, patient_id="P1", patient_age=63, patient_sex="F",
                               shuffle_names=True)
    assert len(paths) == SHAPE[0]
    assert [p.name for p in paths] != sorted(p.name for p in paths)  # shuffled names
    errors, _ = dciodvfy(paths[5])
    assert errors == []
    sz, sy, sx = SPACING
    for k in (0, 17):
        ds = pydicom.dcmread(paths[k])
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage, PS3.4 B.5
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert ds.InstanceNumber == k + 1
        assert [float(v) for v in ds.PixelSpacing] == [sy, sx]  # row, column spacing
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        ipp = [float(v) for v in ds.ImagePositionPatient]
        assert ipp == pytest.approx([clean.origin[0], clean.origin[1], clean.origin[2] + k * sz],
                                    abs=1e-5)
        assert list(ds.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
        assert ds.PatientAge == "063Y" and ds.PatientSex == "F"
        hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.array_equal(hu, clean.volume_hu[k].clip(-1024))
    # deterministic UIDs: same seed -> same UIDs, other seed -> other UIDs
    again = write_dicom_series(clean.volume_hu[:2], clean.spacing, clean.origin, tmp_path / "t",
                               seed=4, patient_id="P1")
    other = write_dicom_series(clean.volume_hu[:2], clean.spacing, clean.origin, tmp_path / "u",
                               seed=5, patient_id="P1")
    first = pydicom.dcmread(paths[0])
    a = pydicom.dcmread(again[0])
    b = pydicom.dcmread(other[0])
    assert (a.StudyInstanceUID, a.SeriesInstanceUID, a.SOPInstanceUID) == (
        first.StudyInstanceUID, first.SeriesInstanceUID, first.SOPInstanceUID)
    assert b.SeriesInstanceUID != a.SeriesInstanceUID
    assert a.FrameOfReferenceUID == first.FrameOfReferenceUID


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        NoduleSpec(5.0)
    with pytest.raises(ValueError, match="kind"):
        NoduleSpec(5.0, center_vox=(1, 1, 1), kind="calcified")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="3-D"):
        write_dicom_series(np.zeros((4, 4)), (1, 1, 1), (0, 0, 0), tmp_path)
