"""Brock University (PanCan) lung-nodule malignancy model, full model with spiculation.

McWilliams A, Tammemagi MC, Mayo JR, et al. Probability of cancer in pulmonary
nodules detected on first screening CT. N Engl J Med 2013;369:910-919
(doi:10.1056/NEJMoa1214726), supplementary appendix, "full model 2b"
(logistic regression on the PanCan data):

    logit = -6.7892
            + 0.0287 * (age - 62)
            + 0.6011 * female
            + 0.2961 * family history of lung cancer
            + 0.2953 * emphysema
            - 5.3854 * ((size_mm / 10) ** -0.5 - 1.58113883)
            + nodule type: ground glass -0.1276, part solid 0.3770, solid 0
            + 0.6581 * upper lobe
            - 0.0824 * (nodule count - 4)
            + 0.7729 * spiculation

``size_mm`` is the nodule's longest diameter.  An input the node does not
know (age and sex from the DICOM header when absent, family history,
emphysema, spiculation, upper-lobe location when lobes are not segmented) is
set to its reference value (0, or the centring value for age) and *named* in
:attr:`BrockResult.missing`, so a report never hides that the probability was
computed without it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from cad_node.results.findings import NoduleType

__all__ = ["BROCK_COEFFICIENTS", "BrockInputs", "BrockResult", "brock_probability"]

#: Full model 2b coefficients (McWilliams et al. 2013, supplementary appendix).
BROCK_COEFFICIENTS: dict[str, float] = {
    "intercept": -6.7892,
    "age": 0.0287,
    "age_centre": 62.0,
    "female": 0.6011,
    "family_history": 0.2961,
    "emphysema": 0.2953,
    "size": -5.3854,
    "size_centre": 1.58113883,  # (4 / 10) ** -0.5: size centred at 4 mm
    "ground_glass": -0.1276,
    "part_solid": 0.3770,
    "upper_lobe": 0.6581,
    "count": -0.0824,
    "count_centre": 4.0,
    "spiculation": 0.7729,
}


@dataclass(frozen=True)
class BrockInputs:
    """Inputs of the model; None means unknown."""

    size_mm: float
    nodule_type: NoduleType
    nodule_count: int
    age_years: float | None = None
    female: bool | None = None
    family_history: bool | None = None
    emphysema: bool | None = None
    upper_lobe: bool | None = None
    spiculation: bool | None = None


@dataclass(frozen=True)
class BrockResult:
    """Probability and the names of inputs that were unknown."""

    probability: float
    missing: list[str] = field(default_factory=list)


def brock_probability(inputs: BrockInputs) -> BrockResult:
    """Brock full-model malignancy probability of one nodule.

    Raises
    ------
    ValueError
        Non-positive size or count.
    """
    if not inputs.size_mm > 0:
        raise ValueError(f"nodule size must be > 0 mm, not {inputs.size_mm}")
    if inputs.nodule_count < 1:
        raise ValueError(f"nodule count must be >= 1, not {inputs.nodule_count}")
    c = BROCK_COEFFICIENTS
    missing: list[str] = []
    logit = c["intercept"]
    if inputs.age_years is None:
        missing.append("patient age")
    else:
        logit += c["age"] * (inputs.age_years - c["age_centre"])
    if inputs.female is None:
        missing.append("patient sex")
    elif inputs.female:
        logit += c["female"]
    for key, value in (("family_history", inputs.family_history),
                       ("emphysema", inputs.emphysema),
                       ("upper_lobe", inputs.upper_lobe),
                       ("spiculation", inputs.spiculation)):
        if value is None:
            missing.append(key.replace("_", " "))
        elif value:
            logit += c[key]
    logit += c["size"] * ((inputs.size_mm / 10.0) ** -0.5 - c["size_centre"])
    if inputs.nodule_type is NoduleType.GROUND_GLASS:
        logit += c["ground_glass"]
    elif inputs.nodule_type is NoduleType.PART_SOLID:
        logit += c["part_solid"]
    logit += c["count"] * (inputs.nodule_count - c["count_centre"])
    return BrockResult(probability=1.0 / (1.0 + math.exp(-logit)), missing=missing)
