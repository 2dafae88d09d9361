"""UID validation rules of PS3.5 9.1."""

from __future__ import annotations

import pytest

from cad_node.uids import (
    UID_MAX_LENGTH,
    InvalidUIDError,
    is_valid_uid,
    normalize_uid,
    uid_problem,
    validate_uid,
)


@pytest.mark.parametrize(
    "uid",
    [
        "1.2.840.10008.5.1.4.1.1.2",
        "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192",
        "2.25.0",
        "0.0",
        "1." + "2" * 62,  # exactly 64 characters
    ],
)
def test_valid_uids(uid: str) -> None:
    assert is_valid_uid(uid)
    assert validate_uid(uid) == uid


@pytest.mark.parametrize(
    ("uid", "reason"),
    [
        ("", "empty"),
        ("../../etc/passwd", "component 1 is empty"),
        ("1.2/../../etc/passwd", "other than 0-9"),
        ("1.2..3", "component 3 is empty"),
        (".1.2", "component 1 is empty"),
        ("1.2.", "component 3 is empty"),
        ("1." + "2" * 63, "65 characters"),
        ("1.02.3", "leading zero"),
        ("1.2.3a", "other than 0-9"),
        ("1.2 .3", "other than 0-9"),
        ("1.2.\u0663", "other than 0-9"),  # Arabic-Indic digit: str.isdigit() but not 0-9
        ("1/2", "other than 0-9"),
    ],
)
def test_invalid_uids(uid: str, reason: str) -> None:
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUIDError, match=reason):
        validate_uid(uid, "SOP Instance UID")


def test_padding_is_removed_before_validation() -> None:
    assert normalize_uid("1.2.3\x00") == "1.2.3"
    assert validate_uid("1.2.3\x00") == "1.2.3"
    assert validate_uid("1.2.3 ") == "1.2.3"
    # 64 characters plus the NULL pad of an odd-length value on the wire
    assert validate_uid("1." + "2" * 62 + "\x00") == "1." + "2" * 62


def test_message_names_the_attribute_and_type_is_checked() -> None:
    with pytest.raises(InvalidUIDError, match="Study Instance UID"):
        validate_uid("1..2", "Study Instance UID")
    with pytest.raises(TypeError):
        validate_uid(123, "x")  # type: ignore[arg-type]
    assert UID_MAX_LENGTH == 64


@pytest.mark.parametrize(
    ("value", "valid"),
    [("1.2.3", True), ("0.1", True), ("1.20.0", True), ("1.02", False), ("1..2", False),
     (".1", False), ("1.", False), ("1.2\n", False), ("\u0661.\u0662", False), ("1.2 3", False),
     ("1." + "2" * 62, True), ("1." + "2" * 63, False), ("", False)],
)
def test_fast_path_agrees_with_the_rules(value: str, valid: bool) -> None:
    """validate_uid's one-regex fast path accepts exactly what uid_problem accepts."""
    assert (uid_problem(value) is None) is valid
    if valid:
        assert validate_uid(value + "\x00") == value
    else:
        with pytest.raises(InvalidUIDError):
            validate_uid(value)
