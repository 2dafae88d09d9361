"""Test-time flips of the CNN scorer (``tta_flips`` in a bundle's input spec)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
import torch
from pydantic import ValidationError

from cad_node.models import load_bundle
from cad_node.models.bundle import InputSpec, device_uid_for
from cad_node.models.network import DEFAULT_ARCHITECTURE, build_network
from cad_node.models.patches import extract_patches
from cad_node.models.scorer import CandidateScorer, flip_averaged_logits
from trainer.export import write_bundle

SPEC = {"spacing_mm": [1.0, 1.0, 1.0], "patch_size": [16, 16, 16],
        "hu_window": [-1000.0, 400.0], "batch_size": 4}


class _Weighted(torch.nn.Module):
    """``tanh(sum(w * x))`` per patch: flip-invariant exactly when ``w`` is."""

    def __init__(self, w: np.ndarray) -> None:
        super().__init__()
        self.w = torch.from_numpy(w.astype(np.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh((x[:, 0] * self.w).sum(dim=(1, 2, 3)) / 50.0)


def _by_numpy_flips(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The 8-flip mean of ``tanh(sum(w * x) / 50)``, flipping ``x`` with numpy."""
    outs = []
    for fz, fy, fx in itertools.product((False, True), repeat=3):
        axes = tuple(a for a, f in zip((1, 2, 3), (fz, fy, fx), strict=True) if f)
        v = np.flip(x[:, 0], axis=axes) if axes else x[:, 0]
        outs.append(np.tanh((v * w).sum(axis=(1, 2, 3)) / 50.0))
    return np.mean(outs, axis=0)


