"""Every override of pynetdicom internals the SCP relies on, behind a version guard.

pynetdicom's acceptor is sound but was not written for a hostile network or
for throughput: its DUL allocates the receive buffer from the length a peer
announces, waits ``acse_timeout`` for an A-ASSOCIATE-RQ even after the peer
has gone, blocks forever in a half-sent PDU, polls with 1 ms sleeps and
decodes every C-STORE command through pydicom.  The private subclasses below
change exactly that, and nothing else:

* :class:`_FastDUL` - PDUs read by :func:`cad_node.scp.wire.read_pdu`
  (chunked, the buffer grows only as bytes arrive); an A-ASSOCIATE-RQ longer
  than :data:`~cad_node.scp.wire.MAX_ASSOCIATE_PDU_BYTES` gets an
  A-ASSOCIATE-RJ after its header alone was read; before acceptance any
  other PDU longer than that, after
  it a P-DATA-TF longer than our maximum PDU, an unknown PDU type, a
  truncated or undecodable PDU, a socket silent past its deadline and, after
  acceptance, a PDU not complete ``node.pdu_deadline_s`` after its first byte
  (a slow dribble) end the association with an A-ABORT (PS3.8 9.3.8) and the
  socket is closed;
* :class:`_Association` - waits for the A-ASSOCIATE-RQ at most
  ``node.association_request_timeout_s`` and returns at once when the peer
  closes; releases its admission :class:`~cad_node.scp.admission.Ticket`
  when it ends; its reactor blocks on the message queue instead of polling;
* :class:`_FastDIMSE` - decodes C-STORE-RQ without pydicom, caps the command
  set at :data:`~cad_node.scp.wire.MAX_COMMAND_SET_BYTES` and A-ABORTs a
  command that arrives before the previous data set ended, a data-set
  fragment without a command or on another presentation context than its
  command's, and a malformed command set (PS3.8 E.2, PS3.7 6.3.1);
* :class:`_EventSocket` / :class:`_WakeQueue` - the DUL waits in ``select``
  instead of sleeping;
* :class:`_AdmissionACSE` - :class:`~cad_node.scp.admission.Admission`
  before negotiation;
* :class:`_RequestHandler` / :class:`_Server` - admission at TCP accept, the
  TLS handshake in the connection's own thread (bounded by the request
  timeout), ``TCP_NODELAY``;
* :func:`lenient_uid_validation` - the relaxed UI validator, scoped to the
  node's own association threads.

:func:`require_compatible` refuses to start on a pynetdicom other than
:data:`PYNETDICOM_SERIES` or whose private API differs in shape from
:data:`PRIVATE_API` (``tests/unit/test_scp_fastpath_api.py`` checks the same).
"""

from __future__ import annotations

import inspect
import logging
import math
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from copy import deepcopy
from typing import Any, cast

import pynetdicom
from pydicom.uid import UID
from pynetdicom import _config, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.fsm import StateMachine
from pynetdicom.pdu_primitives import A_ASSOCIATE, P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from cad_node.scp.admission import (
    Admission,
    AdmissionEvent,
    RefusalLog,
    RejectReason,
    Ticket,
    Verdict,
)
from cad_node.scp.wire import (
    DEADLINE_SLACK_S,
    MAX_ASSOCIATE_PDU_BYTES,
    MAX_COMMAND_SET_BYTES,
    PDU_HEADER,
    AbortReason,
    PDUError,
    PDUType,
    StoreRequest,
    command_has_data_set,
    decode_c_store_rq,
    encode_a_abort,
    encode_a_associate_rj,
    encode_c_store_rsp,
    encode_c_store_rsp_raw,
    read_pdu,
)

__all__ = [
    "PRIVATE_API",
    "PYNETDICOM_SERIES",
    "IncompatiblePynetdicomError",
    "lenient_uid_validation",
    "private_api_mismatches",
    "require_compatible",
]

log = logging.getLogger("cad_node.scp")

#: The pynetdicom release series the overrides were written against
#: (pyproject pins the same).
PYNETDICOM_SERIES = "3.0."

