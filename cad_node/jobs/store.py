"""The durable job table (SQLAlchemy Core: SQLite by default, PostgreSQL at scale).

Contract
--------
* :meth:`JobStore.record_study_complete` is the ingest hand-off.  It commits
  the job row (state ``complete``) before it returns, so a crash right after
  the hand-off loses nothing; it is idempotent on
  ``(study_instance_uid, fingerprint)`` -- the same study handed on twice
  unchanged yields the same job, never a second one.  A study that comes back
  with a different fingerprint (reopened) gets a new job, and every earlier
  job of that study is marked ``superseded_by`` the new one.
* A job's state changes in exactly one place, :meth:`JobStore._set_state`,
  which enforces :func:`cad_node.jobs.states.can_transition` (raising
  :class:`InvalidTransitionError`) and appends the change (state, timestamp,
  attempt, error, detail) to the per-study timeline.  Every public method
  that changes a state (:meth:`~JobStore.transition`, :meth:`~JobStore.enqueue`,
  :meth:`~JobStore.begin_delivery`, the hand-off itself) goes through it.
* Each enqueue gives the job a fresh *delivery token*.  A task must call
  :meth:`JobStore.begin_delivery` with the token it was sent with; a stale
  token (the job was re-enqueued, superseded or finished meanwhile) tells the
  task to drop the message, and the delivery limit (``max_deliveries``) is
  enforced here, not in the broker.
* Claims are transactional: :meth:`~JobStore.begin_delivery` locks the job row
  (``SELECT ... FOR UPDATE``; SQLite's ``BEGIN IMMEDIATE`` lock) and records
  the claiming worker; a second delivery of the same message while the
  claimant's heartbeat is fresh is dropped, so two workers never run one job.
  :meth:`~JobStore.expired_claims` (``FOR UPDATE SKIP LOCKED``) hands jobs
  whose worker stopped heart-beating to exactly one re-publisher.
* Objects acknowledged by a destination are recorded per
  ``(job, destination, SOP Instance UID)``, so a retried or redelivered send
  never sends an acknowledged object again; each destination's outcome is
  kept per ``(job, destination)`` (:class:`DestinationState`), and
  :meth:`~JobStore.acknowledged_by_all` lists jobs every destination
  acknowledged (what retention may delete).

Schema versions live in the ``schema_version`` table (component ``jobs``,
see :mod:`cad_node.storage.db`); :data:`MIGRATIONS` lists the steps.  Every
call is one short transaction on a pooled connection, so the store may be
used from threads and from several processes (and, on PostgreSQL, hosts).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from cad_node.jobs.states import ACTIVE_STATES, JobState, can_transition
from cad_node.storage.db import Database, Migration, retry_on_disconnect, sqlite_url

__all__ = [
    "DB_FILENAME",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Delivery",
    "DestinationState",
    "DestinationStatus",
    "InvalidTransitionError",
    "Job",
    "JobEvent",
    "JobNotFoundError",
    "JobStore",
    "SentObject",
]

#: File name of the SQLite job table below ``storage_dir``.
DB_FILENAME = "jobs.sqlite"
#: Component name of the job table in ``schema_version``.
COMPONENT = "jobs"

METADATA = sa.MetaData()
JOBS = sa.Table(
    "jobs", METADATA,
    sa.Column("job_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("study_id", sa.Text, nullable=False),
    sa.Column("study_instance_uid", sa.Text, nullable=False),
    sa.Column("generation", sa.Integer, nullable=False),
    sa.Column("fingerprint", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("state_at", sa.Float, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("deliveries", sa.Integer, nullable=False, server_default="0"),
    sa.Column("error", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("received_at", sa.Float),
    sa.Column("completed_at", sa.Float),
    sa.Column("sent_at", sa.Float),
    sa.Column("token", sa.Text),
    sa.Column("next_attempt_at", sa.Float),
    sa.Column("first_failure_at", sa.Float),
    sa.Column("supersedes", sa.Integer),
    sa.Column("superseded_by", sa.Integer),
    sa.Column("instances", sa.Text, nullable=False),
    # version 2: the worker holding the current delivery, and since when
    sa.Column("claimed_by", sa.Text),
    sa.Column("claimed_at", sa.Float),
    # version 2: when the message carrying ``token`` reached the broker (None: not yet)
    sa.Column("published_at", sa.Float),
    # version 2: study-scoped token for fetching the study from the receiver (WADO-RS),
    # and the worker holding the results files when workers do not share storage
    sa.Column("fetch_token", sa.Text),
    sa.Column("results_host", sa.Text),
    sa.UniqueConstraint("study_instance_uid", "fingerprint"),
    sa.Index("jobs_state", "state"),
    sa.Index("jobs_study", "study_instance_uid"),
)
JOB_EVENTS = sa.Table(
    "job_events", METADATA,
    sa.Column("event_id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.job_id"), nullable=False),
    sa.Column("study_instance_uid", sa.Text, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("error", sa.Text),
    sa.Column("detail", sa.Text),
    sa.Index("job_events_study", "study_instance_uid"),
    sa.Index("job_events_job", "job_id"),
)
WORKERS = sa.Table(
    "workers", METADATA,
    sa.Column("hostname", sa.Text, primary_key=True),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("queues", sa.Text, nullable=False),
    sa.Column("device", sa.Text, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("last_seen", sa.Float, nullable=False),
)
SENT_OBJECTS = sa.Table(
    "sent_objects", METADATA,
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.job_id"), primary_key=True),
    sa.Column("destination", sa.Text, primary_key=True),
    sa.Column("sop_instance_uid", sa.Text, primary_key=True),
    sa.Column("sop_class_uid", sa.Text, nullable=False),
    sa.Column("kind", sa.Text, nullable=False),
    sa.Column("status", sa.Integer, nullable=False),
    sa.Column("sent_at", sa.Float, nullable=False),
)
# version 2: per-destination outcome of the send stage
JOB_DESTINATIONS = sa.Table(
    "job_destinations", METADATA,
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.job_id"), primary_key=True),
    sa.Column("destination", sa.Text, primary_key=True),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("error", sa.Text),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("acknowledged_at", sa.Float),
    sa.Index("job_destinations_state", "state"),
)


def _v2(conn: Connection, dialect: str) -> None:
    conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN claimed_by TEXT"))
    conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN claimed_at FLOAT"))
    conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN published_at FLOAT"))
    conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN fetch_token TEXT"))
    conn.execute(sa.text("ALTER TABLE jobs ADD COLUMN results_host TEXT"))
    JOB_DESTINATIONS.create(conn, checkfirst=True)


#: Schema steps of the job table (version 1: the first released schema, no
#: ``schema_version`` row; it had jobs, job_events, workers, sent_objects).
MIGRATIONS: tuple[Migration, ...] = (
    Migration(2, "claims (claimed_by, claimed_at), published_at, fetch_token, results_host, "
              "per-destination outcomes", _v2),
)
#: Current schema version of the job table.
SCHEMA_VERSION = MIGRATIONS[-1].version


def _legacy_version(conn: Connection) -> int | None:
    """A job table written before ``schema_version`` existed is version 1."""
    return 1 if sa.inspect(conn).has_table("jobs") else None


class JobNotFoundError(KeyError):
    """No job has the requested id."""


class InvalidTransitionError(ValueError):
    """A state change the job state machine does not allow."""


class Delivery(enum.Enum):
    """What a task must do with a delivered message (see :meth:`JobStore.begin_delivery`)."""

    #: Run the stage.
    RUN = "run"
    #: Drop the message: stale token, superseded or already finished job.
    STALE = "stale"
    #: Drop the message: delivered more than ``max_deliveries`` times; the job is dead.
    DEAD = "dead"


@dataclass(frozen=True)
class JobEvent:
    """One entry of a job's timeline."""

    job_id: int
    study_instance_uid: str
    state: JobState
    at: float
    attempt: int
    error: str | None
    detail: str | None


