"""2.5-D network input: 3 (or 9) neighbouring slices, resampled, in the DeepLesion window.

Convention (as 3DCE / MULAN on DeepLesion):

* **Slices**: the key slice and the slices :data:`NEIGHBOUR_MM` (2 mm) above
  and below it, linearly interpolated along z from the acquired slices (the
  DeepLesion loaders resample the slice interval to 2 mm); at the ends of the
  series the edge slice is repeated.  With 9 slices (3DCE's 9-slice variant,
  :data:`SUPPORTED_SLICES`) the channels are the slices at -8, -6, ..., +8 mm
  (:func:`slice_offsets_mm`); the bundle's ``architecture.in_channels`` says
  which the detector was trained on.
* **No neighbours** (a DeepLesion key slice distributed alone, as most of
  ``deeplesion-samples`` are): a neighbour channel that cannot be
  interpolated from slices within :data:`MAX_GAP_MM` is filled with the
  nearest available slice towards the key slice, i.e. the key slice itself;
  the trainer shows the network such inputs on purpose (neighbour dropout) so
  it does not depend on the 3-D context.
* **In-plane**: resampled to :data:`PIXEL_MM` (1.6 mm, twice the 0.8 mm
  DeepLesion normalises to, for CPU cost) on a :data:`INPUT_SIZE` square grid
  (410 mm field of view) centred on the body's bounding box.
* **Window**: HU clipped to :data:`HU_WINDOW` ``[-1024, 3071]`` (the single
  window of 3DCE/MULAN covering lung, soft tissue and bone) and scaled to
  ``[0, 1]``.

:class:`SliceGrid` maps network pixels to source pixels, so boxes detected on
the input are reported in the source image's pixel coordinates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage

__all__ = [
    "BODY_HU",
    "HU_WINDOW",
    "INPUT_SIZE",
    "MAX_GAP_MM",
    "NEIGHBOUR_MM",
    "PIXEL_MM",
    "SUPPORTED_SLICES",
    "SliceGrid",
    "body_centre",
    "key_slice_input",
    "normalise",
    "resample_plane",
    "slice_offsets_mm",
    "volume_inputs",
]

#: DeepLesion (3DCE, MULAN) HU window.
HU_WINDOW = (-1024.0, 3071.0)
#: Offset (mm) of the neighbour channels from the key slice.
NEIGHBOUR_MM = 2.0
#: Network pixel size, mm.
PIXEL_MM = 1.6
#: Network input is INPUT_SIZE x INPUT_SIZE pixels.
INPUT_SIZE = 256
#: A neighbour is interpolated only between slices at most this far apart.
MAX_GAP_MM = 10.0
#: HU above which a pixel counts as body (for centring the grid).
BODY_HU = -500.0
#: Slices stacked as channels the detector may be built for (3DCE: 3 or 9).
SUPPORTED_SLICES = (3, 9)


def slice_offsets_mm(n_slices: int = 3) -> npt.NDArray[np.float64]:
    """Offsets along z (mm) of the input channels: ``NEIGHBOUR_MM`` apart, key slice central.

    Raises
    ------
    ValueError
        ``n_slices`` not in :data:`SUPPORTED_SLICES`.
    """
    if n_slices not in SUPPORTED_SLICES:
        raise ValueError(f"{n_slices} input slices: the detector takes {SUPPORTED_SLICES}")
    half = n_slices // 2
    return np.arange(-half, half + 1, dtype=float) * NEIGHBOUR_MM


def normalise(hu: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Clip to :data:`HU_WINDOW` and scale to ``[0, 1]`` (float32)."""
    lo, hi = HU_WINDOW
    a = np.asarray(hu, dtype=np.float32)
    return np.asarray((np.clip(a, lo, hi) - lo) / (hi - lo), dtype=np.float32)


