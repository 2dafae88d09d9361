"""Slice-profile harmonisation of thin-slice CT (cad_node.pipelines.ct_chest.harmonise)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
from pydantic import ValidationError
from pydicom.dataset import Dataset

from cad_node.imaging import LoadedSeries
from cad_node.models.bundle import InputSpec
from cad_node.pipelines.ct_chest.harmonise import (
    discrete_gaussian_kernel,
    harmonisation_sigma_mm,
    harmonise_series,
    scan_slice_thickness_mm,
    smooth_along_z,
)
from cad_node.pipelines.ct_chest.pipeline import CtChestPipeline

MODELS = Path(__file__).resolve().parents[2] / "models" / "ct-nodule-scorer"
#: sqrt((2.5^2 - 1.25^2) / 12) mm, worked by hand: sqrt(4.6875 / 12) = sqrt(0.390625).
SIGMA_125_TO_25 = 0.625
NZ, DZ = 41, 1.25


def _series(volume: np.ndarray, dz: float, thickness: str | None) -> LoadedSeries:
    img = sitk.GetImageFromArray(volume)
    img.SetSpacing((0.7, 0.7, dz))
    img.SetOrigin((-10.0, -10.0, -200.0))
    datasets = []
    for k in range(volume.shape[0]):
        ds = Dataset()
        ds.SOPInstanceUID = f"1.2.3.{k + 1}"
        if thickness is not None:
            ds.SliceThickness = thickness
        datasets.append(ds)
    return LoadedSeries(image=img, sop_instance_uids=tuple(d.SOPInstanceUID for d in datasets),
                        datasets=tuple(datasets), study_instance_uid="1.2.3",
                        series_instance_uid="1.2.3.0", modality="CT")


def _plate(dtype: type = np.float32) -> np.ndarray:
    """A thin bright plate (one slice of 1000 HU in -800 HU): its z-profile is a delta."""
    vol = np.full((NZ, 6, 5), -800, dtype=dtype)
    vol[NZ // 2] = 1000
    return vol


def _z_variance_mm2(volume: np.ndarray, dz: float) -> float:
    profile = volume[:, 3, 2].astype(np.float64) + 800.0
    z = np.arange(volume.shape[0]) * dz
    mean = float((profile * z).sum() / profile.sum())
    return float((profile * (z - mean) ** 2).sum() / profile.sum())


def test_sigma_formula() -> None:
    assert harmonisation_sigma_mm(1.25, 2.5) == pytest.approx(SIGMA_125_TO_25, abs=1e-12)
    assert harmonisation_sigma_mm(1.0, 2.0) == pytest.approx(math.sqrt(3 / 12))
    assert harmonisation_sigma_mm(2.5, 2.5) == 0.0
    assert harmonisation_sigma_mm(5.0, 2.5) == 0.0
    assert harmonisation_sigma_mm(1.25, None) == 0.0
    with pytest.raises(ValueError, match="harmonise_slice_thickness_mm"):
        harmonisation_sigma_mm(1.25, 0.0)
    with pytest.raises(ValueError, match="scan slice thickness"):
        harmonisation_sigma_mm(float("nan"), 2.5)


@pytest.mark.parametrize("sigma_vox", [0.3, 0.5, 1.0, 2.2])
def test_kernel_variance_is_exact(sigma_vox: float) -> None:
    k = discrete_gaussian_kernel(sigma_vox)
    n = np.arange(len(k)) - len(k) // 2
    assert k.sum() == pytest.approx(1.0, abs=1e-12)
    assert np.allclose(k, k[::-1])
    assert float((k * n**2).sum()) == pytest.approx(sigma_vox**2, rel=1e-5)


def test_thin_slice_scan_gets_the_stated_sigma() -> None:
    series = _series(_plate(), DZ, "1.25")
    assert _z_variance_mm2(sitk.GetArrayFromImage(series.image), DZ) == 0.0
    out, plan = harmonise_series(series, 2.5)
    assert plan.scan_mm == 1.25 and plan.sigma_mm == pytest.approx(SIGMA_125_TO_25)
    assert plan.note is not None and "0.625 mm" in plan.note
    arr = sitk.GetArrayFromImage(out.image)
    assert _z_variance_mm2(arr, DZ) == pytest.approx(SIGMA_125_TO_25**2, rel=1e-4)
    # mass is kept, the plate's neighbours rise, in-plane nothing mixes
    assert (arr[:, 3, 2] + 800).sum() == pytest.approx(1800.0, rel=1e-5)
    assert arr[NZ // 2 + 1, 3, 2] > -800 and arr[NZ // 2, 3, 2] < 1000
    assert np.allclose(arr, arr[:, :1, :1])
    # geometry, headers and UIDs are those of the input; the input is untouched
    assert out.image.GetSpacing() == series.image.GetSpacing()
    assert out.image.GetOrigin() == series.image.GetOrigin()
    assert out.datasets is series.datasets and out.sop_instance_uids == series.sop_instance_uids
    assert np.array_equal(sitk.GetArrayFromImage(series.image), _plate())


def test_int16_image_keeps_its_type() -> None:
    out, _ = harmonise_series(_series(_plate(np.int16), DZ, "1.25"), 2.5)
    arr = sitk.GetArrayFromImage(out.image)
    assert arr.dtype == np.int16
    assert _z_variance_mm2(arr, DZ) == pytest.approx(SIGMA_125_TO_25**2, rel=0.02)


@pytest.mark.parametrize("thickness", ["2.5", "3.0"])
def test_thick_scan_is_unchanged(thickness: str) -> None:
    series = _series(_plate(), 2.5, thickness)
    out, plan = harmonise_series(series, 2.5)
    assert out is series and plan.sigma_mm == 0.0 and plan.note is None


def test_slice_spacing_stands_in_for_a_missing_thickness() -> None:
    series = _series(_plate(), DZ, None)
    assert scan_slice_thickness_mm(series) == DZ
    assert harmonise_series(series, 2.5)[1].sigma_mm == pytest.approx(SIGMA_125_TO_25)
    assert scan_slice_thickness_mm(_series(_plate(), DZ, "0")) == DZ


def test_bundle_without_the_field_is_unchanged() -> None:
    series = _series(_plate(), DZ, "1.25")
    out, plan = harmonise_series(series, None)
    assert out is series and plan.sigma_mm == 0.0

    class _Scorer:  # only the input spec is read; the real spec type
        spec = InputSpec(spacing_mm=(1.25, 1.25, 1.25), patch_size=(32, 32, 32),
                         hu_window=(-1000.0, 400.0))

    notes: list[str] = []
    assert CtChestPipeline._harmonised(series, _Scorer(), notes) is series  # type: ignore[arg-type]
    assert CtChestPipeline._harmonised(series, None, notes) is series
    assert notes == []
    # the shipped 1.0.2 manifest has no such field: the node behaves as before
    manifest = json.loads((MODELS / "1.0.2" / "manifest.json").read_text())
    assert InputSpec.model_validate(manifest["input"]).harmonise_slice_thickness_mm is None


def test_bundle_field_is_validated_and_drives_the_pipeline() -> None:
    with pytest.raises(ValidationError, match="harmonise_slice_thickness_mm"):
        InputSpec(spacing_mm=(1.25, 1.25, 1.25), patch_size=(32, 32, 32),
                  hu_window=(-1000.0, 400.0), harmonise_slice_thickness_mm=-1.0)

    class _Scorer:
        spec = InputSpec(spacing_mm=(1.25, 1.25, 1.25), patch_size=(32, 32, 32),
                         hu_window=(-1000.0, 400.0), harmonise_slice_thickness_mm=2.5)

    notes: list[str] = []
    series = _series(_plate(), DZ, "1.25")
    out = CtChestPipeline._harmonised(series, _Scorer(), notes)  # type: ignore[arg-type]
    assert out is not series and len(notes) == 1 and "harmonisation" in notes[0]
    assert _z_variance_mm2(sitk.GetArrayFromImage(out.image), DZ) == pytest.approx(
        SIGMA_125_TO_25**2, rel=1e-4)


def test_smooth_along_z_rejects_bad_input() -> None:
    img = sitk.GetImageFromArray(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="3-D"):
        smooth_along_z(img, 0.5)
    with pytest.raises(ValueError, match="positive"):
        discrete_gaussian_kernel(0.0)


def test_harmonisation_is_part_of_the_device_uid() -> None:
    from cad_node.models.bundle import device_uid_for

    sha = "ab" * 32
    plain, harm = device_uid_for(sha, 0.55), device_uid_for(sha, 0.55, None, 2.5)
    assert plain != harm and harm == device_uid_for(sha, 0.55, None, 2.5)
    assert harm != device_uid_for(sha, 0.55, None, 3.0)
    assert device_uid_for(sha, 0.55, None, None) == plain