@dataclass(frozen=True)
class SentObject:
    """An object a destination acknowledged."""

    job_id: int
    destination: str
    sop_instance_uid: str
    sop_class_uid: str
    kind: str
    status: int
    sent_at: float


class DestinationStatus(enum.StrEnum):
    """Outcome of the send stage at one destination (``job_destinations.state``)."""

    #: Not attempted yet.
    PENDING = "pending"
    #: A retryable failure; the send will be tried again.
    RETRYING = "retrying"
    #: Every object of the destination's profile acknowledged (possibly none).
    ACKNOWLEDGED = "acknowledged"
    #: A permanent failure (0xA9xx, 0xCxxx, SOP class not accepted ...).
    FAILED = "failed"
    #: Retried until the retry horizon without success.
    EXHAUSTED = "exhausted"


#: Destination outcomes that end the destination's part of the send stage.
SETTLED_DESTINATION_STATES = frozenset(
    {DestinationStatus.ACKNOWLEDGED, DestinationStatus.FAILED, DestinationStatus.EXHAUSTED}
)


@dataclass(frozen=True)
class DestinationState:
    """One row of ``job_destinations``: how far a job's send got at one destination."""

    job_id: int
    destination: str
    state: DestinationStatus
    attempts: int
    error: str | None
    updated_at: float
    acknowledged_at: float | None


