"""The DICOM network edge: a pynetdicom C-ECHO / C-STORE SCP with admission checks.

Admission (checked when the A-ASSOCIATE-RQ arrives, answered with
A-ASSOCIATE-RJ, PS3.8 9.3.4):

* the called AE title must equal ``node.ae_title`` (reason 7,
  called-AE-title-not-recognized);
* the calling AE title **and** the source IP must match one ``peers`` entry,
  a host name there being resolved once at start (reason 3,
  calling-AE-title-not-recognized, when the AE title is unknown; reason 1,
  no-reason-given, when it is known but the address is not its own), unless
  ``node.accept_any`` is true;
* at most ``node.max_associations`` at once (transient, local-limit-exceeded;
  done by pynetdicom).

Limits: finite ACSE, DIMSE and network timeouts; a large maximum PDU; every
accepted socket gets ``TCP_NODELAY``; a per-association byte cap (a C-STORE
whose data set would take the association past ``max_bytes_per_association``
is refused with 0xA700, and an association that keeps sending more than
:data:`ABORT_SLACK_BYTES` beyond the cap, or a single message larger than
the cap or :data:`MAX_DATA_SET_BYTES`, is aborted, bounding the memory a peer
can make the node buffer); the spool's free-disk watermark (0xA700).

Handler contract (``EVT_C_STORE``): the handler never decodes the data set
with pydicom and never lets an exception escape - every outcome is a
:class:`~cad_node.scp.status.Status`.  It answers Success only after
:meth:`cad_node.storage.Spool.store` returned, i.e. after the file is durable
and its index row committed.

Throughput: pynetdicom's acceptor polls with 1 ms sleeps in two threads; the
private ``_Association``/``_EventSocket`` below replace that polling with
blocking waits (written against pynetdicom 3.0; the dependency is pinned
below 4).  See docs/benchmarks.md "Ingest".
"""

from __future__ import annotations

import ipaddress
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
import weakref
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, Protocol, cast

from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from cad_node.config import Settings
from cad_node.scp.contexts import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, VERIFICATION_SOP_CLASS
from cad_node.scp.status import Status
from cad_node.storage.parse import MalformedDatasetError, MissingAttributeError
from cad_node.storage.records import StudyComplete
from cad_node.storage.spool import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    InsufficientStorageError,
    Spool,
    StoreStatus,
    UIDMismatchError,
)
from cad_node.study.assembler import StudyAssembler
from cad_node.uids import InvalidUIDError

__all__ = [
    "ABORT_SLACK_BYTES",
    "MAX_DATA_SET_BYTES",
    "Admission",
    "AssociationObserver",
    "NodeServer",
    "RejectReason",
]

log = logging.getLogger(__name__)

#: Bytes an association may receive beyond its cap (while its C-STOREs are
#: being refused) before it is aborted.
ABORT_SLACK_BYTES = 64 * 1024**2
#: Largest single C-STORE message accepted (pynetdicom holds a data set in
#: memory until it is complete): a bigger one aborts the association.
MAX_DATA_SET_BYTES = 4 * 1024**3

#: Longest the DUL reactor waits in ``select`` for data or a wake-up before
#: it checks its timers (seconds); see _EventSocket.
DUL_IDLE_WAIT_S = 0.005
#: Longest the association reactor blocks waiting for a DIMSE message before
#: it checks for release, abort and the network timeout (seconds).
REACTOR_WAIT_S = 0.005

_SUPPORTED_STORAGE = frozenset(STORAGE_SOP_CLASSES.values())


@dataclass(frozen=True)
class RejectReason:
    """A-ASSOCIATE-RJ parameters (PS3.8 9.3.4, Table 9-21)."""

    result: int
    source: int
    diagnostic: int

    @classmethod
    def no_reason(cls) -> RejectReason:
        """Rejected-permanent, service-user, no-reason-given (1, 1, 1)."""
        return cls(0x01, 0x01, 0x01)

    @classmethod
    def calling_ae_not_recognized(cls) -> RejectReason:
        """Rejected-permanent, service-user, calling-AE-title-not-recognized (1, 1, 3)."""
        return cls(0x01, 0x01, 0x03)

    @classmethod
    def called_ae_not_recognized(cls) -> RejectReason:
        """Rejected-permanent, service-user, called-AE-title-not-recognized (1, 1, 7)."""
        return cls(0x01, 0x01, 0x07)


