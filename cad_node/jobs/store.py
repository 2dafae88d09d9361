"""The durable job table (SQLite in WAL mode, one file below ``storage_dir``).

Contract
--------
* :meth:`JobStore.record_study_complete` is the ingest hand-off.  It commits
  the job row (state ``complete``) before it returns, so a crash right after
  the hand-off loses nothing; it is idempotent on
  ``(study_instance_uid, fingerprint)`` -- the same study handed on twice
  unchanged yields the same job, never a second one.  A study that comes back
  with a different fingerprint (reopened) gets a new job, and every earlier
  job of that study is marked ``superseded_by`` the new one.
* Every state change appends an event (state, timestamp, attempt, error,
  detail) to the per-study timeline.  Transitions outside
  :func:`cad_node.jobs.states.can_transition` raise :class:`InvalidTransitionError`.
* Each enqueue gives the job a fresh *delivery token*.  A task must call
  :meth:`JobStore.begin_delivery` with the token it was sent with; a stale
  token (the job was re-enqueued, superseded or finished meanwhile) tells the
  task to drop the message, and the delivery limit (``max_deliveries``) is
  enforced here, not in the broker.
* Objects acknowledged by a destination are recorded per
  ``(job, destination, SOP Instance UID)``, so a retried or redelivered send
  never sends an acknowledged object again.

Every connection is short-lived and opened per call, so the store may be used
from threads and from several processes at once (SQLite file locking; writes
take ``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import sqlite3
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cad_node.jobs.states import ACTIVE_STATES, JobState, can_transition

__all__ = [
    "DB_FILENAME",
    "Delivery",
    "InvalidTransitionError",
    "Job",
    "JobEvent",
    "JobNotFoundError",
    "JobStore",
    "SentObject",
]

#: File name of the job table below ``storage_dir``.
DB_FILENAME = "jobs.sqlite"
_BUSY_TIMEOUT_S = 30.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id INTEGER PRIMARY KEY AUTOINCREMENT,
    study_id TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    generation INTEGER NOT NULL,
    fingerprint TEXT NOT NULL,
    state TEXT NOT NULL,
    state_at REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    deliveries INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created_at REAL NOT NULL,
    received_at REAL,
    completed_at REAL,
    sent_at REAL,
    token TEXT,
    next_attempt_at REAL,
    first_failure_at REAL,
    supersedes INTEGER,
    superseded_by INTEGER,
    instances TEXT NOT NULL,
    UNIQUE (study_instance_uid, fingerprint)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE INDEX IF NOT EXISTS jobs_study ON jobs (study_instance_uid);
CREATE TABLE IF NOT EXISTS job_events (
    event_id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs (job_id),
    study_instance_uid TEXT NOT NULL,
    state TEXT NOT NULL,
    at REAL NOT NULL,
    attempt INTEGER NOT NULL,
    error TEXT,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS job_events_study ON job_events (study_instance_uid);
CREATE INDEX IF NOT EXISTS job_events_job ON job_events (job_id);
CREATE TABLE IF NOT EXISTS workers (
    hostname TEXT PRIMARY KEY,
    pid INTEGER NOT NULL,
    queues TEXT NOT NULL,
    device TEXT NOT NULL,
    started_at REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS sent_objects (
    job_id INTEGER NOT NULL REFERENCES jobs (job_id),
    destination TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    kind TEXT NOT NULL,
    status INTEGER NOT NULL,
    sent_at REAL NOT NULL,
    PRIMARY KEY (job_id, destination, sop_instance_uid)
);
"""


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


