"""DIMSE status codes the node answers with.

Codes come from PS3.7 Annex C (general statuses) and PS3.4 Annex B, Table
B.2-1 (Storage Service Class C-STORE statuses).  PS3.4 B.2.3 lets an SCP use
any code of the ``Cxxx`` "Error: Cannot understand" range; the node uses a few
specific ones so a sender's log says *why*.
"""

from __future__ import annotations

from enum import IntEnum

__all__ = ["Status"]


class Status(IntEnum):
    """C-ECHO / C-STORE response statuses used by the node."""

    #: Success (PS3.7 C.1.1; PS3.4 Table B.2-1).  Also answered for a
    #: duplicate SOP Instance UID (policy keep-first, see cad_node.storage).
    SUCCESS = 0x0000
    #: Failure: Processing failure (PS3.7 C.4.2) - an unexpected I/O or
    #: internal error; nothing was stored.
    PROCESSING_FAILURE = 0x0110
    #: Failure: SOP Class not supported (PS3.7 C.5.11).
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    #: Refused: Out of Resources (PS3.4 Table B.2-1, A7xx) - free-disk
    #: watermark reached, disk full, or the per-association byte cap exceeded.
    OUT_OF_RESOURCES = 0xA700
    #: Error: Data Set does not match SOP Class (PS3.4 Table B.2-1, A9xx) -
    #: SOP Class UID differs from the command's, or a Type 1 UID the node
    #: needs (SOP Instance, Study or Series Instance UID) is missing/invalid.
    DATA_SET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    #: Error: Cannot understand (PS3.4 Table B.2-1, Cxxx) - generic.
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
    def is_failure(self) -> bool:
        """True for every status other than Success."""
        return self is not Status.SUCCESS
