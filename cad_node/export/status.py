"""How the sender treats a C-STORE response status.

The status codes, their ranges and categories are :mod:`cad_node.dimse`'s
(PS3.4 Annex B, B.2.3 "Statuses"; PS3.7 Annex C), the table the SCP answers
from too.  This module adds only the sender's policy: stored, retry or give up.
"""

from __future__ import annotations

import enum

from cad_node.dimse import OUT_OF_RESOURCES_RANGE, Status, StatusCategory, code_to_category

__all__ = [
    "SendOutcome",
    "classify_status",
]


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
        ``STORED`` for the Success and Warning categories
        (:func:`cad_node.dimse.code_to_category`); ``RETRYABLE`` for 0xA7xx
        (out of resources) and 0x0110 (processing failure); ``PERMANENT`` for
        0xA9xx, 0xCxxx, every other failure (SOP class not supported, not
        authorised, ...) and codes outside PS3.7 C.  A 0x0111 duplicate SOP
        instance counts as stored: the destination already holds the object
        (our UIDs are deterministic).
    """
    try:
        category = code_to_category(status)
    except ValueError:
        return SendOutcome.PERMANENT
    if category in (StatusCategory.SUCCESS, StatusCategory.WARNING):
        return SendOutcome.STORED
    if status == Status.DUPLICATE_SOP_INSTANCE:
        return SendOutcome.STORED
    if status in OUT_OF_RESOURCES_RANGE or status == Status.PROCESSING_FAILURE:
        return SendOutcome.RETRYABLE
    return SendOutcome.PERMANENT
