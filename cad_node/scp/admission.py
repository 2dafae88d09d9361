"""Admission policy of the SCP: who may connect, how many at once, and why not.

Pure policy, no sockets: :class:`server <cad_node.scp.server.NodeServer>`
asks two questions and acts on the answers.

1. **At TCP accept**, before any byte is read (:meth:`Admission.open`): is the
   source address one of the ``peers`` (unless ``node.accept_any``), and is
   there a slot for it?  Slots are global (``node.max_associations``) and per
   source address (``node.max_associations_per_peer``), so one sender cannot
   starve the others.  The answer is a :class:`Ticket`:

   * :attr:`Verdict.ADMIT` - the connection holds a slot until the ticket is
     released (when its association ends or its socket closes);
   * :attr:`Verdict.BUSY` - a listed peer over a limit: the connection holds
     one of :data:`BUSY_BACKLOG` places, its A-ASSOCIATE-RQ is read (bounded)
     and answered with A-ASSOCIATE-RJ rejected-transient,
     local-limit-exceeded (PS3.8 9.3.4), then the socket closes;
   * :attr:`Verdict.REFUSE` - not a peer, or no place left at all: the
     socket is closed at once, nothing is read.

2. **When the A-ASSOCIATE-RQ arrives** (:meth:`Admission.check`): the called
   AE title must equal ``node.ae_title`` (reason 7); the calling AE title
   **and** the source address must match one ``peers`` entry (reason 3 when
   the AE title is unknown, 1 when it is known but the address is not its
   own), unless ``node.accept_any``.

Every decision is reported to the :data:`AdmissionObserver` callables given
to :class:`Admission` (the hook for an audit trail) as an
:class:`AdmissionEvent`; an observer that raises is logged and ignored.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cad_node.config import Settings

__all__ = [
    "BUSY_BACKLOG",
    "Admission",
    "AdmissionEvent",
    "AdmissionObserver",
    "RejectReason",
    "Ticket",
    "Verdict",
]

log = logging.getLogger(__name__)

#: Connections from listed peers over a limit that are answered with a
#: transient A-ASSOCIATE-RJ (each reads at most one bounded A-ASSOCIATE-RQ);
#: beyond this many at once the socket is simply closed.
BUSY_BACKLOG = 32


class RejectReason(enum.Enum):
    """A-ASSOCIATE-RJ parameters ``(result, source, diagnostic)`` (PS3.8 9.3.4, Table 9-21)."""

    #: Rejected-permanent, service-user, no-reason-given.
    NO_REASON = (0x01, 0x01, 0x01)
    #: Rejected-permanent, service-user, calling-AE-title-not-recognized.
    CALLING_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x03)
    #: Rejected-permanent, service-user, called-AE-title-not-recognized.
    CALLED_AE_NOT_RECOGNIZED = (0x01, 0x01, 0x07)
    #: Rejected-transient, service-provider (presentation), local-limit-exceeded.
    LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)
    #: Rejected-permanent, service-provider (presentation), local-limit-exceeded:
    #: an A-ASSOCIATE-RQ longer than the node reads before acceptance.
    REQUEST_TOO_LONG = (0x01, 0x03, 0x02)

    @property
    def result(self) -> int:
        """Result field: 1 rejected-permanent, 2 rejected-transient."""
        return int(self.value[0])

    @property
    def source(self) -> int:
        """Source field: 1 service-user, 2 service-provider (ACSE), 3 (presentation)."""
        return int(self.value[1])

    @property
    def diagnostic(self) -> int:
        """Reason/Diag. field, meaning depends on ``source``."""
        return int(self.value[2])


class Verdict(enum.Enum):
    """What happens to a new TCP connection (see the module docstring)."""

    ADMIT = "admit"
    BUSY = "busy"
    REFUSE = "refuse"


@dataclass(frozen=True)
class AdmissionEvent:
    """One admission decision, as reported to observers.

    Attributes
    ----------
    stage : str
        ``"connect"`` (TCP accept) or ``"associate"`` (A-ASSOCIATE-RQ).
    accepted : bool
        The connection / association goes ahead.
    address : str
        Source IP address.
    reason : str
        Short machine-readable reason (``"admitted"``, ``"not-a-peer"``,
        ``"global-limit"``, ``"peer-limit"``, ``"backlog-full"``,
        ``"called-ae"``, ``"calling-ae"``, ``"address"``, ``"busy"``,
        ``"request-too-long"``).
    calling_ae, called_ae : str
        AE titles (empty at the ``connect`` stage).
    """

    stage: str
    accepted: bool
    address: str
    reason: str
    calling_ae: str = ""
    called_ae: str = ""


#: Receives every :class:`AdmissionEvent`; must be quick and thread-safe.
AdmissionObserver = Callable[[AdmissionEvent], None]


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


def _normalise(address: str) -> str:
    """``::ffff:1.2.3.4`` -> ``1.2.3.4``; other addresses unchanged."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


