"""Synthetic frontal chest radiographs with known truth (lungs, lesions), for fast tests.

:func:`make_radiograph` draws a phantom: a bright body, two dark lung ellipses
(the patient's right lung on the image's left), ribs as faint bright bands,
and optionally round bright opacities ("lesions") inside the lungs, with their
boxes.  :func:`write_labelled_set` writes a set in the ``png-labels`` layout
that :mod:`trainer.cxr_tb` reads (``images/``, ``masks/``, ``labels.csv``):
positives carry opacities in the upper lung zones, as reactivation TB does.

Nothing here pretends to be a real radiograph: the phantoms only give tests
an image whose truth is known.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image
from scipy import ndimage

__all__ = ["Phantom", "make_radiograph", "write_labelled_set"]


@dataclass(frozen=True)
class Phantom:
    """A synthetic radiograph and its truth."""

    #: ``float32`` ``(size, size)`` in ``[0, 1]``, bright = attenuating.
    image: npt.NDArray[np.float32]
    right_lung: npt.NDArray[np.bool_]
    left_lung: npt.NDArray[np.bool_]
    #: Lesion boxes ``(x0, y0, x1, y1)`` in pixels.
    boxes: tuple[tuple[float, float, float, float], ...]


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float
             ) -> npt.NDArray[np.bool_]:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inside: npt.NDArray[np.bool_] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return inside


def make_radiograph(rng: np.random.Generator, size: int = 128, lesions: int = 0,
                    upper: bool = False, lesion_radius: float | None = None) -> Phantom:
    """Draw one phantom (see the module docstring).

    Parameters
    ----------
    rng : numpy.random.Generator
    size : int
        Side in pixels.
    lesions : int
        Number of round opacities inside the lungs.
    upper : bool
        Put them in the upper half of the lungs.
    lesion_radius : float, optional
        Radius in pixels (default ``size / 20``).
    """
    shape = (size, size)
    s = float(size)
    image = np.full(shape, 0.75, np.float32)
    yy, xx = np.mgrid[:size, :size]
    jitter = rng.uniform(-0.03, 0.03, 4) * s
    right = _ellipse(shape, 0.45 * s + jitter[0], 0.30 * s + jitter[1], 0.28 * s, 0.14 * s)
    left = _ellipse(shape, 0.45 * s + jitter[2], 0.70 * s + jitter[3], 0.27 * s, 0.13 * s)
    image[right | left] = 0.25
    for k in range(6):  # ribs: faint bright bands across the lungs
        band = np.abs(yy - (0.22 + 0.09 * k) * s - 0.05 * s * np.sin(xx / s * np.pi)) < 0.012 * s
        image[band & (right | left)] += 0.12
    radius = lesion_radius if lesion_radius is not None else s / 20
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(lesions):
        lung = right if rng.random() < 0.5 else left
        inner = ndimage.binary_erosion(lung, iterations=max(int(np.ceil(radius)), 1))
        if upper:
            inner &= yy < np.median(np.nonzero(lung)[0])
        rows, cols = np.nonzero(inner if inner.any() else lung)
        pick = int(rng.integers(len(rows)))
        r, c = int(rows[pick]), int(cols[pick])
        blob = np.exp(-(((yy - r) ** 2 + (xx - c) ** 2) / (2 * (radius / 1.5) ** 2)))
        image += (0.45 * blob).astype(np.float32)
        boxes.append((float(c - radius), float(r - radius), float(c + radius), float(r + radius)))
    image += rng.normal(0, 0.02, shape).astype(np.float32)
    image = np.clip(image, 0.0, 1.0).astype(np.float32)
    return Phantom(image, right, left, tuple(boxes))


def write_labelled_set(out: Path, n: int, *, size: int = 96, seed: int = 0) -> Path:
    """Write ``n`` phantoms (half TB-like positives) in the ``png-labels`` layout.

    ``out/images/<name>.png`` (8-bit), ``out/masks/<name>.png`` (1 = right
    lung, 2 = left lung) and ``out/labels.csv`` (``image,label``; 1 = TB).
    """
    rng = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for k in range(n):
        label = k % 2
        ph = make_radiograph(rng, size, lesions=2 * label, upper=True)
        name = f"case{k:04d}"
        Image.fromarray(np.round(ph.image * 255).astype(np.uint8)).save(
            out / "images" / f"{name}.png")
        mask = ph.right_lung.astype(np.uint8) + 2 * ph.left_lung.astype(np.uint8)
        Image.fromarray(mask).save(out / "masks" / f"{name}.png")
        rows.append((f"{name}.png", label))
    with (out / "labels.csv").open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label"])
        w.writerows(rows)
    return out
