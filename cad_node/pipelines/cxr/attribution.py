"""Attribution heatmaps of the chest X-ray abnormality model (captum), restricted to the lungs.

What the heatmap is: the pixels whose change moves the abnormality logit
*up*, by Integrated Gradients (Sundararajan 2017) or DeepLIFT (Shrikumar
2017, the method of the reference system of issue #12), both from captum.

Recipe (:func:`lung_heatmap`):

1. attribution towards the abnormality logit, of either
   * the network's input (``(1, C, H, W)``): Integrated Gradients or DeepLIFT; or
   * an intermediate layer (:attr:`AttributionMethod.LAYER_INTEGRATED_GRADIENTS`):
     the network is a :class:`LayerSplit` (``forward(x) == head(stem(x))``), and
     Integrated Gradients runs on ``head`` from ``stem(baseline)`` to ``stem(x)``,
     which is what captum's ``LayerIntegratedGradients`` computes on the stem's
     output layer (tested), but with the stem run twice instead of once per step;
     the per-cell attribution is upsampled (bilinear) to the input grid.
   The baseline (:class:`Baseline`) is by default the input blurred by a
   Gaussian of :data:`BASELINE_SIGMA_FRACTION` of the side (a "blurred"
   baseline keeps the anatomy and removes small structures such as nodules;
   an all-zero image would credit the whole thorax);
2. summed over channels, positive part only (evidence *for* abnormal);
3. smoothed by a Gaussian of :data:`SMOOTH_SIGMA_FRACTION` of the side;
4. mapped to the analysis image by the caller's ``to_image`` (the inverse of
   the model's preprocessing, e.g. :func:`from_letterbox`);
5. set to 0 outside the lungs (the union of the part-1 lung masks), then
   divided by its maximum inside them: values in ``[0, 1]``, all zero when
   nothing inside the lungs argues for abnormal.

Contract of :func:`lung_heatmap`
--------------------------------
* never changes the network (parameters keep their ``requires_grad``; the
  network stays in eval mode) and works inside ``torch.inference_mode``
  callers (it leaves inference mode for its own computation);
* returns :class:`Attribution` with the heatmap on the analysis image and
  the wall time it took (the pipeline reports it; docs/benchmarks.md);
* raises :class:`ValueError` for a mask of the wrong shape, an unknown method
  or baseline, or a layer method on a network that is not a :class:`LayerSplit`.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt
from scipy import ndimage

if TYPE_CHECKING:
    import torch

__all__ = [
    "BASELINE_SIGMA_FRACTION",
    "LAYER_IG_STEPS",
    "SMOOTH_SIGMA_FRACTION",
    "Attribution",
    "AttributionMethod",
    "Baseline",
    "LayerSplit",
    "attribute",
    "from_letterbox",
    "layer_attribution",
    "lung_heatmap",
]

#: Gaussian sigma of the blurred baseline, as a fraction of the input side.
BASELINE_SIGMA_FRACTION = 1 / 16
#: Gaussian sigma of the smoothing of the attribution, as a fraction of the input side.
SMOOTH_SIGMA_FRACTION = 1 / 64
#: Integration steps of Integrated Gradients.  Measured on the ``cxr-abnormal``
#: architecture (256 px, 1 thread, loaded machine): 1 / 4 / 8 steps took 0.28 /
#: 0.80 / 1.50 s against a 0.11 s forward pass; 4 keeps part 1 + part 2 within
#: the 2 s budget (docs/benchmarks.md, "cxr attribution").
IG_STEPS = 4
#: Integration steps of layer Integrated Gradients (only the head runs per step;
#: timing in docs/benchmarks.md, "Chest X-ray attribution").
LAYER_IG_STEPS = 16


class AttributionMethod(enum.StrEnum):
    """Attribution methods (captum classes)."""

    INTEGRATED_GRADIENTS = "integrated-gradients"
    DEEPLIFT = "deeplift"
    #: Integrated Gradients of a :class:`LayerSplit`'s stem output (layer attribution).
    LAYER_INTEGRATED_GRADIENTS = "layer-integrated-gradients"

    @property
    def display_name(self) -> str:
        """Name for reports."""
        return {"integrated-gradients": "Integrated Gradients",
                "deeplift": "DeepLIFT",
                "layer-integrated-gradients": "Layer Integrated Gradients"}[self.value]


class Baseline(enum.StrEnum):
    """The reference the attribution integrates from."""

    #: The input blurred by a Gaussian of :data:`BASELINE_SIGMA_FRACTION` of its side
    #: (for a layer method: the stem's output of that blurred input).
    BLURRED = "blurred"
    #: All zeros (the input, or for a layer method the layer's activations).
    ZERO = "zero"


@runtime_checkable
class LayerSplit(Protocol):
    """A network cut at the attributed layer: ``forward(x, *extra) == head(stem(x), *extra)``."""

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        """Activations ``(batch, C, h, w)`` of the attributed layer."""
        ...

    def head(self, features: torch.Tensor, *extra: object) -> torch.Tensor:
        """The abnormality logit ``(batch,)`` of those activations."""
        ...


@dataclass(frozen=True)
class Attribution:
    """A lung-restricted heatmap on the analysis image."""

    #: ``float32`` ``(rows, cols)`` in ``[0, 1]``, 0 outside the lungs.
    heatmap: npt.NDArray[np.float32]
    method: AttributionMethod
    #: Wall time of the attribution (forward/backward passes and post-processing).
    seconds: float

    @property
    def peak(self) -> tuple[int, int] | None:
        """``(row, col)`` of the maximum, None for an all-zero heatmap."""
        if not self.heatmap.any():
            return None
        r, c = np.unravel_index(int(np.argmax(self.heatmap)), self.heatmap.shape)
        return int(r), int(c)


class _Logit:
    """``net`` output reduced to one abnormality logit per sample, as captum expects."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net

    def __call__(self, x: torch.Tensor, *extra: object) -> torch.Tensor:
        out: torch.Tensor = self.net(x, *extra)
        return out.reshape(x.shape[0], -1)[:, 0]


