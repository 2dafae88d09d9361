"""Brock/PanCan full model: hand-computed reference values (McWilliams 2013, model 2b)."""

from __future__ import annotations

import pytest

from cad_node.pipelines.ct_chest.brock import BrockInputs, brock_probability
from cad_node.results.findings import NoduleType


def test_hand_computed_solid_10mm_female_62() -> None:
    # logit = -6.7892 + 0.6011 - 5.3854 * (1 - 1.58113883) - 0.0824 * (1 - 4) = -2.81124
    r = brock_probability(BrockInputs(size_mm=10.0, nodule_type=NoduleType.SOLID, nodule_count=1,
                                      age_years=62.0, female=True, family_history=False,
                                      emphysema=False, upper_lobe=False, spiculation=False))
    assert r.probability == pytest.approx(0.05672, abs=2e-5)
    assert r.missing == []


def test_hand_computed_ggo_4mm_male_72_upper_lobe_emphysema() -> None:
    # size term 0 at 4 mm; count term 0 at 4 nodules:
    # logit = -6.7892 + 0.0287 * 10 + 0.2953 - 0.1276 + 0.6581 = -5.6764
    r = brock_probability(BrockInputs(size_mm=4.0, nodule_type=NoduleType.GROUND_GLASS,
                                      nodule_count=4, age_years=72.0, female=False,
                                      family_history=False, emphysema=True, upper_lobe=True,
                                      spiculation=False))
    assert r.probability == pytest.approx(0.003414, abs=2e-6)


def test_missing_inputs_are_named() -> None:
    r = brock_probability(BrockInputs(size_mm=8.0, nodule_type=NoduleType.PART_SOLID,
                                      nodule_count=2))
    assert set(r.missing) == {"patient age", "patient sex", "family history", "emphysema",
                              "upper lobe", "spiculation"}


def test_monotone_in_size_and_type_order() -> None:
    def p(size: float, kind: NoduleType) -> float:
        return brock_probability(BrockInputs(size, kind, 1, 65.0, False)).probability

    assert p(5, NoduleType.SOLID) < p(10, NoduleType.SOLID) < p(25, NoduleType.SOLID)
    assert p(10, NoduleType.GROUND_GLASS) < p(10, NoduleType.SOLID) < p(10, NoduleType.PART_SOLID)


def test_invalid_inputs() -> None:
    with pytest.raises(ValueError, match="size"):
        brock_probability(BrockInputs(0.0, NoduleType.SOLID, 1))
    with pytest.raises(ValueError, match="count"):
        brock_probability(BrockInputs(5.0, NoduleType.SOLID, 0))


@pytest.mark.parametrize(
    ("attrs", "expected"),
    [
        ({"PatientAge": "065Y"}, 65.0),
        ({"PatientAge": "018M"}, 1.5),
        ({"PatientAge": "", "PatientBirthDate": "19500101", "StudyDate": "20100101"}, 60.0),
        ({"PatientAge": "65"}, None),  # not a valid AS value, and no dates
        ({}, None),
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR AS")
@pytest.mark.invalid_values  # an invalid AS value from a source header, on purpose
def test_patient_age_for_brock(attrs: dict[str, str], expected: float | None) -> None:
    from pydicom.dataset import Dataset

    from cad_node.pipelines.ct_chest.pipeline import parse_age

    ds = Dataset()
    for k, v in attrs.items():
        setattr(ds, k, v)
    age = parse_age(ds)
    if expected is None:
        assert age is None
    else:
        assert age == pytest.approx(expected, abs=0.02)