def test_flip_invariant_network_gives_the_plain_logit() -> None:
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.random((5, 1, 6, 8, 10)).astype(np.float32))
    # w(z, y, x) = a(z) b(y) c(x), each a palindrome: unchanged by any axis flip.
    a, b, c = (np.concatenate([v, v[::-1]]) for v in (rng.random(3), rng.random(4),
                                                        rng.random(5)))
    net = _Weighted(np.einsum("i,j,k->ijk", a, b, c))
    plain = flip_averaged_logits(net, x, None)
    np.testing.assert_allclose(flip_averaged_logits(net, x, 8).numpy(), plain.numpy(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(flip_averaged_logits(net, x, 1).numpy(), plain.numpy())


def test_eight_flips_average_a_non_invariant_network() -> None:
    rng = np.random.default_rng(4)
    x = rng.random((3, 1, 6, 8, 10)).astype(np.float32)
    w = rng.normal(size=(6, 8, 10))
    net = _Weighted(w)
    tta = flip_averaged_logits(net, torch.from_numpy(x), 8).numpy()
    np.testing.assert_allclose(tta, _by_numpy_flips(w, x), rtol=1e-4, atol=1e-6)
    assert not np.allclose(tta, net(torch.from_numpy(x)).numpy(), atol=1e-3)
    with pytest.raises(ValueError, match="tta_flips"):
        flip_averaged_logits(net, torch.from_numpy(x), 4)
    with pytest.raises(ValueError, match="shape"):
        flip_averaged_logits(net, torch.from_numpy(x[:, 0]), 8)


def test_input_spec_field_and_device_uid() -> None:
    assert InputSpec.model_validate(SPEC).tta_flips is None
    assert InputSpec.model_validate({**SPEC, "tta_flips": 8}).tta_flips == 8
    with pytest.raises(ValidationError, match="tta_flips"):
        InputSpec.model_validate({**SPEC, "tta_flips": 4})
    sha = "ab" * 32
    plain = device_uid_for(sha, 0.55)
    assert device_uid_for(sha, 0.55, None, None, None) == plain
    assert device_uid_for(sha, 0.55, None, None, 8) != plain
    assert device_uid_for(sha, 0.55, None, None, 8) == device_uid_for(sha, 0.55, None, None, 8)
    assert device_uid_for(sha, 0.55, None, 2.5, 8) != device_uid_for(sha, 0.55, None, None, 8)


def _image() -> sitk.Image:
    rng = np.random.default_rng(5)
    img = sitk.GetImageFromArray(rng.normal(-500, 300, (30, 40, 40)).astype(np.float32))
    img.SetSpacing((0.9, 0.9, 1.5))
    img.SetOrigin((-18.0, -18.0, -22.0))
    return img


def test_bundle_without_the_field_is_unchanged_and_with_it_averages(tmp_path: Path) -> None:
    arch = {**DEFAULT_ARCHITECTURE, "channels": [4, 8], "strides": [2, 2]}
    torch.manual_seed(0)
    net = build_network(arch).eval()
    for version, spec in (("1.0.0", SPEC), ("1.0.1", {**SPEC, "tta_flips": 8})):
        write_bundle(tmp_path, name="toy", version=version, state_dict=net.state_dict(),
                     task="ct-nodule-candidate-scoring", architecture=arch, input_spec=spec,
                     training_data={"description": "untrained (test)"})
    plain_b = load_bundle("toy", version="1.0.0", models_dir=tmp_path)
    tta_b = load_bundle("toy", version="1.0.1", models_dir=tmp_path)
    on_disk = json.loads((tmp_path / "toy" / "1.0.0" / "manifest.json").read_text())
    assert on_disk["input"].get("tta_flips") is None
    assert plain_b.manifest.device_uid == device_uid_for(plain_b.manifest.weights_sha256)
    assert tta_b.manifest.device_uid != plain_b.manifest.device_uid

    img = _image()
    centers = np.array([[0.0, 0.0, 0.0], [3.0, -4.0, 2.5], [-6.0, 5.0, -3.0]])
    x = extract_patches(img, centers, (16, 16, 16), (1.0, 1.0, 1.0), hu_window=(-1000, 400))
    with torch.no_grad():
        one = net(torch.from_numpy(x[:, None])).numpy()
        flips = [net(torch.from_numpy(np.ascontiguousarray(
            np.flip(x, axis=axes) if axes else x)[:, None])).numpy()
            for r in range(4) for axes in itertools.combinations((1, 2, 3), r)]
    assert len(flips) == 8
    # No field: exactly one pass on the patch as it is, as before the field existed.
    np.testing.assert_allclose(CandidateScorer(plain_b).logits(img, centers), one,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(CandidateScorer(tta_b).logits(img, centers),
                               np.mean(flips, axis=0), rtol=1e-4, atol=1e-6)


def test_trainer_scores_like_the_node_with_and_without_flips(tmp_path: Path) -> None:
    """The trainer's evaluation (score_points) sees the node's TTA scores, field for field."""
    from types import SimpleNamespace

    from cad_node.models.patches import VolumeGeometry
    from trainer.config import InputConfig
    from trainer.heldout import score_points

    arch = {**DEFAULT_ARCHITECTURE, "channels": [4, 8], "strides": [2, 2]}
    torch.manual_seed(1)
    net = build_network(arch).eval()
    img = _image()
    hu = sitk.GetArrayFromImage(img).astype(np.float32)
    bg = SimpleNamespace(geometry=VolumeGeometry.of(img))
    centers = np.array([[1.0, -2.0, 0.5], [-5.0, 4.0, 3.0]])
    for version, flips in (("1.0.0", None), ("1.0.1", 8)):
        spec = {**SPEC, "tta_flips": flips} if flips else SPEC
        write_bundle(tmp_path, name="toy", version=version, state_dict=net.state_dict(),
                     task="ct-nodule-candidate-scoring", architecture=arch, input_spec=spec,
                     training_data={"description": "untrained (test)"})
        node = CandidateScorer(load_bundle("toy", version=version, models_dir=tmp_path))
        cfg = InputConfig(spacing_mm=(1.0, 1.0, 1.0), patch_size=(16, 16, 16),
                          batch_size=4, tta_flips=flips)
        np.testing.assert_allclose(
            score_points(net, hu, bg, centers, cfg, torch.device("cpu")),  # type: ignore[arg-type]
            node.score(img, centers), rtol=1e-4, atol=1e-6)