class JobStore:
    """The job table of one node.

    Parameters
    ----------
    path : path-like
        SQLite file (created with its directory when missing).
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._connect() as conn:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(_SCHEMA)

    @classmethod
    def for_storage(cls, storage_dir: str | Path) -> JobStore:
        """Open the job table ``<storage_dir>/jobs.sqlite``."""
        return cls(Path(storage_dir) / DB_FILENAME)

    # -- plumbing ---------------------------------------------------------
    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=_BUSY_TIMEOUT_S, isolation_level=None)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        finally:
            conn.close()

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        conn = self._connect()
        try:
            yield conn
        finally:
            conn.close()

    @staticmethod
    def _job(row: sqlite3.Row) -> Job:
        data = dict(row)
        data["state"] = JobState(data["state"])
        data["instances"] = tuple(json.loads(data["instances"]))
        return Job(**data)

    @staticmethod
    def _row(conn: sqlite3.Connection, job_id: int) -> sqlite3.Row:
        row = conn.execute("SELECT * FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFoundError(job_id)
        return row  # type: ignore[no-any-return]

    @staticmethod
    def _event(
        conn: sqlite3.Connection,
        job_id: int,
        study_uid: str,
        state: JobState,
        at: float,
        attempt: int,
        error: str | None,
        detail: str | None,
    ) -> None:
        conn.execute(
            "INSERT INTO job_events (job_id, study_instance_uid, state, at, attempt, error, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (job_id, study_uid, state.value, at, attempt, error, detail),
        )

    # -- hand-off ---------------------------------------------------------
    def record_study_complete(
        self,
        *,
        study_id: str,
        study_instance_uid: str,
        generation: int,
        fingerprint: str,
        instances: Sequence[Any],
        now: float | None = None,
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

        Returns
        -------
        (Job, bool)
            The job and whether it was created now (False: duplicate hand-off).
        """
        now = time.time() if now is None else now
        records = [instance_record(i) for i in instances]
        if not records:
            raise ValueError(f"study {study_instance_uid} handed on without instances")
        received = [t for t in (_epoch(r.get("received_at")) for r in records) if t is not None]
        received_at = min(received) if received else now
        with self._write() as conn:
            row = conn.execute(
                "SELECT * FROM jobs WHERE study_instance_uid = ? AND fingerprint = ?",
                (study_instance_uid, fingerprint),
            ).fetchone()
            if row is not None:
                return self._job(row), False
            previous = conn.execute(
                "SELECT job_id FROM jobs WHERE study_instance_uid = ? AND superseded_by IS NULL"
                " ORDER BY job_id DESC",
                (study_instance_uid,),
            ).fetchall()
            supersedes = previous[0]["job_id"] if previous else None
            cur = conn.execute(
                "INSERT INTO jobs (study_id, study_instance_uid, generation, fingerprint, state,"
                " state_at, created_at, received_at, completed_at, supersedes, instances)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    study_id, study_instance_uid, generation, fingerprint,
                    JobState.COMPLETE.value, now, now, received_at, now, supersedes,
                    json.dumps(records),
                ),
            )
            job_id = int(cur.lastrowid or 0)
            self._event(conn, job_id, study_instance_uid, JobState.RECEIVED, received_at, 0,
                        None, f"{len(records)} instance(s), generation {generation}")
            self._event(conn, job_id, study_instance_uid, JobState.COMPLETE, now, 0, None,
                        f"fingerprint {fingerprint}")
            for prev in previous:
                conn.execute(
                    "UPDATE jobs SET superseded_by = ? WHERE job_id = ?", (job_id, prev["job_id"])
                )
            return self._job(self._row(conn, job_id)), True

    # -- queries ----------------------------------------------------------
    def get(self, job_id: int) -> Job:
        """Return job ``job_id``; raise :class:`JobNotFoundError` when there is none."""
        with self._read() as conn:
            return self._job(self._row(conn, job_id))

    def list_jobs(
        self,
        *,
        states: Sequence[JobState] | None = None,
        study_instance_uid: str | None = None,
        limit: int | None = 50,
    ) -> list[Job]:
        """Jobs, newest first, optionally filtered by state and study."""
        sql = "SELECT * FROM jobs"
        where: list[str] = []
        args: list[Any] = []
        if states:
            where.append(f"state IN ({','.join('?' * len(states))})")
            args.extend(s.value for s in states)
        if study_instance_uid is not None:
            where.append("study_instance_uid = ?")
            args.append(study_instance_uid)
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY job_id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._read() as conn:
            return [self._job(r) for r in conn.execute(sql, args).fetchall()]

    def count_by_state(self) -> dict[JobState, int]:
        """Number of jobs in each state (every state present, zero when none)."""
        counts = dict.fromkeys(JobState, 0)
        with self._read() as conn:
            for row in conn.execute("SELECT state, COUNT(*) AS n FROM jobs GROUP BY state"):
                counts[JobState(row["state"])] = int(row["n"])
        return counts

    def events(self, job_id: int) -> list[JobEvent]:
        """The timeline of one job, oldest first."""
        return self._events("job_id = ?", (job_id,))

    def timeline(self, study_instance_uid: str) -> list[JobEvent]:
        """The timeline of every job of a study, oldest first."""
        return self._events("study_instance_uid = ?", (study_instance_uid,))

    def _events(self, where: str, args: tuple[Any, ...]) -> list[JobEvent]:
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT * FROM job_events WHERE {where} ORDER BY at, event_id", args
            ).fetchall()
        return [
            JobEvent(r["job_id"], r["study_instance_uid"], JobState(r["state"]), r["at"],
                     r["attempt"], r["error"], r["detail"])
            for r in rows
        ]

    # -- state changes ----------------------------------------------------
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
        """
        now = time.time() if now is None else now
        with self._write() as conn:
            row = self._row(conn, job_id)
            old = JobState(row["state"])
            if not can_transition(old, state):
                raise InvalidTransitionError(
                    f"job {job_id}: {old.value} -> {state.value} not allowed")
            attempts = row["attempts"] + (1 if count_attempt else 0)
            first_failure = row["first_failure_at"]
            if count_attempt and first_failure is None:
                first_failure = now
            sent_at = now if state is JobState.SENT else row["sent_at"]
            conn.execute(
                "UPDATE jobs SET state = ?, state_at = ?, error = ?, attempts = ?,"
                " next_attempt_at = ?, first_failure_at = ?, sent_at = ? WHERE job_id = ?",
                (state.value, now, error, attempts, next_attempt_at, first_failure, sent_at,
                 job_id),
            )
            self._event(conn, job_id, row["study_instance_uid"], state, now, attempts, error,
                        detail)
            return self._job(self._row(conn, job_id))

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
        worker still reaches ``max_deliveries``.
        """
        now = time.time() if now is None else now
        token = uuid.uuid4().hex
        with self._write() as conn:
            row = self._row(conn, job_id)
            old = JobState(row["state"])
            if old is not state and not can_transition(old, state):
                raise InvalidTransitionError(
                    f"job {job_id}: {old.value} -> {state.value} not allowed")
            attempts = 0 if reset_attempts else row["attempts"]
            first_failure = None if reset_attempts else row["first_failure_at"]
            error = None if reset_attempts else row["error"]
            deliveries = 0 if reset_deliveries else row["deliveries"]
            conn.execute(
                "UPDATE jobs SET state = ?, state_at = ?, token = ?, deliveries = ?,"
                " attempts = ?, first_failure_at = ?, error = ? WHERE job_id = ?",
                (state.value, now, token, deliveries, attempts, first_failure, error, job_id),
            )
            if old is not state or detail:
                self._event(conn, job_id, row["study_instance_uid"], state, now, attempts,
                            error, detail)
            return self._job(self._row(conn, job_id)), token

    def begin_delivery(self, job_id: int, token: str, max_deliveries: int) -> tuple[Delivery, Job]:
        """Count one delivery of a task message and decide whether to run it.

        Parameters
        ----------
        job_id : int
            The job named by the message.
        token : str
            The delivery token the message carries.
        max_deliveries : int
            A token delivered more often than this kills the job (``dead``):
            the message keeps crashing its worker.

        Returns
        -------
        (Delivery, Job)
            The decision and the (updated) job.
        """
        now = time.time()
        with self._write() as conn:
            row = self._row(conn, job_id)
            state = JobState(row["state"])
            if row["token"] != token or state not in ACTIVE_STATES:
                return Delivery.STALE, self._job(row)
            deliveries = row["deliveries"] + 1
            if deliveries > max_deliveries:
                error = f"delivered {deliveries} times (max_deliveries={max_deliveries})"
                conn.execute(
                    "UPDATE jobs SET state = ?, state_at = ?, deliveries = ?, error = ?"
                    " WHERE job_id = ?",
                    (JobState.DEAD.value, now, deliveries, error, job_id),
                )
                self._event(conn, job_id, row["study_instance_uid"], JobState.DEAD, now,
                            row["attempts"], error, None)
                return Delivery.DEAD, self._job(self._row(conn, job_id))
            conn.execute("UPDATE jobs SET deliveries = ? WHERE job_id = ?", (deliveries, job_id))
            return Delivery.RUN, self._job(self._row(conn, job_id))

    # -- sent objects -----------------------------------------------------
    def record_sent(self, job_id: int, destination: str, sop_instance_uid: str,
                    sop_class_uid: str, kind: str, status: int) -> None:
        """Record that ``destination`` acknowledged an object (idempotent)."""
        with self._write() as conn:
            conn.execute(
                "INSERT OR IGNORE INTO sent_objects (job_id, destination, sop_instance_uid,"
                " sop_class_uid, kind, status, sent_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, destination, sop_instance_uid, sop_class_uid, kind, status, time.time()),
            )

    def sent_objects(self, job_id: int, destination: str | None = None) -> list[SentObject]:
        """Objects acknowledged for a job (optionally for one destination)."""
        sql = "SELECT * FROM sent_objects WHERE job_id = ?"
        args: list[Any] = [job_id]
        if destination is not None:
            sql += " AND destination = ?"
            args.append(destination)
        with self._read() as conn:
            rows = conn.execute(sql + " ORDER BY sent_at", args).fetchall()
        return [SentObject(**dict(r)) for r in rows]

    def forget_sent(self, job_id: int) -> int:
        """Forget acknowledgements of a job (``jobs resend``); return how many."""
        with self._write() as conn:
            cur = conn.execute("DELETE FROM sent_objects WHERE job_id = ?", (job_id,))
            return int(cur.rowcount)

    # -- workers ----------------------------------------------------------
    def heartbeat(self, hostname: str, pid: int, queues: Sequence[str], device: str,
                  started_at: float) -> None:
        """Record that a worker is alive (``cad-node status`` lists workers from this)."""
        with self._write() as conn:
            conn.execute(
                "INSERT INTO workers (hostname, pid, queues, device, started_at, last_seen)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (hostname) DO UPDATE SET"
                " pid = excluded.pid, queues = excluded.queues, device = excluded.device,"
                " started_at = excluded.started_at, last_seen = excluded.last_seen",
                (hostname, pid, ",".join(queues), device, started_at, time.time()),
            )

    def workers(self) -> list[dict[str, Any]]:
        """Workers that sent a heartbeat, most recent first."""
        with self._read() as conn:
            rows = conn.execute("SELECT * FROM workers ORDER BY last_seen DESC").fetchall()
        return [dict(r) for r in rows]
