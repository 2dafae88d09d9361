"""C-STORE response statuses and how the sender treats them.

Status values are those of the Storage Service Class, PS3.4 Annex B
(B.2.3 "Statuses") and the general DIMSE statuses of PS3.7 Annex C.
"""

from __future__ import annotations

import enum

__all__ = [
    "CANNOT_UNDERSTAND_RANGE",
    "DATASET_DOES_NOT_MATCH_RANGE",
    "OUT_OF_RESOURCES_RANGE",
    "SendOutcome",
    "StoreStatus",
    "classify_status",
]


class StoreStatus(enum.IntEnum):
    """Single C-STORE status codes (PS3.4 B.2.3, PS3.7 C)."""

    #: Success (PS3.4 B.2.3).
    SUCCESS = 0x0000
    #: Warning: Coercion of Data Elements (PS3.4 B.2.3).
    WARNING_COERCION = 0xB000
    #: Warning: Elements Discarded (PS3.4 B.2.3).
    WARNING_ELEMENTS_DISCARDED = 0xB006
    #: Warning: Data Set Does Not Match SOP Class (PS3.4 B.2.3).
    WARNING_DATASET_MISMATCH = 0xB007
    #: Refused: Out of Resources, first code of the A7xx range (PS3.4 B.2.3).
    OUT_OF_RESOURCES = 0xA700
    #: Error: Data Set Does Not Match SOP Class, first code of the A9xx range (PS3.4 B.2.3).
    DATASET_DOES_NOT_MATCH = 0xA900
    #: Error: Cannot Understand, first code of the Cxxx range (PS3.4 B.2.3).
    CANNOT_UNDERSTAND = 0xC000
    #: Failure: Processing Failure (PS3.7 C.4.2.1.1).
    PROCESSING_FAILURE = 0x0110
    #: Failure: Duplicate SOP Instance (PS3.7 C.4.2.1.3).
    DUPLICATE_SOP_INSTANCE = 0x0111
    #: Refused: SOP Class Not Supported (PS3.7 C.4.2.1.9).
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    #: Refused: Not Authorized (PS3.7 C.4.2.1.13).
    NOT_AUTHORIZED = 0x0124


#: Refused: Out of Resources (PS3.4 B.2.3): 0xA700-0xA7FF -- retryable.
OUT_OF_RESOURCES_RANGE = range(0xA700, 0xA800)
#: Error: Data Set Does Not Match SOP Class (PS3.4 B.2.3): 0xA900-0xA9FF -- permanent.
DATASET_DOES_NOT_MATCH_RANGE = range(0xA900, 0xAA00)
#: Error: Cannot Understand (PS3.4 B.2.3): 0xC000-0xCFFF -- permanent.
CANNOT_UNDERSTAND_RANGE = range(0xC000, 0xD000)
#: Warning statuses (PS3.4 B.2.3): the object was stored.
_WARNINGS = frozenset(
    {StoreStatus.WARNING_COERCION, StoreStatus.WARNING_ELEMENTS_DISCARDED,
     StoreStatus.WARNING_DATASET_MISMATCH}
)


class SendOutcome(enum.Enum):
    """What a status (or a transport failure) means for the job."""

    #: The destination stored the object (Success or a Warning).
    STORED = "stored"
    #: Try again later (out of resources, timeout, abort, refused connection).
    RETRYABLE = "retryable"
    #: Sending the same object again cannot succeed.
    PERMANENT = "permanent"


def classify_status(status: int) -> SendOutcome:
    """Classify a C-STORE response status.

    Parameters
    ----------
    status : int
        The (0000,0900) Status of the C-STORE response.

    Returns
    -------
    SendOutcome
        ``STORED`` for Success/Warning; ``RETRYABLE`` for 0xA7xx (out of
        resources) and 0x0110 (processing failure); ``PERMANENT`` for 0xA9xx,
        0xCxxx and every other failure (SOP class not supported, not
        authorised, ...).  A 0x0111 duplicate SOP instance counts as stored:
        the destination already holds the object (our UIDs are deterministic).
    """
    if status == StoreStatus.SUCCESS or status in _WARNINGS or 0xB000 <= status <= 0xBFFF:
        return SendOutcome.STORED
    if status == StoreStatus.DUPLICATE_SOP_INSTANCE:
        return SendOutcome.STORED
    if status in OUT_OF_RESOURCES_RANGE or status == StoreStatus.PROCESSING_FAILURE:
        return SendOutcome.RETRYABLE
    return SendOutcome.PERMANENT
