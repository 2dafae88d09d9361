"""The DICOM network edge: a C-ECHO / C-STORE SCP that a hostile peer cannot hurt.

Layers (pynetdicom's own split: transport, DUL, ACSE, DIMSE):

* :mod:`cad_node.scp.admission` - pure policy: who may connect, how many at
  once, which association requests are rejected and why;
* :mod:`cad_node.scp.wire` - bytes only: PDU framing limits, A-ABORT and
  A-ASSOCIATE-RJ, the C-STORE command codec;
* :mod:`cad_node.scp._fastpath` - every override of pynetdicom internals,
  behind a version guard;
* this module - :class:`NodeServer`: the listeners, the store handler, the
  per-association byte accounting.

Contract at the edge (what a peer can and cannot make the node do)
-----------------------------------------------------------------
* **Admission before resources.**  At TCP accept, before any byte is read,
  the source address must be one of ``peers`` (unless ``node.accept_any``);
  it then needs one of ``node.max_associations`` slots, at most
  ``node.max_associations_per_peer`` of them per source address.  A listed
  peer over a limit gets A-ASSOCIATE-RJ transient, local-limit-exceeded
  (PS3.8 9.3.4); anyone else's socket is closed at once, and so is one whose
  peer closed it before it was accepted (no slot, no thread: a burst of
  connections is drained in the accept loop without stalling it).  A connection
  without a complete A-ASSOCIATE-RQ (and TLS handshake) within
  ``node.association_request_timeout_s`` is closed; a peer closing its socket
  frees its slot at once.  At the A-ASSOCIATE-RQ the called AE title must be
  ``node.ae_title`` (reason 7) and the calling AE title **and** source
  address must match one ``peers`` entry (reason 3 / reason 1).
* **Bounded memory.**  PDUs are read in chunks into a buffer that grows only
  as bytes arrive.  Before acceptance an A-ASSOCIATE-RQ longer than 64 KiB
  gets an A-ASSOCIATE-RJ (rejected-permanent, service-provider presentation,
  local-limit-exceeded) once its 6-byte header is read, any other PDU that
  long an A-ABORT; after acceptance a P-DATA-TF longer than our maximum PDU
  (``node.max_pdu``) gets an A-ABORT; the socket then closes.  A command set
  is capped at 64 KiB.  A C-STORE whose
  data set would take the association past ``max_bytes_per_association`` is
  refused with 0xA700; an association that keeps sending more than
  :data:`ABORT_SLACK_BYTES` beyond the cap, or a single message larger than
  the cap or :data:`MAX_DATA_SET_BYTES`, is aborted.
* **Protocol violations end the association** with an A-ABORT, logged with
  the calling AE title and address: an unknown PDU type, a truncated or
  undecodable PDU, a new command before the previous data set ended, a data
  set fragment without a command or on another presentation context than its
  command's, a C-STORE on a context that was not accepted.  Other
  associations are not affected.
* **UIDs: lenient where real modalities are sloppy, strict where it
  matters** (:func:`cad_node.uids.lenient_uid`).  A UID with a leading-zero
  component (``1.2.840.0113...``, forbidden by PS3.5 9.1 but common and
  readable by pydicom) is stored, answered Success and flagged: a WARNING
  log line with the study UID, ``DatasetHeader.uid_defects`` and the index
  column ``instance.uid_defects`` (``StudyState.flagged_instances``, shown on
  the status page and by ``GET /api/studies/{uid}/uid-defects``).  A UID
  that is empty, longer than 64 characters, has a character other than
  ``0-9`` and ``.`` (so no ``/`` or ``..``: no path traversal) or an empty
  component is refused: 0xC101 in the command, 0xA900 in the data set.  The
  transfer syntax UID is checked strictly.  pynetdicom's UI validator is
  relaxed in the node's own association threads only, so such a command
  reaches this policy instead of going unanswered.  No path is ever built
  from a UID.
* **Timeouts.**  Finite ACSE, DIMSE and network timeouts; a PDU that stops
  arriving mid-way for ``network_timeout_s``, or is not complete
  ``pdu_deadline_s`` after its first byte arrived (a slow dribble that each
  read alone would allow), aborts the association.
* **DICOM TLS** (``node.tls``): a second listener with the BCP 195 profile
  (TLS 1.2+, its cipher suites), a client certificate from ``ca_bundle``
  required unless ``require_client_certificate`` is false.

Handler contract (``EVT_C_STORE`` and the fast path): the handler never
decodes the data set with pydicom and never lets an exception escape - every
outcome is a :class:`~cad_node.scp.status.Status`.  It answers Success only
after :meth:`cad_node.storage.Spool.store` returned, i.e. after the file is
durable and its index row committed.

Throughput: see :mod:`cad_node.scp._fastpath` and docs/benchmarks.md "Ingest".
"""

