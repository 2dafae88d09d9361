"""Tuberculosis probability from lung-masked image features (the optional ``cxr-tb`` bundle).

The network (:class:`TbNet`, builder ``cxr-tb`` in
:mod:`cad_node.models.network`) sees two channels at the bundle's square
``input.size`` (:func:`tb_input`): the radiograph letter-boxed and
histogram-equalised exactly as the lung segmenter sees it
(:func:`cad_node.pipelines.cxr.lungs.network_input`), set to 0 outside the
lungs, and the lung mask itself.  Convolutional features are averaged
*inside the lungs only* (mask-weighted pooling), then an MLP gives one TB
logit: "CNN features of the segmented lungs plus an MLP", as the reference
system of issue #12.

Contract
--------
* :func:`load_tb_model` returns None when no ``cxr-tb`` bundle is installed
  (the pipeline then states that TB screening is not installed and reports no
  number); it raises :class:`ValueError` for a bundle that is present but
  unusable (the pipeline reports that, still without a number);
* :meth:`TbModel.classify` gives an
  :class:`~cad_node.results.findings.ImageClassification` with the bundle's
  operating threshold and rule (``output.operating_threshold`` /
  ``operating_rule``);
* no download, no training here: :mod:`trainer.cxr_tb` trains and exports.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from cad_node.pipelines.cxr.lungs import letterbox, network_input
from cad_node.results.findings import FindingType, ImageClassification

if TYPE_CHECKING:
    from cad_node.models.bundle import ModelBundle

__all__ = ["TB_BUNDLE", "TbModel", "TbNet", "load_tb_model", "not_installed_statement",
           "tb_input"]

#: Name of the optional tuberculosis bundle (``models/cxr-tb/<version>``).
TB_BUNDLE = "cxr-tb"
_CACHE: dict[str, TbModel] = {}
_LOCK = threading.Lock()


class TbNet(nn.Module):
    """Conv features pooled inside the lungs, then an MLP: one TB logit per image.

    Parameters
    ----------
    channels : sequence of int
        Output channels of the conv blocks (each conv-BN-ReLU, then 2x2 max pooling).
    hidden : int
        Width of the MLP's hidden layer.
    dropout : float
        Dropout before the last layer.
    """

    def __init__(self, channels: Sequence[int] = (16, 32, 64, 96), hidden: int = 64,
                 dropout: float = 0.2) -> None:
        super().__init__()
        if not channels or any(c < 1 for c in channels) or hidden < 1:
            raise ValueError(f"invalid TbNet channels {channels} / hidden {hidden}")
        layers: list[nn.Module] = []
        in_ch = 1
        for c in channels:
            layers += [nn.Conv2d(in_ch, c, 3, padding=1, bias=False), nn.BatchNorm2d(c),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            in_ch = c
        self.features = nn.Sequential(*layers)
        self.levels = len(channels)
        self.head = nn.Sequential(nn.Linear(2 * in_ch, hidden), nn.ReLU(inplace=True),
                                  nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(N, 2, S, S)`` (masked image, lung mask); returns logits ``(N,)``."""
        image, mask = x[:, :1], x[:, 1:2]
        f = self.features(image)
        m = nn.functional.adaptive_avg_pool2d(mask, f.shape[-2:])
        weight = m / m.sum(dim=(2, 3), keepdim=True).clamp_min(1e-6)
        mean = (f * weight).sum(dim=(2, 3))
        peak = (f * (m > 0.25)).amax(dim=(2, 3))
        logits: torch.Tensor = self.head(torch.cat([mean, peak], dim=1)).squeeze(1)
        return logits


def tb_input(image: npt.NDArray[np.floating], lungs: npt.NDArray[np.bool_], size: int
             ) -> npt.NDArray[np.float32]:
    """The ``(2, size, size)`` network input of one radiograph and its lung mask.

    Raises
    ------
    ValueError
        Image and mask shapes differ.
    """
    if image.shape != lungs.shape:
        raise ValueError(f"image {image.shape} and lung mask {lungs.shape} differ")
    mask = letterbox(lungs.astype(np.float32), size) >= 0.5
    x = network_input(image, size)
    return np.stack([np.where(mask, x, 0.0), mask.astype(np.float32)]).astype(np.float32)


@dataclass(frozen=True)
class TbModel:
    """A loaded ``cxr-tb`` bundle and its network."""

    bundle: ModelBundle
    net: nn.Module

    @property
    def size(self) -> int:
        """The network's input side."""
        spec = self.bundle.manifest.input
        return int(getattr(spec, "size", 256))

    def probability(self, image: npt.NDArray[np.floating], lungs: npt.NDArray[np.bool_]
                    ) -> float:
        """TB probability of one radiograph (``[0, 1]`` display values) with its lungs."""
        x = torch.from_numpy(tb_input(image, lungs, self.size))[None]
        with torch.inference_mode():
            return float(torch.sigmoid(self.net(x))[0])

    def classify(self, image: npt.NDArray[np.floating], lungs: npt.NDArray[np.bool_]
                 ) -> ImageClassification:
        """The TB probability and its decision at the bundle's operating point."""
        out = self.bundle.manifest.output
        return ImageClassification(
            finding_type=FindingType.TUBERCULOSIS,
            probability=self.probability(image, lungs),
            threshold=out.operating_threshold,
            operating_rule=out.operating_rule,
            model=self.bundle.identity,
        )


def load_tb_model(models_dir: Path | None = None, device: str = "cpu") -> TbModel | None:
    """The installed ``cxr-tb`` bundle (highest version), None when none is installed.

    Raises
    ------
    ValueError
        A bundle is installed but unusable (bad manifest, weights, architecture).
    """
    from cad_node.models.bundle import list_versions, load_bundle

    if not list_versions(TB_BUNDLE, models_dir):
        return None
    bundle = load_bundle(TB_BUNDLE, models_dir)
    key = f"{bundle.path}|{bundle.manifest.weights_sha256}|{device}"
    with _LOCK:
        model = _CACHE.get(key)
        if model is None:
            model = TbModel(bundle, bundle.build_network(device))
            _CACHE[key] = model
    return model


def not_installed_statement() -> str:
    """What the report says without a ``cxr-tb`` bundle (no number, issue #12)."""
    return (f"TB screening not installed (no {TB_BUNDLE} bundle): no tuberculosis "
            "probability is reported")