def _wrapped(net: torch.nn.Module) -> torch.nn.Module:
    import torch

    class LogitModule(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x: torch.Tensor, *extra: object) -> torch.Tensor:
            out: torch.Tensor = self.inner(x, *extra)
            return out.reshape(x.shape[0], -1)[:, :1]

    return LogitModule(net).eval()


@contextmanager
def _input_gradients_only(net: torch.nn.Module) -> Iterator[None]:
    """No parameter gradients during attribution (half the backward cost); restored after."""
    saved = [(p, p.requires_grad) for p in net.parameters()]
    try:
        for p, _ in saved:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)


def _blurred(x: torch.Tensor, sigma: float) -> torch.Tensor:
    import torch

    arr = x.detach().cpu().numpy()
    out = np.stack([np.stack([ndimage.gaussian_filter(ch, sigma) for ch in sample])
                    for sample in arr]).astype(arr.dtype)
    return torch.from_numpy(out).to(x.device)


def _layer_ig(net: LayerSplit, inp: torch.Tensor, base: torch.Tensor, baseline: Baseline,
              steps: int, extra: tuple[object, ...]) -> torch.Tensor:
    import torch
    from captum.attr import IntegratedGradients

    with torch.no_grad():
        feats = net.stem(inp)
        ref = net.stem(base) if baseline is Baseline.BLURRED else torch.zeros_like(feats)
    cells: torch.Tensor = IntegratedGradients(net.head).attribute(
        feats, baselines=ref, additional_forward_args=extra or None,
        n_steps=steps, internal_batch_size=steps)
    return cells.detach()


def layer_attribution(net: torch.nn.Module, x: torch.Tensor, steps: int = LAYER_IG_STEPS,
                      extra: tuple[object, ...] = (),
                      baseline: Baseline | str = Baseline.BLURRED) -> torch.Tensor:
    """Layer Integrated Gradients ``(1, C, h, w)`` of ``net.stem(x)`` towards ``net.head``.

    The same quantity as captum's ``LayerIntegratedGradients`` on the layer whose
    output ``stem`` returns, with the layer baseline ``stem(baseline input)``
    (or zeros for :attr:`Baseline.ZERO`); the stem runs twice, not once per step.

    Raises
    ------
    ValueError
        ``net`` is not a :class:`LayerSplit`, or ``baseline`` is unknown.
    """
    import torch

    baseline = Baseline(baseline)
    if not isinstance(net, LayerSplit):
        raise ValueError(f"layer attribution needs a network with stem() and head() "
                         f"(a LayerSplit), not {type(net).__name__}")
    inp = x.detach().clone().float()
    side = float(max(x.shape[-2:]))
    base = (_blurred(inp, BASELINE_SIGMA_FRACTION * side)
            if baseline is Baseline.BLURRED else torch.zeros_like(inp))
    with torch.inference_mode(False), torch.enable_grad(), _input_gradients_only(net):
        return _layer_ig(net, inp, base, baseline, steps, extra)


