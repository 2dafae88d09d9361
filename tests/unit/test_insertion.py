"""Lesion insertion into the real LIDC-IDRI-0001 lung background."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
from scipy import ndimage

from trainer.insertion import (
    ExclusionZone,
    LungBackground,
    NoduleKind,
    Placement,
    insert_nodules,
    render_nodule,
)

REAL_NODULE = ExclusionZone((56.208, 86.343, -115.868), 23.35 / 2)


@pytest.fixture(scope="module")
def background(lidc_dir: Path) -> LungBackground:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(lidc_dir)))
    return LungBackground.from_image(reader.Execute())


def _index(bg: LungBackground, p: tuple[float, float, float]) -> tuple[int, int, int]:
    x, y, z = np.rint(bg.geometry.physical_to_index(p)[0]).astype(int)
    return int(z), int(y), int(x)


def _ball(bg: LungBackground, center: tuple[float, float, float], r: float) -> np.ndarray:
    """Boolean mask of voxels whose centre is within r mm (computed independently)."""
    nz, ny, nx = bg.hu.shape
    sx, sy, sz = bg.geometry.spacing
    ox, oy, oz = bg.geometry.origin  # axial, identity direction for this CT
    z = oz + np.arange(nz) * sz
    y = oy + np.arange(ny) * sy
    x = ox + np.arange(nx) * sx
    dz = (z - center[2])[:, None, None]
    dy = (y - center[1])[None, :, None]
    dx = (x - center[0])[None, None, :]
    return (dx**2 + dy**2 + dz**2) < r**2


def test_background_is_the_real_ct(background: LungBackground) -> None:
    assert background.hu.shape == (133, 512, 512)
    assert np.allclose(background.geometry.direction, np.eye(3))
    vol_ml = background.lung.sum() * np.prod(background.geometry.spacing) / 1000
    assert 2500 < vol_ml < 7000
    assert 3 < background.noise_hu < 60


@pytest.mark.parametrize(
    ("kind", "hu_range"),
    [(NoduleKind.SOLID, (-40, 80)), (NoduleKind.GROUND_GLASS, (-760, -380))],
)
def test_rendered_nodule_size_and_attenuation(
    background: LungBackground, kind: NoduleKind, hu_range: tuple[float, float]
) -> None:
    # A parenchymal spot (far from pleura and vessels), chosen by the test.
    far = (background.dist_to_pleura_mm > 20) & (background.dist_to_vessel_mm > 9)
    z, y, x = np.argwhere(far)[len(np.argwhere(far)) // 2]
    center = tuple(background.geometry.index_to_physical([[x, y, z]])[0])
    d = 14.0
    out = background.hu.copy()
    render_nodule(out, background, center, d, kind, np.random.default_rng(3))
    inner = _ball(background, center, 0.4 * d / 2)
    mean_inner = float(out[inner].mean())
    assert hu_range[0] < mean_inner < hu_range[1]
    # Never darkens anything; leaves everything far away untouched.
    assert np.all(out >= background.hu)
    far_mask = ~_ball(background, center, d / 2 * 1.25 + 4)
    assert np.array_equal(out[far_mask], background.hu[far_mask])
    # Volume: voxels that became dense enough, versus the sphere's volume.
    # Thresholds halfway between aerated lung (about -850 HU) and the lesion.
    thr = -400 if kind is NoduleKind.SOLID else -780
    changed = (out > thr) & (background.hu <= thr) & _ball(background, center, d)
    lab, _ = ndimage.label(changed)
    assert lab[_index(background, center)] > 0
    comp = lab == lab[_index(background, center)]
    vol = comp.sum() * np.prod(background.geometry.spacing)
    sphere = 4 / 3 * np.pi * (d / 2) ** 3
    assert 0.6 * sphere < vol < 1.5 * sphere


def test_insert_nodules_respects_placement_exclusion_and_slab(
    background: LungBackground,
) -> None:
    rng = np.random.default_rng(11)
    out, truth = insert_nodules(
        background, 14, rng, z_range_mm=(-200.0, -60.0), exclusions=[REAL_NODULE]
    )
    assert len(truth) >= 10
    placements = {n.placement for n in truth}
    assert Placement.JUXTAPLEURAL in placements and Placement.PARENCHYMAL in placements
    centers = np.array([n.center_mm for n in truth])
    assert np.all((centers[:, 2] >= -200) & (centers[:, 2] <= -60))
    for n in truth:
        r = n.diameter_mm / 2
        assert 4.0 <= n.diameter_mm <= 30.0
        dist_real = np.linalg.norm(np.array(n.center_mm) - np.array(REAL_NODULE.center_mm))
        assert dist_real > r + REAL_NODULE.radius_mm
        assert background.lung[_index(background, n.center_mm)]
        if n.placement is Placement.JUXTAPLEURAL:
            # Part of the lesion's ball lies outside the lung (touches the pleura).
            ball = _ball(background, n.center_mm, r)
            assert (~background.lung[ball]).any()
        if n.placement is Placement.PARENCHYMAL:
            ball = _ball(background, n.center_mm, r)
            assert background.lung[ball].all()
    # Non-overlapping.
    for i in range(len(truth)):
        for j in range(i + 1, len(truth)):
            gap = np.linalg.norm(centers[i] - centers[j])
            assert gap > (truth[i].diameter_mm + truth[j].diameter_mm) / 2
    # The real nodule region is untouched.
    real = _ball(background, REAL_NODULE.center_mm, REAL_NODULE.radius_mm + 2)
    assert np.array_equal(out[real], background.hu[real])


def test_insertion_is_deterministic(background: LungBackground) -> None:
    a, ta = insert_nodules(background, 3, np.random.default_rng(5), z_range_mm=(-200, -60))
    b, tb = insert_nodules(background, 3, np.random.default_rng(5), z_range_mm=(-200, -60))
    _c, tc = insert_nodules(background, 3, np.random.default_rng(6), z_range_mm=(-200, -60))
    assert ta == tb and np.array_equal(a, b)
    assert tc != ta
