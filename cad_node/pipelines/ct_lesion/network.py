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
    """

    def __init__(self, in_channels: int = 3, channels: Sequence[int] = (16, 32, 48, 64),
                 neck: int = 32, n_types: int = 8) -> None:
        super().__init__()
        if len(channels) != 4:
            raise ValueError("channels needs 4 values (stem and three stages)")
        c0, c1, c2, c3 = (int(c) for c in channels)
        self.stem = _conv(in_channels, c0, 2)
        self.enc1 = ResidualUnit(2, c0, c1, strides=2, subunits=2, norm="BATCH")
        self.enc2 = ResidualUnit(2, c1, c2, strides=2, subunits=2, norm="BATCH")
        self.enc3 = ResidualUnit(2, c2, c3, strides=2, subunits=2, norm="BATCH")
        self.up2 = _conv(c3 + c2, c2)
        self.up1 = _conv(c2 + c1, neck)
        self.heatmap = _head(neck, 1, neck)
        self.size = _head(neck, 2, neck)
        self.offset = _head(neck, 2, neck)
        self.type_logits = _head(neck, n_types, neck)
        last = self.heatmap[-1]
        assert isinstance(last, nn.Conv2d) and last.bias is not None
        nn.init.constant_(last.bias, _HEATMAP_BIAS)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Return the four output maps (module docstring)."""
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
