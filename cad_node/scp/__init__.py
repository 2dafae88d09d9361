"""The DICOM network edge (C-ECHO and C-STORE SCP).

Public API: :class:`NodeServer` (SCP + spool + study assembler, in-process),
:class:`Admission` / :class:`AdmissionEvent` (admission policy and its audit
hook), :class:`Status` (DIMSE statuses) and the presentation context tables
in :mod:`cad_node.scp.contexts`.  Layers: :mod:`~cad_node.scp.admission`
(policy), :mod:`~cad_node.scp.wire` (bytes), :mod:`~cad_node.scp._fastpath`
(pynetdicom overrides, version-guarded), :mod:`~cad_node.scp.server`.
"""

from cad_node.scp.admission import Admission, AdmissionEvent, RejectReason
from cad_node.scp.contexts import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, VERIFICATION_SOP_CLASS
from cad_node.scp.server import ABORT_SLACK_BYTES, NodeServer
from cad_node.scp.status import Status

__all__ = [
    "ABORT_SLACK_BYTES",
    "STORAGE_SOP_CLASSES",
    "TRANSFER_SYNTAXES",
    "VERIFICATION_SOP_CLASS",
    "Admission",
    "AdmissionEvent",
    "NodeServer",
    "RejectReason",
    "Status",
]
