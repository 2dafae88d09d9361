"""Attribution heatmaps (captum) on a small classifier trained here on phantoms with known lesions.

The classifier (conv layers, global max pooling) learns "a round opacity in
a lung" from :func:`trainer.cxr_synthetic.make_radiograph` phantoms; on
held-out positives the lung-restricted heatmap must be zero outside the
lungs and peak inside the lesion box, for Integrated Gradients, DeepLIFT and
layer Integrated Gradients (of its first convolution's output).  The layer
method is checked against captum's own ``LayerIntegratedGradients``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cad_node.pipelines.cxr.attribution import (
    BASELINE_SIGMA_FRACTION,
    AttributionMethod,
    Baseline,
    attribute,
    from_letterbox,
    layer_attribution,
    lung_heatmap,
)
from cad_node.pipelines.cxr.lungs import letterbox
from trainer.cxr_synthetic import make_radiograph

SIZE = 64


class _Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 9, padding=4), torch.nn.ReLU(), torch.nn.Conv2d(4, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).amax(dim=(1, 2, 3))

    # a LayerSplit at the first convolution's output
    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.features[0](x)

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return self.features[2](self.features[1](f)).amax(dim=(1, 2, 3))


def _batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    phantoms = [make_radiograph(rng, SIZE, lesions=k % 2, lesion_radius=4.0) for k in range(n)]
    x = torch.from_numpy(np.stack([p.image for p in phantoms]) * 2 - 1)[:, None]
    y = torch.tensor([k % 2 for k in range(n)], dtype=torch.float32)
    return x, y, phantoms


@pytest.fixture(scope="module")
def trained() -> _Classifier:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    net = _Classifier()
    opt = torch.optim.Adam(net.parameters(), lr=2e-2)
    x, y, _ = _batch(rng, 80)
    for _ in range(30):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(x), y)
        loss.backward()
        opt.step()
    net.eval()
    xt, yt, _ = _batch(np.random.default_rng(1), 40)
    with torch.no_grad():
        p = torch.sigmoid(net(xt))
    accuracy = float(((p > 0.5).float() == yt).float().mean())
    assert accuracy >= 0.9, accuracy  # the model must have learned the lesions
    return net


@pytest.mark.parametrize("method", list(AttributionMethod))
def test_heatmap_inside_lungs_and_peaks_on_the_lesion(trained: _Classifier,
                                                      method: AttributionMethod) -> None:
    rng = np.random.default_rng(7)
    hits, n = 0, 12
    for _ in range(n):
        ph = make_radiograph(rng, SIZE, lesions=1, lesion_radius=4.0)
        lungs = ph.right_lung | ph.left_lung
        x = torch.from_numpy(ph.image * 2 - 1)[None, None]
        with torch.inference_mode():  # as the pipeline calls it
            att = lung_heatmap(trained, x, lungs, lambda a: a, method)
        heat = att.heatmap
        assert heat.dtype == np.float32 and heat.shape == lungs.shape
        assert float(heat[~lungs].max(initial=0.0)) == 0.0
        assert 0.0 <= float(heat.min()) and float(heat.max()) == pytest.approx(1.0)
        assert att.peak is not None
        r, c = att.peak
        x0, y0, x1, y1 = ph.boxes[0]
        hits += int(x0 <= c <= x1 and y0 <= r <= y1)
    assert hits >= 0.8 * n, hits
    assert all(p.requires_grad for p in trained.parameters())  # restored


def test_from_letterbox_inverts_the_letterbox() -> None:
    image = np.zeros((40, 60), np.float32)
    image[10:20, 30:50] = 1.0
    square = letterbox(image, 32)
    back = from_letterbox(square, image.shape)
    assert back.shape == image.shape
    assert float(back[15, 40]) > 0.8 and float(back[35, 5]) < 0.1


def test_no_positive_evidence_gives_an_all_zero_map(trained: _Classifier) -> None:
    ph = make_radiograph(np.random.default_rng(3), SIZE)
    lungs = np.zeros_like(ph.right_lung)  # nothing to attribute to
    att = lung_heatmap(trained, torch.from_numpy(ph.image * 2 - 1)[None, None], lungs,
                       lambda a: a)
    assert not att.heatmap.any() and att.peak is None


@pytest.mark.parametrize("baseline", list(Baseline))
def test_layer_attribution_is_captums_layer_integrated_gradients(
        trained: _Classifier, baseline: Baseline) -> None:
    """Same steps, same layer baseline: equal to captum's LayerIntegratedGradients."""
    from captum.attr import LayerIntegratedGradients
    from scipy import ndimage

    ph = make_radiograph(np.random.default_rng(11), SIZE, lesions=1, lesion_radius=4.0)
    x = torch.from_numpy(ph.image * 2 - 1)[None, None]
    ours = layer_attribution(trained, x, steps=8, baseline=baseline)
    if baseline is Baseline.BLURRED:
        base = torch.from_numpy(ndimage.gaussian_filter(
            x[0, 0].numpy(), BASELINE_SIGMA_FRACTION * SIZE))[None, None]
        lig = LayerIntegratedGradients(trained, trained.features[0])
        ref = lig.attribute(x, baselines=base, n_steps=8)
    else:  # zero layer activations: captum's IG on the head from zeros
        from captum.attr import IntegratedGradients

        f = trained.stem(x).detach()
        ref = IntegratedGradients(trained.head).attribute(f, baselines=torch.zeros_like(f),
                                                          n_steps=8)
    assert ours.shape == ref.shape == (1, 4, SIZE, SIZE)
    assert float(ref.abs().max()) > 0
    torch.testing.assert_close(ours, ref.detach(), rtol=1e-4, atol=1e-5)


def test_layer_method_needs_a_layer_split() -> None:
    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 3, padding=1), torch.nn.Flatten(),
                                torch.nn.LazyLinear(1))
    x = torch.zeros(1, 1, 8, 8)
    plain(x)
    with pytest.raises(ValueError, match="LayerSplit"):
        attribute(plain, x, AttributionMethod.LAYER_INTEGRATED_GRADIENTS)
    with pytest.raises(ValueError, match="LayerSplit"):
        layer_attribution(plain, x)
