"""The SCP's lenient-but-strict UID policy (cad_node.uids.lenient_uid, issue 9 item 7)."""

from __future__ import annotations

import pytest

from cad_node.uids import InvalidUIDError, lenient_uid


@pytest.mark.parametrize("uid", ["1.2.3", "1.2.840.10008.5.1.4.1.1.2", "0", "1." + "2" * 62])
def test_valid_uids_have_no_defect(uid: str) -> None:
    assert lenient_uid(uid + "\x00") == (uid, None)


@pytest.mark.parametrize(("uid", "component"), [
    ("1.2.840.0113619.2.55", 4), ("01.2.3", 1), ("1.2.00", 3),
])
def test_leading_zero_is_tolerated_and_reported(uid: str, component: int) -> None:
    value, defect = lenient_uid(uid, "SOP Instance UID")
    assert value == uid
    assert defect == f"SOP Instance UID component {component} has a leading zero"


@pytest.mark.parametrize(("uid", "why"), [
    ("", "empty"),
    ("../../etc/passwd", "empty"),
    ("1.2/../3", "other than 0-9"),
    ("1.02/3", "other than 0-9"),
    ("1..2", "empty"),
    (".1.2", "empty"),
    ("1.2.", "empty"),
    ("1." + "2" * 63, "65 characters"),
    ("1.0" + "2" * 63, "66 characters"),
    ("1.2\n3", "other than 0-9"),
    ("１.２", "other than 0-9"),  # full-width digits
])
def test_unsafe_or_unreadable_uids_are_refused(uid: str, why: str) -> None:
    with pytest.raises(InvalidUIDError, match=why):
        lenient_uid(uid)