def _addresses(host: str) -> set[str]:
    """IP addresses of a peer ``host`` (an IP address, or a name resolved once at start)."""
    try:
        ipaddress.ip_address(host)
        return {host}
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError as exc:
        log.warning("peer host %r does not resolve (%s); it cannot connect", host, exc)
        return set()
    return {str(info[4][0]) for info in infos}


class Admission:
    """Decide whether an association request is admitted.

    Parameters
    ----------
    settings : Settings
        Uses ``node.ae_title``, ``node.accept_any`` and ``peers``.
    """

    def __init__(self, settings: Settings) -> None:
        self.ae_title = settings.node.ae_title
        self.accept_any = settings.node.accept_any
        self.peers: dict[str, set[str]] = {}
        for peer in settings.peers:
            self.peers.setdefault(peer.ae_title, set()).update(_addresses(peer.host))

    def check(self, calling_ae: str, called_ae: str, address: str) -> RejectReason | None:
        """Return why the request is rejected, or ``None`` to admit it."""
        if called_ae.strip() != self.ae_title:
            return RejectReason.called_ae_not_recognized()
        if self.accept_any:
            return None
        hosts = self.peers.get(calling_ae.strip())
        if hosts is None:
            return RejectReason.calling_ae_not_recognized()
        if address not in hosts:
            return RejectReason.no_reason()
        return None


class AssociationObserver(Protocol):
    """Told about every association's outcome (the audit trail implements it).

    Each method is called once per association, from the association's
    thread; it must not raise and must not block for long.
    """

    def accepted(self, calling_ae: str, called_ae: str, address: str) -> None:
        """An A-ASSOCIATE-RQ was accepted."""

    def rejected(self, calling_ae: str, called_ae: str, address: str,
                 reason: RejectReason) -> None:
        """An A-ASSOCIATE-RQ was rejected by the admission policy."""

    def ended(self, calling_ae: str, address: str, how: str, stored: int,
              studies: dict[str, int]) -> None:
        """An accepted association ended (``how``: released or aborted).

        ``stored`` counts the instances newly stored, ``studies`` the same by
        Study Instance UID.
        """


class _AdmissionACSE(ACSE):
    """ACSE provider that applies :class:`Admission` before negotiation."""

    def __init__(self, assoc: Association, admission: Admission,
                 observer: AssociationObserver | None = None) -> None:
        super().__init__(assoc)
        self._admission = admission
        self._observer = observer

    def _negotiate_as_acceptor(self) -> None:
        rq = self.requestor.primitive
        calling = str(rq.calling_ae_title) if rq is not None else ""
        called = str(rq.called_ae_title) if rq is not None else ""
        address = self.requestor.address
        reason = self._admission.check(calling, called, address)
        if reason is not None:
            log.warning(
                "association rejected: calling AE %r called AE %r from %s (diagnostic %d)",
                calling, called, address, reason.diagnostic,
            )
            self.send_reject(reason.result, reason.source, reason.diagnostic)
            if self._observer is not None:
                self._observer.rejected(calling.strip(), called.strip(), address, reason)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        if rq is not None:
            self._prefer_requested_syntaxes(rq.presentation_context_definition_list)
        super()._negotiate_as_acceptor()

    def _prefer_requested_syntaxes(self, requested: list[Any]) -> None:
        """Reorder our transfer syntaxes so the requestor's first choices win.

        pynetdicom accepts, per proposed context, the first transfer syntax
        of the *acceptor's* list that was proposed.  The node wants the data
        as the sender holds it (no transcoding by the sender, which may not
        even have the codec), so for each abstract syntax the syntaxes that
        some proposed context lists *first* move to the front, in proposal
        order.  The contexts are this association's own copies.
        """
        firsts: dict[str, list[str]] = {}
        for cx in requested:
            if cx.transfer_syntax:
                firsts.setdefault(str(cx.abstract_syntax), []).append(str(cx.transfer_syntax[0]))
        for ac in self.acceptor.supported_contexts:
            preferred = firsts.get(str(ac.abstract_syntax))
            if not preferred:
                continue
            ours = [str(ts) for ts in ac.transfer_syntax]
            front = [ts for ts in dict.fromkeys(preferred) if ts in ours]
            ordered: list[str | bytes | UID] = [*front, *(ts for ts in ours if ts not in front)]
            ac.transfer_syntax = ordered