@dataclass
class Ticket:
    """A connection's admission; :meth:`release` (idempotent) gives its place back."""

    verdict: Verdict
    address: str
    _admission: Admission | None = field(default=None, repr=False)
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        """Free the slot or backlog place this ticket holds (no-op the second time)."""
        if self._released or self._admission is None:
            return
        self._released = True
        self._admission._release(self)


class Admission:
    """Decide whether a connection and its association request are admitted.

    Parameters
    ----------
    settings : Settings
        Uses ``node.ae_title``, ``node.accept_any``, ``node.max_associations``,
        ``node.max_associations_per_peer`` and ``peers``.
    observers : iterable of AdmissionObserver, optional
        Told about every decision (the audit hook).

    Notes
    -----
    Thread-safe: :meth:`open` runs in the accept thread, :meth:`check` and
    :meth:`Ticket.release` in association threads.
    """

    def __init__(
        self, settings: Settings, observers: Iterable[AdmissionObserver] = ()
    ) -> None:
        node = settings.node
        self.ae_title = node.ae_title
        self.accept_any = node.accept_any
        self.max_total = node.max_associations
        self.max_per_peer = node.max_associations_per_peer
        self.peers: dict[str, set[str]] = {}
        for peer in settings.peers:
            self.peers.setdefault(peer.ae_title, set()).update(
                _normalise(a) for a in _addresses(peer.host)
            )
        self.addresses: frozenset[str] = frozenset().union(*self.peers.values())
        self.observers: list[AdmissionObserver] = list(observers)
        self._lock = threading.Lock()
        self._total = 0
        self._per_peer: dict[str, int] = {}
        self._busy = 0

    # -- live reload ----------------------------------------------------------
    def reconfigure(self, settings: Settings) -> None:
        """Use the ``peers`` of ``settings`` for every decision from now on (live reload).

        Connections in flight keep their slots and their admitted
        associations are not checked again; ``node.*`` (AE title, limits,
        ``accept_any``) needs a restart and is not taken.
        """
        fresh = Admission(settings)
        with self._lock:
            self.peers, self.addresses = fresh.peers, fresh.addresses

    # -- observers ------------------------------------------------------------
    def notify(self, event: AdmissionEvent) -> None:
        """Report ``event`` to every observer (exceptions are logged, not raised)."""
        for observer in self.observers:
            try:
                observer(event)
            except Exception:
                log.exception("admission observer %r failed", observer)

    # -- TCP accept -----------------------------------------------------------
    @property
    def in_use(self) -> int:
        """Slots currently held by admitted connections."""
        return self._total

    def open(self, address: str) -> Ticket:
        """Decide a new TCP connection from ``address`` (see :class:`Verdict`)."""
        ip = _normalise(address)
        if not self.accept_any and ip not in self.addresses:
            self.notify(AdmissionEvent("connect", False, ip, "not-a-peer"))
            return Ticket(Verdict.REFUSE, ip)
        with self._lock:
            peer_count = self._per_peer.get(ip, 0)
            if self._total < self.max_total and peer_count < self.max_per_peer:
                self._total += 1
                self._per_peer[ip] = peer_count + 1
                verdict, reason = Verdict.ADMIT, "admitted"
            elif self._busy < BUSY_BACKLOG:
                self._busy += 1
                verdict = Verdict.BUSY
                reason = "global-limit" if self._total >= self.max_total else "peer-limit"
            else:
                verdict, reason = Verdict.REFUSE, "backlog-full"
        self.notify(AdmissionEvent("connect", verdict is not Verdict.REFUSE, ip, reason))
        if verdict is Verdict.REFUSE:
            return Ticket(verdict, ip)
        return Ticket(verdict, ip, self)

    def _release(self, ticket: Ticket) -> None:
        with self._lock:
            if ticket.verdict is Verdict.ADMIT:
                self._total -= 1
                left = self._per_peer.get(ticket.address, 1) - 1
                if left > 0:
                    self._per_peer[ticket.address] = left
                else:
                    self._per_peer.pop(ticket.address, None)
            elif ticket.verdict is Verdict.BUSY:
                self._busy -= 1

    # -- A-ASSOCIATE-RQ -------------------------------------------------------
    def check(self, calling_ae: str, called_ae: str, address: str) -> RejectReason | None:
        """Return why the request is rejected, or ``None`` to admit it (and notify)."""
        calling, called, ip = calling_ae.strip(), called_ae.strip(), _normalise(address)
        reason, why = self._decide(calling, called, ip)
        self.notify(AdmissionEvent("associate", reason is None, ip, why, calling, called))
        return reason

    def _decide(self, calling: str, called: str, ip: str) -> tuple[RejectReason | None, str]:
        if called != self.ae_title:
            return RejectReason.CALLED_AE_NOT_RECOGNIZED, "called-ae"
        if self.accept_any:
            return None, "admitted"
        hosts = self.peers.get(calling)
        if hosts is None:
            return RejectReason.CALLING_AE_NOT_RECOGNIZED, "calling-ae"
        if ip not in hosts:
            return RejectReason.NO_REASON, "address"
        return None, "admitted"


