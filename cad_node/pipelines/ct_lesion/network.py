"""Anchor-free 2.5-D lesion detector (CenterNet-style) built from MONAI blocks.

Input ``(N, 3, H, W)``: three neighbouring slices (key - 2 mm, key, key + 2 mm)
in the DeepLesion HU window (:mod:`.slices`).  Output at stride 4, a dict of

``heatmap`` ``(N, 1, H/4, W/4)``
    Logit of a lesion centre (Gaussian-splat targets, focal loss).
``size`` ``(N, 2, H/4, W/4)``
    ``log`` of box width and height in input pixels.
``offset`` ``(N, 2, H/4, W/4)``
    Sub-cell centre offset in output cells, ``[0, 1)``.
``type_logits`` ``(N, 8, H/4, W/4)``
    The 8 DeepLesion coarse types (:data:`LESION_TYPE_NAMES`).

Optional fixed HU windows (``windows``, bundles from 1.1.0): the network maps
its input back to HU and re-windows each slice channel into every listed
window (e.g. soft tissue ``[-160, 240]``), so the low-contrast soft-tissue
detail is not lost in the wide DeepLesion window a small network trained
briefly cannot stretch; the input convention is unchanged.

Encoder: a strided :class:`monai.networks.blocks.Convolution` stem and three
strided :class:`monai.networks.blocks.ResidualUnit` stages (strides 2, 4, 8,
16); decoder: two upsampling steps with skip connections back to stride 4
(a small U-Net/FPN neck); one small convolutional head per output.  No
torchvision.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks.convolutions import Convolution, ResidualUnit
from torch import nn

__all__ = ["LESION_TYPE_NAMES", "OUTPUT_STRIDE", "LesionCenterNet"]

#: DeepLesion ``Coarse_lesion_type`` 1..8, in this order (head channel k is type k+1).
LESION_TYPE_NAMES: tuple[str, ...] = (
    "bone", "abdomen", "mediastinum", "liver", "lung", "kidney", "soft tissue", "pelvis",
)
#: Output stride of every head.
OUTPUT_STRIDE = 4
#: The input's HU window (:data:`cad_node.pipelines.ct_lesion.slices.HU_WINDOW`).
INPUT_HU_WINDOW = (-1024.0, 3071.0)
#: Prior of the heatmap bias (CenterNet: -2.19 = logit(0.1)).
_HEATMAP_BIAS = -2.19


def _conv(c_in: int, c_out: int, stride: int = 1) -> Convolution:
    return Convolution(spatial_dims=2, in_channels=c_in, out_channels=c_out, strides=stride,
                       kernel_size=3, act="RELU", norm="BATCH")


def _head(c_in: int, c_out: int, width: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, width, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(width, c_out, 1)
    )


class LesionCenterNet(nn.Module):
    """CenterNet-style detector (see module docstring).

    Parameters
    ----------
    in_channels : int
        Slices stacked as channels (3).
    channels : sequence of int
        Stem then the three encoder stages (4 values).
    neck : int
        Channels of the stride-4 feature map the heads read.
    n_types : int
        Lesion types (8).
    windows : sequence of (float, float), optional
        HU windows ``(low, high)`` every slice channel is re-windowed into
        (module docstring); ``None``: the input as it is (bundle 1.0.0).
    head_width : int, optional
        Hidden channels of each head (default ``neck``); fewer is a
        lower-capacity head.
    """

    #: Buffers of the optional HU windows, shape ``(1, windows, 1, 1, 1)``.
    window_low: torch.Tensor
    window_width: torch.Tensor

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (16, 32, 48, 64),
                 neck: int = 32, n_types: int = 8,
                 windows: Sequence[Sequence[float]] | None = None,
                 head_width: int | None = None) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError("channels needs 4 values (stem and three stages)")
        c0, c1, c2, c3 = (int(c) for c in channels)
        self.windowed = windows is not None
        if windows is not None:
            w = torch.tensor([[float(v) for v in pair] for pair in windows], dtype=torch.float32)
            if w.ndim != 2 or w.shape[1] != 2 or w.shape[0] < 1 or bool((w[:, 1] <= w[:, 0]).any()):
                raise ValueError(f"windows must be (low, high) pairs with high > low: {windows}")
            self.register_buffer("window_low", w[:, 0].reshape(1, -1, 1, 1, 1))
            self.register_buffer("window_width", (w[:, 1] - w[:, 0]).reshape(1, -1, 1, 1, 1))
        stem_in = in_channels * (len(windows) if windows is not None else 1)
        hw = int(head_width) if head_width is not None else neck
        self.stem = _conv(stem_in, c0, 2)
        self.enc1 = ResidualUnit(2, c0, c1, strides=2, subunits=2, norm="BATCH")
        self.enc2 = ResidualUnit(2, c1, c2, strides=2, subunits=2, norm="BATCH")
        self.enc3 = ResidualUnit(2, c2, c3, strides=2, subunits=2, norm="BATCH")
        self.up2 = _conv(c3 + c2, c2)
        self.up1 = _conv(c2 + c1, neck)
        self.heatmap = _head(neck, 1, hw)
        self.size = _head(neck, 2, hw)
        self.offset = _head(neck, 2, hw)
        self.type_logits = _head(neck, n_types, hw)
        last = self.heatmap[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        nn.init.constant_(last.bias, _HEATMAP_BIAS)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the four output maps (module docstring)."""
        if self.windowed:
            lo, hi = INPUT_HU_WINDOW
            hu = (x * (hi - lo) + lo).unsqueeze(1)  # (N, 1, slices, H, W)
            x = ((hu - self.window_low) / self.window_width).clamp(0.0, 1.0).flatten(1, 2)
        f1 = self.enc1(self.stem(x))
        f2 = self.enc2(f1)
        f3 = self.enc3(f2)
        up = nn.functional.interpolate(f3, size=f2.shape[-2:], mode="nearest")
        g2 = self.up2(torch.cat([up, f2], 1))
        up = nn.functional.interpolate(g2, size=f1.shape[-2:], mode="nearest")
        g1 = self.up1(torch.cat([up, f1], 1))
        return {
            "heatmap": self.heatmap(g1),
            "size": self.size(g1),
            "offset": self.offset(g1),
            "type_logits": self.type_logits(g1),
        }