class _Association(Association):
    """Acceptor association whose reactor waits on its message queue.

    pynetdicom's acceptor reactor polls for a complete DIMSE message with a
    1 ms ``sleep`` per loop; on a busy machine each sleep costs far more and
    bounds C-STORE throughput.  This reactor blocks on the queue instead
    (waking as soon as a message is decoded) and otherwise performs the same
    checks, in the same order, as pynetdicom 3.0's ``_run_reactor``.
    """

    def _run_reactor(self) -> None:
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=REACTOR_WAIT_S)
            except queue.Empty:
                context_id, msg = None, None
            if isinstance(msg, StoreRequest):
                self._serve_store(msg, int(context_id))
            elif msg:
                self._serve_request(msg, int(context_id))  # type: ignore[arg-type]

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                log.error("network timeout reached; aborting association")
                self.abort()
                self.kill()
                return

    def _serve_store(self, req: StoreRequest, context_id: int) -> None:
        """Answer a C-STORE-RQ decoded by :class:`_FastDIMSE` (PS3.7 9.3.1).

        The same checks as pynetdicom's ``_serve_request`` for a C-STORE:
        ignored during release, an unaccepted context aborts the association;
        then the node's store handler (which never raises) and the response,
        unless the association ended meanwhile (e.g. aborted at its byte cap).
        """
        if self._sent_release:
            log.warning("C-STORE-RQ received during association release, ignoring")
            return
        context = self._accepted_cx.get(context_id)
        if context is None:
            log.warning("C-STORE-RQ on invalid or rejected context ID %d; aborting", context_id)
            self.abort()
            return
        server = self._server
        assert isinstance(server, _Server)
        status = server.store_handler(self, req, str(context.transfer_syntax[0]))
        if not self.is_established:
            return
        pdata = P_DATA()
        command = encode_c_store_rsp_raw(
            req.sop_class_raw, req.sop_instance_raw, req.message_id, status
        )
        pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
        self.dul.send_pdu(pdata)


#: C-STORE-RSP Command Field (PS3.7 E.1-1 / 9.3.1.2).
_C_STORE_RSP = 0x8001
#: Command Data Set Type "no data set present" (PS3.7 E.1-1).
_NO_DATA_SET = 0x0101