from __future__ import annotations

import logging
import ssl
import threading
import weakref
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, cast

from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE

from cad_node.config import Settings
from cad_node.scp._fastpath import (
    _RequestHandler,
    _Server,
    lenient_uid_validation,
    require_compatible,
)
from cad_node.scp.admission import Admission, AdmissionObserver
from cad_node.scp.contexts import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, VERIFICATION_SOP_CLASS
from cad_node.scp.status import Status
from cad_node.scp.wire import StoreRequest
from cad_node.storage.parse import MalformedDatasetError, MissingAttributeError
from cad_node.storage.records import StudyComplete
from cad_node.storage.spool import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    InsufficientStorageError,
    Spool,
    SpoolOutcome,
    UIDMismatchError,
)
from cad_node.study.assembler import StudyAssembler
from cad_node.tls import server_context
from cad_node.uids import InvalidUIDError

__all__ = [
    "ABORT_SLACK_BYTES",
    "MAX_DATA_SET_BYTES",
    "AssociationEnd",
    "NodeServer",
]

log = logging.getLogger(__name__)

#: Bytes an association may receive beyond its cap (while its C-STOREs are
#: being refused) before it is aborted.
ABORT_SLACK_BYTES = 64 * 1024**2
#: Largest single C-STORE message accepted (pynetdicom holds a data set in
#: memory until it is complete): a bigger one aborts the association.
MAX_DATA_SET_BYTES = 4 * 1024**3
#: pynetdicom's own association limit, kept out of the way: the node's
#: :class:`~cad_node.scp.admission.Admission` counts slots at TCP accept.
_PYNETDICOM_MAX_ASSOCIATIONS = 4096

_SUPPORTED_STORAGE = frozenset(STORAGE_SOP_CLASSES.values())


