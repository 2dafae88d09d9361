"""Synthetic lesions of several DeepLesion types inserted into real CT slices.

The real DeepLesion material at hand is 47 key slices (liver lesions only), so
the shipped ``ct-lesion`` detector also learns from lesions *inserted* into the
real CT backgrounds of LIDC-IDRI-0001 and -0002 (chest CTs whose lowest slices
show the liver dome and upper abdomen), like :mod:`trainer.insertion` does for
lung nodules.  Everything is driven by a :class:`numpy.random.Generator`.

Backgrounds: every slice of each volume resampled in-plane to the detector
grid (:mod:`cad_node.pipelines.ct_lesion.slices`); a sample is the key slice
and its +-2 mm neighbours interpolated along z.

Tissue masks on the key slice decide where a lesion of each type may go and
so its type label (DeepLesion ``Coarse_lesion_type``):

* lung (5): inside the lungs (air below -400 HU enclosed by the body);
* mediastinum (3): body, not lung or bone, with lung on both sides of it along
  the row (between the lungs);
* liver (4): homogeneous soft tissue (30-90 HU after a 5x5 median) on the
  patient's right, in a component larger than 15 cm2, eroded;
* bone (1): cancellous/cortical bone (above 150 HU, holes filled, components
  larger than 2 cm2, eroded);
* soft tissue (7): body wall (within 40 mm of the skin, not lung or bone);
* abdomen (2): other soft tissue of slices with little lung.
* kidney (6) and pelvis (8) never occur in these chest backgrounds: the type
  head sees no synthetic examples of them (stated in the model card).

Lesion model: an ellipsoid (in-plane semi-axes from a long axis log-uniform
in 5-50 mm, axis ratio 0.6-1, random rotation, smooth radial lobulation; z
semi-axis 0.6-1.2 x the in-plane mean) whose centre lies within +-half its
z extent of the key slice; partial volume by a 1-pixel soft edge; HU by type
(hypodense or hyperdense liver lesions, lymph-node-like mediastinal, lytic
or sclerotic bone, solid lung nodules, soft-tissue masses) plus the
background's own high-frequency texture and correlated noise.  Target boxes
follow DL_info: lesion extent on the key slice padded by 4 mm (5 DeepLesion
pixels).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from cad_node.pipelines.ct_lesion.recist import BOX_PAD_MM
from cad_node.pipelines.ct_lesion.slices import (
    PIXEL_MM,
    SliceGrid,
    _interp_z,
    body_centre,
    resample_plane,
    slice_offsets_mm,
)

__all__ = ["TYPE_CODES", "Background", "SyntheticSample", "insert_lesions", "tissue_masks"]

#: DeepLesion ``Coarse_lesion_type`` codes used here.
TYPE_CODES = {"bone": 1, "abdomen": 2, "mediastinum": 3, "liver": 4, "lung": 5,
              "soft tissue": 7}
#: Relative frequency of the types drawn (DeepLesion is dominated by lung,
#: abdomen, mediastinum and liver lesions).
TYPE_WEIGHTS = {"lung": 0.2, "mediastinum": 0.2, "liver": 0.3, "abdomen": 0.1,
                "soft tissue": 0.1, "bone": 0.1}


@dataclass
class Background:
    """A real CT volume on the detector grid (HU planes and their z positions)."""

    name: str
    planes: npt.NDArray[np.float32]
    positions_mm: npt.NDArray[np.float64]
    #: Slice indices samples may be drawn from (all but the two end slices by default).
    usable: npt.NDArray[np.intp] = field(default_factory=lambda: np.zeros(0, dtype=np.intp))

    def __post_init__(self) -> None:
        if len(self.usable) == 0 and len(self.planes) > 2:
            self.usable = np.arange(1, len(self.planes) - 1)

    @classmethod
    def from_volume(cls, name: str, hu_zyx: npt.NDArray[np.generic],
                    spacing_zyx: tuple[float, float, float]) -> Background:
        """Resample every slice of a volume in-plane onto the grid centred on the body."""
        dz, dy, dx = spacing_zyx
        grid = SliceGrid.centred(body_centre(hu_zyx[:: max(1, len(hu_zyx) // 16)]), (dx, dy))
        planes = resample_plane(np.asarray(hu_zyx), grid)
        return cls(name, planes, np.arange(len(planes), dtype=float) * dz)

    def stack(self, k: int, n_slices: int = 3) -> npt.NDArray[np.float32]:
        """Key slice ``k`` and its neighbours 2 mm apart, HU ``(n_slices, H, W)``."""
        z = self.positions_mm[k]
        return _interp_z(self.planes, self.positions_mm, z + slice_offsets_mm(n_slices))


def tissue_masks(hu: npt.NDArray[np.floating]) -> dict[str, npt.NDArray[np.bool_]]:
    """Where each lesion type may be inserted on one slice (module docstring)."""
    body = ndimage.binary_fill_holes(ndimage.binary_opening(hu > -400, iterations=2))
    lab, n = ndimage.label(body)
    if n > 1:
        sizes = ndimage.sum(body, lab, range(1, n + 1))
        body = lab == int(np.argmax(sizes)) + 1
    filled = ndimage.binary_fill_holes(body)
    lung = ndimage.binary_opening(filled & (hu < -400), iterations=2)
    bone_raw = ndimage.binary_fill_holes(filled & (hu > 150))
    lab, n = ndimage.label(bone_raw)
    bone = np.zeros_like(bone_raw)
    if n:
        sizes = ndimage.sum(bone_raw, lab, range(1, n + 1))
        keep = np.nonzero(sizes * PIXEL_MM ** 2 > 200)[0] + 1
        bone = np.isin(lab, keep)
    left = np.maximum.accumulate(lung, axis=1)
    right = np.maximum.accumulate(lung[:, ::-1], axis=1)[:, ::-1]
    soft = filled & ~lung & ~ndimage.binary_dilation(bone, iterations=2)
    medi = soft & left & right & (hu > -150)
    depth = ndimage.distance_transform_edt(filled) * PIXEL_MM
    wall = soft & (depth < 40) & ~medi & (hu > -150)
    med = ndimage.median_filter(hu, size=5)
    liver_raw = filled & (med > 30) & (med < 90) & ~lung
    liver_raw &= np.arange(hu.shape[1])[None, :] < hu.shape[1] * 0.55  # patient's right
    lab, n = ndimage.label(liver_raw)
    liver = np.zeros_like(liver_raw)
    if n:
        sizes = ndimage.sum(liver_raw, lab, range(1, n + 1))
        keep = np.nonzero(sizes * PIXEL_MM ** 2 > 1500)[0] + 1
        liver = ndimage.binary_erosion(np.isin(lab, keep), iterations=3)
    little_lung = lung.sum() * PIXEL_MM ** 2 < 3000
    abdomen = soft & ~liver & (depth > 30) & (hu > -50) & little_lung
    return {"lung": ndimage.binary_erosion(lung, iterations=3),
            "mediastinum": ndimage.binary_erosion(medi, iterations=2),
            "liver": liver, "bone": ndimage.binary_erosion(bone, iterations=1),
            "soft tissue": wall, "abdomen": abdomen}


@dataclass
class SyntheticSample:
    """One training sample: HU channels, boxes (network px) and type codes."""

    hu: npt.NDArray[np.float32]
    boxes: npt.NDArray[np.float64]
    types: npt.NDArray[np.int64]


def _lesion_hu(kind: str, bg: float, rng: np.random.Generator) -> float:
    if kind == "lung":
        return float(rng.uniform(-20, 60))
    if kind == "liver":
        if rng.random() < 0.8:
            return float(bg - rng.uniform(25, 90))
        return float(bg + rng.uniform(20, 60))
    if kind == "bone":
        return float(rng.uniform(0, 120)) if rng.random() < 0.7 else float(rng.uniform(600, 1000))
    if kind == "mediastinum":
        return float(rng.uniform(15, 60))
    return float(rng.uniform(0, 70))


def insert_lesions(background: Background, k: int, rng: np.random.Generator,
                   max_lesions: int = 3, n_slices: int = 3) -> SyntheticSample:
    """Insert 0-``max_lesions`` lesions around key slice ``k`` (module docstring)."""
    hu = background.stack(k, n_slices).copy()
    key_ch = n_slices // 2
    key = hu[key_ch]
    masks = tissue_masks(key)
    h, w = key.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    texture = hu - ndimage.gaussian_filter(hu, sigma=(0, 1.5, 1.5))
    boxes: list[tuple[float, float, float, float]] = []
    types: list[int] = []
    occupied = np.zeros(key.shape, dtype=bool)
    n = int(rng.integers(0, max_lesions + 1)) if rng.random() > 0.1 else 0
    kinds = list(TYPE_WEIGHTS)
    p = np.array([TYPE_WEIGHTS[t] for t in kinds])
    for _ in range(n * 3):
        if len(boxes) >= n:
            break
        kind = kinds[int(rng.choice(len(kinds), p=p / p.sum()))]
        allowed = masks[kind] & ~occupied
        if kind in ("bone",):
            long_mm = float(np.exp(rng.uniform(np.log(6), np.log(25))))
        elif kind == "lung":
            long_mm = float(np.exp(rng.uniform(np.log(5), np.log(35))))
        else:
            long_mm = float(np.exp(rng.uniform(np.log(6), np.log(50))))
        a = long_mm / 2 / PIXEL_MM
        b = a * float(rng.uniform(0.6, 1.0))
        cand = np.argwhere(allowed)
        if len(cand) == 0:
            continue
        cy, cx = (cand[int(rng.integers(len(cand)))] + rng.uniform(-0.5, 0.5, 2)).tolist()
        c_mm = (a + b) / 2 * PIXEL_MM * float(rng.uniform(0.6, 1.2))
        dz0 = float(rng.uniform(-0.5, 0.5)) * c_mm
        theta = float(rng.uniform(0, np.pi))
        ct, st = np.cos(theta), np.sin(theta)
        u = (xx - cx) * ct + (yy - cy) * st
        v = -(xx - cx) * st + (yy - cy) * ct
        phi = np.arctan2(v, u)
        lob = 1.0 + sum(float(rng.uniform(0, 0.08)) * np.cos(m * phi + float(rng.uniform(0, 6.3)))
                        for m in (2, 3, 5))
        r = np.sqrt((u / a) ** 2 + (v / b) ** 2) / lob
        occ_key = None
        lesion_hu = _lesion_hu(kind, float(np.median(key[allowed])) if allowed.any() else 40.0,
                               rng)
        noise = ndimage.gaussian_filter(rng.normal(0, 12, key.shape), 1.0).astype(np.float32)
        for ch, dz in enumerate(slice_offsets_mm(n_slices)):
            zr = (dz - dz0) / c_mm
            if abs(zr) >= 1:
                continue
            scale = np.sqrt(1 - zr ** 2)
            edge = np.clip((scale - r) * max(a * scale, 1.0) + 0.5, 0, 1).astype(np.float32)
            if ch == key_ch:
                occ_key = edge
            hu[ch] = hu[ch] * (1 - edge) + edge * (lesion_hu + 0.7 * texture[ch] + noise)
        if occ_key is None or (occ_key > 0.5).sum() < 4:
            continue
        ys, xs = np.nonzero(occ_key > 0.5)
        pad = BOX_PAD_MM / PIXEL_MM
        boxes.append((xs.min() - 0.5 - pad, ys.min() - 0.5 - pad,
                      xs.max() + 0.5 + pad, ys.max() + 0.5 + pad))
        types.append(TYPE_CODES[kind])
        occupied |= ndimage.binary_dilation(occ_key > 0.05, iterations=4)
    return SyntheticSample(hu, np.asarray(boxes, dtype=float).reshape(-1, 4),
                           np.asarray(types, dtype=np.int64))