#: ``(owner, attribute, parameters)``: the private (or overridden) API the
#: overrides call or replace; ``parameters`` is the callable's parameter
#: names, ``None`` for a plain attribute.
PRIVATE_API: tuple[tuple[type | object, str, tuple[str, ...] | None], ...] = (
    (DULServiceProvider, "_read_pdu_data", ("self",)),
    (DULServiceProvider, "_decode_pdu", ("self", "bytestream")),
    (DULServiceProvider, "run_reactor", ("self",)),
    (DULServiceProvider, "receive_pdu", ("self", "wait", "timeout")),
    (DULServiceProvider, "stop_dul", ("self",)),
    (DULServiceProvider, "kill_dul", ("self",)),
    (StateMachine, "do_action", ("self", "event")),
    (StateMachine, "__init__", ("self", "dul")),
    (Association, "run_reactor", ("self",)),
    (Association, "_run_reactor", ("self",)),
    (Association, "_serve_request", ("self", "msg", "context_id")),
    (Association, "kill", ("self",)),
    (Association, "abort", ("self", "block")),
    (DIMSEServiceProvider, "receive_primitive", ("self", "primitive")),
    (DIMSEServiceProvider, "send_msg", ("self", "primitive", "context_id")),
    (ACSE, "_negotiate_as_acceptor", ("self",)),
    (ACSE, "send_reject", ("self", "result", "source", "diagnostic")),
    (ACSE, "is_release_requested", ("self",)),
    (ACSE, "is_aborted", ("self", "abort_type")),
    (AssociationSocket, "close", ("self",)),
    (AssociationSocket, "__init__", ("self", "assoc", "client_socket", "address")),
    (RequestHandler, "_create_association", ("self",)),
    (ThreadedAssociationServer, "process_request", ("self", "request", "client_address")),
    (ThreadedAssociationServer, "get_request", ("self",)),
    (ThreadedAssociationServer, "service_actions", ("self",)),
    (_config, "VALIDATORS", None),
    (_config, "LOG_HANDLER_LEVEL", None),
)

#: FSM states before the association is accepted (PS3.8 Table 9-10).
_PRE_ACCEPT = frozenset({"Sta1", "Sta2", "Sta3"})
#: Longest the DUL reactor waits in ``select`` for data or a wake-up before
#: it checks its timers (seconds); see _EventSocket.
DUL_IDLE_WAIT_S = 0.005
#: Longest the association reactor blocks waiting for a DIMSE message before
#: it checks for release, abort and the network timeout (seconds).
REACTOR_WAIT_S = 0.005
#: Poll interval of the wait for the A-ASSOCIATE-RQ (seconds).
_REQUEST_POLL_S = 0.05
#: After an A-ASSOCIATE-RJ, how long the rest of the peer's request is read
#: and dropped before the socket closes (seconds), and the buffer it goes to.
_REJECT_DRAIN_S = 0.5
_REJECT_DRAIN_CHUNK = 64 * 1024


class IncompatiblePynetdicomError(RuntimeError):
    """The installed pynetdicom is not the one the overrides were written against."""


def private_api_mismatches() -> list[str]:
    """Differences between :data:`PRIVATE_API` and the installed pynetdicom (empty if none)."""
    problems: list[str] = []
    for owner, name, params in PRIVATE_API:
        label = f"{getattr(owner, '__name__', owner)}.{name}"
        if not hasattr(owner, name):
            problems.append(f"{label} is missing")
            continue
        if params is None:
            continue
        found = tuple(inspect.signature(getattr(owner, name)).parameters)
        if found != params:
            problems.append(f"{label} takes {found}, expected {params}")
    return problems


def require_compatible() -> None:
    """Raise :class:`IncompatiblePynetdicomError` unless the guarded pynetdicom is installed."""
    version = str(pynetdicom.__version__)
    if not version.startswith(PYNETDICOM_SERIES):
        raise IncompatiblePynetdicomError(
            f"pynetdicom {version} is installed; the SCP's overrides (cad_node.scp._fastpath) "
            f"were written against {PYNETDICOM_SERIES}x"
        )
    problems = private_api_mismatches()
    if problems:
        raise IncompatiblePynetdicomError(
            "pynetdicom's private API changed shape: " + "; ".join(problems)
        )