def _command_element(elem: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element of command group 0000 (PS3.7 6.3.1)."""
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def _even(raw: bytes) -> bytes:
    """NULL-pad a UI value to even length (PS3.5 6.2)."""
    return raw + b"\x00" if len(raw) % 2 else raw


def encode_c_store_rsp_raw(
    sop_class_uid: bytes, sop_instance_uid: bytes, message_id: int, status: int
) -> bytes:
    """:func:`encode_c_store_rsp` for UIDs given as the bytes the request carried."""
    body = b"".join((
        _command_element(0x0002, _even(sop_class_uid)),
        _command_element(0x0100, struct.pack("<H", _C_STORE_RSP)),
        _command_element(0x0120, struct.pack("<H", message_id)),
        _command_element(0x0800, struct.pack("<H", _NO_DATA_SET)),
        _command_element(0x0900, struct.pack("<H", status)),
        _command_element(0x1000, _even(sop_instance_uid)),
    ))
    return _command_element(0x0000, struct.pack("<I", len(body))) + body


def encode_c_store_rsp(
    sop_class_uid: str, sop_instance_uid: str, message_id: int, status: int
) -> bytes:
    """Encode a C-STORE-RSP command set (PS3.7 9.3.1.2, Table 9.3-2).

    Implicit VR Little Endian, elements in ascending order: Command Group
    Length, Affected SOP Class UID, Command Field (8001H), Message ID Being
    Responded To, Command Data Set Type (0101H, none), Status, Affected SOP
    Instance UID.  UIDs are NULL-padded to even length (PS3.5 6.2).

    Raises
    ------
    UnicodeEncodeError
        A UID is not ASCII (the caller falls back to pynetdicom's encoder).
    """
    def ui(uid: str) -> bytes:
        raw = uid.encode("ascii")
        return raw + b"\x00" if len(raw) % 2 else raw

    body = b"".join((
        _command_element(0x0002, ui(sop_class_uid)),
        _command_element(0x0100, struct.pack("<H", _C_STORE_RSP)),
        _command_element(0x0120, struct.pack("<H", message_id)),
        _command_element(0x0800, struct.pack("<H", _NO_DATA_SET)),
        _command_element(0x0900, struct.pack("<H", status)),
        _command_element(0x1000, ui(sop_instance_uid)),
    ))
    return _command_element(0x0000, struct.pack("<I", len(body))) + body


#: C-STORE-RQ Command Field (PS3.7 E.1-1 / 9.3.1.1).
_C_STORE_RQ = 0x0001
_COMMAND_ELEMENT = struct.Struct("<HHI")
#: Command elements (PS3.7 E.1-1) read from a C-STORE-RQ.
_CMD_GROUP_LENGTH = 0x0000
_CMD_AFFECTED_SOP_CLASS_UID = 0x0002
_CMD_COMMAND_FIELD = 0x0100
_CMD_MESSAGE_ID = 0x0110
_CMD_PRIORITY = 0x0700
_CMD_DATA_SET_TYPE = 0x0800
_CMD_AFFECTED_SOP_INSTANCE_UID = 0x1000
_CMD_MOVE_ORIGINATOR_AE = 0x1030
_CMD_MOVE_ORIGINATOR_ID = 0x1031
#: Elements a C-STORE-RQ may carry (PS3.7 Table 9.3-1); any other makes the
#: fast path hand the message to pynetdicom.
_C_STORE_RQ_ELEMENTS = frozenset({
    _CMD_GROUP_LENGTH, _CMD_AFFECTED_SOP_CLASS_UID, _CMD_COMMAND_FIELD, _CMD_MESSAGE_ID,
    _CMD_PRIORITY, _CMD_DATA_SET_TYPE, _CMD_AFFECTED_SOP_INSTANCE_UID,
    _CMD_MOVE_ORIGINATOR_AE, _CMD_MOVE_ORIGINATOR_ID,
})


@dataclass
class StoreRequest:
    """A C-STORE-RQ decoded without pydicom (PS3.7 9.3.1.1, Table 9.3-1).

    UIDs are kept as received (``*_raw``, possibly NULL-padded) so the
    response echoes them byte for byte; ``dataset`` is filled in as the data
    set fragments arrive.
    """

    message_id: int
    sop_class_raw: bytes
    sop_instance_raw: bytes
    dataset: bytes = b""

    @property
    def sop_class_uid(self) -> str:
        """Affected SOP Class UID (latin-1 decoded, padding kept)."""
        return self.sop_class_raw.decode("latin-1")

    @property
    def sop_instance_uid(self) -> str:
        """Affected SOP Instance UID (latin-1 decoded, padding kept)."""
        return self.sop_instance_raw.decode("latin-1")


def decode_c_store_rq(command: bytes) -> StoreRequest | None:
    """Decode a C-STORE-RQ command set (Implicit VR Little Endian, PS3.7 6.3.1).

    Returns
    -------
    StoreRequest or None
        ``None`` when ``command`` is not a well-formed C-STORE-RQ with a data
        set (another command, a truncated or unexpected element, a missing
        Message ID or UID): the caller then lets pynetdicom decode it.
    """
    values: dict[int, bytes] = {}
    pos, end = 0, len(command)
    unpack = _COMMAND_ELEMENT.unpack_from
    while pos < end:
        if pos + 8 > end:
            return None
        group, elem, length = unpack(command, pos)
        pos += 8
        if group != 0x0000 or elem not in _C_STORE_RQ_ELEMENTS or pos + length > end:
            return None
        values[elem] = command[pos : pos + length]
        pos += length
    field = values.get(_CMD_COMMAND_FIELD)
    data_set_type = values.get(_CMD_DATA_SET_TYPE)
    message_id = values.get(_CMD_MESSAGE_ID)
    sop_class = values.get(_CMD_AFFECTED_SOP_CLASS_UID)
    sop_instance = values.get(_CMD_AFFECTED_SOP_INSTANCE_UID)
    if (
        field is None or len(field) != 2 or struct.unpack("<H", field)[0] != _C_STORE_RQ
        or data_set_type is None or len(data_set_type) != 2
        or struct.unpack("<H", data_set_type)[0] == _NO_DATA_SET
        or message_id is None or len(message_id) != 2
        or sop_class is None or sop_instance is None
    ):
        return None
    return StoreRequest(struct.unpack("<H", message_id)[0], sop_class, sop_instance)


class _FastDIMSE(DIMSEServiceProvider):
    """DIMSE provider that decodes C-STORE requests and encodes responses without pydicom.

    Receiving: pynetdicom decodes every command set into a pydicom Dataset
    and builds a validated primitive from it, then its storage service class
    builds the response primitive the same way: about a third of the node's
    CPU per instance.  A C-STORE-RQ command is a handful of fixed group-0000
    elements, so :meth:`receive_primitive` decodes it directly
    (:func:`decode_c_store_rq`), collects the data set fragments (PS3.8 E.2)
    and queues a :class:`StoreRequest`, which :class:`_Association` answers
    through the node's store handler.  Any other message (C-ECHO, a command
    the fast decoder does not recognise) is handed to pynetdicom unchanged,
    fragment by fragment.  ``EVT_DIMSE_RECV`` and ``EVT_C_STORE`` are not
    triggered for fast-path requests (the node binds no handler to the
    former and handles the latter itself).

    Sending: a C-STORE-RSP is seven fixed elements, so it is encoded directly
    (:func:`encode_c_store_rsp`) and sent as one P-DATA-TF with a single
    last-fragment command PDV (PS3.8 E.2).  Every other message goes through
    pynetdicom.  ``EVT_DIMSE_SENT`` is not triggered for these responses.
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._command: list[bytes] = []
        self._store: StoreRequest | None = None
        self._store_context = 0
        self._data: list[bytes] = []
        #: The message being received goes through pynetdicom.
        self._legacy = False

    def _to_pynetdicom(self, context_id: int, pdv: bytes) -> None:
        primitive = P_DATA()
        primitive.presentation_data_value_list.append((context_id, pdv))
        super().receive_primitive(primitive)
        # pynetdicom resets ``message`` once a message is complete
        self._legacy = self.message is not None

    def receive_primitive(self, primitive: P_DATA) -> None:
        for context_id, pdv in primitive.presentation_data_value_list:
            if self._legacy or not pdv:
                self._to_pynetdicom(context_id, pdv)
                continue
            header = pdv[0]  # message control header (PS3.8 E.2)
            if header & 0x01:  # command fragment
                if self._store is not None:  # a new command before the data set ended
                    self._store, self._data = None, []
                self._command.append(pdv[1:])
                if not header & 0x02:
                    continue
                command = b"".join(self._command)
                self._command = []
                store = decode_c_store_rq(command)
                if store is None:
                    self._to_pynetdicom(context_id, b"\x03" + command)
                else:
                    self._store, self._store_context, self._data = store, context_id, []
            elif self._store is None:  # data set without a command: pynetdicom decides
                self._to_pynetdicom(context_id, pdv)
            else:
                self._data.append(memoryview(pdv)[1:])  # type: ignore[arg-type]
                if header & 0x02:  # last data set fragment
                    store, self._store = self._store, None
                    store.dataset = b"".join(self._data)
                    self._data = []
                    self.msg_queue.put((self._store_context, store))  # type: ignore[arg-type]

    def send_msg(self, primitive: Any, context_id: int) -> None:
        if (
            isinstance(primitive, C_STORE)
            and primitive.MessageIDBeingRespondedTo is not None
            and primitive.Status is not None
        ):
            try:
                command = encode_c_store_rsp(
                    str(primitive.AffectedSOPClassUID or ""),
                    str(primitive.AffectedSOPInstanceUID or ""),
                    int(primitive.MessageIDBeingRespondedTo),
                    int(primitive.Status),
                )
            except (UnicodeEncodeError, struct.error):
                pass
            else:
                pdata = P_DATA()
                # message control header 03H: command, last fragment (PS3.8 E.2)
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)