@dataclass(frozen=True)
class SliceGrid:
    """Affine map from network pixels ``(u, v)`` to source pixels ``(x, y)``.

    ``x = origin_x + u * step_x`` and ``y = origin_y + v * step_y`` (pixel
    centres at integer coordinates on both grids).
    """

    origin_x: float
    origin_y: float
    step_x: float
    step_y: float

    @classmethod
    def centred(cls, centre_xy: tuple[float, float], spacing_xy: tuple[float, float],
                pixel_mm: float = PIXEL_MM, size: int = INPUT_SIZE) -> SliceGrid:
        """The grid of ``size`` pixels of ``pixel_mm`` centred on ``centre_xy`` (source px)."""
        sx, sy = pixel_mm / spacing_xy[0], pixel_mm / spacing_xy[1]
        half = (size - 1) / 2.0
        return cls(centre_xy[0] - half * sx, centre_xy[1] - half * sy, sx, sy)

    def to_source(self, boxes: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Network ``(x1, y1, x2, y2, ...)`` boxes -> source pixels (extra columns kept)."""
        b = np.array(boxes, dtype=float, ndmin=2, copy=True)
        b[:, [0, 2]] = self.origin_x + b[:, [0, 2]] * self.step_x
        b[:, [1, 3]] = self.origin_y + b[:, [1, 3]] * self.step_y
        return b

    def to_network(self, boxes: npt.ArrayLike) -> npt.NDArray[np.float64]:
        """Source ``(x1, y1, x2, y2, ...)`` boxes -> network pixels (extra columns kept)."""
        b = np.array(boxes, dtype=float, ndmin=2, copy=True)
        b[:, [0, 2]] = (b[:, [0, 2]] - self.origin_x) / self.step_x
        b[:, [1, 3]] = (b[:, [1, 3]] - self.origin_y) / self.step_y
        return b


def body_centre(hu: npt.NDArray[np.generic]) -> tuple[float, float]:
    """Centre ``(x, y)`` of the bounding box of body pixels of a 2-D or 3-D (max) image."""
    img = np.asarray(hu)
    plane = img.max(axis=0) if img.ndim == 3 else img
    ys, xs = np.nonzero(plane > BODY_HU)
    if len(xs) == 0:
        return ((plane.shape[1] - 1) / 2.0, (plane.shape[0] - 1) / 2.0)
    return ((float(xs.min()) + float(xs.max())) / 2.0, (float(ys.min()) + float(ys.max())) / 2.0)


def resample_plane(planes: npt.NDArray[np.generic], grid: SliceGrid, size: int = INPUT_SIZE,
                   fill_hu: float = HU_WINDOW[0]) -> npt.NDArray[np.float32]:
    """Resample ``(n, rows, cols)`` HU planes onto ``grid`` (bilinear), float32 HU."""
    src = np.asarray(planes, dtype=np.float32)
    if src.ndim == 2:
        src = src[None]
    out = np.empty((src.shape[0], size, size), dtype=np.float32)
    matrix = np.diag([grid.step_y, grid.step_x])
    offset = (grid.origin_y, grid.origin_x)
    for k in range(src.shape[0]):
        out[k] = ndimage.affine_transform(src[k], matrix, offset=offset, output_shape=(size, size),
                                          order=1, mode="constant", cval=fill_hu)
    return out


def _interp_z(stack: npt.NDArray[np.float32], positions: npt.NDArray[np.float64],
              targets: npt.NDArray[np.float64]) -> npt.NDArray[np.float32]:
    """Linear interpolation of ``stack[k]`` (at ``positions[k]`` mm) at ``targets`` mm.

    Beyond the ends the edge slice is used; across a gap wider than
    :data:`MAX_GAP_MM` the nearer slice.
    """
    out = np.empty((len(targets), *stack.shape[1:]), dtype=np.float32)
    for i, t in enumerate(targets):
        j = int(np.searchsorted(positions, t))
        if j <= 0:
            out[i] = stack[0]
        elif j >= len(positions):
            out[i] = stack[-1]
        else:
            z0, z1 = positions[j - 1], positions[j]
            if z1 - z0 > MAX_GAP_MM:
                out[i] = stack[j - 1] if t - z0 <= z1 - t else stack[j]
            else:
                w = float((t - z0) / (z1 - z0))
                out[i] = stack[j - 1] * (1.0 - w) + stack[j] * w
    return out


def volume_inputs(
    hu_zyx: npt.NDArray[np.generic], spacing_zyx: Sequence[float],
    indices: Sequence[int] | None = None, grid: SliceGrid | None = None,
    n_slices: int = 3,
) -> tuple[npt.NDArray[np.float32], SliceGrid]:
    """Network inputs for slices ``indices`` of a volume.

    Parameters
    ----------
    hu_zyx : ndarray (nz, rows, cols)
        HU volume, slices in acquisition order along the normal.
    spacing_zyx : (dz, dy, dx)
        Slice interval and pixel spacing, mm.
    indices : sequence of int, optional
        Key slices (default all).
    grid : SliceGrid, optional
        Default: centred on the body's bounding box of the whole volume.
    n_slices : int
        Channels: 3 or 9 (:func:`slice_offsets_mm`).

    Returns
    -------
    (ndarray (n, n_slices, INPUT_SIZE, INPUT_SIZE) float32, SliceGrid)
    """
    offsets = slice_offsets_mm(n_slices)
    vol = np.asarray(hu_zyx)
    nz = vol.shape[0]
    dz, dy, dx = (float(s) for s in spacing_zyx)
    keys = list(range(nz)) if indices is None else [int(i) for i in indices]
    if grid is None:
        grid = SliceGrid.centred(body_centre(vol[:: max(1, nz // 16)]), (dx, dy))
    reach = int(float(offsets[-1]) // max(dz, 1e-3))
    needed = sorted({k2 for k in keys for k2 in range(k - 2 - reach, k + 3 + reach)
                     if 0 <= k2 < nz})
    planes = resample_plane(vol[needed], grid)
    positions = np.asarray(needed, dtype=float) * dz
    out = np.empty((len(keys), len(offsets), INPUT_SIZE, INPUT_SIZE), dtype=np.float32)
    for i, k in enumerate(keys):
        out[i] = _interp_z(planes, positions, k * dz + offsets)
    return normalise(out), grid


def key_slice_input(
    key_hu: npt.NDArray[np.generic], spacing_xy: tuple[float, float],
    neighbours: Mapping[float, npt.NDArray[np.generic]] | None = None,
    grid: SliceGrid | None = None, n_slices: int = 3,
) -> tuple[npt.NDArray[np.float32], SliceGrid]:
    """Network input ``(n_slices, H, W)`` for one key slice and whatever neighbours exist.

    Parameters
    ----------
    key_hu : ndarray (rows, cols)
    spacing_xy : (float, float)
        Pixel spacing (x, y), mm.
    neighbours : dict, optional
        Offset along z (mm, signed) -> HU slice.  Missing neighbours are
        filled as the module docstring says.
    grid : SliceGrid, optional
        Default: centred on the body's bounding box.
    n_slices : int
        Channels: 3 or 9 (:func:`slice_offsets_mm`).
    """
    offsets = slice_offsets_mm(n_slices)
    if grid is None:
        grid = SliceGrid.centred(body_centre(key_hu), spacing_xy)
    items = sorted({0.0: key_hu, **(neighbours or {})}.items())
    positions = np.array([p for p, _ in items], dtype=float)
    planes = resample_plane(np.stack([np.asarray(s, dtype=np.float32) for _, s in items]), grid)
    stack = _interp_z(planes, positions, offsets)
    return normalise(stack), grid
