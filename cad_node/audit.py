"""The audit trail: one JSON object per line, in the spirit of IHE ATNA (ITI-20).

One file, ``<storage_dir>/audit/audit.jsonl``, written by every process of
the node (the SCP, the worker, the CLI, the web API) and rotated by size
(``audit.jsonl.1`` is the newest rotated file, ``.N`` the oldest).

Each line carries the ATNA essentials::

    {"time": "2026-12-01T10:02:03.123456+00:00",   # UTC, ISO 8601
     "event": "association-accepted",               # AuditEvent value
     "outcome": 0,                                  # EventOutcomeIndicator, DICOM PS3.15 A.5.3.1
     "actor": "alice",                              # who (token name, user, peer AE)
     "source": {"ae_title": "MODALITY", "address": "127.0.0.1"},
     ...event-specific fields}

Contract
--------
* :meth:`AuditLog.record` appends the complete line with one ``write`` under
  an exclusive ``flock`` of ``audit.lock`` and ``fsync``\\ s it before it
  returns; rotation happens under the same lock, so concurrent writers in
  several processes never interleave or lose lines.
* It never raises: an audit failure is logged (the node keeps serving).
* No file name is built from event content.
"""

from __future__ import annotations

import datetime as dt
import enum
import fcntl
import getpass
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "AUDIT_DIRNAME",
    "AUDIT_FILENAME",
    "AuditEvent",
    "AuditLog",
    "Outcome",
    "SCPAuditObserver",
    "cli_actor",
    "read_events",
]

LOG = logging.getLogger(__name__)

#: Directory of the audit trail below ``storage_dir``.
AUDIT_DIRNAME = "audit"
#: The current audit file.
AUDIT_FILENAME = "audit.jsonl"
_LOCK_FILENAME = "audit.lock"


class AuditEvent(enum.StrEnum):
    """Kinds of audit events (ATNA: Association, DICOM Instances Transferred, ...)."""

    ASSOCIATION_ACCEPTED = "association-accepted"
    ASSOCIATION_REJECTED = "association-rejected"
    #: Instances stored over one association (ATNA "DICOM Instances Transferred", import).
    INSTANCES_STORED = "instances-stored"
    #: Results sent to a destination (ATNA "DICOM Instances Transferred", export).
    RESULTS_SENT = "results-sent"
    CONFIG_CHANGED = "config-changed"
    ADMIN_ACTION = "admin-action"


class Outcome(enum.IntEnum):
    """EventOutcomeIndicator (DICOM PS3.15 A.5.3.1, RFC 3881)."""

    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


