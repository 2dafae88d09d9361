# mypy: disallow-untyped-calls=False
"""A coarser working grid for whole-volume CT steps (segmentation, blob search).

Whole-volume filters run on a grid downsampled by integer factors (block
means), about :data:`TARGET_SPACING_MM` per voxel; results are mapped back to
the source grid by nearest-neighbour repetition.  Integer factors keep the
mapping exact: working voxel ``(k, j, i)`` covers source voxels
``[k*fz:(k+1)*fz, j*fy:(j+1)*fy, i*fx:(i+1)*fx]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813 - conventional alias

__all__ = ["TARGET_SPACING_MM", "WorkGrid"]

#: Aimed-at working voxel size (mm).
TARGET_SPACING_MM = 1.4
#: Slices averaged per chunk while downsampling (bounds temporary memory).
_CHUNK = 32


@dataclass(frozen=True)
class WorkGrid:
    """Integer downsampling factors between a source image and the working grid."""

    source_shape: tuple[int, int, int]
    source_spacing_zyx: tuple[float, float, float]
    factors: tuple[int, int, int]

    @classmethod
    def for_image(cls, image: sitk.Image, target_mm: float = TARGET_SPACING_MM) -> WorkGrid:
        """Choose factors so that each working voxel is at most ~``target_mm``."""
        sx, sy, sz = image.GetSpacing()
        nx, ny, nz = image.GetSize()
        factors = tuple(max(1, round(target_mm / s)) for s in (sz, sy, sx))
        return cls((nz, ny, nx), (sz, sy, sx), factors)

    @property
    def shape(self) -> tuple[int, int, int]:
        """Working grid shape (ceil division; edge blocks may be partial)."""
        return tuple(-(-n // f) for n, f in zip(self.source_shape, self.factors,
                                                strict=True))  # type: ignore[return-value]

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        """Working voxel size (mm), ``(z, y, x)``."""
        return tuple(s * f for s, f in zip(self.source_spacing_zyx, self.factors,
                                           strict=True))  # type: ignore[return-value]

    @property
    def voxel_ml(self) -> float:
        """Volume of one working voxel in mL."""
        return float(np.prod(self.spacing_zyx)) / 1000.0

    def downsample(self, array: npt.NDArray[np.generic]) -> npt.NDArray[np.float32]:
        """Block-mean a source ``(z, y, x)`` array onto the working grid."""
        fz, fy, fx = self.factors
        nz, ny, nx = self.shape
        out = np.empty((nz, ny, nx), dtype=np.float32)
        py, px = ny * fy - array.shape[1], nx * fx - array.shape[2]
        for k0 in range(0, nz, _CHUNK):
            k1 = min(nz, k0 + _CHUNK)
            block = np.asarray(array[k0 * fz:k1 * fz], dtype=np.float32)
            pz = (k1 - k0) * fz - block.shape[0]
            if pz or py or px:
                block = np.pad(block, ((0, pz), (0, py), (0, px)), mode="edge")
            # strided sums: one pass over the data (much faster than a 3-axis mean)
            acc = np.zeros((k1 - k0, ny, nx), dtype=np.float32)
            for a in range(fz):
                for b in range(fy):
                    for c in range(fx):
                        acc += block[a::fz, b::fy, c::fx]
            out[k0:k1] = acc / float(fz * fy * fx)
        return out

    def upsample(self, mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        """Nearest-neighbour map a working-grid mask back to the source grid."""
        out: npt.NDArray[np.bool_] = mask
        for axis in (2, 1, 0):  # innermost first: fastest order for np.repeat
            if self.factors[axis] > 1:
                out = np.repeat(out, self.factors[axis], axis=axis)
        if out.shape != self.source_shape:
            out = np.ascontiguousarray(
                out[: self.source_shape[0], : self.source_shape[1], : self.source_shape[2]])
        return out

    def to_source_index(self, index_zyx: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Continuous working index -> continuous source index (voxel centres)."""
        f = np.asarray(self.factors, dtype=np.float64)
        return np.asarray(index_zyx, dtype=np.float64) * f + (f - 1.0) / 2.0

    def to_work_index(self, index_zyx: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Continuous source index -> continuous working index."""
        f = np.asarray(self.factors, dtype=np.float64)
        return (np.asarray(index_zyx, dtype=np.float64) - (f - 1.0) / 2.0) / f
