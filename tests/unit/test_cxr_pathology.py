"""The cxr-lungs 1.2.0 recipe: synthetic findings inside the lung fields, labels unchanged.

Truth is by construction: a synthetic film with two dark oval lung fields on a
bright body, so where an opacity may fall (inside a lung field) and what it must
leave alone (everything else, and the labels) is known exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from cad_node.pipelines.cxr.lungs import normalise
from trainer import cxr_pathology as cp
from trainer.cxr_lungs import SiteAugmenter, load_cxr_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "trainer" / "configs"
S = 128


def _film() -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:S, 0:S]
    right = ((xx - 0.3 * S) / (0.13 * S)) ** 2 + ((yy - 0.45 * S) / (0.3 * S)) ** 2 < 1
    left = ((xx - 0.7 * S) / (0.13 * S)) ** 2 + ((yy - 0.45 * S) / (0.3 * S)) ** 2 < 1
    heart = ((xx - 0.55 * S) / (0.12 * S)) ** 2 + ((yy - 0.7 * S) / (0.1 * S)) ** 2 < 1
    heart &= ~(right | left)
    image = np.full((S, S), 0.75, np.float32)
    image[right | left] = 0.2
    label = np.stack([right, left, heart]).astype(np.float32)
    return image, label


def _outside(lung: np.ndarray) -> np.ndarray:
    out: np.ndarray = ~ndimage.binary_dilation(lung, iterations=3)
    return out


def test_the_1_2_0_recipe_keeps_the_fixed_split_and_starts_from_1_1_0() -> None:
    cfg = load_cxr_config(CONFIGS / "cxr-lungs-1.2.0.yaml")
    base = load_cxr_config(CONFIGS / "cxr-lungs.yaml")
    assert cfg.split.validation == base.split.validation  # the same held-out 37
    assert cfg.train.init_from == "models/cxr-lungs/1.1.0" and cfg.bundle.version == "1.2.0"
    a = cfg.augment
    assert a.site and a.pathology_prob > 0 and a.devices_prob > 0 and a.portable_prob > 0


@pytest.mark.parametrize("name", ["cxr-lungs.yaml", "cxr-lungs-1.1.0.yaml"])
def test_older_configs_leave_the_findings_off(name: str) -> None:
    a = load_cxr_config(CONFIGS / name).augment
    assert (a.pathology_prob, a.soft_tissue_prob, a.devices_prob, a.portable_prob) == (0, 0, 0, 0)
    image, label = _film()
    aug = SiteAugmenter(a, seed=1)
    state = aug.findings_rng.bit_generator.state
    assert aug.findings(image, label) is image and aug.appearance(image) is image
    assert aug.findings_rng.bit_generator.state == state  # the 1.1.0 stream is untouched


@pytest.mark.parametrize("seed", range(6))
def test_effusion_rises_from_the_base_of_one_lung_field_only(seed: int) -> None:
    image, label = _film()
    right = label[0] > 0.5
    rng = np.random.default_rng(seed)
    out = cp.add_effusion(image, right, 0.75, rng, lateral_right=False, max_fraction=0.8)
    assert out.dtype == np.float32 and out.shape == image.shape
    assert np.array_equal(out[_outside(right)], image[_outside(right)])
    core = ndimage.binary_erosion(right, iterations=3)
    rows = np.nonzero(core)[0]
    low = core & (np.arange(S)[:, None] > rows.max() - 4)
    top = core & (np.arange(S)[:, None] < rows.min() + 4)
    assert float(out[low].mean()) > 0.5  # dense at the costophrenic angle
    assert float(out[top].mean()) == pytest.approx(0.2, abs=0.02)  # apex still aerated


def test_meniscus_is_higher_at_the_chest_wall_than_medially() -> None:
    image, label = _film()
    right = label[0] > 0.5  # on the image's left: its chest wall is at low columns
    cols = np.nonzero(right)[1]
    c0, width = int(cols.min()), int(cols.max() - cols.min())
    lateral, medial = c0 + width // 5, c0 + 4 * width // 5
    for seed in range(4):
        out = cp.add_effusion(image, right, 0.75, np.random.default_rng(seed),
                              lateral_right=False, max_fraction=0.5)

        def fluid_top(col: int, out: np.ndarray = out) -> int:
            return int(np.nonzero(right[:, col] & (out[:, col] - image[:, col] > 0.1))[0].min())

        assert fluid_top(lateral) < fluid_top(medial)


def test_whole_hemithorax_is_opaque_and_the_other_lung_untouched() -> None:
    image, label = _film()
    left, right = label[1] > 0.5, label[0] > 0.5
    out = cp.add_effusion(image, left, 0.75, np.random.default_rng(0), lateral_right=True,
                          whole=True)
    core = ndimage.binary_erosion(left, iterations=3)
    assert float(np.mean(out[core] > 0.5)) > 0.95
    assert np.array_equal(out[right], image[right])


@pytest.mark.parametrize("seed", range(4))
def test_consolidation_brightens_inside_the_lung_field_only(seed: int) -> None:
    image, label = _film()
    left = label[1] > 0.5
    out = cp.add_consolidation(image, left, 0.75, np.random.default_rng(seed))
    assert np.array_equal(out[_outside(left)], image[_outside(left)])
    assert float((out - image)[left].max()) > 0.2
    assert np.all(out >= image - 1e-6)  # an opacity only adds density


def test_devices_and_soft_tissue_only_brighten_and_stay_in_range() -> None:
    image, _ = _film()
    for seed in range(5):
        rng = np.random.default_rng(seed)
        for out in (cp.add_devices(image, rng), cp.add_soft_tissue(image, 0.75, rng)):
            assert out.dtype == np.float32 and 0.0 <= out.min() and out.max() <= 1.0
            assert np.all(out >= image - 1e-6) and float(np.abs(out - image).max()) > 0.05


def test_portable_look_survives_the_histogram_equalisation() -> None:
    image, _ = _film()
    image = image + np.linspace(0, 0.05, S, dtype=np.float32)[None]  # some grey levels
    out = cp.portable_look(image, np.random.default_rng(0))
    assert 0.0 <= out.min() and out.max() <= 1.0
    # a global monotone change alone would be undone exactly by the equalisation
    assert float(np.abs(normalise(out) - normalise(image)).mean()) > 0.05


def test_bad_shapes_are_refused() -> None:
    image, _ = _film()
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="does not match"):
        cp.add_effusion(image, np.zeros((4, 4), bool), 0.7, rng, lateral_right=True)
    with pytest.raises(ValueError, match="2-D image"):
        cp.add_devices(image[0], rng)


@pytest.mark.parametrize("seed", range(4))
def test_augmented_sample_keeps_its_labels(seed: int) -> None:
    """With the geometry off, the findings never move a label pixel."""
    cfg = load_cxr_config(CONFIGS / "cxr-lungs-1.2.0.yaml").augment.model_copy(update={
        "prob": 0.0, "distort_prob": 0.0, "frame_prob": 0.0, "pathology_prob": 1.0,
        "soft_tissue_prob": 1.0, "devices_prob": 1.0, "portable_prob": 1.0})
    image, label = _film()
    x, y = SiteAugmenter(cfg, seed=seed)(image, label)
    assert np.array_equal(y, label)
    assert x.shape == image.shape and -1.0 <= float(x.min()) and float(x.max()) <= 1.0