@dataclass(frozen=True)
class Job:
    """A row of the job table."""

    job_id: int
    study_id: str
    study_instance_uid: str
    generation: int
    fingerprint: str
    state: JobState
    state_at: float
    attempts: int
    deliveries: int
    error: str | None
    created_at: float
    received_at: float | None
    completed_at: float | None
    sent_at: float | None
    token: str | None
    next_attempt_at: float | None
    first_failure_at: float | None
    supersedes: int | None
    superseded_by: int | None
    instances: tuple[dict[str, Any], ...] = field(repr=False)
    #: Worker holding the current delivery (schema 2), and since when.
    claimed_by: str | None = None
    claimed_at: float | None = None
    #: When the message with the current token reached the broker (None: not yet).
    published_at: float | None = None
    #: Study-scoped token for the receiver's WADO-RS endpoint (remote workers).
    fetch_token: str | None = field(default=None, repr=False)
    #: Worker that holds the results files (workers without shared storage), or None.
    results_host: str | None = None

    @property
    def turnaround_s(self) -> float | None:
        """Seconds from the study-complete hand-off to the last acknowledged result."""
        if self.sent_at is None or self.completed_at is None:
            return None
        return self.sent_at - self.completed_at

    @property
    def node_name(self) -> str:
        """A file-system-safe name built from node ids only (never from UIDs)."""
        return f"job-{self.job_id:08d}"


def _epoch(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return dt.datetime.fromisoformat(value).timestamp()
        except ValueError:
            return None
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dt.datetime):
        return value.timestamp()
    if isinstance(value, enum.Enum):
        return value.value
    return value


def instance_record(instance: Any) -> dict[str, Any]:
    """Turn an ingest ``StoredInstance`` (dataclass, pydantic model or mapping) into JSON data.

    Parameters
    ----------
    instance : object
        Has at least ``series_instance_uid``, ``sop_instance_uid`` and ``path``.

    Returns
    -------
    dict
        JSON-serialisable fields; ``path`` as a string, ``received_at`` as epoch seconds.
    """
    if dataclasses.is_dataclass(instance) and not isinstance(instance, type):
        raw = dataclasses.asdict(instance)
    elif hasattr(instance, "model_dump"):
        raw = instance.model_dump()
    elif isinstance(instance, Mapping):
        raw = dict(instance)
    else:
        raw = {k: v for k, v in vars(instance).items() if not k.startswith("_")}
    for required in ("series_instance_uid", "sop_instance_uid", "path"):
        if required not in raw:
            raise ValueError(f"stored instance lacks {required!r}: {raw!r}")
    return {k: _jsonable(v) for k, v in raw.items()}


def _row_dict(row: RowMapping) -> dict[str, Any]:
    return dict(row)


