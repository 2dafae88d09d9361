"""Lung-RADS v2022 category of a baseline screening CT from its nodules.

American College of Radiology, Lung-RADS v2022 (released November 2022),
baseline screening, by mean diameter (mean of long and short axis on the same
axial image, to one decimal place):

======================  ==========================  ==============================
category                solid                       part-solid / ground glass
======================  ==========================  ==============================
1  negative             no nodules                  --
2  benign appearance    < 6 mm                      part-solid < 6 mm total;
                                                    ground glass < 30 mm
3  probably benign      >= 6 to < 8 mm              part-solid >= 6 mm total with
                                                    solid component < 6 mm;
                                                    ground glass >= 30 mm
4A suspicious           >= 8 to < 15 mm             solid component >= 6 to < 8 mm
4B very suspicious      >= 15 mm                    solid component >= 8 mm
======================  ==========================  ==============================

4X (category 3/4 with additional suspicious features) and 0 (incomplete) need
a reader and are not assigned.  The study category is the highest nodule
category.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from cad_node.results.findings import NoduleType

__all__ = ["LungRads", "NoduleForRads", "lung_rads_category", "nodule_category"]


class LungRads(enum.Enum):
    """Lung-RADS v2022 assessment categories assigned by the pipeline."""

    NEGATIVE = "1"
    BENIGN = "2"
    PROBABLY_BENIGN = "3"
    SUSPICIOUS = "4A"
    VERY_SUSPICIOUS = "4B"

    @property
    def rank(self) -> int:
        """Order of severity."""
        return list(LungRads).index(self)


@dataclass(frozen=True)
class NoduleForRads:
    """The measurements Lung-RADS needs (mm, mean diameters)."""

    mean_diameter_mm: float
    nodule_type: NoduleType
    solid_mean_diameter_mm: float = 0.0


def _r(x: float) -> float:
    return round(x, 1)  # Lung-RADS v2022: sizes to one decimal place


def nodule_category(n: NoduleForRads) -> LungRads:
    """Baseline Lung-RADS v2022 category of one nodule."""
    size = _r(n.mean_diameter_mm)
    if n.nodule_type is NoduleType.SOLID:
        if size < 6.0:
            return LungRads.BENIGN
        if size < 8.0:
            return LungRads.PROBABLY_BENIGN
        if size < 15.0:
            return LungRads.SUSPICIOUS
        return LungRads.VERY_SUSPICIOUS
    if n.nodule_type is NoduleType.GROUND_GLASS:
        return LungRads.BENIGN if size < 30.0 else LungRads.PROBABLY_BENIGN
    solid = _r(n.solid_mean_diameter_mm)
    if size < 6.0:
        return LungRads.BENIGN
    if solid < 6.0:
        return LungRads.PROBABLY_BENIGN
    if solid < 8.0:
        return LungRads.SUSPICIOUS
    return LungRads.VERY_SUSPICIOUS


def lung_rads_category(nodules: Iterable[NoduleForRads]) -> LungRads:
    """Study category: the most severe nodule category, 1 when there are none."""
    cats = [nodule_category(n) for n in nodules]
    return max(cats, key=lambda c: c.rank) if cats else LungRads.NEGATIVE