# -- the relaxed UI validator, per thread -------------------------------------------

_LENIENT = threading.local()
_validator_lock = threading.Lock()
_validator_users = 0
_original_ui_validator: Callable[[Any], tuple[bool, str]] | None = None


def _lenient_ui(value: Any) -> tuple[bool, str]:
    """pynetdicom UI validator that defers validation to the C-STORE handler."""
    return (True, "") if isinstance(value, str) else (False, "must be a str")


def _scoped_ui(value: Any) -> tuple[bool, str]:
    if getattr(_LENIENT, "on", False) or _original_ui_validator is None:
        return _lenient_ui(value)
    return _original_ui_validator(value)


def _mark_lenient_thread() -> None:
    _LENIENT.on = True


@contextmanager
def lenient_uid_validation() -> Iterator[None]:
    """Install the node's UI validator for as long as the context lasts.

    pynetdicom refuses to decode a command whose UID is longer than 64
    characters (or otherwise invalid) and then never answers; the node
    validates UIDs itself (:mod:`cad_node.uids`) and answers 0xC101.  The
    relaxed validator applies only in the node's own association threads;
    every other thread (the node's SCU, tests, other code in the process)
    keeps pynetdicom's validator.  Nested uses are counted; the last one out
    restores the original validator.
    """
    global _validator_users, _original_ui_validator
    with _validator_lock:
        if _validator_users == 0:
            _original_ui_validator = _config.VALIDATORS["UI"]
            _config.VALIDATORS["UI"] = _scoped_ui
        _validator_users += 1
    try:
        yield
    finally:
        with _validator_lock:
            _validator_users -= 1
            if _validator_users == 0 and _original_ui_validator is not None:
                _config.VALIDATORS["UI"] = _original_ui_validator
                _original_ui_validator = None


# -- DUL ------------------------------------------------------------------------------

class _GuardedStateMachine(StateMachine):
    """PS3.8 state machine whose failures end the association instead of the thread.

    pynetdicom's ``do_action`` re-raises whatever an action raises (an
    A-ABORT PDU with an invalid Source, say, fails when its primitive is
    built; an event invalid in the current state raises
    ``InvalidEventError``), which kills the DUL thread with an unhandled
    exception.  Here the failure is a protocol violation: A-ABORT, close.
    """

    def do_action(self, event: str) -> None:
        try:
            super().do_action(event)
        except Exception as exc:
            dul = self.dul
            if isinstance(dul, _FastDUL):
                dul.violation(
                    f"state machine failed on {event} in {self.current_state}: {exc!r}",
                    AbortReason.UNEXPECTED_PDU_PARAMETER,
                )
            dul.kill_dul()