class _WakeQueue(queue.Queue):  # type: ignore[type-arg]
    """The DUL's to-provider queue: every put() wakes the DUL reactor."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class _EventSocket(AssociationSocket):
    """Association socket whose ``ready`` blocks until data or a wake-up.

    pynetdicom's DUL reactor polls ``ready`` (a zero-timeout ``select``) and
    sleeps between polls, so a C-STORE waits for a sleep to end before its
    first PDU is read and again before its response is sent.  Here ``ready``
    waits in ``select`` on the peer socket *and* a socketpair that
    :class:`_WakeQueue` writes to whenever the association queues a
    primitive to send, for at most :data:`DUL_IDLE_WAIT_S`; the reactor's own
    sleep is set to zero.  No polling, no added latency.
    """

    def __init__(self, assoc: Association, client_socket: socket.socket) -> None:
        super().__init__(assoc, client_socket=client_socket)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def wake(self) -> None:
        """Interrupt a waiting :attr:`ready`."""
        try:
            self._wake_w.send(b"\x00")
        except OSError:  # buffer full (already woken) or closed
            pass

    @property
    def ready(self) -> bool:
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            readable, _, _ = select.select([sock, self._wake_r], [], [], DUL_IDLE_WAIT_S)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        if self._wake_r in readable:
            try:
                self._wake_r.recv(4096)
            except OSError:
                pass
        return sock in readable

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly ``nr_bytes`` (fewer only if the peer closes).

        pynetdicom reads in 4 KiB ``recv`` calls (about 130 per 512x512 CT
        instance); this reads into one buffer with as few calls as the
        kernel allows.
        """
        sock = self.socket
        assert sock is not None
        buf = bytearray(nr_bytes)
        view = memoryview(buf)
        got = 0
        while got < nr_bytes:
            n = sock.recv_into(view[got:], nr_bytes - got)
            if not n:
                view.release()
                del buf[got:]
                return buf
            got += n
        view.release()
        return buf

    def close(self) -> None:
        super().close()
        for s in (self._wake_r, self._wake_w):
            try:
                s.close()
            except OSError:
                pass


