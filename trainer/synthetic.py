"""Synthetic chest CT phantoms with known truth, and a CT DICOM series writer.

:func:`make_phantom` draws a thorax on a regular grid (array order
``(z, y, x)``, LPS patient axes, axial slices):

* air (-1000 HU) outside an elliptic body of soft tissue (:data:`SOFT_TISSUE_HU`)
  under a subcutaneous fat layer (:data:`FAT_HU`);
* two lungs (:data:`LUNG_HU`), ellipsoids left and right of a mediastinum,
  labelled in :attr:`Phantom.lung_labels` (1 = right lung, at low x / image
  left; 2 = left lung, at high x);
* an air-filled trachea that splits into two main bronchi at the carina;
* branching vessel trees (:data:`VESSEL_HU`) inside each lung, radii 3 mm at
  the hilum down to 0.5 mm (diameters 6 to 1 mm);
* nodules from :class:`NoduleSpec`: solid (:data:`SOLID_NODULE_HU`),
  ground-glass (:data:`GGO_HU`) or part-solid (ground glass around a solid
  core of half the radius), spheres or ellipsoids, optionally moved against
  the chest wall (juxtapleural);
* a slight blur (partial volume) and Gaussian noise.

Everything is deterministic for a given ``seed``.  :func:`write_dicom_series`
writes a volume as a CT Image Storage series (PS3.3 A.3) with deterministic
UIDs.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
from scipy import ndimage

__all__ = [
    "AIR_HU",
    "CT_IMAGE_STORAGE",
    "FAT_HU",
    "GGO_HU",
    "LUNG_HU",
    "SOFT_TISSUE_HU",
    "SOLID_NODULE_HU",
    "VESSEL_HU",
    "NoduleKind",
    "NoduleSpec",
    "NoduleTruth",
    "Phantom",
    "make_phantom",
    "random_nodule_specs",
    "write_dicom_series",
]

AIR_HU = -1000
FAT_HU = -100
SOFT_TISSUE_HU = 40
LUNG_HU = -850
VESSEL_HU = 40
SOLID_NODULE_HU = 30
GGO_HU = -600
#: Fraction of the radius taken by the solid core of a part-solid nodule.
PART_SOLID_CORE_FRACTION = 0.5

#: CT Image Storage SOP Class UID (PS3.4 B.5).
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: Explicit VR Little Endian transfer syntax (PS3.5 A.2).
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
#: Axial ImageOrientationPatient: rows along +x, columns along +y (PS3.3 C.7.6.2.1.1).
AXIAL_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
#: ImageType of an original acquired axial CT image (PS3.3 C.8.2.1.1.1).
IMAGE_TYPE = ("ORIGINAL", "PRIMARY", "AXIAL")
#: Stored value = HU - RESCALE_INTERCEPT (unsigned 16-bit storage, PS3.3 C.11.1.1.2).
RESCALE_INTERCEPT = -1024
#: Stored range of 12-bit CT data: HU -1024 .. 3071.
HU_MIN, HU_MAX = -1024, 3071
#: UID root of the phantoms' UIDs: "2.25" + a hash (PS3.5 B.2, UUID-derived UIDs).
_UID_ENTROPY_TAG = "cad-node synthetic phantom"

NoduleKind = Literal["solid", "part-solid", "ground-glass"]
_KINDS = ("solid", "part-solid", "ground-glass")


@dataclass(frozen=True)
class NoduleSpec:
    """A nodule to draw.

    Give exactly one of ``center_mm`` (LPS x, y, z in mm) or ``center_vox``
    (array index ``(z, y, x)``, may be fractional).

    Attributes
    ----------
    diameter_mm : float
        Diameter of the sphere (or the ellipsoid's reference diameter).
    kind : {"solid", "part-solid", "ground-glass"}
    hu : int, optional
        Attenuation of the solid part (solid, part-solid core) or of the whole
        ground-glass nodule; defaults to :data:`SOLID_NODULE_HU` / :data:`GGO_HU`.
    axes : (float, float, float)
        Semi-axis scale factors along x, y, z; ``(1, 1, 1)`` is a sphere.
    juxtapleural : bool
        Move the centre laterally until the nodule touches the chest wall.
    """

    diameter_mm: float
    center_mm: tuple[float, float, float] | None = None
    center_vox: tuple[float, float, float] | None = None
    kind: NoduleKind = "solid"
    hu: int | None = None
    axes: tuple[float, float, float] = (1.0, 1.0, 1.0)
    juxtapleural: bool = False

    def __post_init__(self) -> None:
        if (self.center_mm is None) == (self.center_vox is None):
            raise ValueError("NoduleSpec needs exactly one of center_mm or center_vox")
        if self.kind not in _KINDS:
            raise ValueError(f"NoduleSpec.kind must be one of {_KINDS}, not {self.kind!r}")
        if not self.diameter_mm > 0:
            raise ValueError(f"NoduleSpec.diameter_mm must be > 0, not {self.diameter_mm}")
        if any(a <= 0 for a in self.axes):
            raise ValueError(f"NoduleSpec.axes must be positive, not {self.axes}")


@dataclass
class NoduleTruth:
    """Ground truth of one drawn nodule.

    Attributes
    ----------
    center_mm : (float, float, float)
        Centre, LPS mm (after any juxtapleural shift).
    diameter_mm : float
    kind : str
    mask : ndarray of bool, shape (z, y, x)
        Voxels whose centre lies inside the ellipsoid.
    center_vox : (float, float, float)
        Centre as array index (z, y, x).
    """

    center_mm: tuple[float, float, float]
    diameter_mm: float
    kind: str
    mask: npt.NDArray[np.bool_] = field(repr=False)
    center_vox: tuple[float, float, float] = (0.0, 0.0, 0.0)


@dataclass
class Phantom:
    """A synthetic chest CT and its truth.

    Attributes
    ----------
    volume_hu : ndarray of int16, shape (z, y, x)
    spacing : (float, float, float)
        Voxel spacing (sz, sy, sx), mm.
    origin : (float, float, float)
        LPS position (x, y, z) of voxel ``[0, 0, 0]``.
    lung_mask : ndarray of bool, shape (z, y, x)
    lung_labels : ndarray of uint8, shape (z, y, x)
        0 outside the lungs, 1 right lung (low x), 2 left lung (high x).
    nodules : list of NoduleTruth
    """

    volume_hu: npt.NDArray[np.int16] = field(repr=False)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    lung_mask: npt.NDArray[np.bool_] = field(repr=False)
    lung_labels: npt.NDArray[np.uint8] = field(repr=False)
    nodules: list[NoduleTruth]

    def vox_to_mm(self, zyx: Sequence[float]) -> tuple[float, float, float]:
        """LPS (x, y, z) mm of array index ``(z, y, x)``."""
        sz, sy, sx = self.spacing
        return (self.origin[0] + zyx[2] * sx, self.origin[1] + zyx[1] * sy,
                self.origin[2] + zyx[0] * sz)

    def mm_to_vox(self, xyz: Sequence[float]) -> tuple[float, float, float]:
        """Array index ``(z, y, x)`` (fractional) of LPS (x, y, z) mm."""
        sz, sy, sx = self.spacing
        return ((xyz[2] - self.origin[2]) / sz, (xyz[1] - self.origin[1]) / sy,
                (xyz[0] - self.origin[0]) / sx)


# --------------------------------------------------------------------------- drawing


def _grids(shape: tuple[int, int, int], spacing: tuple[float, float, float],
           origin: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nz, ny, nx = shape
    sz, sy, sx = spacing
    z = origin[2] + np.arange(nz, dtype=np.float32) * sz
    y = origin[1] + np.arange(ny, dtype=np.float32) * sy
    x = origin[0] + np.arange(nx, dtype=np.float32) * sx
    return z[:, None, None], y[None, :, None], x[None, None, :]


def _draw_capsule(
    out: np.ndarray,
    p0: np.ndarray,
    p1: np.ndarray,
    radius: float,
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
) -> None:
    """Set ``out`` True inside the capsule (segment p0-p1, LPS mm) of ``radius`` mm."""
    sz, sy, sx = spacing
    lo = np.minimum(p0, p1) - radius
    hi = np.maximum(p0, p1) + radius
    org = np.array([origin[0], origin[1], origin[2]])
    step = np.array([sx, sy, sz])
    ilo = np.maximum(np.floor((lo - org) / step).astype(int), 0)
    shape_xyz = np.array([out.shape[2], out.shape[1], out.shape[0]])
    ihi = np.minimum(np.ceil((hi - org) / step).astype(int) + 1, shape_xyz)
    if np.any(ihi <= ilo):
        return
    xs = org[0] + np.arange(ilo[0], ihi[0]) * sx
    ys = org[1] + np.arange(ilo[1], ihi[1]) * sy
    zs = org[2] + np.arange(ilo[2], ihi[2]) * sz
    d = p1 - p0
    dd = float(d @ d) or 1e-9
    px = xs[None, None, :] - p0[0]
    py = ys[None, :, None] - p0[1]
    pz = zs[:, None, None] - p0[2]
    t = np.clip((px * d[0] + py * d[1] + pz * d[2]) / dd, 0.0, 1.0)
    dist2 = (px - t * d[0]) ** 2 + (py - t * d[1]) ** 2 + (pz - t * d[2]) ** 2
    out[ilo[2]:ihi[2], ilo[1]:ihi[1], ilo[0]:ihi[0]] |= dist2 <= radius * radius


def _vessel_tree(
    rng: random.Random,
    start: np.ndarray,
    direction: np.ndarray,
    radius: float,
    length: float,
    depth: int,
    segments: list[tuple[np.ndarray, np.ndarray, float]],
) -> None:
    end = start + direction * length
    segments.append((start, end, radius))
    if depth == 0 or radius <= 0.6:
        return
    for sign in (-1.0, 1.0):
        # perturb the direction by ~35 degrees in a random plane
        perp = np.cross(direction, np.array([rng.uniform(-1, 1), rng.uniform(-1, 1),
                                             rng.uniform(-1, 1)]))
        norm = float(np.linalg.norm(perp)) or 1.0
        new_dir = direction + sign * 0.7 * perp / norm
        new_dir /= np.linalg.norm(new_dir)
        _vessel_tree(rng, end, new_dir, radius * rng.uniform(0.6, 0.8),
                     length * rng.uniform(0.7, 0.9), depth - 1, segments)


def _juxtapleural_center(center: np.ndarray, radius: float, lung: np.ndarray,
                         spacing: tuple[float, float, float],
                         origin: tuple[float, float, float]) -> np.ndarray:
    """Slide ``center`` laterally (away from the midline) until it reaches the lung edge."""
    sz, sy, sx = spacing
    k = round(float(center[2] - origin[2]) / sz)
    j = round(float(center[1] - origin[1]) / sy)
    i = round(float(center[0] - origin[0]) / sx)
    nz, ny, nx = lung.shape
    if not (0 <= k < nz and 0 <= j < ny and 0 <= i < nx):
        return center
    mid = (nx - 1) / 2
    step = 1 if i >= mid else -1
    while 0 <= i + step < nx and lung[k, j, i + step]:
        i += step
    edge_x = origin[0] + (i + 0.5 * step) * sx
    out = center.copy()
    # centre half a radius inside the lung: the nodule abuts/indents the wall
    out[0] = edge_x - step * 0.5 * radius
    return out


def make_phantom(
    shape: tuple[int, int, int] = (80, 128, 128),
    spacing: tuple[float, float, float] = (2.5, 2.5, 2.5),
    nodules: Sequence[NoduleSpec] = (),
    *,
    seed: int,
    vessels: bool = True,
    noise_hu: float = 20.0,
    origin: tuple[float, float, float] | None = None,
    blur_vox: float = 0.5,
) -> Phantom:
    """Draw a chest CT phantom with known lungs and nodules.

    Parameters
    ----------
    shape : (int, int, int)
        Array shape (z, y, x).
    spacing : (float, float, float)
        Voxel spacing (sz, sy, sx), mm.
    nodules : sequence of NoduleSpec
    seed : int
        Seed of every random choice (vessel trees, noise).
    vessels : bool
        Draw the vessel trees.
    noise_hu : float
        Standard deviation of the additive Gaussian noise, HU.
    origin : (float, float, float), optional
        LPS (x, y, z) of voxel [0, 0, 0]; default centres x and y on 0.
    blur_vox : float
        Gaussian blur sigma in voxels applied before the noise (0 = none).

    Returns
    -------
    Phantom
    """
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be (z, y, x) with every size >= 8, not {shape}")
    nz, ny, nx = shape
    sz, sy, sx = spacing
    if origin is None:
        origin = (-(nx - 1) * sx / 2.0, -(ny - 1) * sy / 2.0, -(nz - 1) * sz / 2.0)
    rng = random.Random(seed)
    Z, Y, X = _grids(shape, spacing, origin)
    width, height, depth = nx * sx, ny * sy, nz * sz
    cx, cy = origin[0] + (nx - 1) * sx / 2, origin[1] + (ny - 1) * sy / 2
    z0, z1 = origin[2], origin[2] + (nz - 1) * sz

    # body: ellipse, fat rim, soft tissue inside
    bx, by = 0.46 * width, 0.36 * height
    r_body = ((X - cx) / bx) ** 2 + ((Y - cy) / by) ** 2
    fat = max(4.0, 0.04 * width)
    r_inner = ((X - cx) / (bx - fat)) ** 2 + ((Y - cy) / (by - fat)) ** 2
    vol = np.full(shape, AIR_HU, dtype=np.float32)
    vol[np.broadcast_to(r_body <= 1.0, shape)] = FAT_HU
    vol[np.broadcast_to(r_inner <= 1.0, shape)] = SOFT_TISSUE_HU

    # lungs: ellipsoids, apex near the top slice, base near the bottom
    lx, ly, lz = 0.15 * width, 0.25 * height, 0.46 * depth
    lung_cz = z0 + 0.52 * (z1 - z0)
    labels = np.zeros(shape, dtype=np.uint8)
    lung_centres = {1: cx - 0.2 * width, 2: cx + 0.2 * width}
    for label, lcx in lung_centres.items():
        inside = (((X - lcx) / lx) ** 2 + ((Y - (cy + 0.02 * height)) / ly) ** 2
                  + ((Z - lung_cz) / lz) ** 2) <= 1.0
        labels[inside] = label
    lung = labels > 0
    vol[lung] = LUNG_HU

    # trachea and main bronchi (air), in the mediastinum
    airway = np.zeros(shape, dtype=bool)
    carina = np.array([cx, cy - 0.05 * height, z0 + 0.6 * (z1 - z0)], dtype=float)
    top = np.array([cx, cy - 0.05 * height, z1 + sz], dtype=float)
    trachea_r = max(0.035 * width, 1.5 * sx)
    _draw_capsule(airway, carina, top, trachea_r, spacing, origin)
    hila: dict[int, np.ndarray] = {}
    for label, lcx in lung_centres.items():
        hilum = np.array([lcx + (0.55 if label == 1 else -0.55) * lx, cy, carina[2] - 0.05 * depth])
        hila[label] = hilum
        _draw_capsule(airway, carina, hilum, 0.7 * trachea_r, spacing, origin)
    vol[airway] = AIR_HU

    # vessel trees inside the lungs
    if vessels:
        vessel = np.zeros(shape, dtype=bool)
        for label, hilum in hila.items():
            lateral = -1.0 if label == 1 else 1.0
            for direction in ((lateral, 0.2, 0.8), (lateral, -0.3, 0.1), (lateral, 0.3, -0.8),
                              (lateral * 0.5, 0.9, -0.2), (lateral * 0.4, -0.6, 0.7),
                              (lateral * 0.6, 0.5, 0.3)):
                d = np.asarray(direction, dtype=float)
                d /= np.linalg.norm(d)
                segs: list[tuple[np.ndarray, np.ndarray, float]] = []
                _vessel_tree(rng, hilum, d, 3.0, 0.2 * min(width, depth), 5, segs)
                for p0, p1, r in segs:
                    _draw_capsule(vessel, p0, p1, r, spacing, origin)
        vessel &= lung
        vol[vessel] = VESSEL_HU

    # nodules
    truths: list[NoduleTruth] = []
    for spec in nodules:
        if spec.center_mm is not None:
            c = np.asarray(spec.center_mm, dtype=float)
        else:
            assert spec.center_vox is not None
            kz, jy, ix = spec.center_vox
            c = np.array([origin[0] + ix * sx, origin[1] + jy * sy, origin[2] + kz * sz])
        r = spec.diameter_mm / 2.0
        if spec.juxtapleural:
            c = _juxtapleural_center(c, r * spec.axes[0], lung, spacing, origin)
        ax, ay, az = (r * a for a in spec.axes)
        rho = ((X - c[0]) / ax) ** 2 + ((Y - c[1]) / ay) ** 2 + ((Z - c[2]) / az) ** 2
        mask = np.asarray(rho <= 1.0)
        if spec.kind == "solid":
            vol[mask] = SOLID_NODULE_HU if spec.hu is None else spec.hu
        elif spec.kind == "ground-glass":
            vol[mask] = GGO_HU if spec.hu is None else spec.hu
        else:
            vol[mask] = GGO_HU
            core = rho <= PART_SOLID_CORE_FRACTION**2
            vol[core] = SOLID_NODULE_HU if spec.hu is None else spec.hu
        cv = ((c[2] - origin[2]) / sz, (c[1] - origin[1]) / sy, (c[0] - origin[0]) / sx)
        truths.append(NoduleTruth((float(c[0]), float(c[1]), float(c[2])), spec.diameter_mm,
                                  spec.kind, mask, (float(cv[0]), float(cv[1]), float(cv[2]))))

    if blur_vox > 0:
        vol = ndimage.gaussian_filter(vol, sigma=blur_vox, mode="nearest")
    if noise_hu > 0:
        noise = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
        vol += noise * np.float32(noise_hu)
    volume = np.clip(np.rint(vol), HU_MIN, HU_MAX).astype(np.int16)
    return Phantom(volume, (float(sz), float(sy), float(sx)),
                   (float(origin[0]), float(origin[1]), float(origin[2])), lung, labels, truths)


# --------------------------------------------------------------------------- DICOM


def _uid(*parts: object) -> str:
    """Deterministic UUID-derived UID ``2.25.<uuid5 as integer>`` (PS3.5 B.2)."""
    name = "|".join([_UID_ENTROPY_TAG, *map(str, parts)])
    return f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, name).int}"


def _ds_decimal(value: float) -> str:
    """A DS value (PS3.5 6.2: at most 16 characters)."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    return text if text not in {"", "-0"} else "0"


def write_dicom_series(
    volume_hu: npt.NDArray[np.integer] | npt.NDArray[np.floating],
    spacing: tuple[float, float, float],
    origin: tuple[float, float, float],
    out_dir: str | Path,
    *,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "PHANTOM",
    patient_age: int | str | None = None,
    patient_sex: str | None = None,
    modality: str = "CT",
    seed: int = 0,
    shuffle_names: bool = False,
    series_number: int = 1,
) -> list[Path]:
    """Write a ``(z, y, x)`` HU volume as a CT Image Storage series.

    Each axial slice ``k`` becomes one file with ImagePositionPatient
    ``origin + (0, 0, k * sz)``, ImageOrientationPatient ``[1,0,0,0,1,0]``,
    PixelSpacing ``[sy, sx]`` (row spacing, column spacing, PS3.3
    C.7.6.2.1.1), unsigned 16-bit pixels with RescaleIntercept -1024.

    Parameters
    ----------
    volume_hu : ndarray, shape (z, y, x)
        Hounsfield units; clipped to -1024..3071.
    spacing : (float, float, float)
        (sz, sy, sx) in mm.
    origin : (float, float, float)
        LPS (x, y, z) of voxel [0, 0, 0].
    out_dir : str or Path
        Created if needed.
    study_uid, series_uid : str, optional
        Default: deterministic UIDs derived from ``seed`` and ``patient_id``.
    patient_id : str
    patient_age : int or str, optional
        Years (int) or a DICOM AS string such as ``"063Y"``.
    patient_sex : {"M", "F", "O"}, optional
    modality : str
        Modality (0008,0060); keep ``"CT"`` for a valid CT image.
    seed : int
        Seed of the UIDs and of the file-name shuffle.
    shuffle_names : bool
        Name the files in a random (seeded) order instead of slice order.
    series_number : int

    Returns
    -------
    list of Path
        The written files, in slice order (index ``k`` is slice ``k``).
    """
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import UID, ExplicitVRLittleEndian

    vol = np.asarray(volume_hu)
    if vol.ndim != 3:
        raise ValueError(f"volume_hu must be 3-D (z, y, x), not shape {vol.shape}")
    if patient_sex is not None and patient_sex not in {"M", "F", "O"}:
        raise ValueError(f"patient_sex must be M, F or O (PS3.3 C.7.1.1), not {patient_sex!r}")
    if isinstance(patient_age, int):
        if not 0 <= patient_age <= 999:
            raise ValueError(f"patient_age out of range: {patient_age}")
        age_text: str | None = f"{patient_age:03d}Y"
    else:
        age_text = patient_age
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = vol.shape
    sz, sy, sx = (float(v) for v in spacing)
    study_uid = study_uid or _uid("study", seed, patient_id)
    series_uid = series_uid or _uid("series", seed, patient_id, study_uid)
    frame_uid = _uid("frame", seed, series_uid)
    stored = (np.clip(np.rint(vol), HU_MIN, HU_MAX) - RESCALE_INTERCEPT).astype(np.uint16)
    names = [f"{k + 1:04d}.dcm" for k in range(nz)]
    if shuffle_names:
        random.Random(seed).shuffle(names)
    study_date, study_time = "20240101", "120000"
    paths: list[Path] = []
    for k in range(nz):
        sop_uid = _uid("sop", series_uid, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
        meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out / names[k]
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = list(IMAGE_TYPE)
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = study_date
        ds.SeriesDate = study_date
        ds.ContentDate = study_date
        ds.StudyTime = study_time
        ds.SeriesTime = study_time
        ds.ContentTime = study_time
        ds.AccessionNumber = ""
        ds.Modality = modality
        ds.Manufacturer = "cad-node synthetic phantom"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Synthetic chest CT phantom"
        ds.SeriesDescription = "Phantom axial"
        ds.PatientName = f"{patient_id}^"
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = patient_sex or ""
        if age_text is not None:
            ds.PatientAge = age_text
        ds.BodyPartExamined = "CHEST"
        ds.SliceThickness = _ds_decimal(sz)
        ds.KVP = "120"
        ds.PatientPosition = "FFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [_ds_decimal(origin[0]), _ds_decimal(origin[1]),
                                   _ds_decimal(origin[2] + k * sz)]
        ds.ImageOrientationPatient = [_ds_decimal(v) for v in AXIAL_ORIENTATION]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds_decimal(origin[2] + k * sz)
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.PixelSpacing = [_ds_decimal(sy), _ds_decimal(sx)]
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = str(RESCALE_INTERCEPT)
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.WindowCenter = "-600"
        ds.WindowWidth = "1500"
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def random_nodule_specs(
    phantom_shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    n: int,
    *,
    seed: int,
    diameter_range_mm: tuple[float, float] = (4.0, 20.0),
    kinds: Sequence[NoduleKind] = ("solid", "part-solid", "ground-glass"),
) -> list[NoduleSpec]:
    """``n`` nodules at random positions well inside the phantom's lungs.

    Positions are chosen on a lung mask drawn with the same geometry as
    :func:`make_phantom` (without vessels or noise), at least a radius away
    from the lung boundary.
    """
    base = make_phantom(phantom_shape, spacing, seed=seed, vessels=False, noise_hu=0,
                        blur_vox=0)
    rng = np.random.default_rng(seed)
    specs: list[NoduleSpec] = []
    dist = ndimage.distance_transform_edt(base.lung_mask, sampling=spacing)
    for _ in range(n):
        d = float(rng.uniform(*diameter_range_mm))
        ok = np.argwhere(dist > d / 2 + 1.0)
        if len(ok) == 0:
            raise ValueError(f"no room for a {d:.1f} mm nodule in a {phantom_shape} phantom")
        kz, jy, ix = ok[int(rng.integers(len(ok)))]
        kind = kinds[int(rng.integers(len(kinds)))]
        specs.append(NoduleSpec(d, center_mm=base.vox_to_mm((kz, jy, ix)), kind=kind))
    return specs
