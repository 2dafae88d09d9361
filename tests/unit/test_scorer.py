"""Patch extraction geometry and the CandidateScorer contract."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
import torch

from cad_node.models import load_bundle
from cad_node.models.network import DEFAULT_ARCHITECTURE, build_network
from cad_node.models.patches import extract_patches
from cad_node.models.scorer import CandidateScorer
from trainer.export import write_bundle

SIZE = (8, 6, 4)  # patch (D, H, W)
SPACING = (1.5, 1.0, 2.0)  # patch spacing (x, y, z) mm


def _linear_image(direction: tuple[float, ...]) -> sitk.Image:
    """A volume whose value is 2x + 3y - z + 100 at every patient point."""
    nx, ny, nz = 40, 30, 20
    spacing = (0.8, 0.7, 2.5)
    origin = (-10.0, 5.0, -60.0)
    img = sitk.Image(nx, ny, nz, sitk.sitkFloat32)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    d = np.asarray(direction).reshape(3, 3)
    k, j, i = np.meshgrid(np.arange(nz), np.arange(ny), np.arange(nx), indexing="ij")
    idx = np.stack([i, j, k], axis=-1).astype(float) * np.asarray(spacing)
    phys = idx @ d.T + np.asarray(origin)
    vals = 2 * phys[..., 0] + 3 * phys[..., 1] - phys[..., 2] + 100
    out = sitk.GetImageFromArray(vals.astype(np.float32))
    out.CopyInformation(img)
    return out


def _expected(center: np.ndarray) -> np.ndarray:
    d, h, w = SIZE
    sx, sy, sz = SPACING
    zz = (np.arange(d) - (d - 1) / 2) * sz + center[2]
    yy = (np.arange(h) - (h - 1) / 2) * sy + center[1]
    xx = (np.arange(w) - (w - 1) / 2) * sx + center[0]
    z, y, x = np.meshgrid(zz, yy, xx, indexing="ij")
    return 2 * x + 3 * y - z + 100


@pytest.mark.parametrize(
    "direction",
    [
        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
        # x axis flipped and y/z swapped: a coronal-like, left-right flipped grid.
        (-1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.0),
        # Oblique (rotated 10 degrees about z): the general gather path.
        (0.984807753, -0.173648178, 0.0, 0.173648178, 0.984807753, 0.0, 0.0, 0.0, 1.0),
    ],
)
def test_patches_sample_the_right_patient_points(direction: tuple[float, ...]) -> None:
    img = _linear_image(direction)
    # Points well inside the volume: trilinear interpolation of a linear field is exact.
    d = np.asarray(direction).reshape(3, 3)
    inner = np.array([[20.0, 15.0, 10.0], [17.3, 12.1, 8.6]])
    centers = (inner * np.asarray(img.GetSpacing())) @ d.T + np.asarray(img.GetOrigin())
    patches = extract_patches(img, centers, SIZE, SPACING)
    assert patches.shape == (2, *SIZE)
    for p, c in zip(patches, centers, strict=True):
        np.testing.assert_allclose(p, _expected(c), atol=1e-3)


def test_separable_path_matches_the_general_gather() -> None:
    """Axis-aligned grids take a separable fast path; it must equal map_coordinates."""
    from scipy import ndimage

    from cad_node.models.patches import VolumeGeometry, extract_patches_array

    rng = np.random.default_rng(1)
    vol = rng.normal(-500, 300, size=(20, 30, 40)).astype(np.float32)
    geom = VolumeGeometry((-10.0, 5.0, -60.0), (0.8, 0.7, 2.5), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    centers = geom.index_to_physical(np.array([[20.3, 14.8, 9.6], [18.0, 16.2, 11.1]]))
    fast = extract_patches_array(vol, geom, centers, SIZE, SPACING)
    d, h, w = SIZE
    sx, sy, sz = SPACING
    for p, c in zip(fast, centers, strict=True):
        zz, yy, xx = np.meshgrid(
            (np.arange(d) - (d - 1) / 2) * sz + c[2],
            (np.arange(h) - (h - 1) / 2) * sy + c[1],
            (np.arange(w) - (w - 1) / 2) * sx + c[0],
            indexing="ij",
        )
        idx = geom.physical_to_index(np.stack([xx.ravel(), yy.ravel(), zz.ravel()], axis=1))
        ref = ndimage.map_coordinates(vol, idx[:, ::-1].T, order=1).reshape(SIZE)
        np.testing.assert_allclose(p, ref, rtol=1e-4, atol=1e-2)


def test_outside_voxels_get_air_and_window_normalises() -> None:
    img = _linear_image((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    far = np.array([[500.0, 500.0, 500.0]])
    p = extract_patches(img, far, SIZE, SPACING, outside_hu=-1024.0)
    assert np.all(p == -1024.0)
    n = extract_patches(img, far, SIZE, SPACING, hu_window=(-1000.0, 400.0))
    assert np.all(n == 0.0)
    hot = extract_patches(img, [[5.0, 15.0, -40.0]], SIZE, SPACING, hu_window=(0.0, 10.0))
    assert hot.max() == 1.0 and hot.min() >= 0.0


@pytest.fixture(scope="module")
def toy_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models")
    arch = {**DEFAULT_ARCHITECTURE, "channels": [4, 8], "strides": [2, 2]}
    torch.manual_seed(0)
    net = build_network(arch)
    net.eval()
    write_bundle(
        models,
        name="toy",
        version="1.0.0",
        state_dict=net.state_dict(),
        task="ct-nodule-candidate-scoring",
        architecture=arch,
        input_spec={
            "spacing_mm": [1.0, 1.0, 1.0],
            "patch_size": [16, 16, 16],
            "hu_window": [-1000.0, 400.0],
            "batch_size": 4,
        },
        training_data={"description": "untrained (test)"},
    )
    return models


def test_scorer_contract(toy_bundle: Path) -> None:
    bundle = load_bundle("toy", models_dir=toy_bundle)
    img = _linear_image((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    rng = np.random.default_rng(0)
    centers = np.array([0.0, 15.0, -40.0]) + rng.normal(0, 5, size=(11, 3))
    scorer = CandidateScorer(bundle, device="cpu")
    p1 = scorer.score(img, centers)
    assert p1.shape == (11,)
    assert np.all((p1 >= 0) & (p1 <= 1))
    # Deterministic, order-preserving and independent of batching (batch size 4).
    np.testing.assert_array_equal(scorer.score(img, centers), p1)
    np.testing.assert_allclose(scorer.score(img, centers[::-1]), p1[::-1], rtol=1e-5)
    np.testing.assert_allclose(scorer.score(img, centers[3:4]), p1[3:4], rtol=1e-5)
    # Same as running the bundle's network on the extracted patches by hand.
    net = bundle.build_network()
    x = extract_patches(img, centers, (16, 16, 16), (1.0, 1.0, 1.0), hu_window=(-1000, 400))
    with torch.no_grad():
        manual = torch.sigmoid(net(torch.from_numpy(x[:, None]))).numpy()
    np.testing.assert_allclose(p1, manual, rtol=1e-4, atol=1e-6)
    assert scorer.score(img, np.zeros((0, 3))).shape == (0,)
    with pytest.raises(ValueError, match="shape"):
        scorer.score(img, np.zeros((4, 2)))
    assert scorer.identity == bundle.identity
    # A scoped thread count gives the same scores and restores torch's setting.
    before = torch.get_num_threads()
    one = CandidateScorer(bundle, device="cpu", threads=1)
    np.testing.assert_allclose(one.score(img, centers), p1, rtol=1e-5)
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        CandidateScorer(bundle, threads=0)


def test_scorer_refuses_unavailable_cuda(toy_bundle: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA"):
        CandidateScorer(load_bundle("toy", models_dir=toy_bundle), device="cuda")