class _RequestHandler(RequestHandler):
    """Create acceptor associations with admission checks and a faster reactor."""

    def _create_association(self) -> Association:
        server = self.server
        assert isinstance(server, _Server)
        assoc = _Association(self.ae, MODE_ACCEPTOR)
        assoc._server = server
        assoc.name = f"AcceptorThread@{time.strftime('%Y%m%d%H%M%S')}"
        sock = _EventSocket(assoc, self.request)
        assoc.set_socket(sock)
        assoc.dul.to_provider_queue = _WakeQueue(sock.wake)
        assoc.dimse = _FastDIMSE(assoc)
        assoc.dul._run_loop_delay = 0.0
        assoc.acceptor.maximum_length = self.ae.maximum_pdu_size
        assoc.acceptor.ae_title = server.ae_title
        assoc.acceptor.address_info = self.local
        assoc.acceptor.implementation_class_uid = self.ae.implementation_class_uid
        assoc.acceptor.implementation_version_name = self.ae.implementation_version_name
        assoc.acceptor.supported_contexts = deepcopy(server.contexts)
        assoc.requestor.address_info = self.remote
        for event, handlers in server._handlers.items():
            if event.is_intervention and handlers:
                assoc.bind(event, *handlers)
            elif isinstance(event, evt.NotificationEvent):
                for handler in handlers:
                    assoc.bind(event, handler[0], handler[1])  # type: ignore[index]
        assoc.acse = _AdmissionACSE(assoc, server.admission, server.observer)
        return assoc


class _Server(ThreadedAssociationServer):
    """Association server that sets TCP_NODELAY on every accepted socket."""

    #: Read once per new association, so replacing it (live reload) leaves
    #: associations in flight on the policy they were admitted with.
    admission: Admission
    observer: AssociationObserver | None = None
    #: ``(assoc, request, transfer syntax) -> status``; never raises.
    store_handler: Callable[[Association, StoreRequest, str], int]

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        sock, address = super().get_request()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address


@dataclass
class _AssocState:
    received: int = 0
    #: Bytes received since the last C-STORE reached the handler (the data
    #: set being received is buffered in memory by pynetdicom).
    pending: int = 0
    aborting: bool = False
    #: Instances newly stored, in total and per Study Instance UID (audit trail).
    stored: int = 0
    studies: dict[str, int] = field(default_factory=dict)


def _decode_any_uid(value: Any) -> tuple[bool, str]:
    """pynetdicom UI validator that defers validation to the C-STORE handler."""
    return (True, "") if isinstance(value, str) else (False, "must be a str")


def _log_hand_off(event: StudyComplete) -> None:
    log.info(
        "study=%s generation=%d complete with %d instance(s); no hand-off consumer configured",
        event.study_instance_uid, event.generation, len(event.instances),
    )


