"""A real negative scan as a second insertion background (``real_negatives[].insertion_rounds``).

LIDC-IDRI-0002 (no LUNA16 nodule) gives the trainer its generator candidates as
negatives and, with insertion rounds, synthetic nodules inserted into its own
appearance.  The rounds must stay inside the configured z range and clear of the
scan's reader-marked nodule: the sub-consensus nodule of about 25 mm near
(59.8, 71.7, -103.2) mm that the data set's SOURCE.txt names (an irrelevant
finding, neither positive nor negative).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

import trainer.data as tdata
from tests.conftest import require_data
from trainer.config import RealNegativeConfig, load_train_config
from trainer.data import half_extent_mm, real_negative_patches
from trainer.export import _extra_sections

REPO = Path(__file__).resolve().parents[2]
CI_CONFIG = REPO / "trainer" / "configs" / "ci-tiny.yaml"
#: The sub-consensus nodule of LIDC-IDRI-0002, from its SOURCE.txt (centre, ~diameter mm).
MARKED_NODULE_MM = (59.8, 71.7, -103.2)
MARKED_DIAMETER_MM = 25.0
Z_RANGE = (-132.0, -9.5)


def test_insertion_rounds_into_a_real_negative_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    require_data("lidc-idri-0002")
    base = load_train_config(CI_CONFIG)
    data = base.data.model_copy(update={
        "nodules_per_round": 6,
        "negatives_per_round": 40,
        "real_negatives": [RealNegativeConfig(
            ct="lidc-idri-0002", negatives=12, copies=1, z_mm=Z_RANGE, insertion_rounds=1)],
    })
    cfg = base.model_copy(update={"data": data})
    inserted: list[Any] = []
    real_insert = tdata.insert_nodules

    def recording(*args: Any, **kwargs: Any) -> Any:
        hu, truth = real_insert(*args, **kwargs)
        inserted.extend(truth)
        return hu, truth

    # A spy, not a mock: the real insertion runs and its nodules are recorded.
    monkeypatch.setattr(tdata, "insert_nodules", recording)
    xs, ys, out = real_negative_patches(cfg, np.random.default_rng(3), CI_CONFIG.parent)

    assert len(xs) == len(ys) == 2
    shape = tuple(cfg.input.patch_size)
    assert all(x.shape[1:] == shape for x in xs)
    # the scan's own candidates: negatives only
    assert ys[0].tolist() == [0.0] * 12
    # the insertion round: positives and negatives of the same volume
    assert 0 < int(ys[1].sum()) < len(ys[1])
    summary = out[0]
    assert summary["z_mm"] == list(Z_RANGE)
    assert summary["reader_marks_excluded"] >= 1
    assert summary["patches"] == 12
    rounds = summary["insertion"]
    assert rounds["rounds"] == 1
    assert rounds["positive_patches"] == int(ys[1].sum())
    assert rounds["negative_patches"] == int((ys[1] == 0).sum())
    assert 1 <= rounds["inserted_nodules"] == len(inserted) <= 6
    guard = MARKED_DIAMETER_MM / 2 + half_extent_mm(cfg.input)
    for n in inserted:
        assert Z_RANGE[0] <= n.center_mm[2] <= Z_RANGE[1]
        # no inserted nodule's patch shows the reader-marked nodule
        dist = float(np.linalg.norm(np.subtract(n.center_mm, MARKED_NODULE_MM)))
        assert dist > guard, (n.center_mm, dist)
    # the model card says the scan was an insertion background, with its counts
    card = _extra_sections({}, {"real_negative_scans": out})
    assert (f"It was also an insertion background: 1 rounds, {len(inserted)} synthetic "
            f"nodules in z = {Z_RANGE} mm") in card
