"""Outbound C-STORE of result objects to one destination (pynetdicom SCU).

Contract
--------
* :func:`send_objects` opens one association per call, proposes for every SOP
  class the object's own transfer syntax plus Explicit and Implicit VR Little
  Endian, and sends each object over a context the destination accepted
  (uncompressed data is re-encoded by pynetdicom; compressed data the
  destination does not accept is decompressed first).  The socket gets
  ``TCP_NODELAY`` and we offer a large maximum PDU.
* It never raises for network trouble: every object gets a
  :class:`ObjectResult` whose ``outcome`` is ``STORED``, ``RETRYABLE`` (0xA7xx,
  0x0110, timeout, abort, association refused/rejected, connection refused) or
  ``PERMANENT`` (0xA9xx, 0xCxxx, other failures, SOP class not accepted).
* Objects listed in ``skip`` (already acknowledged) are not sent again.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context, evt
from pynetdicom.association import Association

from cad_node.config import DestinationConfig
from cad_node.dimse import Status
from cad_node.export.status import SendOutcome, classify_status
from cad_node.tls import client_context

__all__ = [
    "DEFAULT_MAX_PDU",
    "EchoResult",
    "ObjectResult",
    "OutboundObject",
    "SendReport",
    "echo",
    "send_objects",
]

LOG = logging.getLogger(__name__)

#: Maximum PDU we offer on outbound associations (bytes, PS3.8 D.1): large PDUs
#: cut per-PDU overhead for multi-megabyte SEG objects.
DEFAULT_MAX_PDU = 4 * 1024 * 1024
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: Verification SOP Class (PS3.4 A.4), used for C-ECHO.
VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"


@dataclass(frozen=True)
class OutboundObject:
    """A result object stored on disk, ready to send."""

    kind: str
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str

    @classmethod
    def from_file(cls, path: Path, kind: str) -> OutboundObject:
        """Describe a DICOM Part 10 file (reads its header only)."""
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return cls(kind, Path(path), str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                   str(ds.file_meta.TransferSyntaxUID))


@dataclass(frozen=True)
class ObjectResult:
    """The fate of one object."""

    obj: OutboundObject
    outcome: SendOutcome
    status: int | None = None
    error: str | None = None


@dataclass
class SendReport:
    """Result of one :func:`send_objects` call."""

    destination: str
    results: list[ObjectResult] = field(default_factory=list)
    #: Association-level error (refused, rejected, aborted), if any.
    error: str | None = None
    #: Whether TCP_NODELAY was in effect on the association's socket.
    tcp_nodelay: bool = False
    elapsed_s: float = 0.0

    @property
    def stored(self) -> list[ObjectResult]:
        """Objects the destination acknowledged."""
        return [r for r in self.results if r.outcome is SendOutcome.STORED]

    @property
    def retryable(self) -> list[ObjectResult]:
        """Objects to send again later."""
        return [r for r in self.results if r.outcome is SendOutcome.RETRYABLE]

    @property
    def permanent(self) -> list[ObjectResult]:
        """Objects that can never be stored there."""
        return [r for r in self.results if r.outcome is SendOutcome.PERMANENT]


@dataclass(frozen=True)
class EchoResult:
    """Outcome of a C-ECHO."""

    destination: str
    ok: bool
    status: int | None
    elapsed_s: float
    error: str | None = None


def _nodelay_handler(flags: dict[str, bool]) -> Callable[[Any], None]:
    def _on_open(event: Any) -> None:
        sock = getattr(getattr(event.assoc.dul, "socket", None), "socket", None)
        if isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            flags["nodelay"] = bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))

    return _on_open


def _make_ae(calling_ae: str, dest: DestinationConfig) -> AE:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = dest.timeout_s
    ae.dimse_timeout = dest.timeout_s
    ae.network_timeout = dest.timeout_s
    ae.connection_timeout = dest.timeout_s
    return ae


def _associate(
    ae: AE, dest: DestinationConfig, contexts: list[Any], max_pdu: int, flags: dict[str, bool]
) -> Association:
    # DICOM TLS (BCP 195) when the destination is configured for it
    tls_args = (client_context(dest.tls), dest.host) if dest.tls is not None else None
    return ae.associate(
        dest.host, dest.port, contexts=contexts, ae_title=dest.ae_title, max_pdu=max_pdu,
        evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay_handler(flags))], tls_args=tls_args,
    )


def _association_error(assoc: Association) -> str:
    if assoc.is_rejected:
        return "association rejected by the destination"
    if assoc.is_aborted:
        return "association aborted (connection refused, reset or timed out)"
    return "association could not be established"


def send_objects(
    dest: DestinationConfig,
    objects: Sequence[OutboundObject],
    *,
    calling_ae: str,
    max_pdu: int = DEFAULT_MAX_PDU,
    skip: Collection[str] = (),
    on_stored: Callable[[ObjectResult], None] | None = None,
) -> SendReport:
    """Send ``objects`` to ``dest`` over one association.

    Parameters
    ----------
    dest : DestinationConfig
        The destination (host, port, AE title, timeout).
    objects : sequence of OutboundObject
        Objects to send, in order.
    calling_ae : str
        Our AE title.
    max_pdu : int
        Maximum PDU length we offer to receive.
    skip : collection of str
        SOP Instance UIDs already acknowledged; not sent again.
    on_stored : callable, optional
        Called for every acknowledged object as soon as its response arrives
        (the caller records it durably, so a crash right after never resends).

    Returns
    -------
    SendReport
        One result per object not skipped.
    """
    t0 = time.monotonic()
    report = SendReport(dest.name)
    todo = [o for o in objects if o.sop_instance_uid not in skip]
    if not todo:
        return report
    syntaxes: dict[str, list[str]] = {}
    for o in todo:
        lst = syntaxes.setdefault(o.sop_class_uid, [])
        for ts in (o.transfer_syntax_uid, *_UNCOMPRESSED):
            if ts not in lst:
                lst.append(ts)
    # Verification is always proposed so that an association whose storage
    # contexts are all refused is still established and each object can be
    # reported as "SOP class not supported" (permanent) instead of an abort.
    contexts = [build_context(sop, tss) for sop, tss in syntaxes.items()]
    contexts.append(build_context(VERIFICATION_SOP_CLASS))
    flags: dict[str, bool] = {}
    ae = _make_ae(calling_ae, dest)
    try:
        assoc = _associate(ae, dest, contexts, max_pdu, flags)
    except OSError as exc:  # e.g. name resolution
        assoc = None
        report.error = f"cannot connect to {dest.host}:{dest.port}: {exc}"
    report.tcp_nodelay = flags.get("nodelay", False)
    if assoc is None or not assoc.is_established:
        if assoc is not None:
            report.error = _association_error(assoc)
        report.results = [ObjectResult(o, SendOutcome.RETRYABLE, None, report.error) for o in todo]
        report.elapsed_s = time.monotonic() - t0
        ae.shutdown()
        return report
    try:
        for index, obj in enumerate(todo):
            result = _store_one(assoc, obj)
            report.results.append(result)
            if result.outcome is SendOutcome.STORED and on_stored is not None:
                on_stored(result)
            if not assoc.is_established:
                report.error = result.error or "association lost"
                report.results.extend(
                    ObjectResult(o, SendOutcome.RETRYABLE, None, report.error)
                    for o in todo[index + 1:]
                )
                break
    finally:
        if assoc.is_established:
            assoc.release()
        ae.shutdown()
    report.elapsed_s = time.monotonic() - t0
    return report


def _accepted_syntaxes(assoc: Association, sop_class_uid: str) -> list[str]:
    return [
        str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
        if str(cx.abstract_syntax) == sop_class_uid
    ]


def _store_one(assoc: Association, obj: OutboundObject) -> ObjectResult:
    accepted = _accepted_syntaxes(assoc, obj.sop_class_uid)
    if not accepted:
        return ObjectResult(obj, SendOutcome.PERMANENT, int(Status.SOP_CLASS_NOT_SUPPORTED),
                            f"destination accepted no presentation context for {obj.sop_class_uid}")
    try:
        ds = pydicom.dcmread(obj.path)
    except (OSError, ValueError) as exc:
        return ObjectResult(obj, SendOutcome.PERMANENT, None, f"cannot read {obj.path}: {exc}")
    ts = UID(obj.transfer_syntax_uid)
    if obj.transfer_syntax_uid not in accepted and ts.is_compressed:
        ds.decompress()
    try:
        rsp = assoc.send_c_store(ds)
    except (ValueError, AttributeError, RuntimeError) as exc:
        return ObjectResult(obj, SendOutcome.PERMANENT, None, f"cannot encode: {exc}")
    status = rsp.get("Status") if rsp else None
    if status is None:
        return ObjectResult(obj, SendOutcome.RETRYABLE, None,
                            "no C-STORE response (DIMSE timeout or association aborted)")
    outcome = classify_status(int(status))
    error = None if outcome is SendOutcome.STORED else f"C-STORE status 0x{int(status):04X}"
    return ObjectResult(obj, outcome, int(status), error)


def echo(dest: DestinationConfig, *, calling_ae: str) -> EchoResult:
    """C-ECHO (Verification, PS3.4 Annex A) the destination.

    Returns
    -------
    EchoResult
        ``ok`` when the association was accepted and the status was Success.
    """
    t0 = time.monotonic()
    ae = _make_ae(calling_ae, dest)
    try:
        assoc = _associate(ae, dest, [build_context(VERIFICATION_SOP_CLASS)], DEFAULT_MAX_PDU, {})
    except OSError as exc:
        ae.shutdown()
        return EchoResult(dest.name, False, None, time.monotonic() - t0, str(exc))
    try:
        if not assoc.is_established:
            return EchoResult(dest.name, False, None, time.monotonic() - t0,
                              _association_error(assoc))
        rsp = assoc.send_c_echo()
        status = int(rsp.Status) if rsp and "Status" in rsp else None
        assoc.release()
        return EchoResult(dest.name, status == Status.SUCCESS, status,
                          time.monotonic() - t0,
                          None if status == Status.SUCCESS else "no or failed C-ECHO response")
    finally:
        ae.shutdown()
