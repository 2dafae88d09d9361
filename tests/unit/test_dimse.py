"""The one DIMSE status table (cad_node.dimse), read against pynetdicom's."""

from __future__ import annotations

import pytest
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS
from pynetdicom.status import code_to_category as pynetdicom_category

from cad_node import dimse
from cad_node.dimse import Status, StatusCategory, code_to_category
from cad_node.export.status import SendOutcome, classify_status


def test_every_code_has_pynetdicoms_category() -> None:
    for code in range(0x10000):
        assert code_to_category(code).value == pynetdicom_category(code), hex(code)


def test_the_scp_and_the_scu_share_the_table() -> None:
    from cad_node.scp import Status as ScpStatus
    from cad_node.scp.status import Status as ScpStatusModule

    assert ScpStatus is ScpStatusModule is dimse.Status


def test_named_storage_codes_match_ps34_table_b2_1() -> None:
    # pynetdicom's Storage Service Class table (PS3.4 B.2-1 plus PS3.7 C general
    # statuses) names each code; ours must be in it with the same category.
    for status in Status:
        if status in (Status.MALFORMED_DATA_SET, Status.INVALID_UID,
                      Status.SOP_INSTANCE_UID_MISMATCH):
            assert status in dimse.CANNOT_UNDERSTAND_RANGE  # node-specific Cxxx (PS3.4 B.2.3)
            continue
        assert status.category.value == STORAGE_SERVICE_CLASS_STATUS[int(status)][0], status


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (0x0000, SendOutcome.STORED),
        (0xB007, SendOutcome.STORED),
        (0x0111, SendOutcome.STORED),  # duplicate: the destination holds it
        (0xA7FF, SendOutcome.RETRYABLE),
        (0x0110, SendOutcome.RETRYABLE),
        (0xA900, SendOutcome.PERMANENT),
        (0xC101, SendOutcome.PERMANENT),
        (0x0124, SendOutcome.PERMANENT),
        (0xFF00, SendOutcome.PERMANENT),  # Pending is no C-STORE answer
        (0x1234, SendOutcome.PERMANENT),  # unknown
        (-1, SendOutcome.PERMANENT),
    ],
)
def test_sender_policy(code: int, outcome: SendOutcome) -> None:
    assert classify_status(code) is outcome


def test_bad_codes_are_refused() -> None:
    for bad in (-1, 0x10000, True):
        with pytest.raises(ValueError, match="0x0000-0xFFFF"):
            code_to_category(bad)  # type: ignore[arg-type]
    assert code_to_category(0x1234) is StatusCategory.UNKNOWN