def cli_actor() -> str:
    """The actor of a command-line action: the login name of the user."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):
        return f"cli:uid{os.getuid()}"


class AuditLog:
    """Append-only, size-rotated JSON-lines audit file.

    Parameters
    ----------
    directory : path-like
        Directory of the trail (``<storage_dir>/audit``); created when missing.
    max_bytes : int
        Rotate before a line would take the file beyond this size.
    backups : int
        Rotated files kept.
    enabled : bool
        False makes :meth:`record` a no-op.
    """

    def __init__(self, directory: str | os.PathLike[str], *, max_bytes: int = 10 * 1024**2,
                 backups: int = 10, enabled: bool = True) -> None:
        self.directory = Path(directory)
        self.path = self.directory / AUDIT_FILENAME
        self.max_bytes = max_bytes
        self.backups = backups
        self.enabled = enabled

    @classmethod
    def for_settings(cls, settings: Any) -> AuditLog:
        """The audit trail of a node configuration (``node.storage_dir`` and ``audit``)."""
        audit = settings.audit
        return cls(Path(settings.node.storage_dir) / AUDIT_DIRNAME, max_bytes=audit.max_bytes,
                   backups=audit.backups, enabled=audit.enabled)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory / _LOCK_FILENAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the lock

    def _rotate(self) -> None:
        oldest = self.path.with_name(f"{AUDIT_FILENAME}.{self.backups}")
        oldest.unlink(missing_ok=True)
        for n in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{AUDIT_FILENAME}.{n}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{AUDIT_FILENAME}.{n + 1}"))
        os.replace(self.path, self.path.with_name(f"{AUDIT_FILENAME}.1"))

    def record(self, event: AuditEvent, *, outcome: Outcome = Outcome.SUCCESS,
               actor: str | None = None, now: dt.datetime | None = None,
               **fields: Any) -> dict[str, Any] | None:
        """Append one event; return the record written (None when disabled or on error).

        Parameters
        ----------
        event : AuditEvent
            What happened.
        outcome : Outcome
            ATNA EventOutcomeIndicator.
        actor : str, optional
            Who did it: a token name, ``cli:<user>``, or the peer's AE title.
        now : datetime, optional
            Event time (UTC now when omitted).
        **fields
            Event-specific, JSON-serialisable details.
        """
        if not self.enabled:
            return None
        when = now if now is not None else dt.datetime.now(dt.UTC)
        record: dict[str, Any] = {"time": when.isoformat(), "event": event.value,
                                  "outcome": int(outcome), "actor": actor, **fields}
        try:
            line = (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()
            with self._locked():
                try:
                    size = self.path.stat().st_size
                except FileNotFoundError:
                    size = 0
                if size and size + len(line) > self.max_bytes:
                    self._rotate()
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except (OSError, TypeError, ValueError) as exc:
            LOG.error("audit event %s not recorded: %s", event.value, exc)
            return None
        return record


def read_events(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every event of a trail, oldest first (rotated files included)."""
    base = Path(directory)
    files = sorted(base.glob(f"{AUDIT_FILENAME}.*"),
                   key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    files = [p for p in files if p.suffix[1:].isdigit()] + [base / AUDIT_FILENAME]
    out: list[dict[str, Any]] = []
    for path in files:
        if path.exists():
            out.extend(json.loads(ln) for ln in path.read_text().splitlines() if ln.strip())
    return out


class SCPAuditObserver:
    """Records the SCP's association outcomes.

    An :data:`cad_node.scp.admission.AdmissionObserver` (called with every
    admission decision) and, through :meth:`ended`, the SCP's
    ``on_association_end`` hook.

    Parameters
    ----------
    audit : AuditLog
        Where events go.
    """

    def __init__(self, audit: AuditLog) -> None:
        self.audit = audit

    def __call__(self, event: Any) -> None:
        """Record ``association-accepted``/``-rejected`` for an ``AdmissionEvent``.

        An admitted TCP connection is not an event of its own (its
        A-ASSOCIATE-RQ decision follows); a refused one is a rejection.
        """
        if event.stage == "connect" and event.accepted and event.reason == "admitted":
            return
        source = {"ae_title": event.calling_ae or None, "address": event.address}
        if event.accepted and event.stage == "associate":
            self.audit.record(AuditEvent.ASSOCIATION_ACCEPTED, actor=event.calling_ae,
                              source=source, destination={"ae_title": event.called_ae})
            return
        self.audit.record(
            AuditEvent.ASSOCIATION_REJECTED, outcome=Outcome.MINOR_FAILURE,
            actor=event.calling_ae or event.address, source=source,
            destination={"ae_title": event.called_ae or None}, stage=event.stage,
            reason=event.reason, text=_REJECT_TEXT.get(event.reason, event.reason))

    def ended(self, end: Any) -> None:
        """Record ``instances-stored`` for an ``AssociationEnd`` (also when it stored none)."""
        self.audit.record(
            AuditEvent.INSTANCES_STORED,
            outcome=Outcome.SUCCESS if end.how == "released" else Outcome.MINOR_FAILURE,
            actor=end.calling_ae, source={"ae_title": end.calling_ae, "address": end.address},
            association=end.how, count=end.stored,
            studies=[{"study_instance_uid": uid, "count": n} for uid, n in end.studies.items()],
        )


#: Reasons of :class:`cad_node.scp.admission.AdmissionEvent`, spelled out.
_REJECT_TEXT = {
    "called-ae": "called-AE-title-not-recognized (PS3.8 9.3.4, diagnostic 7)",
    "calling-ae": "calling-AE-title-not-recognized (PS3.8 9.3.4, diagnostic 3)",
    "address": "calling AE title known, source address not its own (diagnostic 1)",
    "not-a-peer": "source address is no peer's: connection closed before reading",
    "global-limit": "node.max_associations reached (rejected-transient, local-limit-exceeded)",
    "peer-limit": "node.max_associations_per_peer reached (rejected-transient)",
    "backlog-full": "too many connections waiting: closed",
    "busy": "rejected-transient, local-limit-exceeded",
}
