"""Outbound DICOM: C-STORE of result objects to destinations, statuses, retry policy.

* :func:`~cad_node.export.sender.send_objects` / :func:`~cad_node.export.sender.echo`
* :func:`~cad_node.export.status.classify_status`: the sender's reading of a status
  (the status table itself is :mod:`cad_node.dimse`, shared with the SCP)
* :class:`~cad_node.export.retry.RetryPolicy` (exponential backoff with jitter over a horizon)
"""

from cad_node.export.retry import RetryPolicy
from cad_node.export.sender import EchoResult, OutboundObject, SendReport, echo, send_objects
from cad_node.export.status import SendOutcome, classify_status

__all__ = [
    "EchoResult",
    "OutboundObject",
    "RetryPolicy",
    "SendOutcome",
    "SendReport",
    "classify_status",
    "echo",
    "send_objects",
]
