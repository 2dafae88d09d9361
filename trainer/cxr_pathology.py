"""Synthetic findings JSRT lacks, drawn on a letter-boxed grey radiograph (cxr-lungs 1.2.0).

JSRT is one site's PA films of ambulant patients: no pleural fluid, almost no
consolidation, no tubes or lines, no portable AP films.  On such films of
another site a model trained on it follows the *aerated* lung and stops at an
opacity, whereas the SCR reference outline is the anatomical lung field, which
covers an opacified lung too.  These functions draw what is missing, on the
letter-boxed grey image in ``[0, 1]`` (bright = attenuating) *before* the
histogram equalisation, and never change the labels:

* :func:`add_effusion`: a dense, homogeneous opacity rising from the
  costophrenic angle of one lung field, its upper border a concave meniscus
  (higher at the chest wall than medially) that fades upwards, from a blunted
  angle up to most of the hemithorax, or (``whole``) the whole hemithorax
  opaque; its grey is the heart's (soft tissue), so that the lung's lower and
  outer borders vanish into the diaphragm and chest wall as on a real film;
* :func:`add_consolidation`: soft bright blobs (consolidation, masses) inside
  a lung field;
* :func:`add_soft_tissue`: large soft bright overlays that cross the lung
  borders (breasts, obesity, a rotated patient's soft tissue), so that an
  opacity edge is not taken for a lung edge;
* :func:`portable_look`: the portable AP appearance: a soft-tissue haze (a
  smooth additive field), compressed contrast with a gamma, blur and heavy
  noise.  A global monotone change alone would be undone by the equalisation;
  with the additive haze and the noise it is not;
* :func:`add_devices`: tubes (double-walled), lines, wires looping across the
  film and over the apices, ECG electrodes with their leads.

All take a :class:`numpy.random.Generator`, so a seeded run is reproducible,
and return a new ``float32`` image clipped to ``[0, 1]``.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw
from scipy import ndimage

__all__ = [
    "add_consolidation",
    "add_devices",
    "add_effusion",
    "add_soft_tissue",
    "portable_look",
    "soft_tissue_grey",
]

F32 = npt.NDArray[np.float32]


def _check(image: F32, lung: npt.NDArray[np.bool_] | None = None) -> None:
    if image.ndim != 2 or min(image.shape) < 16:
        raise ValueError(f"expected a 2-D image of at least 16x16, got shape {image.shape}")
    if lung is not None and lung.shape != image.shape:
        raise ValueError(f"lung mask {lung.shape} does not match the image {image.shape}")


def soft_tissue_grey(image: F32, heart: npt.NDArray[np.bool_] | None) -> float:
    """Soft-tissue grey of this film: the median inside the heart, else the 85th percentile."""
    _check(image)
    if heart is not None and int(heart.sum()) >= 20:
        return float(np.median(image[heart]))
    return float(np.percentile(image, 85))


def _blend(image: F32, alpha: npt.NDArray[np.floating], value: float) -> F32:
    """Move ``image`` towards ``value`` by ``alpha``, never darker: an opacity only adds density."""
    a = np.clip(alpha, 0.0, 1.0).astype(np.float32)
    target = np.maximum(image, np.float32(value))
    out: F32 = np.clip(image * (1.0 - a) + a * target, 0.0, 1.0).astype(np.float32)
    return out


def add_effusion(image: F32, lung: npt.NDArray[np.bool_], value: float,
                 rng: np.random.Generator, *, lateral_right: bool,
                 max_fraction: float = 0.8, whole: bool = False) -> F32:
    """Pleural fluid (or a whole opaque hemithorax) in one lung field.

    Parameters
    ----------
    image : numpy.ndarray
        ``(s, s)`` grey image in ``[0, 1]``.
    lung : numpy.ndarray
        Boolean mask of the lung field (after the geometric augmentation).
    value : float
        Grey of the fluid (:func:`soft_tissue_grey`), scaled by up to ±10%.
    rng : numpy.random.Generator
        Source of every random choice.
    lateral_right : bool
        Whether this lung's chest wall is at the image's right (the patient's
        left lung on a PA/AP film): the meniscus rises towards it.
    max_fraction : float
        Largest fluid height as a fraction of the lung field's height.
    whole : bool
        Opacify the whole hemithorax (the fluid level above the apex).

    Raises
    ------
    ValueError
        Not a 2-D image, or ``lung`` of another shape.
    """
    _check(image, lung)
    if not lung.any():
        return image.astype(np.float32, copy=True)
    rows, cols = np.nonzero(lung)
    top, bottom = int(rows.min()), int(rows.max())
    left, right = int(cols.min()), int(cols.max())
    height, width = bottom - top + 1, max(1, right - left + 1)
    yy, xx = np.mgrid[0:image.shape[0], 0:image.shape[1]].astype(np.float32)
    if whole:
        level = np.full(image.shape, top - 0.2 * height, np.float32)
        fade = 2.0
    else:
        frac = float(rng.uniform(0.08, max_fraction))
        base = bottom - frac * height
        # 0 at the mediastinal side, 1 at the chest wall
        lateral = (xx - left) / width if lateral_right else (right - xx) / width
        rise = float(rng.uniform(0.1, 0.35)) * height
        level = base - rise * np.clip(lateral, 0.0, 1.0) ** float(rng.uniform(1.5, 3.0))
        fade = float(rng.uniform(0.02, 0.08)) * height + 1.0
    inside = _soft_inside(lung, 1.5)
    below = 1.0 / (1.0 + np.exp(np.clip(-(yy - level) / fade, -50, 50)))
    density = float(rng.uniform(0.75, 1.0)) if not whole else float(rng.uniform(0.8, 1.0))
    grey = float(np.clip(value * rng.uniform(0.9, 1.1), 0.0, 1.0))
    return _blend(image, density * below * inside * _texture(image.shape, rng, 0.1), grey)


def _texture(shape: tuple[int, int], rng: np.random.Generator, depth: float
             ) -> npt.NDArray[np.float32]:
    """A smooth random field in ``[1 - depth, 1]`` (density that is not perfectly uniform)."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32),
                                    float(rng.uniform(3.0, 8.0)))
    field = (field - field.min()) / (float(np.ptp(field)) + 1e-6)
    out: F32 = (1.0 - depth + depth * field).astype(np.float32)
    return out