class _FastDUL(DULServiceProvider):
    """DUL provider with bounded, deadline-limited PDU reads (see the module docstring)."""

    def __init__(
        self, assoc: Association, request_deadline: float, max_pdu: int,
        pdu_deadline_s: float = 60.0,
    ) -> None:
        super().__init__(assoc)
        self.state_machine = _GuardedStateMachine(self)
        #: ``time.monotonic()`` by which the A-ASSOCIATE-RQ must have arrived.
        self.request_deadline = request_deadline
        #: Our maximum PDU (0: unlimited, PS3.8 D.1).
        self.max_pdu = max_pdu
        #: After acceptance, seconds from a PDU's first byte to its last.
        self.pdu_deadline_s = pdu_deadline_s
        self.violated = False
        self._timeout: float | None = -1.0

    def run_reactor(self) -> None:
        _mark_lenient_thread()
        super().run_reactor()

    def _max_length(self, pdu_type: int) -> int:
        if self.state_machine.current_state in _PRE_ACCEPT:
            return MAX_ASSOCIATE_PDU_BYTES - PDU_HEADER
        if pdu_type == PDUType.P_DATA_TF:
            return self.max_pdu if self.max_pdu else 0xFFFFFFFF
        return MAX_ASSOCIATE_PDU_BYTES - PDU_HEADER

    def _set_timeout(self, sock: socket.socket, timeout: float | None) -> None:
        if timeout != self._timeout:
            sock.settimeout(timeout)
            self._timeout = timeout

    def _read_pdu_data(self) -> None:
        wrapper = cast(AssociationSocket, self.socket)
        sock = wrapper.socket if wrapper is not None else None
        if sock is None:
            self.event_queue.put("Evt17")
            return
        now = time.monotonic()
        pre_accept = self.state_machine.current_state in _PRE_ACCEPT
        if pre_accept:
            deadline = self.request_deadline
            self._set_timeout(sock, max(0.001, deadline - now))
        else:
            deadline = now + self.pdu_deadline_s
            idle = self.network_timeout
            self._set_timeout(
                sock, min(float(idle), self.pdu_deadline_s) if idle else self.pdu_deadline_s
            )
        try:
            data = read_pdu(sock.recv_into, self._max_length, deadline, self._lower_timeout,
                            self._timeout if self._timeout is not None else math.inf)
        except PDUError as exc:
            if pre_accept and exc.too_long == PDUType.A_ASSOCIATE_RQ:
                self.refuse_request(str(exc))
                return
            if exc.timed_out and not pre_accept:
                why = f"PDU not complete within node.pdu_deadline_s = {self.pdu_deadline_s} s"
            else:
                why = str(exc)
            # before acceptance the request timeout (ARTIM) just closes the transport
            self.violation(why, exc.reason,
                           send_abort=not exc.peer_closed and not (exc.timed_out and pre_accept))
            return
        except TimeoutError:
            if time.monotonic() >= deadline - DEADLINE_SLACK_S:
                if pre_accept:
                    why = "no complete A-ASSOCIATE-RQ before the request timeout"
                else:
                    why = f"PDU not complete within node.pdu_deadline_s = {self.pdu_deadline_s} s"
            else:
                why = f"no data for {self._timeout} s in the middle of a PDU"
            self.violation(why, AbortReason.NOT_SPECIFIED, send_abort=not pre_accept)
            return
        except OSError as exc:
            self.violation(f"connection failed: {exc}", AbortReason.NOT_SPECIFIED,
                           send_abort=False)
            return
        try:
            pdu, event = self._decode_pdu(data)
        except Exception as exc:
            self.violation(f"undecodable PDU type 0x{data[0]:02X}: {exc!r}",
                           AbortReason.INVALID_PDU_PARAMETER_VALUE)
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _lower_timeout(self, timeout: float) -> None:
        """``settimeout`` of :func:`~cad_node.scp.wire.read_pdu` (the DUL thread's socket)."""
        sock = self._peer_socket()
        if sock is not None:
            self._set_timeout(sock, timeout)

    def _peer_socket(self) -> socket.socket | None:
        wrapper = cast(AssociationSocket, self.socket)
        return wrapper.socket if wrapper is not None else None

    def _close_transport(self) -> None:
        """Close the socket (which queues Evt17), or queue Evt17 if it is gone already."""
        wrapper = cast(AssociationSocket, self.socket)
        if wrapper is not None and wrapper.socket is not None:
            wrapper.close()
        else:
            self.event_queue.put("Evt17")

    def refuse_request(self, why: str) -> None:
        """Answer an over-long A-ASSOCIATE-RQ with A-ASSOCIATE-RJ (PS3.8 9.3.4), then close.

        Only the PDU header was read.  The reject is followed by our FIN;
        what the peer still sends is read into a fixed buffer and dropped
        for at most :data:`_REJECT_DRAIN_S` (closing with unread data would
        reset the connection and could destroy the reject in flight).
        """
        if self.violated:
            return
        self.violated = True
        address = self.assoc.requestor.address
        log.warning("A-ASSOCIATE-RQ from %s refused: %s; A-ASSOCIATE-RJ", address, why)
        server = getattr(self.assoc, "_server", None)
        if isinstance(server, _Server):
            server.admission.notify(AdmissionEvent("associate", False, address,
                                                   "request-too-long"))
        sock = self._peer_socket()
        if sock is not None:
            try:
                sock.settimeout(0.5)
                sock.sendall(encode_a_associate_rj(*RejectReason.REQUEST_TOO_LONG.value))
                sock.shutdown(socket.SHUT_WR)
                sink = bytearray(_REJECT_DRAIN_CHUNK)
                until = time.monotonic() + _REJECT_DRAIN_S
                while (left := until - time.monotonic()) > 0:
                    sock.settimeout(left)
                    if not sock.recv_into(sink):
                        break
            except OSError:
                pass
        self._close_transport()

    def violation(self, why: str, reason: AbortReason, *, send_abort: bool = True) -> None:
        """End the association: log, A-ABORT (unless the peer is gone), close the socket.

        Runs in the DUL thread.  Closing the socket queues Evt17, which the
        state machine turns into an A-P-ABORT indication (Sta3-Sta13) or
        Sta1 (Sta2); the association reactor then ends.
        """
        if self.violated:
            return
        self.violated = True
        assoc = self.assoc
        calling = ""
        if assoc.requestor.primitive is not None:
            calling = str(assoc.requestor.ae_title)
        address = assoc.requestor.address
        if send_abort:
            log.warning("protocol violation by %r@%s: %s; A-ABORT", calling, address, why)
        else:
            log.info("connection from %r@%s ended: %s", calling, address, why)
        sock = self._peer_socket()
        if sock is not None and send_abort:
            try:
                sock.settimeout(0.5)
                sock.sendall(encode_a_abort(reason))
            except OSError:
                pass
        self._close_transport()


