"""Nodule measurements on synthetic shapes of known size."""

from __future__ import annotations

import numpy as np
import pytest

from cad_node.pipelines.ct_chest.characterise import axial_diameters, characterise_nodule
from cad_node.results.findings import NoduleType


def _ellipse(a: float, b: float, angle_deg: float, n: int = 101) -> np.ndarray:
    yy, xx = np.mgrid[:n, :n] - n // 2
    t = np.radians(angle_deg)
    u = xx * np.cos(t) + yy * np.sin(t)
    v = -xx * np.sin(t) + yy * np.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


@pytest.mark.parametrize("angle", [0.0, 30.0, 90.0])
def test_axial_diameters_of_rotated_ellipse(angle: float) -> None:
    # semi-axes 20 and 10 pixels of 0.5 mm: diameters (2*20+1)*0.5 and (2*10+1)*0.5 mm
    long_mm, short_mm = axial_diameters(_ellipse(20, 10, angle), (0.5, 0.5))
    assert long_mm == pytest.approx(20.5, abs=0.6)
    assert short_mm == pytest.approx(10.5, abs=0.6)


def test_single_pixel_measures_one_pixel() -> None:
    m = np.zeros((5, 5), bool)
    m[2, 2] = True
    assert axial_diameters(m, (0.7, 0.7)) == (pytest.approx(0.7), pytest.approx(0.7))


SPACING = (1.0, 0.7, 0.7)


def _scene(kind: str, diameter: float, wall: bool = False):
    shape = (60, 100, 100)
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, SPACING, strict=True)],
                        indexing="ij")
    centre = np.array([30.0, 35.0, 35.0])
    r = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre, strict=True)))
    hu = np.full(shape, -850.0, dtype=np.float32)
    lungs = np.ones(shape, bool)
    if wall:  # chest wall beyond x = 35 + radius: soft tissue, outside the lungs
        wall_mask = grids[2] > centre[2] + diameter / 2 - 1.0
        hu[wall_mask] = 40.0
        lungs[wall_mask] = False
    if kind == "solid":
        hu[r <= diameter / 2] = 40.0
    elif kind == "ggo":
        hu[r <= diameter / 2] = -600.0
    else:
        hu[r <= diameter / 2] = -600.0
        hu[r <= diameter / 4] = 40.0
    idx = tuple(round(c / s) for c, s in zip(centre, SPACING, strict=True))
    return hu, lungs, idx


@pytest.mark.parametrize(("kind", "expected"), [("solid", NoduleType.SOLID),
                                                ("ggo", NoduleType.GROUND_GLASS),
                                                ("part", NoduleType.PART_SOLID)])
def test_sphere_volume_diameter_type(kind: str, expected: NoduleType) -> None:
    d = 12.0
    hu, lungs, idx = _scene(kind, d)
    m = characterise_nodule(hu, lungs, idx, 10.0, SPACING)
    assert m is not None
    assert m.nodule_type is expected
    assert m.volume_mm3 == pytest.approx(np.pi / 6 * d**3, rel=0.15)
    assert m.long_axis_mm == pytest.approx(d, rel=0.12)
    assert m.short_axis_mm == pytest.approx(d, rel=0.15)
    if kind == "part":
        assert m.solid_mean_diameter_mm == pytest.approx(d / 2, rel=0.3)


def test_juxtapleural_nodule_excludes_chest_wall() -> None:
    d = 10.0
    hu, lungs, idx = _scene("solid", d, wall=True)
    m = characterise_nodule(hu, lungs, idx, 8.0, SPACING)
    assert m is not None
    # the wall is a slab of soft tissue; a leak would multiply the volume
    assert m.volume_mm3 == pytest.approx(np.pi / 6 * d**3, rel=0.3)
    assert m.long_axis_mm < 1.3 * d


def test_nothing_at_centre_gives_none() -> None:
    hu = np.full((30, 40, 40), -850.0, dtype=np.float32)
    assert characterise_nodule(hu, np.ones(hu.shape, bool), (15, 20, 20), 6.0, SPACING) is None
