"""Lung-RADS v2022 baseline categories from the ACR table."""

from __future__ import annotations

import pytest

from cad_node.pipelines.ct_chest.lungrads import (
    LungRads,
    NoduleForRads,
    lung_rads_category,
    nodule_category,
)
from cad_node.results.findings import NoduleType

S, P, G = NoduleType.SOLID, NoduleType.PART_SOLID, NoduleType.GROUND_GLASS


@pytest.mark.parametrize(
    ("size", "kind", "solid", "expected"),
    [
        (5.9, S, 0.0, "2"), (6.0, S, 0.0, "3"), (7.9, S, 0.0, "3"), (8.0, S, 0.0, "4A"),
        (14.9, S, 0.0, "4A"), (15.0, S, 0.0, "4B"), (40.0, S, 0.0, "4B"),
        (29.9, G, 0.0, "2"), (30.0, G, 0.0, "3"),
        (5.9, P, 3.0, "2"), (10.0, P, 5.9, "3"), (10.0, P, 6.0, "4A"), (12.0, P, 7.9, "4A"),
        (12.0, P, 8.0, "4B"),
        (5.94, S, 0.0, "2"), (5.96, S, 0.0, "3"),  # one decimal place
    ],
)
def test_nodule_category(size: float, kind: NoduleType, solid: float, expected: str) -> None:
    assert nodule_category(NoduleForRads(size, kind, solid)).value == expected


def test_study_category_is_most_severe() -> None:
    assert lung_rads_category([]) is LungRads.NEGATIVE
    nodules = [NoduleForRads(5.0, S), NoduleForRads(9.0, S), NoduleForRads(35.0, G)]
    assert lung_rads_category(nodules) is LungRads.SUSPICIOUS