# -- association ----------------------------------------------------------------------

class _Association(Association):
    """Acceptor association: bounded wait for the request, blocking reactor, ticket release.

    pynetdicom's acceptor reactor polls for a complete DIMSE message with a
    1 ms ``sleep`` per loop; on a busy machine each sleep costs far more and
    bounds C-STORE throughput.  This reactor blocks on the queue instead
    (waking as soon as a message is decoded) and otherwise performs the same
    checks, in the same order, as pynetdicom 3.0's ``_run_reactor``.
    """

    def __init__(
        self, ae: Any, ticket: Ticket, request_timeout: float, max_pdu: int,
        pdu_deadline_s: float = 60.0,
    ) -> None:
        super().__init__(ae, MODE_ACCEPTOR)
        self.ticket = ticket
        self.request_deadline = time.monotonic() + request_timeout
        self.dul = _FastDUL(self, self.request_deadline, max_pdu, pdu_deadline_s)
        # the timers belong to the DUL: set them again on the new one
        self.network_timeout = self.network_timeout
        self.acse_timeout = self.acse_timeout
        # ARTIM (PS3.8 9.1.5) bounds the wait for the request and for the close
        self.dul.artim_timer.timeout = request_timeout

    @property
    def busy(self) -> bool:
        """Admitted only to be told the node is busy (A-ASSOCIATE-RJ transient)."""
        return self.ticket.verdict is Verdict.BUSY

    def _transport_gone(self) -> bool:
        wrapper = self.dul.socket
        return wrapper is None or wrapper.socket is None

    def run_reactor(self) -> None:
        _mark_lenient_thread()
        try:
            self._run_acceptor()
        except Exception:
            log.exception("association from %s failed", self.requestor.address)
        finally:
            self._finish()

    def _finish(self) -> None:
        """Stop the DUL (bounded), close the socket, give the admission slot back."""
        try:
            self._kill = True
            self.is_established = False
            self._reactor_checkpoint.set()
            deadline = time.monotonic() + 2.0
            while self.dul.is_alive() and not self.dul.stop_dul():
                if time.monotonic() > deadline:
                    self.dul.kill_dul()
                    break
                time.sleep(0.01)
            wrapper = self.dul.socket
            if wrapper is not None and wrapper.socket is not None:
                wrapper.close()
        finally:
            self.ticket.release()

    def _run_acceptor(self) -> None:
        if not self._started_dul:
            self.dul.start()
            self._started_dul = True
            self._dul_ready.wait()
        primitive = None
        while primitive is None:
            remaining = self.request_deadline - time.monotonic()
            if self._transport_gone() or self._kill:
                return
            if remaining <= 0:
                log.warning(
                    "no A-ASSOCIATE-RQ from %s within %.1f s; closing",
                    self.requestor.address, self.dul.artim_timer.timeout,
                )
                return
            primitive = self.dul.receive_pdu(wait=True, timeout=min(remaining, _REQUEST_POLL_S))
        if not isinstance(primitive, A_ASSOCIATE):
            return
        self.requestor.primitive = primitive
        evt.trigger(self, evt.EVT_REQUESTED, {})
        if not self.is_aborted and not self.is_rejected:
            self.acse.negotiate_association()
        if self.is_established:
            self._run_reactor()

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
                log.error(
                    "network timeout reached on the association from %r@%s; aborting",
                    str(self.requestor.ae_title), self.requestor.address,
                )
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
            log.warning(
                "C-STORE-RQ on invalid or rejected context ID %d from %r@%s; aborting",
                context_id, str(self.requestor.ae_title), self.requestor.address,
            )
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