def attribute(net: torch.nn.Module, x: torch.Tensor,
              method: AttributionMethod | str = AttributionMethod.INTEGRATED_GRADIENTS,
              steps: int | None = None, extra: tuple[object, ...] = (),
              baseline: Baseline | str = Baseline.BLURRED,
              ) -> npt.NDArray[np.float32]:
    """Signed attribution ``(H, W)`` of ``x`` (``(1, C, H, W)``) towards the abnormality logit.

    ``extra`` are further arguments of ``net.forward`` after ``x`` (e.g. the
    ``cxr-abnormal`` network's lung grid); they are not attributed.  ``steps``
    (Integrated Gradients) defaults to :data:`IG_STEPS`, or :data:`LAYER_IG_STEPS`
    for the layer method, whose per-cell attribution is upsampled to ``(H, W)``.

    Raises
    ------
    ValueError
        ``x`` is not one ``(1, C, H, W)`` sample, ``method`` or ``baseline`` is
        unknown, or the layer method is asked of a network that is not a
        :class:`LayerSplit`.
    """
    import torch
    from captum.attr import DeepLift, IntegratedGradients

    method = AttributionMethod(method)
    baseline = Baseline(baseline)
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one (1, C, H, W) input, got {tuple(x.shape)}")
    if method is AttributionMethod.LAYER_INTEGRATED_GRADIENTS:
        cells = layer_attribution(net, x, LAYER_IG_STEPS if steps is None else steps,
                                  extra, baseline)
        attr = torch.nn.functional.interpolate(
            cells.sum(dim=1, keepdim=True), size=tuple(x.shape[-2:]),
            mode="bilinear", align_corners=False)
        return np.ascontiguousarray(attr[0, 0].cpu().numpy(), dtype=np.float32)
    if steps is None:
        steps = IG_STEPS
    side = float(max(x.shape[-2:]))
    with torch.inference_mode(False), torch.enable_grad(), _input_gradients_only(net):
        inp = x.detach().clone().float()
        base = (_blurred(inp, BASELINE_SIGMA_FRACTION * side)
                if baseline is Baseline.BLURRED else torch.zeros_like(inp))
        if method is AttributionMethod.INTEGRATED_GRADIENTS:
            attr = IntegratedGradients(_Logit(net)).attribute(
                inp, baselines=base, additional_forward_args=extra or None,
                n_steps=steps, internal_batch_size=steps)
        else:
            attr = DeepLift(_wrapped(net)).attribute(
                inp, baselines=base, target=0, additional_forward_args=extra or None)
    out = attr.detach().sum(dim=1)[0].cpu().numpy()
    return np.ascontiguousarray(out, dtype=np.float32)


def from_letterbox(a: npt.NDArray[np.floating], shape: tuple[int, int]
                   ) -> npt.NDArray[np.float32]:
    """Map a square network-input array back to an image of ``shape`` (rows, cols).

    The inverse of :func:`cad_node.pipelines.cxr.lungs.letterbox` (pad bottom /
    right to a square, resample): resample to the square side, crop.
    """
    import torch

    rows, cols = shape
    side = max(rows, cols)
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]
    with torch.inference_mode():
        big = torch.nn.functional.interpolate(t, size=(side, side), mode="bilinear",
                                              align_corners=False)
    return np.ascontiguousarray(big[0, 0, :rows, :cols].numpy(), dtype=np.float32)


def lung_heatmap(
    net: torch.nn.Module,
    x: torch.Tensor,
    lungs: npt.NDArray[np.bool_],
    to_image: Callable[[npt.NDArray[np.float32]], npt.NDArray[np.float32]],
    method: AttributionMethod | str = AttributionMethod.INTEGRATED_GRADIENTS,
    steps: int | None = None,
    extra: tuple[object, ...] = (),
    baseline: Baseline | str = Baseline.BLURRED,
) -> Attribution:
    """The smoothed, lung-restricted heatmap of the abnormality model (module recipe).

    Parameters
    ----------
    net : torch.nn.Module
        The abnormality network (eval mode); its output's first element per
        sample is the abnormality logit.
    x : torch.Tensor
        Its preprocessed input, ``(1, C, H, W)``.
    lungs : numpy.ndarray
        ``bool`` union of the lung masks on the analysis image.
    to_image : callable
        Maps an ``(H, W)`` network-input array to the analysis image's shape.
    method, steps
        Attribution method and Integrated Gradients steps (default: :func:`attribute`'s).
    extra : tuple
        Further arguments of ``net.forward`` (not attributed).
    baseline : Baseline
        The reference the attribution integrates from.
    """
    start = time.perf_counter()
    method = AttributionMethod(method)
    raw = attribute(net, x, method, steps, extra, baseline)
    positive = np.maximum(raw, 0.0)
    smooth = ndimage.gaussian_filter(positive, SMOOTH_SIGMA_FRACTION * max(raw.shape))
    heat = to_image(smooth.astype(np.float32))
    if heat.shape != lungs.shape:
        raise ValueError(f"the mapped heatmap is {heat.shape}, the lung mask {lungs.shape}")
    heat = np.where(lungs, np.maximum(heat, 0.0), 0.0)
    top = float(heat.max())
    heat = heat / top if top > 0 else np.zeros_like(heat)
    out = np.clip(heat, 0.0, 1.0).astype(np.float32)
    return Attribution(out, method, time.perf_counter() - start)
