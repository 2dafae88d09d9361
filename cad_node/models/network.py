"""The candidate-scorer network: a small 3-D residual CNN from MONAI blocks.

The architecture is described by a plain dict stored in the bundle manifest
(``architecture``), so a bundle fully determines the network it needs::

    {"builder": "residual3d", "in_channels": 1, "channels": [16, 32, 64],
     "strides": [2, 2, 2], "dropout": 0.1, "norm": "batch"}

``residual3d`` is a strided :class:`monai.networks.blocks.Convolution` stem
followed by :class:`monai.networks.blocks.ResidualUnit` stages, global average
pooling, dropout and one linear layer producing a single logit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.networks.blocks.convolutions import Convolution, ResidualUnit
from torch import nn

__all__ = [
    "DEFAULT_ARCHITECTURE",
    "UNET2D_ARCHITECTURE",
    "ResidualScorer3D",
    "build_network",
    "build_unet2d",
    "count_parameters",
]

#: Architecture of the shipped scorer (about 0.3 M parameters, ~1.1 MB float32).
DEFAULT_ARCHITECTURE: dict[str, Any] = {
    "builder": "residual3d",
    "in_channels": 1,
    "channels": [16, 32, 64],
    "strides": [2, 2, 2],
    "dropout": 0.1,
    "norm": "batch",
}

_NORMS = {"batch": "BATCH", "instance": "INSTANCE"}


class ResidualScorer3D(nn.Module):
    """Strided conv stem + residual stages + global pooling + linear logit.

    Parameters
    ----------
    in_channels : int
        Input channels (1 for a CT patch).
    channels : sequence of int
        Output channels of the stem and of each residual stage; the first
        entry is the stem.
    strides : sequence of int
        Stride of the stem and of each stage (same length as ``channels``).
    dropout : float
        Dropout before the linear layer.
    norm : {"batch", "instance"}
        Normalisation layer.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64),
        strides: Sequence[int] = (2, 2, 2),
        dropout: float = 0.1,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        if len(channels) != len(strides) or len(channels) < 1:
            raise ValueError("channels and strides must be non-empty and of equal length")
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {sorted(_NORMS)}, not {norm!r}")
        monai_norm = _NORMS[norm]
        layers: list[nn.Module] = [
            Convolution(
                spatial_dims=3,
                in_channels=in_channels,
                out_channels=channels[0],
                strides=strides[0],
                kernel_size=3,
                act="RELU",
                norm=monai_norm,
            )
        ]
        for c_in, c_out, stride in zip(channels[:-1], channels[1:], strides[1:], strict=True):
            layers.append(
                ResidualUnit(
                    spatial_dims=3,
                    in_channels=c_in,
                    out_channels=c_out,
                    strides=stride,
                    kernel_size=3,
                    subunits=2,
                    act="RELU",
                    norm=monai_norm,
                )
            )
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(channels[-1], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return one logit per patch, shape ``(N,)``."""
        h = self.pool(self.features(x)).flatten(1)
        logits: torch.Tensor = self.head(self.dropout(h)).squeeze(1)
        return logits


def build_network(architecture: Mapping[str, Any]) -> nn.Module:
    """Build the network an architecture dict describes.

    Raises
    ------
    ValueError
        Unknown builder or invalid arguments.
    """
    arch = dict(architecture)
    builder = arch.pop("builder", None)
    if builder == "unet2d":
        return build_unet2d(arch)
    if builder == "lesion-centernet":
        # the ct-lesion detector (cad_node.pipelines.ct_lesion.network)
        from cad_node.pipelines.ct_lesion.network import LesionCenterNet

        try:
            return LesionCenterNet(**arch)
        except TypeError as exc:
            raise ValueError(f"invalid architecture {architecture}: {exc}") from None
    if builder == "cxr-tb":
        # the chest X-ray TB head (cad_node.pipelines.cxr.tb)
        from cad_node.pipelines.cxr.tb import TbNet

        try:
            return TbNet(**arch)
        except TypeError as exc:
            raise ValueError(f"invalid architecture {architecture}: {exc}") from None
    if builder == "cxr-abnormal":
        # the chest radiograph abnormality scorer (cad_node.pipelines.cxr.abnormal_net)
        from cad_node.pipelines.cxr.abnormal_net import AbnormalNet

        try:
            return AbnormalNet(**arch)
        except TypeError as exc:
            raise ValueError(f"invalid architecture {architecture}: {exc}") from None
    if builder != "residual3d":
        raise ValueError(f"unknown network builder {builder!r} (known: 'residual3d', 'unet2d', "
                         "'lesion-centernet', 'cxr-tb', 'cxr-abnormal')")
    try:
        return ResidualScorer3D(**arch)
    except TypeError as exc:
        raise ValueError(f"invalid architecture {architecture}: {exc}") from None


#: Architecture of the shipped ``cxr-lungs`` segmenter: a MONAI residual U-Net
#: (about 1.6 M parameters) with three sigmoid output channels.
UNET2D_ARCHITECTURE: dict[str, Any] = {
    "builder": "unet2d",
    "in_channels": 1,
    "out_channels": 3,
    "channels": [16, 32, 64, 128, 256],
    "strides": [2, 2, 2, 2],
    "num_res_units": 2,
    "norm": "batch",
    "dropout": 0.0,
}


def build_unet2d(arguments: Mapping[str, Any]) -> nn.Module:
    """A 2-D :class:`monai.networks.nets.UNet` (residual units) from manifest arguments.

    Raises
    ------
    ValueError
        Missing or invalid arguments.
    """
    from monai.networks.nets.unet import UNet

    arch = dict(arguments)
    arch.pop("builder", None)
    norm = arch.pop("norm", "batch")
    if norm not in _NORMS:
        raise ValueError(f"norm must be one of {sorted(_NORMS)}, not {norm!r}")
    try:
        return UNet(spatial_dims=2, norm=_NORMS[norm], **arch)
    except (TypeError, ValueError, AssertionError) as exc:
        raise ValueError(f"invalid unet2d architecture {dict(arguments)}: {exc}") from None


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)