class _AdmissionACSE(ACSE):
    """ACSE provider that applies :class:`Admission` before negotiation."""

    def __init__(self, assoc: _Association, admission: Admission) -> None:
        super().__init__(assoc)
        self._admission = admission

    def _negotiate_as_acceptor(self) -> None:
        assoc = cast(_Association, self.assoc)
        rq = self.requestor.primitive
        calling = str(rq.calling_ae_title) if rq is not None else ""
        called = str(rq.called_ae_title) if rq is not None else ""
        address = self.requestor.address
        if assoc.busy:
            reason: RejectReason | None = RejectReason.LOCAL_LIMIT_EXCEEDED
            self._admission.notify(
                AdmissionEvent("associate", False, address, "busy", calling.strip(),
                               called.strip())
            )
        else:
            reason = self._admission.check(calling, called, address)
        if reason is not None:
            log.warning(
                "association rejected: calling AE %r called AE %r from %s "
                "(result %d, source %d, diagnostic %d)",
                calling, called, address, reason.result, reason.source, reason.diagnostic,
            )
            self.send_reject(reason.result, reason.source, reason.diagnostic)
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


# -- DIMSE ----------------------------------------------------------------------------

class _FastDIMSE(DIMSEServiceProvider):
    """DIMSE provider: C-STORE without pydicom, message framing enforced.

    Receiving: pynetdicom decodes every command set into a pydicom Dataset
    and builds a validated primitive from it, then its storage service class
    builds the response primitive the same way: about a third of the node's
    CPU per instance.  A C-STORE-RQ command is a handful of fixed group-0000
    elements, so :meth:`receive_primitive` decodes it directly
    (:func:`~cad_node.scp.wire.decode_c_store_rq`), collects the data set
    fragments (PS3.8 E.2) and queues a
    :class:`~cad_node.scp.wire.StoreRequest`, which :class:`_Association`
    answers through the node's store handler.  Any other message (C-ECHO, a
    command the fast decoder does not recognise) is handed to pynetdicom
    whole (command) and fragment by fragment (data set).  ``EVT_DIMSE_RECV``
    and ``EVT_C_STORE`` are not triggered for fast-path requests.

    Framing, for every message: a command set over
    :data:`~cad_node.scp.wire.MAX_COMMAND_SET_BYTES`, command fragments on
    different contexts, a new command before the previous data set ended, a
    data-set fragment with no command announcing one or on another context
    than its command's, an empty PDV and a command set that is not a
    sequence of group-0000 elements with a Command Data Set Type each end the
    association with an A-ABORT (:meth:`_FastDUL.violation`).

    Sending: a C-STORE-RSP is seven fixed elements, so it is encoded directly
    (:func:`~cad_node.scp.wire.encode_c_store_rsp`) and sent as one P-DATA-TF
    with a single last-fragment command PDV.  Every other message goes
    through pynetdicom.  ``EVT_DIMSE_SENT`` is not triggered for these.
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self._command: list[bytes] = []
        self._command_len = 0
        self._command_context = 0
        #: Context of the data set being received (``None``: no data set expected).
        self._data_context: int | None = None
        self._store: StoreRequest | None = None
        self._data: list[bytes] = []
        self._dead = False

    def _violation(self, why: str, reason: AbortReason = AbortReason.UNEXPECTED_PDU) -> None:
        self._dead = True
        self._command, self._data, self._store = [], [], None
        dul = self.assoc.dul
        if isinstance(dul, _FastDUL):
            dul.violation(why, reason)
        else:  # pragma: no cover - every node association has a _FastDUL
            self.assoc.abort(block=False)

    def _to_pynetdicom(self, context_id: int, pdv: bytes) -> None:
        primitive = P_DATA()
        primitive.presentation_data_value_list.append((context_id, pdv))
        super().receive_primitive(primitive)

    def receive_primitive(self, primitive: P_DATA) -> None:
        for context_id, pdv in primitive.presentation_data_value_list:
            if self._dead:
                return
            if not pdv:
                self._violation(f"empty PDV on context {context_id}")
                return
            header = pdv[0]  # message control header (PS3.8 E.2)
            if header & 0x01:
                self._command_fragment(context_id, pdv, header)
            else:
                self._data_fragment(context_id, pdv, header)

    def _command_fragment(self, context_id: int, pdv: bytes, header: int) -> None:
        if self._data_context is not None:
            self._violation(
                f"command on context {context_id} before the data set on context "
                f"{self._data_context} ended"
            )
            return
        if self._command and context_id != self._command_context:
            self._violation(
                f"command fragment on context {context_id}, its first fragment on "
                f"{self._command_context}"
            )
            return
        self._command_context = context_id
        self._command.append(pdv[1:])
        self._command_len += len(pdv) - 1
        if self._command_len > MAX_COMMAND_SET_BYTES:
            self._violation(
                f"command set longer than {MAX_COMMAND_SET_BYTES} bytes",
                AbortReason.INVALID_PDU_PARAMETER_VALUE,
            )
            return
        if not header & 0x02:
            return
        command = b"".join(self._command)
        self._command, self._command_len = [], 0
        has_data_set = command_has_data_set(command)
        if has_data_set is None:
            self._violation(f"malformed command set on context {context_id}",
                            AbortReason.INVALID_PDU_PARAMETER_VALUE)
            return
        store = decode_c_store_rq(command) if has_data_set else None
        if store is not None:
            self._store, self._data = store, []
        else:
            self._to_pynetdicom(context_id, b"\x03" + command)
        self._data_context = context_id if has_data_set else None

    def _data_fragment(self, context_id: int, pdv: bytes, header: int) -> None:
        if self._data_context is None:
            self._violation(f"data set fragment on context {context_id} without a command")
            return
        if context_id != self._data_context:
            self._violation(
                f"data set fragment on context {context_id}, its command on "
                f"{self._data_context}"
            )
            return
        last = bool(header & 0x02)
        if self._store is None:
            self._to_pynetdicom(context_id, pdv)
        else:
            self._data.append(memoryview(pdv)[1:])  # type: ignore[arg-type]
            if last:
                store, self._store = self._store, None
                store.dataset = b"".join(self._data)
                self._data = []
                self.msg_queue.put((context_id, store))  # type: ignore[arg-type]
        if last:
            self._data_context = None

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


# -- transport ------------------------------------------------------------------------

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
    sleep is set to zero.  No polling, no added latency.  PDUs are read by
    :meth:`_FastDUL._read_pdu_data`, not by :meth:`recv`.
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

    def close(self) -> None:
        super().close()
        for s in (self._wake_r, self._wake_w):
            try:
                s.close()
            except OSError:
                pass


class _RequestHandler(RequestHandler):
    """Per connection: TLS handshake (bounded), then an admitted acceptor association."""

    server: _Server

    def handle(self) -> None:
        server = self.server
        ticket = server.take_ticket(self.request)
        try:
            if server.tls_context is not None:
                self.request = self._handshake(server.tls_context, server.request_timeout)
            assoc = self._create_association(ticket)
            evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
            assoc.start()
        except Exception as exc:
            ticket.release()
            address = self.client_address[0] if self.client_address else "?"
            if isinstance(exc, (ssl.SSLError, OSError)):
                log.warning("TLS handshake with %s failed: %s; closing", address, exc)
            else:
                log.exception("connection from %s could not be set up", address)
            server.shutdown_request(self.request)

    def _handshake(self, context: ssl.SSLContext, timeout: float) -> ssl.SSLSocket:
        sock = cast(socket.socket, self.request)
        tls = context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        tls.settimeout(timeout)
        tls.do_handshake()
        return tls

    def _create_association(self, ticket: Ticket | None = None) -> Association:
        server = self.server
        assert ticket is not None
        assoc = _Association(self.ae, ticket, server.request_timeout, self.ae.maximum_pdu_size,
                             server.pdu_deadline_s)
        assoc._server = server
        assoc.name = f"AcceptorThread@{time.strftime('%Y%m%d%H%M%S')}"
        sock = _EventSocket(assoc, cast(socket.socket, self.request))
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
        assoc.acse = _AdmissionACSE(assoc, server.admission)
        return assoc


def _peer_gone(sock: socket.socket) -> bool:
    """True when the peer closed (FIN or RST) before its connection was accepted.

    A non-blocking ``MSG_PEEK`` of one byte: nothing is consumed, nothing
    allocated from the peer's say-so; pending data or nothing yet means the
    peer is still there.
    """
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


class _Server(ThreadedAssociationServer):
    """Association server: admission at TCP accept, TLS in the connection thread.

    :meth:`process_request` drops a connection whose peer already closed it
    (without a slot or a thread), then asks :meth:`Admission.open
    <cad_node.scp.admission.Admission.open>` before a thread is started or a
    byte is read; a refused socket is closed at once.  The accept loop does
    nothing else between two accepts (:meth:`service_actions`).  The TLS handshake (when
    :attr:`tls_context` is set) runs in the connection's thread with the
    request timeout, never in the accept loop.
    """

    #: Kernel backlog of not-yet-accepted connections (socketserver's 5 is
    #: far too small for a burst of senders).
    request_queue_size = 512
    daemon_threads = True

    admission: Admission
    #: ``(assoc, request, transfer syntax) -> status``; never raises.
    store_handler: Callable[[Association, StoreRequest, str], int]
    tls_context: ssl.SSLContext | None = None
    request_timeout: float = 5.0
    #: After acceptance, longest time from a PDU's first byte to its last (seconds).
    pdu_deadline_s: float = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._tickets_lock = threading.Lock()
        self._tickets: dict[int, Ticket] = {}
        self._refusal_log = RefusalLog()
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def service_actions(self) -> None:
        """Nothing between two accepts.

        pynetdicom's runs a full ``gc.collect()`` every 60 turns of the
        accept loop: in a process with a large heap each one holds the GIL
        for a substantial fraction of a second, so a burst of hundreds of
        connections stalled the loop (and every association) for seconds
        and a listed peer's association waited behind them.  Association
        cycles are left to the interpreter's own generational collector; the
        node closes every socket explicitly, so none waits for a collection.
        """

    def process_request(self, request: Any, client_address: Any) -> None:
        if _peer_gone(cast(socket.socket, request)):
            # closed before it was accepted (a burst that gave up, a port
            # scan): no slot, no thread, no admission decision to make
            self.close_request(request)
            return
        ticket = self.admission.open(str(client_address[0]))
        if ticket.verdict is Verdict.REFUSE:
            self._refusal_log.refused(str(client_address[0]))
            self.shutdown_request(request)
            return
        with self._tickets_lock:
            self._tickets[id(request)] = ticket
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.take_ticket(request).release()
            self.shutdown_request(request)
            raise

    def take_ticket(self, request: Any) -> Ticket:
        """The admission ticket :meth:`process_request` issued for ``request``."""
        with self._tickets_lock:
            ticket = self._tickets.pop(id(request), None)
        if ticket is None:  # pragma: no cover - every request passes process_request
            raise RuntimeError("connection without an admission ticket")
        return ticket