class JobStore:
    """The job table of one node.

    Parameters
    ----------
    target : path-like, str URL or Database
        A SQLite file (created with its directory when missing), a database
        URL (``sqlite:///...``, ``postgresql://...``) or an open
        :class:`~cad_node.storage.db.Database`.
    """

    def __init__(self, target: str | Path | Database) -> None:
        if isinstance(target, Database):
            self.db = target
        elif isinstance(target, Path) or "://" not in str(target):
            self.db = Database(sqlite_url(target))
        else:
            self.db = Database(str(target))
        #: The SQLite file, or None on a server database.
        self.path: Path | None = (
            Path(self.db.url.database or "") if self.db.dialect == "sqlite" else None)
        self.schema_version = self.db.migrate(COMPONENT, METADATA, MIGRATIONS,
                                              legacy_version=_legacy_version)

    @classmethod
    def for_storage(cls, storage_dir: str | Path, database_url: str | None = None) -> JobStore:
        """Open the job table: ``database_url`` if given, else ``<storage_dir>/jobs.sqlite``."""
        if database_url:
            return cls(database_url)
        return cls(Path(storage_dir) / DB_FILENAME)

    @classmethod
    def from_settings(cls, settings: Any) -> JobStore:
        """Open the job table a :class:`cad_node.config.Settings` names."""
        return cls.for_storage(settings.node.storage_dir, settings.storage.jobs_database_url)

    @property
    def url(self) -> str:
        """The database URL (password hidden)."""
        return self.db.url.render_as_string(hide_password=True)

    def close(self) -> None:
        """Close pooled connections."""
        self.db.dispose()

    # -- plumbing ---------------------------------------------------------
    @staticmethod
    def _job(row: RowMapping) -> Job:
        data = _row_dict(row)
        data["state"] = JobState(data["state"])
        data["instances"] = tuple(json.loads(data["instances"]))
        return Job(**data)

    @staticmethod
    def _row(conn: Connection, job_id: int, *, lock: bool = False) -> RowMapping:
        query = sa.select(JOBS).where(JOBS.c.job_id == job_id)
        if lock:
            query = query.with_for_update()
        row = conn.execute(query).mappings().first()
        if row is None:
            raise JobNotFoundError(job_id)
        return row

    @staticmethod
    def _set_state(
        conn: Connection,
        row: RowMapping,
        state: JobState,
        *,
        at: float,
        error: str | None,
        detail: str | None = None,
        event: bool = True,
        **fields: Any,
    ) -> None:
        """THE state change: check the transition, update the row, append the event.

        Parameters
        ----------
        conn : Connection
            Inside the caller's write transaction (the row was read in it).
        row : RowMapping
            The job row as read in this transaction.
        state : JobState
            The new state; ``can_transition(row.state, state)`` must hold.
        at : float
            Time of the change (``state_at`` and the event's time).
        error, detail : str, optional
            The state's error (stored on the row and the event) and the
            event's free text.
        event : bool
            Append a timeline event (False only for a re-enqueue into the
            same state without news).
        **fields
            Other columns to set in the same UPDATE (attempts, token ...).

        Raises
        ------
        InvalidTransitionError
            The transition is not in the table of :mod:`cad_node.jobs.states`.
        """
        old = JobState(row["state"])
        if not can_transition(old, state):
            raise InvalidTransitionError(
                f"job {row['job_id']}: {old.value} -> {state.value} not allowed")
        values = dict(fields, state=state.value, state_at=at, error=error)
        conn.execute(sa.update(JOBS).where(JOBS.c.job_id == row["job_id"]).values(**values))
        if event:
            attempt = int(values.get("attempts", row["attempts"]))
            conn.execute(sa.insert(JOB_EVENTS).values(
                job_id=row["job_id"], study_instance_uid=row["study_instance_uid"],
                state=state.value, at=at, attempt=attempt, error=error, detail=detail))

    # -- hand-off ---------------------------------------------------------
    @retry_on_disconnect
    def record_study_complete(
        self,
        *,
        study_id: str,
        study_instance_uid: str,
        generation: int,
        fingerprint: str,
        instances: Sequence[Any],
        now: float | None = None,
        fetch_token: str | None = None,
    ) -> tuple[Job, bool]:
        """Record a "study complete" hand-off durably.

        Parameters
        ----------
        study_id, study_instance_uid, generation, fingerprint
            Identity of the study generation handed on by ingest.
        instances : sequence
            The study's ``StoredInstance`` records (see :func:`instance_record`).
        now : float, optional
            Hand-off time (epoch seconds); ``time.time()`` when omitted.
        fetch_token : str, optional
            Study-scoped token a remote worker presents to the receiver's
            WADO-RS endpoint (:mod:`cad_node.storage.wado`).

        Returns
        -------
        (Job, bool)
            The job and whether it was created now (False: duplicate hand-off).

        Notes
        -----
        The row is inserted in ``received`` (dated by the earliest instance)
        and moved to ``complete`` through the one state-change function.
        """
        now = time.time() if now is None else now
        records = [instance_record(i) for i in instances]
        if not records:
            raise ValueError(f"study {study_instance_uid} handed on without instances")
        received = [t for t in (_epoch(r.get("received_at")) for r in records) if t is not None]
        received_at = min(received) if received else now
        with self.db.write() as conn:
            row = conn.execute(sa.select(JOBS).where(
                JOBS.c.study_instance_uid == study_instance_uid,
                JOBS.c.fingerprint == fingerprint)).mappings().first()
            if row is not None:
                return self._job(row), False
            previous = [int(r) for r in conn.execute(
                sa.select(JOBS.c.job_id).where(JOBS.c.study_instance_uid == study_instance_uid,
                                               JOBS.c.superseded_by.is_(None))
                .order_by(JOBS.c.job_id.desc()).with_for_update()).scalars()]
            supersedes = previous[0] if previous else None
            job_id = int(conn.execute(sa.insert(JOBS).values(
                study_id=study_id, study_instance_uid=study_instance_uid,
                generation=generation, fingerprint=fingerprint, state=JobState.RECEIVED.value,
                state_at=received_at, created_at=now, received_at=received_at,
                completed_at=now, supersedes=supersedes, instances=json.dumps(records),
                fetch_token=fetch_token,
            ).returning(JOBS.c.job_id)).scalar_one())
            conn.execute(sa.insert(JOB_EVENTS).values(
                job_id=job_id, study_instance_uid=study_instance_uid,
                state=JobState.RECEIVED.value, at=received_at, attempt=0, error=None,
                detail=f"{len(records)} instance(s), generation {generation}"))
            self._set_state(conn, self._row(conn, job_id), JobState.COMPLETE, at=now,
                            error=None, detail=f"fingerprint {fingerprint}")
            if previous:
                conn.execute(sa.update(JOBS).where(JOBS.c.job_id.in_(previous))
                             .values(superseded_by=job_id))
            return self._job(self._row(conn, job_id)), True

    # -- queries ----------------------------------------------------------
    @retry_on_disconnect
    def get(self, job_id: int) -> Job:
        """Return job ``job_id``; raise :class:`JobNotFoundError` when there is none."""
        with self.db.read() as conn:
            return self._job(self._row(conn, job_id))

    @retry_on_disconnect
    def list_jobs(
        self,
        *,
        states: Sequence[JobState] | None = None,
        study_instance_uid: str | None = None,
        limit: int | None = 50,
    ) -> list[Job]:
        """Jobs, newest first, optionally filtered by state and study."""
        query = sa.select(JOBS)
        if states:
            query = query.where(JOBS.c.state.in_([s.value for s in states]))
        if study_instance_uid is not None:
            query = query.where(JOBS.c.study_instance_uid == study_instance_uid)
        query = query.order_by(JOBS.c.job_id.desc())
        if limit is not None:
            query = query.limit(limit)
        with self.db.read() as conn:
            return [self._job(r) for r in conn.execute(query).mappings()]

    @retry_on_disconnect
    def count_by_state(self) -> dict[JobState, int]:
        """Number of jobs in each state (every state present, zero when none)."""
        counts = dict.fromkeys(JobState, 0)
        with self.db.read() as conn:
            for state, n in conn.execute(
                    sa.select(JOBS.c.state, sa.func.count()).group_by(JOBS.c.state)):
                counts[JobState(state)] = int(n)
        return counts

    @retry_on_disconnect
    def table_counts(self) -> dict[str, int]:
        """Rows per table of the job store (``cad-node db migrate`` checks these)."""
        with self.db.read() as conn:
            return {t.name: int(conn.execute(sa.select(sa.func.count()).select_from(t))
                                .scalar_one())
                    for t in METADATA.sorted_tables}

    def events(self, job_id: int) -> list[JobEvent]:
        """The timeline of one job, oldest first."""
        return self._events(JOB_EVENTS.c.job_id == job_id)

    def timeline(self, study_instance_uid: str) -> list[JobEvent]:
        """The timeline of every job of a study, oldest first."""
        return self._events(JOB_EVENTS.c.study_instance_uid == study_instance_uid)

    @retry_on_disconnect
    def _events(self, where: Any) -> list[JobEvent]:
        with self.db.read() as conn:
            rows = conn.execute(sa.select(JOB_EVENTS).where(where)
                                .order_by(JOB_EVENTS.c.at, JOB_EVENTS.c.event_id)).mappings()
            return [
                JobEvent(r["job_id"], r["study_instance_uid"], JobState(r["state"]), r["at"],
                         r["attempt"], r["error"], r["detail"])
                for r in rows
            ]

    @retry_on_disconnect
    def send_failure_counts(self) -> dict[JobState, int]:
        """Failed send attempts recorded on the timeline, by the state they led to."""
        wanted = [JobState.RESULTS_READY.value, JobState.FAILED.value, JobState.DEAD.value]
        with self.db.read() as conn:
            rows = conn.execute(
                sa.select(JOB_EVENTS.c.state, sa.func.count())
                .where(JOB_EVENTS.c.error.is_not(None), JOB_EVENTS.c.attempt > 0,
                       JOB_EVENTS.c.state.in_(wanted))
                .group_by(JOB_EVENTS.c.state)).all()
        return {JobState(s): int(n) for s, n in rows}

    # -- state changes ----------------------------------------------------
    @retry_on_disconnect
    def transition(
        self,
        job_id: int,
        state: JobState,
        *,
        error: str | None = None,
        detail: str | None = None,
        count_attempt: bool = False,
        next_attempt_at: float | None = None,
        now: float | None = None,
    ) -> Job:
        """Move a job to ``state`` and append the change to its timeline.

        Parameters
        ----------
        job_id : int
            The job.
        state : JobState
            New state; must be allowed by :func:`~cad_node.jobs.states.can_transition`.
        error : str, optional
            Error of this state (cleared when None).
        detail : str, optional
            Free text for the timeline.
        count_attempt : bool
            Increment the attempt count (a send attempt that failed).
        next_attempt_at : float, optional
            When a retry is due (epoch seconds).
        now : float, optional
            Time of the change.

        Returns
        -------
        Job
            The updated row.

        Raises
        ------
        InvalidTransitionError
            The state machine does not allow the change.
        """
        now = time.time() if now is None else now
        with self.db.write() as conn:
            row = self._row(conn, job_id, lock=True)
            attempts = row["attempts"] + (1 if count_attempt else 0)
            first_failure = row["first_failure_at"]
            if count_attempt and first_failure is None:
                first_failure = now
            sent_at = now if state is JobState.SENT else row["sent_at"]
            self._set_state(conn, row, state, at=now, error=error, detail=detail,
                            attempts=attempts, next_attempt_at=next_attempt_at,
                            first_failure_at=first_failure, sent_at=sent_at)
            return self._job(self._row(conn, job_id))

    @retry_on_disconnect
    def enqueue(self, job_id: int, *, detail: str | None = None,
                reset_attempts: bool = False, reset_deliveries: bool = True,
                now: float | None = None,
                state: JobState = JobState.QUEUED) -> tuple[Job, str]:
        """Give the job a fresh delivery token and move it to ``state``.

        ``state`` is ``queued`` for the whole job or ``results-ready`` for a
        (re)send.  Returns the job and the token to put in the task message;
        messages carrying an older token are dropped by :meth:`begin_delivery`.
        ``reset_deliveries=False`` (re-publishing a message a dead worker
        lost) keeps the delivery count, so a job that keeps killing its
        worker still reaches ``max_deliveries``.  The claim is released.
        """
        now = time.time() if now is None else now
        token = uuid.uuid4().hex
        with self.db.write() as conn:
            row = self._row(conn, job_id, lock=True)
            old = JobState(row["state"])
            attempts = 0 if reset_attempts else row["attempts"]
            first_failure = None if reset_attempts else row["first_failure_at"]
            error = None if reset_attempts else row["error"]
            deliveries = 0 if reset_deliveries else row["deliveries"]
            self._set_state(conn, row, state, at=now, error=error, detail=detail,
                            event=old is not state or bool(detail), token=token,
                            deliveries=deliveries, attempts=attempts,
                            first_failure_at=first_failure, claimed_by=None, claimed_at=None,
                            published_at=None,
                            results_host=None if state is JobState.QUEUED else row["results_host"])
            return self._job(self._row(conn, job_id)), token

    @retry_on_disconnect
    def set_results_host(self, job_id: int, host: str | None) -> None:
        """Record which worker holds the job's results files (not a state change)."""
        with self.db.write() as conn:
            conn.execute(sa.update(JOBS).where(JOBS.c.job_id == job_id)
                         .values(results_host=host))

    @retry_on_disconnect
    def mark_published(self, job_id: int, token: str) -> None:
        """Record that the message carrying ``token`` reached the broker (not a state change)."""
        with self.db.write() as conn:
            conn.execute(sa.update(JOBS).where(JOBS.c.job_id == job_id, JOBS.c.token == token)
                         .values(published_at=time.time()))

    @retry_on_disconnect
    def unpublished(self, older_than_s: float, *, now: float | None = None) -> list[Job]:
        """Jobs whose message may never have reached the broker, oldest first.

        ``complete`` jobs (handed off, never enqueued), and ``queued`` /
        ``results-ready`` jobs whose current token was never marked
        published (the broker was down, or the process died, between the
        table and the broker), in that state for longer than ``older_than_s``
        (a hand-off still publishing is left alone).
        """
        now = time.time() if now is None else now
        c = JOBS.c
        query = sa.select(JOBS).where(c.state_at < now - older_than_s, sa.or_(
            c.state == JobState.COMPLETE.value,
            sa.and_(c.state.in_([JobState.QUEUED.value, JobState.RESULTS_READY.value]),
                    c.published_at.is_(None), c.claimed_by.is_(None)),
        )).order_by(c.job_id)
        with self.db.read() as conn:
            return [self._job(r) for r in conn.execute(query).mappings()]

    @retry_on_disconnect
    def begin_delivery(self, job_id: int, token: str, max_deliveries: int,
                       worker: str | None = None,
                       lease_s: float | None = None) -> tuple[Delivery, Job]:
        """Claim a delivered task message: count it and decide whether to run it.

        Parameters
        ----------
        job_id : int
            The job named by the message.
        token : str
            The delivery token the message carries.
        max_deliveries : int
            A token delivered more often than this kills the job (``dead``):
            the message keeps crashing its worker.
        worker : str, optional
            Name of the claiming worker (recorded as ``claimed_by``).
        lease_s : float, optional
            With ``worker``: a delivery of the same token while another
            worker holds the claim and heart-beat within ``lease_s`` seconds
            is :attr:`Delivery.STALE` (a broker redelivery to a second
            worker); an expired claim is taken over.

        Returns
        -------
        (Delivery, Job)
            The decision and the (updated) job.
        """
        now = time.time()
        with self.db.write() as conn:
            row = self._row(conn, job_id, lock=True)
            state = JobState(row["state"])
            if row["token"] != token or state not in ACTIVE_STATES:
                return Delivery.STALE, self._job(row)
            holder = row["claimed_by"]
            if (worker is not None and lease_s is not None and holder not in (None, worker)
                    and conn.execute(sa.select(self._live_claim(now - lease_s)
                                               .where(JOBS.c.job_id == job_id))).scalar()):
                return Delivery.STALE, self._job(row)
            deliveries = row["deliveries"] + 1
            if deliveries > max_deliveries:
                error = f"delivered {deliveries} times (max_deliveries={max_deliveries})"
                self._set_state(conn, row, JobState.DEAD, at=now, error=error,
                                deliveries=deliveries, claimed_by=None, claimed_at=None)
                return Delivery.DEAD, self._job(self._row(conn, job_id))
            conn.execute(sa.update(JOBS).where(JOBS.c.job_id == job_id).values(
                deliveries=deliveries, claimed_by=worker, claimed_at=now))
            return Delivery.RUN, self._job(self._row(conn, job_id))

    @staticmethod
    def _live_claim(since: float) -> sa.Exists:
        """EXISTS: the claimant heart-beat since ``since`` and started before its claim.

        A worker restarted under the same name (its new ``started_at`` is
        after the claim) does not keep the claims of its previous life.
        """
        return sa.exists().where(WORKERS.c.hostname == JOBS.c.claimed_by,
                                 WORKERS.c.last_seen >= since,
                                 WORKERS.c.started_at <= JOBS.c.claimed_at)

    @retry_on_disconnect
    def expired_claims(self, lease_s: float, *, now: float | None = None) -> list[int]:
        """Release claims whose worker stopped heart-beating; return those jobs.

        A claimed ``queued``/``running``/``results-ready`` job whose worker's
        last heartbeat is older than ``lease_s`` (or that has none) loses its
        claim; so does a ``results-ready`` job whose results are held by such
        a worker (``results_host``, workers without shared storage).  The
        caller re-publishes them (:func:`cad_node.jobs.tasks.reap`).
        The rows are taken ``FOR UPDATE SKIP LOCKED``: of several callers at
        once, each job goes to exactly one, and none waits for another.
        """
        now = time.time() if now is None else now
        active = [JobState.QUEUED.value, JobState.RUNNING.value, JobState.RESULTS_READY.value]
        with self.db.write() as conn:
            holder_alive = sa.exists().where(WORKERS.c.hostname == JOBS.c.results_host,
                                             WORKERS.c.last_seen >= now - lease_s)
            claimed = sa.and_(JOBS.c.claimed_by.is_not(None), JOBS.c.claimed_at < now - lease_s,
                              ~self._live_claim(now - lease_s))
            orphaned = sa.and_(JOBS.c.state == JobState.RESULTS_READY.value,
                               JOBS.c.claimed_by.is_(None), JOBS.c.results_host.is_not(None),
                               JOBS.c.state_at < now - lease_s, ~holder_alive)
            ids = [int(i) for i in conn.execute(
                sa.select(JOBS.c.job_id)
                .where(JOBS.c.state.in_(active), sa.or_(claimed, orphaned))
                .order_by(JOBS.c.job_id)
                .with_for_update(skip_locked=True)).scalars()]
            if ids:
                conn.execute(sa.update(JOBS).where(JOBS.c.job_id.in_(ids))
                             .values(claimed_by=None, claimed_at=None))
            return ids

    # -- sent objects and destinations ------------------------------------
    @retry_on_disconnect
    def record_sent(self, job_id: int, destination: str, sop_instance_uid: str,
                    sop_class_uid: str, kind: str, status: int) -> None:
        """Record that ``destination`` acknowledged an object (idempotent)."""
        with self.db.write() as conn:
            exists = conn.execute(sa.select(SENT_OBJECTS.c.job_id).where(
                SENT_OBJECTS.c.job_id == job_id, SENT_OBJECTS.c.destination == destination,
                SENT_OBJECTS.c.sop_instance_uid == sop_instance_uid)).first()
            if exists is None:
                conn.execute(sa.insert(SENT_OBJECTS).values(
                    job_id=job_id, destination=destination, sop_instance_uid=sop_instance_uid,
                    sop_class_uid=sop_class_uid, kind=kind, status=status, sent_at=time.time()))

    @retry_on_disconnect
    def sent_objects(self, job_id: int, destination: str | None = None) -> list[SentObject]:
        """Objects acknowledged for a job (optionally for one destination)."""
        query = sa.select(SENT_OBJECTS).where(SENT_OBJECTS.c.job_id == job_id)
        if destination is not None:
            query = query.where(SENT_OBJECTS.c.destination == destination)
        with self.db.read() as conn:
            rows = conn.execute(query.order_by(SENT_OBJECTS.c.sent_at)).mappings().all()
        return [SentObject(**_row_dict(r)) for r in rows]

    @retry_on_disconnect
    def forget_sent(self, job_id: int) -> int:
        """Forget acknowledgements of a job (``jobs resend``); return how many objects."""
        with self.db.write() as conn:
            conn.execute(sa.delete(JOB_DESTINATIONS).where(JOB_DESTINATIONS.c.job_id == job_id))
            cur = conn.execute(sa.delete(SENT_OBJECTS).where(SENT_OBJECTS.c.job_id == job_id))
            return int(cur.rowcount)

    @retry_on_disconnect
    def record_destination(self, job_id: int, destination: str, state: DestinationStatus,
                           *, error: str | None = None, count_attempt: bool = False,
                           now: float | None = None) -> DestinationState:
        """Record the send stage's outcome at one destination (upsert)."""
        now = time.time() if now is None else now
        c = JOB_DESTINATIONS.c
        with self.db.write() as conn:
            row = conn.execute(sa.select(JOB_DESTINATIONS).where(
                c.job_id == job_id, c.destination == destination)
                .with_for_update()).mappings().first()
            acked = now if state is DestinationStatus.ACKNOWLEDGED else None
            if row is None:
                conn.execute(sa.insert(JOB_DESTINATIONS).values(
                    job_id=job_id, destination=destination, state=state.value,
                    attempts=int(count_attempt), error=error, updated_at=now,
                    acknowledged_at=acked))
            else:
                conn.execute(sa.update(JOB_DESTINATIONS).where(
                    c.job_id == job_id, c.destination == destination).values(
                    state=state.value, attempts=row["attempts"] + int(count_attempt),
                    error=error, updated_at=now,
                    acknowledged_at=acked or row["acknowledged_at"]))
            out = conn.execute(sa.select(JOB_DESTINATIONS).where(
                c.job_id == job_id, c.destination == destination)).mappings().one()
        return self._dest(out)

    @staticmethod
    def _dest(row: RowMapping) -> DestinationState:
        data = _row_dict(row)
        data["state"] = DestinationStatus(data["state"])
        return DestinationState(**data)

    @retry_on_disconnect
    def destinations(self, job_id: int) -> dict[str, DestinationState]:
        """The per-destination outcomes of a job's send stage, by destination name."""
        with self.db.read() as conn:
            rows = conn.execute(sa.select(JOB_DESTINATIONS)
                                .where(JOB_DESTINATIONS.c.job_id == job_id)
                                .order_by(JOB_DESTINATIONS.c.destination)).mappings().all()
        return {r["destination"]: self._dest(r) for r in rows}

    @retry_on_disconnect
    def acknowledged_by_all(self, destinations: Sequence[str], *,
                            before: float | None = None) -> list[int]:
        """Jobs whose results every one of ``destinations`` acknowledged.

        Parameters
        ----------
        destinations : sequence of str
            The destination names that must all have acknowledged (the
            configured destinations; a job is never "done" for an empty list).
        before : float, optional
            Only jobs whose last acknowledgement is older than this (epoch s).

        Returns
        -------
        list of int
            Job ids, ascending: the jobs whose results retention may delete.
        """
        names = sorted(set(destinations))
        if not names:
            return []
        c = JOB_DESTINATIONS.c
        query = (sa.select(c.job_id)
                 .where(c.destination.in_(names), c.state == DestinationStatus.ACKNOWLEDGED.value)
                 .group_by(c.job_id)
                 .having(sa.func.count(sa.distinct(c.destination)) == len(names)))
        if before is not None:
            query = query.having(sa.func.max(c.acknowledged_at) < before)
        with self.db.read() as conn:
            return sorted(int(i) for i in conn.execute(query).scalars())

    # -- workers ----------------------------------------------------------
    @retry_on_disconnect
    def heartbeat(self, hostname: str, pid: int, queues: Sequence[str], device: str,
                  started_at: float) -> None:
        """Record that a worker is alive (``cad-node status`` lists workers from this)."""
        now = time.time()
        values = {"pid": pid, "queues": ",".join(queues), "device": device,
                  "started_at": started_at, "last_seen": now}
        with self.db.write() as conn:
            done = conn.execute(sa.update(WORKERS).where(WORKERS.c.hostname == hostname)
                                .values(**values)).rowcount
            if not done:
                conn.execute(sa.insert(WORKERS).values(hostname=hostname, **values))

    @retry_on_disconnect
    def workers(self) -> list[dict[str, Any]]:
        """Workers that sent a heartbeat, most recent first."""
        with self.db.read() as conn:
            rows = conn.execute(sa.select(WORKERS)
                                .order_by(WORKERS.c.last_seen.desc())).mappings().all()
        return [_row_dict(r) for r in rows]
