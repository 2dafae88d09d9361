"""Lung and heart segmentation of a frontal chest radiograph (2-D U-Net).

The network (a MONAI residual U-Net, builder ``unet2d`` in
:mod:`cad_node.models.network`) sees a square :data:`NET_SIZE` image: the
radiograph is letter-boxed to a square (padding at the bottom/right with the
darkest value), area-resampled, then histogram-equalised
(:func:`network_input`).  The trainer calls the very same function, so the
training and inference inputs cannot drift apart.

Outputs are three sigmoid channels, in :data:`LABELS` order (the patient's
right lung, the patient's left lung, the heart); they may overlap slightly,
as the SCR reference masks do.  Post-processing (:func:`postprocess`) keeps the
largest connected component of each structure and fills its holes.

Contract of :func:`segment`
---------------------------
* input: a 2-D ``float`` array in ``[0, 1]``, display orientation, bright =
  attenuating (MONOCHROME2 semantics; :mod:`cad_node.imaging.radiograph`
  delivers exactly this);
* output: :class:`LungHeartMasks` at the input's full resolution;
* it never reads geometry: millimetres are the caller's business.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from scipy import ndimage

if TYPE_CHECKING:  # torch is imported lazily: CLI start-up stays cheap
    import torch

__all__ = [
    "LABELS",
    "NET_SIZE",
    "LungHeartMasks",
    "letterbox",
    "network_input",
    "normalise",
    "postprocess",
    "segment",
    "segment_batch_logits",
]

#: Side of the square network input, pixels (measured choice: 256 keeps the
#: forward pass about 30x cheaper than 512 on CPU; see the model card).
NET_SIZE = 256
#: Output channels, in order: the patient's right lung (image left on a PA/AP
#: film), the patient's left lung, the heart.
LABELS: tuple[str, str, str] = ("right_lung", "left_lung", "heart")
#: Number of grey levels of the histogram equalisation.
_HIST_BINS = 256


@dataclass(frozen=True)
class LungHeartMasks:
    """Masks of one radiograph at its full resolution (rows, columns)."""

    right_lung: npt.NDArray[np.bool_]
    left_lung: npt.NDArray[np.bool_]
    heart: npt.NDArray[np.bool_]

    def as_dict(self) -> dict[str, npt.NDArray[np.bool_]]:
        """``{label: mask}`` in :data:`LABELS` order."""
        return {"right_lung": self.right_lung, "left_lung": self.left_lung, "heart": self.heart}


def letterbox(image: npt.NDArray[np.floating], size: int = NET_SIZE) -> npt.NDArray[np.float32]:
    """Pad ``image`` to a square (bottom/right, with its minimum) and area-resample to ``size``.

    Raises
    ------
    ValueError
        Not a 2-D image, or empty.
    """
    if image.ndim != 2 or min(image.shape) < 1:
        raise ValueError(f"expected a non-empty 2-D image, got shape {image.shape}")
    import torch

    rows, cols = image.shape
    side = max(rows, cols)
    square = np.full((side, side), float(np.min(image)), np.float32)
    square[:rows, :cols] = image
    t = torch.from_numpy(square)[None, None]
    mode = "area" if side >= size else "bilinear"
    out = torch.nn.functional.interpolate(t, size=(size, size), mode=mode)
    return np.ascontiguousarray(out[0, 0].numpy(), dtype=np.float32)


def _equalise(image: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Histogram-equalise to ``[0, 1]`` (invariant to any monotone grey-level change)."""
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return np.zeros_like(image)
    hist, edges = np.histogram(image, bins=_HIST_BINS, range=(lo, hi))
    cdf = np.cumsum(hist).astype(np.float64)
    cdf /= cdf[-1]
    centres = 0.5 * (edges[:-1] + edges[1:])
    return np.interp(image, centres, cdf).astype(np.float32)


def normalise(square: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The ``histeq`` normalisation of a letter-boxed image: equalised, centred on 0.

    The trainer applies it after its grey-level augmentation, the node right
    after :func:`letterbox` (:func:`network_input`): one function for both.
    """
    return (_equalise(square) - 0.5) * 2.0


def network_input(image: npt.NDArray[np.floating], size: int = NET_SIZE) -> npt.NDArray[np.float32]:
    """The network's input for one radiograph: letter-boxed, resampled, equalised, centred.

    Returns
    -------
    numpy.ndarray
        ``float32`` of shape ``(size, size)``, roughly zero-mean, unit-range.
    """
    return normalise(letterbox(image, size))


def _largest_filled(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    keep = labels == (int(np.argmax(sizes)) + 1)
    filled: npt.NDArray[np.bool_] = ndimage.binary_fill_holes(keep)
    return filled


def postprocess(probabilities: npt.NDArray[np.floating], threshold: float = 0.5) -> LungHeartMasks:
    """Threshold the ``(3, rows, cols)`` probabilities, keep the largest component, fill holes."""
    if probabilities.ndim != 3 or probabilities.shape[0] != len(LABELS):
        raise ValueError(f"expected (3, rows, cols) probabilities, got {probabilities.shape}")
    masks = [_largest_filled(probabilities[k] >= threshold) for k in range(len(LABELS))]
    return LungHeartMasks(right_lung=masks[0], left_lung=masks[1], heart=masks[2])


def segment_batch_logits(net: torch.nn.Module, inputs: npt.NDArray[np.float32]) -> torch.Tensor:
    """Forward ``(n, size, size)`` network inputs; return ``(n, 3, size, size)`` logits."""
    import torch

    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(inputs))[:, None]
        out: torch.Tensor = net(x)
    return out


def probabilities_at(
    logits: torch.Tensor, shape: tuple[int, int]
) -> npt.NDArray[np.float32]:
    """Map ``(3, size, size)`` logits back to sigmoid probabilities at ``shape`` (rows, cols)."""
    import torch

    rows, cols = shape
    side = max(rows, cols)
    with torch.inference_mode():
        p = torch.sigmoid(logits[None].float())
        p = torch.nn.functional.interpolate(p, size=(side, side), mode="bilinear",
                                            align_corners=False)
    return np.ascontiguousarray(p[0, :, :rows, :cols].numpy(), dtype=np.float32)


def segment(net: torch.nn.Module, image: npt.NDArray[np.floating], threshold: float = 0.5,
            size: int = NET_SIZE) -> LungHeartMasks:
    """Segment one radiograph (``[0, 1]`` display values) at its full resolution.

    Parameters
    ----------
    net : torch.nn.Module
        The ``cxr-lungs`` network in eval mode (``ModelBundle.build_network``).
    image : numpy.ndarray
        2-D, ``[0, 1]``, bright = attenuating.
    threshold : float
        Probability threshold per structure.
    size : int
        The network's input side (the bundle's ``input.size``).
    """
    logits = segment_batch_logits(net, network_input(image, size)[None])
    shape = (int(image.shape[0]), int(image.shape[1]))
    return postprocess(probabilities_at(logits[0], shape), threshold)