def _soft_inside(lung: npt.NDArray[np.bool_], sigma: float) -> npt.NDArray[np.float32]:
    """``lung`` with a soft edge, exactly 0 beyond 3 pixels outside it."""
    soft = ndimage.gaussian_filter(lung.astype(np.float32), sigma)
    return np.where(ndimage.binary_dilation(lung, iterations=3), soft, 0.0).astype(np.float32)


def _blob(shape: tuple[int, int], centre: tuple[float, float], radius: float,
          rng: np.random.Generator) -> npt.NDArray[np.float32]:
    """A soft, irregular blob in ``[0, 1]``: a Gaussian bump with a lumpy edge."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    ry, rx = radius * rng.uniform(0.7, 1.3), radius * rng.uniform(0.7, 1.3)
    d2 = ((yy - centre[0]) / ry) ** 2 + ((xx - centre[1]) / rx) ** 2
    lumps = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32),
                                    max(1.0, radius / 3))
    lumps /= float(np.abs(lumps).max()) + 1e-6
    edge = 1.0 / (1.0 + np.exp(np.clip((d2 + 0.6 * lumps - 1.0) / 0.3, -50, 50)))
    out: F32 = edge.astype(np.float32)
    return out


def add_consolidation(image: F32, lung: npt.NDArray[np.bool_], value: float,
                      rng: np.random.Generator, *, max_blobs: int = 4) -> F32:
    """One to ``max_blobs`` soft bright blobs centred inside ``lung`` (consolidation, masses).

    Raises
    ------
    ValueError
        Not a 2-D image, or ``lung`` of another shape.
    """
    _check(image, lung)
    rows, cols = np.nonzero(lung)
    if rows.size == 0:
        return image.astype(np.float32, copy=True)
    height = float(rows.max() - rows.min() + 1)
    inside = _soft_inside(lung, 2.0)
    alpha = np.zeros(image.shape, np.float32)
    for _ in range(int(rng.integers(1, max_blobs + 1))):
        i = int(rng.integers(0, rows.size))
        radius = float(rng.uniform(0.06, 0.3)) * height
        alpha = np.maximum(alpha, float(rng.uniform(0.55, 1.0))
                           * _blob(image.shape, (float(rows[i]), float(cols[i])), radius, rng))
    grey = float(np.clip(value * rng.uniform(0.9, 1.1), 0.0, 1.0))
    return _blend(image, alpha * inside * _texture(image.shape, rng, 0.4), grey)


def add_soft_tissue(image: F32, value: float, rng: np.random.Generator) -> F32:
    """A large soft overlay that crosses the lung borders (breast, obesity, rotation).

    Raises
    ------
    ValueError
        Not a 2-D image.
    """
    _check(image)
    s0, s1 = image.shape
    alpha = np.zeros(image.shape, np.float32)
    for _ in range(int(rng.integers(1, 3))):
        centre = (float(rng.uniform(0.55, 0.95)) * s0, float(rng.uniform(0.1, 0.9)) * s1)
        radius = float(rng.uniform(0.12, 0.3)) * min(s0, s1)
        alpha = np.maximum(alpha, float(rng.uniform(0.2, 0.55))
                           * ndimage.gaussian_filter(_blob(image.shape, centre, radius, rng), 3.0))
    return _blend(image, alpha, float(np.clip(value, 0.0, 1.0)))


def portable_look(image: F32, rng: np.random.Generator, *, noise_std: float = 0.03) -> F32:
    """Portable AP appearance: haze, compressed contrast, gamma, blur, heavy noise.

    Raises
    ------
    ValueError
        Not a 2-D image.
    """
    _check(image)
    img = np.clip(image, 0.0, 1.0).astype(np.float32) ** np.float32(rng.uniform(0.6, 1.6))
    mean = float(img.mean())
    img = mean + (img - mean) * np.float32(rng.uniform(0.4, 0.85))
    coarse = rng.standard_normal((4, 4)).astype(np.float32)
    haze = ndimage.zoom(coarse, (image.shape[0] / 4, image.shape[1] / 4), order=3)
    haze = (haze - haze.min()) / (float(np.ptp(haze)) + 1e-6)
    img = img + np.float32(rng.uniform(0.05, 0.3)) * haze
    # rescale rather than clip: a saturated plateau plus noise would be speckle, not a film
    img = 0.05 + 0.9 * (img - img.min()) / (float(np.ptp(img)) + 1e-6)
    if rng.random() < 0.5:
        img = ndimage.gaussian_filter(img, float(rng.uniform(0.5, 1.5)))
    img = img + rng.normal(0.0, rng.uniform(0.3, 1.0) * noise_std, image.shape)
    out: F32 = np.clip(img, 0.0, 1.0).astype(np.float32)
    return out


def _curve(rng: np.random.Generator, start: tuple[float, float], end: tuple[float, float],
           bend: float, n: int = 40) -> list[tuple[float, float]]:
    """A quadratic Bezier from ``start`` to ``end`` (x, y) with a random control point."""
    (x0, y0), (x1, y1) = start, end
    cx = 0.5 * (x0 + x1) + float(rng.normal(0, bend))
    cy = 0.5 * (y0 + y1) + float(rng.normal(0, bend))
    t = np.linspace(0.0, 1.0, n)
    xs = (1 - t) ** 2 * x0 + 2 * (1 - t) * t * cx + t ** 2 * x1
    ys = (1 - t) ** 2 * y0 + 2 * (1 - t) * t * cy + t ** 2 * y1
    return list(zip(xs.tolist(), ys.tolist(), strict=True))


def add_devices(image: F32, rng: np.random.Generator, *, max_items: int = 6) -> F32:
    """Tubes, lines, looping wires (many across the apices) and ECG electrodes with leads.

    Raises
    ------
    ValueError
        Not a 2-D image.
    """
    _check(image)
    h, w = image.shape
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    for _ in range(int(rng.integers(1, max_items + 1))):
        kind = rng.choice(["tube", "line", "apex", "loop", "ecg"])
        grey = int(rng.integers(150, 256))
        width = max(1, round(float(rng.uniform(0.003, 0.009)) * w))
        if kind == "tube":  # endotracheal / nasogastric: down the midline, double wall
            x = float(rng.uniform(0.4, 0.6)) * w
            pts = _curve(rng, (x, 0.0), (x + rng.normal(0, 0.05 * w),
                                         float(rng.uniform(0.3, 0.9)) * h), 0.05 * w)
            draw.line(pts, fill=grey, width=width + 4)
            draw.line(pts, fill=grey // 3, width=max(1, width))
        elif kind == "line":  # central line, drain: from a side into the chest
            x0 = float(rng.choice([0.0, w - 1.0]))
            pts = _curve(rng, (x0, float(rng.uniform(0.0, 0.7)) * h),
                         (float(rng.uniform(0.2, 0.8)) * w, float(rng.uniform(0.1, 0.8)) * h),
                         0.15 * w)
            draw.line(pts, fill=grey, width=width)
        elif kind == "apex":  # wires over the shoulders and apices
            pts = _curve(rng, (float(rng.uniform(0.0, 1.0)) * w, 0.0),
                         (float(rng.uniform(0.0, 1.0)) * w, float(rng.uniform(0.15, 0.45)) * h),
                         0.2 * w)
            draw.line(pts, fill=grey, width=width)
        elif kind == "loop":  # coiled lead lying on the film
            cx, cy = float(rng.uniform(0.1, 0.9)) * w, float(rng.uniform(0.1, 0.9)) * h
            r = float(rng.uniform(0.03, 0.12)) * w
            t = np.linspace(0, 2 * np.pi * rng.uniform(1.0, 3.0), 80)
            drift = np.linspace(0, rng.uniform(-0.15, 0.15) * w, t.size)
            pts = list(zip((cx + r * np.cos(t) + drift).tolist(),
                           (cy + r * np.sin(t) + drift[::-1]).tolist(), strict=True))
            draw.line(pts, fill=grey, width=width)
        else:  # ECG electrode with its lead
            cx, cy = float(rng.uniform(0.1, 0.9)) * w, float(rng.uniform(0.05, 0.8)) * h
            r = float(rng.uniform(0.008, 0.02)) * w
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=grey)
            end = (float(rng.choice([0.0, w - 1.0])), float(rng.uniform(0.0, 1.0)) * h)
            draw.line(_curve(rng, (cx, cy), end, 0.2 * w), fill=grey, width=width)
    alpha = ndimage.gaussian_filter(np.asarray(canvas, np.float32) / 255.0, 0.6)
    return _blend(image, alpha, float(rng.uniform(0.85, 1.0)))