@dataclass
class _AssocState:
    received: int = 0
    #: Bytes received since the last C-STORE reached the handler (the data
    #: set being received is buffered in memory by pynetdicom).
    pending: int = 0
    aborting: bool = False
    #: Instances newly stored, per Study Instance UID (:class:`AssociationEnd`).
    studies: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class AssociationEnd:
    """An accepted association ended: what it stored (the audit trail's "instances stored").

    Attributes
    ----------
    calling_ae, address : str
        The peer.
    how : str
        ``"released"`` or ``"aborted"``.
    studies : dict
        Study Instance UID -> instances newly stored (duplicates not counted).
    """

    calling_ae: str
    address: str
    how: str
    studies: dict[str, int]

    @property
    def stored(self) -> int:
        """Instances newly stored over the association."""
        return sum(self.studies.values())


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
    admission_observers : iterable of AdmissionObserver, optional
        Told about every admission decision (TCP accept and A-ASSOCIATE-RQ),
        see :class:`cad_node.scp.admission.AdmissionEvent`: the hook for an
        audit trail.
    on_association_end : callable, optional
        Called once when an accepted association is released or aborted,
        from its thread, with an :class:`AssociationEnd`; must not block.

    Notes
    -----
    ``start()`` opens the spool (taking its lock), binds the plain port (and
    the TLS port when ``node.tls`` is set) and starts the assembler thread;
    ``stop()`` undoes all of it.  Usable as a context manager.
    :attr:`spool` and :attr:`assembler` are available after start.

    Raises
    ------
    cad_node.scp._fastpath.IncompatiblePynetdicomError
        From :meth:`start`, when the installed pynetdicom is not the release
        the SCP's overrides were written against.
    """

    def __init__(
        self,
        settings: Settings,
        on_study_complete: Callable[[StudyComplete], None] | None = None,
        admission_observers: Iterable[AdmissionObserver] = (),
        on_association_end: Callable[[AssociationEnd], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_study_complete = on_study_complete or _log_hand_off
        self.on_association_end = on_association_end
        self.admission = Admission(settings, admission_observers)
        self.spool: Spool | None = None
        self.assembler: StudyAssembler | None = None
        self._ae: AE | None = None
        self._server: _Server | None = None
        self._tls_server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._scope: ExitStack | None = None
        self._states: weakref.WeakKeyDictionary[Any, _AssocState] = weakref.WeakKeyDictionary()
        self._states_lock = threading.Lock()

    # -- life cycle ---------------------------------------------------------
    @property
    def port(self) -> int:
        """The plain TCP port the SCP listens on (after :meth:`start`)."""
        if self._server is None:
            raise RuntimeError("server not started")
        return int(self._server.server_address[1])

    @property
    def tls_port(self) -> int:
        """The DICOM TLS port (after :meth:`start`, with ``node.tls`` set)."""
        if self._tls_server is None:
            raise RuntimeError("TLS listener not started")
        return int(self._tls_server.server_address[1])

    def _make_ae(self) -> AE:
        node = self.settings.node
        ae = AE(ae_title=node.ae_title)
        ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
        ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
        ae.acse_timeout = node.acse_timeout_s
        ae.dimse_timeout = node.dimse_timeout_s
        ae.network_timeout = node.network_timeout_s
        ae.maximum_associations = _PYNETDICOM_MAX_ASSOCIATIONS
        ae.maximum_pdu_size = node.max_pdu
        ae.require_called_aet = True
        ae.add_supported_context(VERIFICATION_SOP_CLASS)
        for uid in STORAGE_SOP_CLASSES.values():
            ae.add_supported_context(uid, list(TRANSFER_SYNTAXES))
        return ae

    def _listen(self, ae: AE, port: int, tls: ssl.SSLContext | None) -> _Server:
        node = self.settings.node
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_DATA_RECV, self._on_data),
        ]
        if self.on_association_end is not None:
            handlers += [(evt.EVT_RELEASED, self._on_ended), (evt.EVT_ABORTED, self._on_ended)]
        server = ae.make_server(
            (node.host, port),
            evt_handlers=handlers,
            server_class=_Server,
            request_handler=_RequestHandler,
        )
        assert isinstance(server, _Server)
        server.admission = self.admission
        server.store_handler = self._on_fast_store
        server.request_timeout = node.association_request_timeout_s
        server.pdu_deadline_s = node.pdu_deadline_s
        server.tls_context = tls
        # Registered like AE.start_server() does, so AE.shutdown() stops it.
        ae._servers.append(server)
        thread = threading.Thread(
            target=server.serve_forever,
            name=f"scp-{node.ae_title}{'-tls' if tls else ''}",
            daemon=True,
        )
        thread.start()
        self._threads.append(thread)
        return server

    def start(self) -> None:
        """Open the spool, bind the SCP (plain and TLS) and start the assembler."""
        if self._server is not None:
            return
        require_compatible()
        node = self.settings.node
        tls = server_context(node.tls) if node.tls is not None else None
        # pynetdicom's per-PDU "standard" logging handlers cost ~10% of a
        # C-STORE; the node logs its own outcomes instead.
        _config.LOG_HANDLER_LEVEL = "none"
        self._scope = ExitStack()
        self._scope.enter_context(lenient_uid_validation())
        try:
            self.spool = Spool.open(
                node.storage_dir,
                node.min_free_bytes,
                own_manufacturers=frozenset({self.settings.results.manufacturer}),
                database_url=self.settings.storage.index_database_url,
            )
            self.assembler = StudyAssembler(
                self.spool.index, self.settings.study, self.on_study_complete
            )
            self._ae = self._make_ae()
            self._server = self._listen(self._ae, node.port, None)
            if tls is not None and node.tls is not None:
                self._tls_server = self._listen(self._ae, node.tls.port, tls)
            self.assembler.start()
        except BaseException:
            self.stop()
            raise
        log.info(
            "SCP %s listening on %s:%d%s, spool %s",
            node.ae_title, node.host, self.port,
            f" (TLS on {self.tls_port})" if self._tls_server is not None else "",
            self.spool.root,
        )

    def stop(self) -> None:
        """Stop accepting, abort running associations, stop the assembler, close the spool."""
        if self._ae is not None:
            # Shuts the servers down, closes their sockets, aborts associations.
            self._ae.shutdown()
            self._ae = None
        self._server = None
        self._tls_server = None
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads = []
        if self.assembler is not None:
            self.assembler.stop()
            self.assembler = None
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        if self._scope is not None:
            self._scope.close()
            self._scope = None

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

    def _on_ended(self, event: evt.Event) -> None:
        callback = self.on_association_end
        if callback is None:
            return
        try:
            callback(AssociationEnd(
                str(event.assoc.requestor.ae_title).strip(), str(event.assoc.requestor.address),
                "released" if event.event is evt.EVT_RELEASED else "aborted",
                dict(self._state(event.assoc).studies)))
        except Exception:
            log.exception("association-end callback failed")

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
        if result.header.uid_defects:
            log.warning(
                "stored instance %d with non-conformant UID(s), flagged (%s): study=%s %s",
                result.instance_id, "; ".join(result.header.uid_defects),
                result.header.study_instance_uid, where,
            )
        if result.status is SpoolOutcome.STORED:
            uid = result.header.study_instance_uid
            state.studies[uid] = state.studies.get(uid, 0) + 1
            log.debug(
                "stored instance %d study=%s %s",
                result.instance_id, result.header.study_instance_uid, where,
            )
        return Status.SUCCESS