class NodeServer:
    """The receiving node: SCP + durable spool + study assembler, in-process.

    Parameters
    ----------
    settings : Settings
        Whole configuration (``node``, ``peers``, ``study`` are used).
    on_study_complete : callable, optional
        Hand-off consumer, see :class:`cad_node.study.StudyAssembler` for the
        contract (called once per generation from the assembler thread;
        at-least-once across crashes).  ``None`` logs the event only.

    Notes
    -----
    ``start()`` opens the spool (taking its lock), binds the port and starts
    the assembler thread; ``stop()`` undoes all of it.  Usable as a context
    manager.  :attr:`spool` and :attr:`assembler` are available after start.
    """

    def __init__(
        self,
        settings: Settings,
        on_study_complete: Callable[[StudyComplete], None] | None = None,
        observer: AssociationObserver | None = None,
    ) -> None:
        self.settings = settings
        self.on_study_complete = on_study_complete or _log_hand_off
        self.observer = observer
        self._admission = Admission(settings)
        self.spool: Spool | None = None
        self.assembler: StudyAssembler | None = None
        self._ae: AE | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._states: weakref.WeakKeyDictionary[Any, _AssocState] = weakref.WeakKeyDictionary()
        self._states_lock = threading.Lock()

    # -- admission policy (replaceable: live reload) ------------------------
    @property
    def admission(self) -> Admission:
        """The policy new associations are admitted with.

        Assigning a new :class:`Admission` takes effect for the next
        A-ASSOCIATE-RQ; associations in flight are not affected.
        """
        return self._admission

    @admission.setter
    def admission(self, policy: Admission) -> None:
        self._admission = policy
        if self._server is not None:
            self._server.admission = policy

    # -- life cycle ---------------------------------------------------------
    @property
    def port(self) -> int:
        """The TCP port the SCP listens on (after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.server_address[1])

    def _make_ae(self) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.maximum_associations = node.max_associations
        ae.maximum_pdu_size = node.max_pdu
        ae.require_called_aet = True
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        for uid in STORAGE_SOP_CLASSES.values():
            ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
        return ae

    def start(self) -> None:
        """Open the spool, bind the SCP and start the assembler."""
        if self._server is not None:
            return
        # pynetdicom's per-PDU "standard" logging handlers cost ~10% of a
        # C-STORE; the node logs its own outcomes instead.
        _config.LOG_HANDLER_LEVEL = "none"
        # pynetdicom refuses to decode a command whose UID is longer than 64
        # characters and then never answers; the node validates UIDs itself,
        # strictly (cad_node.uids), so such a request gets 0xC101 instead.
        _config.VALIDATORS["UI"] = _decode_any_uid
        node = self.settings.node
        self.spool = Spool.open(
            node.storage_dir,
            node.min_free_bytes,
            own_manufacturers=frozenset({self.settings.results.manufacturer}),
        )
        try:
            self.assembler = StudyAssembler(
                self.spool.index, self.settings.study, self.on_study_complete
            )
            self._ae = self._make_ae()
            handlers: list[evt.EventHandlerType] = [
                (evt.EVT_C_ECHO, self._on_echo),
                (evt.EVT_C_STORE, self._on_store),
                (evt.EVT_DATA_RECV, self._on_data),
            ]
            if self.observer is not None:
                handlers += [(evt.EVT_ACCEPTED, self._on_accepted),
                             (evt.EVT_RELEASED, self._on_ended),
                             (evt.EVT_ABORTED, self._on_ended)]
            server = self._ae.make_server(
                (node.host, node.port),
                evt_handlers=handlers,
                server_class=_Server,
                request_handler=_RequestHandler,
            )
            assert isinstance(server, _Server)
            server.admission = self.admission
            server.observer = self.observer
            server.store_handler = self._on_fast_store
            # Registered like AE.start_server() does, so AE.shutdown() stops it.
            self._ae._servers.append(server)
            self._server = server
            self._thread = threading.Thread(
                target=server.serve_forever, name=f"scp-{node.ae_title}", daemon=True
            )
            self._thread.start()
            self.assembler.start()
        except BaseException:
            self.stop()
            raise
        log.info(
            "SCP %s listening on %s:%d, spool %s",
            node.ae_title, node.host, self.port, self.spool.root,
        )

    def stop(self) -> None:
        """Stop accepting, abort running associations, stop the assembler, close the spool."""
        if self._ae is not None:
            # Shuts the server down, closes its socket, aborts associations.
            self._ae.shutdown()
            self._ae = None
        self._server = None
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.assembler is not None:
            self.assembler.stop()
            self.assembler = None
        if self.spool is not None:
            self.spool.close()
            self.spool = None

    def __enter__(self) -> NodeServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- handlers -----------------------------------------------------------
    def _state(self, assoc: Any) -> _AssocState:
        with self._states_lock:
            state = self._states.get(assoc)
            if state is None:
                state = self._states[assoc] = _AssocState()
            return state

    def _on_accepted(self, event: evt.Event) -> None:
        if self.observer is not None:
            rq = event.assoc.requestor
            self.observer.accepted(str(rq.ae_title).strip(), str(event.assoc.acceptor.ae_title),
                                   str(rq.address))

    def _on_ended(self, event: evt.Event) -> None:
        if self.observer is not None:
            state = self._state(event.assoc)
            how = "released" if event.event is evt.EVT_RELEASED else "aborted"
            self.observer.ended(str(event.assoc.requestor.ae_title).strip(),
                                str(event.assoc.requestor.address), how, state.stored,
                                dict(state.studies))

    def _on_echo(self, event: evt.Event) -> int:
        return int(Status.SUCCESS)

    def _on_data(self, event: evt.Event) -> None:
        """Count received bytes; abort an association far beyond its byte cap."""
        state = self._state(event.assoc)
        state.received += len(event.data)
        state.pending += len(event.data)
        cap = self.settings.node.max_bytes_per_association
        too_much = state.received > cap + ABORT_SLACK_BYTES
        too_big = state.pending > min(cap, MAX_DATA_SET_BYTES) + ABORT_SLACK_BYTES
        if (too_much or too_big) and not state.aborting:
            state.aborting = True
            log.warning(
                "aborting association from %s (%s): %d bytes received (%d in the current "
                "message), cap %d per association, %d per data set",
                event.assoc.requestor.ae_title, event.assoc.requestor.address,
                state.received, state.pending, cap, MAX_DATA_SET_BYTES,
            )
            threading.Thread(target=event.assoc.abort, daemon=True).start()

    def _on_store(self, event: evt.Event) -> int:
        """Store one C-STORE data set; never raises (see the module docstring)."""
        try:
            return int(self._store(event))
        except Exception:
            log.exception("unexpected error in C-STORE handler")
            return int(Status.PROCESSING_FAILURE)

    def _on_fast_store(self, assoc: Association, req: StoreRequest, transfer_syntax: str) -> int:
        """Store a request decoded by the fast path; never raises (see the module docstring)."""
        try:
            return int(self._store_instance(
                assoc, req.sop_class_uid, req.sop_instance_uid, req.dataset, transfer_syntax
            ))
        except Exception:
            log.exception("unexpected error in C-STORE handler")
            return int(Status.PROCESSING_FAILURE)

    def _store(self, event: evt.Event) -> Status:
        req = cast(C_STORE, event.request)
        dataset: bytes = (
            req.DataSet.getvalue() if isinstance(req.DataSet, BytesIO) else b""
        )
        return self._store_instance(
            event.assoc,
            str(req.AffectedSOPClassUID or ""),
            str(req.AffectedSOPInstanceUID or ""),
            dataset,
            str(event.context.transfer_syntax),
        )

    def _store_instance(
        self,
        assoc: Association,
        sop_class: str,
        sop_instance: str,
        dataset: bytes,
        transfer_syntax: str,
    ) -> Status:
        calling = str(assoc.requestor.ae_title).strip()
        host = str(assoc.requestor.address)
        where = f"sop={sop_instance[:80]!r} from {calling}@{host}"
        state = self._state(assoc)
        state.pending = 0
        if state.received > self.settings.node.max_bytes_per_association:
            log.warning("C-STORE refused (byte cap per association reached): %s", where)
            return Status.OUT_OF_RESOURCES
        if sop_class.rstrip("\x00 ") not in _SUPPORTED_STORAGE:
            log.warning("C-STORE refused (SOP class %r not supported): %s", sop_class, where)
            return Status.SOP_CLASS_NOT_SUPPORTED
        spool = self.spool
        if spool is None:
            return Status.PROCESSING_FAILURE
        try:
            result = spool.store(
                dataset,
                sop_class_uid=sop_class,
                sop_instance_uid=sop_instance,
                transfer_syntax_uid=transfer_syntax,
                calling_ae=calling,
                peer_host=host,
            )
        except InvalidUIDError as exc:
            log.warning("C-STORE failed (invalid UID: %s): %s", exc, where)
            return Status.INVALID_UID
        except UIDMismatchError as exc:
            log.warning("C-STORE failed (%s): %s", exc, where)
            return (
                Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
                if exc.sop_class
                else Status.SOP_INSTANCE_UID_MISMATCH
            )
        except MissingAttributeError as exc:
            log.warning("C-STORE failed (%s): %s", exc, where)
            return Status.DATA_SET_DOES_NOT_MATCH_SOP_CLASS
        except MalformedDatasetError as exc:
            log.warning("C-STORE failed (malformed data set: %s): %s", exc, where)
            return Status.MALFORMED_DATA_SET
        except InsufficientStorageError as exc:
            log.error("C-STORE refused (out of storage: %s): %s", exc, where)
            return Status.OUT_OF_RESOURCES
        except OSError as exc:
            log.error("C-STORE failed (I/O error: %s): %s", exc, where)
            return Status.PROCESSING_FAILURE
        if result.status is StoreStatus.STORED:
            uid = result.header.study_instance_uid
            state.stored += 1
            state.studies[uid] = state.studies.get(uid, 0) + 1
            log.debug(
                "stored instance %d study=%s %s",
                result.instance_id, result.header.study_instance_uid, where,
            )
        return Status.SUCCESS
