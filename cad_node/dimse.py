"""DIMSE statuses: the one table the SCP (answers) and the SCU (reads) share.

Codes come from PS3.7 Annex C (general statuses) and PS3.4 Annex B, Table
B.2-1 (Storage Service Class C-STORE statuses); categories follow PS3.7 C
as pynetdicom's ``status.code_to_category`` does.  PS3.4 B.2.3 lets an SCP use
any code of the ``Cxxx`` "Error: Cannot understand" range; the node answers
a few specific ones (``0xC100``-``0xC102``) so a sender's log says *why*.

* :class:`Status`: every status code the node answers or acts on by name.
* :class:`StatusCategory` and :func:`code_to_category`: Success, Warning,
  Failure, Cancel, Pending or Unknown for *any* code a peer may send.
* The ``*_RANGE`` constants: the code ranges of PS3.4 Table B.2-1.

What a status means for a job (retry or give up) is the sender's policy:
:func:`cad_node.export.status.classify_status`.  The spool's own outcome
(stored or duplicate) is not a DIMSE status:
:class:`cad_node.storage.spool.SpoolOutcome`.
"""

from __future__ import annotations

import enum

__all__ = [
    "CANNOT_UNDERSTAND_RANGE",
    "DATA_SET_DOES_NOT_MATCH_RANGE",
    "OUT_OF_RESOURCES_RANGE",
    "WARNING_RANGE",
    "Status",
    "StatusCategory",
    "code_to_category",
]


class Status(enum.IntEnum):
    """C-ECHO / C-STORE status codes (PS3.7 C, PS3.4 Table B.2-1)."""

    #: Success (PS3.7 C.1.1; PS3.4 Table B.2-1).  The node also answers it for
    #: a duplicate SOP Instance UID (policy keep-first, see cad_node.storage).
    SUCCESS = 0x0000
    #: Warning: Coercion of Data Elements (PS3.4 Table B.2-1).
    WARNING_COERCION = 0xB000
    #: Warning: Elements Discarded (PS3.4 Table B.2-1).
    WARNING_ELEMENTS_DISCARDED = 0xB006
    #: Warning: Data Set Does Not Match SOP Class (PS3.4 Table B.2-1).
    WARNING_DATA_SET_MISMATCH = 0xB007
    #: Failure: Processing failure (PS3.7 C.4.2.1.1) - an unexpected I/O or
    #: internal error; nothing was stored.
    PROCESSING_FAILURE = 0x0110
    #: Failure: Duplicate SOP Instance (PS3.7 C.4.2.1.3).
    DUPLICATE_SOP_INSTANCE = 0x0111
    #: Failure: SOP Class not supported (PS3.7 C.4.2.1.9).
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    #: Failure: Not Authorized (PS3.7 C.4.2.1.13).
    NOT_AUTHORIZED = 0x0124
    #: Refused: Out of Resources (PS3.4 Table B.2-1, first code of A7xx) - the
    #: node answers it at its free-disk watermark, on a full disk, or when the
    #: per-association byte cap is exceeded.
    OUT_OF_RESOURCES = 0xA700
    #: Error: Data Set does not match SOP Class (PS3.4 Table B.2-1, first code
    #: of A9xx) - SOP Class UID differs from the command's, or a Type 1 UID
    #: the node needs (SOP Instance, Study or Series Instance UID) is
    #: missing/invalid.
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Error: Cannot understand (PS3.4 Table B.2-1, first code of Cxxx).
    CANNOT_UNDERSTAND = 0xC000
    #: Error: Cannot understand - the data set is empty, truncated or not a
    #: DICOM encoding in the negotiated transfer syntax (node-specific Cxxx).
    MALFORMED_DATA_SET = 0xC100
    #: Error: Cannot understand - a UID in the command is not a valid UID
    #: (PS3.5 9.1) (node-specific Cxxx).
    INVALID_UID = 0xC101
    #: Error: Cannot understand - the data set's SOP Instance UID differs from
    #: the command's Affected SOP Instance UID (node-specific Cxxx).
    SOP_INSTANCE_UID_MISMATCH = 0xC102

    @property
    def category(self) -> StatusCategory:
        """:func:`code_to_category` of this code."""
        return code_to_category(int(self))

    @property
    def is_failure(self) -> bool:
        """True for every status other than Success."""
        return self is not Status.SUCCESS


class StatusCategory(enum.Enum):
    """Status categories of PS3.7 C (the labels pynetdicom uses)."""

    SUCCESS = "Success"
    WARNING = "Warning"
    FAILURE = "Failure"
    CANCEL = "Cancel"
    PENDING = "Pending"
    #: Not a code PS3.7 C assigns to a category.
    UNKNOWN = "Unknown"


#: Refused: Out of Resources (PS3.4 Table B.2-1): 0xA700-0xA7FF.
OUT_OF_RESOURCES_RANGE = range(0xA700, 0xA800)
#: Error: Data Set Does Not Match SOP Class (PS3.4 Table B.2-1): 0xA900-0xA9FF.
DATA_SET_DOES_NOT_MATCH_RANGE = range(0xA900, 0xAA00)
#: Error: Cannot Understand (PS3.4 Table B.2-1): 0xC000-0xCFFF.
CANNOT_UNDERSTAND_RANGE = range(0xC000, 0xD000)
#: Warning (PS3.4 Table B.2-1): 0xB000-0xBFFF; the object was stored.
WARNING_RANGE = range(0xB000, 0xC000)

#: PS3.7 C.4 failure codes of the general statuses (0x01xx, 0x02xx).
_GENERAL_FAILURES = frozenset(
    {0x0105, 0x0106, 0x0110, 0x0111, 0x0112, 0x0113, 0x0114, 0x0115, 0x0117, 0x0118,
     0x0119, 0x0120, 0x0121, 0x0122, 0x0123, 0x0124, 0x0210, 0x0211, 0x0212, 0x0213}
)
#: PS3.7 C.2 warning codes of the general statuses.
_GENERAL_WARNINGS = frozenset({0x0001, 0x0107, 0x0116})


def code_to_category(code: int) -> StatusCategory:
    """The PS3.7 C category of a status code.

    Parameters
    ----------
    code : int
        A (0000,0900) Status value, 0x0000-0xFFFF.

    Returns
    -------
    StatusCategory
        ``UNKNOWN`` for a code PS3.7 C does not place (callers decide; the
        sender treats it as a failure).

    Raises
    ------
    ValueError
        ``code`` is not an integer in 0x0000-0xFFFF.
    """
    if isinstance(code, bool) or not isinstance(code, int) or not 0 <= code <= 0xFFFF:
        raise ValueError(f"a DIMSE status is an integer 0x0000-0xFFFF, not {code!r}")
    if code == 0x0000:
        return StatusCategory.SUCCESS
    if code in (0xFF00, 0xFF01):
        return StatusCategory.PENDING
    if code == 0xFE00:
        return StatusCategory.CANCEL
    if code in _GENERAL_FAILURES or 0xA000 <= code <= 0xAFFF or code in CANNOT_UNDERSTAND_RANGE:
        return StatusCategory.FAILURE
    if code in _GENERAL_WARNINGS or code in WARNING_RANGE:
        return StatusCategory.WARNING
    return StatusCategory.UNKNOWN