#: Seconds between two log lines about the same refused source address.
REFUSAL_LOG_INTERVAL_S = 60.0
#: Source addresses whose refusals are counted at once; beyond it the oldest
#: is forgotten (its next refusal logs again), so the table stays bounded
#: whatever the number of addresses a flood comes from.
REFUSAL_LOG_ADDRESSES = 1024


class RefusalLog:
    """Log connections refused at TCP accept without a line per connection.

    The first refusal of a source address is logged at WARNING; further ones
    within :data:`REFUSAL_LOG_INTERVAL_S` are counted, and the next line for
    that address (after the interval) says how many were not logged.  A
    flood of connections from a stranger is one line a minute, not one per
    connection.  Thread-safe; memory bounded by :data:`REFUSAL_LOG_ADDRESSES`.

    Parameters
    ----------
    interval_s : float
        Seconds between two lines for the same address.
    max_addresses : int
        Addresses tracked at once.
    clock : callable
        Monotonic seconds (injected by tests).
    """

    def __init__(self, interval_s: float = REFUSAL_LOG_INTERVAL_S,
                 max_addresses: int = REFUSAL_LOG_ADDRESSES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if interval_s <= 0 or max_addresses < 1:
            raise ValueError("interval_s must be > 0 and max_addresses >= 1")
        self._interval = interval_s
        self._max = max_addresses
        self._clock = clock
        self._lock = threading.Lock()
        #: address -> (time of its last line, refusals not logged since)
        self._seen: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def refused(self, address: str) -> bool:
        """Record one refusal of ``address``; True when a line was logged."""
        now = self._clock()
        with self._lock:
            last = self._seen.get(address)
            if last is not None and now - last[0] < self._interval:
                self._seen[address] = (last[0], last[1] + 1)
                return False
            self._seen[address] = (now, 0)
            self._seen.move_to_end(address)
            while len(self._seen) > self._max:
                self._seen.popitem(last=False)
        if last is not None and last[1]:
            log.warning("connection from %s refused at accept (and %d more since the "
                        "last such line, %.0f s ago)", address, last[1], now - last[0])
        else:
            log.warning("connection from %s refused at accept", address)
        return True
