"""The cxr-lungs 1.1.0 training recipe: other-site augmentation and the time-budget schedule.

Truth is by construction: a synthetic film whose lungs are dark ovals, so the
masks must keep covering the dark pixels after every augmentation, and the
patient's right lung must stay on the image's left (no flips).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from trainer.cxr_lungs import SiteAugmenter, budget_lr, load_cxr_config

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "trainer" / "configs" / "cxr-lungs-1.1.0.yaml"


def _film(size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:size, 0:size]
    right = ((xx - 0.3 * size) / (0.12 * size)) ** 2 + ((yy - 0.45 * size) / (0.3 * size)) ** 2 < 1
    left = ((xx - 0.7 * size) / (0.12 * size)) ** 2 + ((yy - 0.45 * size) / (0.3 * size)) ** 2 < 1
    image = np.full((size, size), 0.8, np.float32)
    image[right | left] = 0.2
    label = np.stack([right, left, np.zeros_like(right)]).astype(np.float32)
    return image, label


def test_the_shipped_recipe_is_valid_and_keeps_the_fixed_split() -> None:
    cfg = load_cxr_config(CONFIG)
    base = load_cxr_config(REPO / "trainer" / "configs" / "cxr-lungs.yaml")
    assert cfg.augment.site and cfg.train.init_from == "models/cxr-lungs/1.0.0"
    assert cfg.split.validation == base.split.validation  # the same held-out 37
    assert cfg.bundle.version == "1.1.0"


def test_frame_moves_masks_with_the_pixels() -> None:
    cfg = load_cxr_config(CONFIG).augment.model_copy(update={"frame_prob": 1.0})
    image, label = _film()
    aug = SiteAugmenter(cfg, seed=5)
    for _ in range(10):
        img, lab = aug.frame(image, label)
        lungs = lab[:2].sum(axis=0) > 0
        assert lungs.any()
        # every mask pixel is on the (dark) film, never on the frame
        assert float(np.mean(img[lungs] < 0.5)) > 0.9


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_augmented_sample_keeps_the_sides_and_is_normalised(seed: int) -> None:
    cfg = load_cxr_config(CONFIG).augment
    image, label = _film()
    x, y = SiteAugmenter(cfg, seed=seed)(image, label)
    assert x.shape == image.shape and x.dtype == np.float32
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert set(np.unique(y)) <= {0.0, 1.0}
    right_cols, left_cols = np.nonzero(y[0])[1], np.nonzero(y[1])[1]
    assert right_cols.size and left_cols.size
    assert right_cols.mean() < left_cols.mean()  # patient's right on the image's left


def test_budget_schedule_warms_up_then_anneals_to_zero() -> None:
    peak = 1e-3
    assert budget_lr(peak, 0.0) == pytest.approx(0.04 * peak)
    assert budget_lr(peak, 0.1) == pytest.approx(peak)
    values = [budget_lr(peak, p) for p in np.linspace(0.1, 1.0, 50)]
    assert all(a >= b for a, b in itertools.pairwise(values))
    assert budget_lr(peak, 1.0) == pytest.approx(0.0, abs=1e-12)
    assert budget_lr(peak, 3.0) == pytest.approx(0.0, abs=1e-12)  # past the budget
