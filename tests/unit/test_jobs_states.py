"""The job state machine, exhaustively, and the job table's schema versions.

Anchor: pynetdicom's ``test_fsm.py`` checks every state x event pair against
its table; here every (state, state) pair goes through the store's one
state-change function and is checked against the table written out below
(the specification, independent of :mod:`cad_node.jobs.states`).
"""

from __future__ import annotations

import itertools
import sqlite3
from pathlib import Path

import pytest
import sqlalchemy as sa

from cad_node.jobs.states import JobState, can_transition
from cad_node.jobs.store import (
    JOBS,
    SCHEMA_VERSION,
    Delivery,
    DestinationStatus,
    InvalidTransitionError,
    JobStore,
)

R, C, Q, RUN, RR, S, F, D = (
    JobState.RECEIVED, JobState.COMPLETE, JobState.QUEUED, JobState.RUNNING,
    JobState.RESULTS_READY, JobState.SENT, JobState.FAILED, JobState.DEAD)

#: The allowed transitions (docs: cad_node/jobs/states.py).  Everything else is forbidden.
ALLOWED = {
    R: {C},
    C: {Q, F, D},
    Q: {Q, RUN, F, D},           # queued -> queued: re-enqueued after a lost delivery
    RUN: {Q, RUN, RR, F, D},     # running -> running: redelivered after a worker died
    RR: {Q, RR, S, F, D},        # results-ready -> results-ready: retry scheduled
    S: {RR, Q},                  # operator: resend, retry
    F: {Q, RR},
    D: {Q, RR},
}
STUDY = "1.2.826.0.1.3680043.8.498.77"


def _job_in(store: JobStore, state: JobState, fingerprint: str) -> int:
    """A job whose row is put in ``state`` directly (test set-up only)."""
    job, _ = store.record_study_complete(
        study_id="1", study_instance_uid=STUDY, generation=1, fingerprint=fingerprint,
        instances=[{"series_instance_uid": "1.2", "sop_instance_uid": "1.2.3", "path": "/x",
                    "received_at": 0.0}])
    with store.db.write() as conn:
        conn.execute(sa.update(JOBS).where(JOBS.c.job_id == job.job_id)
                     .values(state=state.value))
    return job.job_id


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> JobStore:
    return JobStore(tmp_path_factory.mktemp("fsm") / "jobs.sqlite")


@pytest.mark.parametrize(("old", "new"), list(itertools.product(JobState, JobState)),
                         ids=lambda s: s.value)
def test_every_state_pair(store: JobStore, old: JobState, new: JobState) -> None:
    allowed = new in ALLOWED[old]
    assert can_transition(old, new) is allowed
    job_id = _job_in(store, old, f"{old.value}->{new.value}")
    events_before = store.events(job_id)
    if allowed:
        job = store.transition(job_id, new, error="e", detail="d")
        assert job.state is new
        last = store.events(job_id)[-1]
        assert (last.state, last.error, last.detail) == (new, "e", "d")
    else:
        with pytest.raises(InvalidTransitionError, match=f"{old.value} -> {new.value}"):
            store.transition(job_id, new)
        assert store.get(job_id).state is old
        assert store.events(job_id) == events_before


@pytest.mark.parametrize("old", list(JobState), ids=lambda s: s.value)
def test_enqueue_goes_through_the_same_check(store: JobStore, old: JobState) -> None:
    job_id = _job_in(store, old, f"enqueue-{old.value}")
    if Q in ALLOWED[old]:
        job, token = store.enqueue(job_id)
        assert job.state is Q and job.token == token
    else:
        with pytest.raises(InvalidTransitionError):
            store.enqueue(job_id)
        assert store.get(job_id).state is old


@pytest.mark.parametrize("old", [C, Q, RUN, RR], ids=lambda s: s.value)
def test_delivery_limit_kills_through_the_same_check(store: JobStore, old: JobState) -> None:
    """begin_delivery's ``dead`` is a checked transition with its timeline event."""
    job_id = _job_in(store, old, f"dead-{old.value}")
    with store.db.write() as conn:
        conn.execute(sa.update(JOBS).where(JOBS.c.job_id == job_id)
                     .values(token="t", deliveries=2))
    decision, job = store.begin_delivery(job_id, "t", max_deliveries=2)
    assert decision is Delivery.DEAD and job.state is D
    last = store.events(job_id)[-1]
    assert last.state is D and "delivered 3 times" in (last.error or "")


def test_claims_exclude_a_second_worker_until_the_lease_expires(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = _job_in(store, C, "claim")
    _, token = store.enqueue(job_id)
    store.heartbeat("w1", 1, ["inference"], "cpu", started_at=0.0)
    store.heartbeat("w2", 2, ["inference"], "cpu", started_at=0.0)
    assert store.begin_delivery(job_id, token, 5, worker="w1", lease_s=30)[0] is Delivery.RUN
    # The same message delivered to w2 while w1 is alive: dropped.
    assert store.begin_delivery(job_id, token, 5, worker="w2", lease_s=30)[0] is Delivery.STALE
    assert store.get(job_id).claimed_by == "w1"
    assert store.expired_claims(30) == []
    # w1 stops heart-beating: its claim expires, exactly once.
    with store.db.write() as conn:
        conn.execute(sa.text("UPDATE workers SET last_seen = 0 WHERE hostname = 'w1'"))
        conn.execute(sa.update(JOBS).values(claimed_at=1.0))
    assert store.expired_claims(30) == [job_id]
    assert store.expired_claims(30) == []
    assert store.get(job_id).claimed_by is None


def test_acknowledged_by_every_destination(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    a = _job_in(store, RR, "a")
    b = _job_in(store, RR, "b")
    for dest in ("pacs", "archive"):
        store.record_destination(a, dest, DestinationStatus.ACKNOWLEDGED, now=100.0)
    store.record_destination(b, "pacs", DestinationStatus.ACKNOWLEDGED, now=100.0)
    store.record_destination(b, "archive", DestinationStatus.RETRYING, error="refused",
                             count_attempt=True, now=100.0)
    assert store.acknowledged_by_all(["pacs", "archive"]) == [a]
    assert store.acknowledged_by_all(["pacs"]) == [a, b]
    assert store.acknowledged_by_all(["pacs", "archive"], before=50.0) == []
    assert store.acknowledged_by_all([]) == []
    state = store.destinations(b)["archive"]
    assert state.state is DestinationStatus.RETRYING and state.attempts == 1


V1_SCHEMA = """
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


def test_version_1_job_table_is_migrated(tmp_path: Path) -> None:
    """A job table of the first release (no schema_version) is migrated in place."""
    path = tmp_path / "jobs.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(V1_SCHEMA)
        db.execute(
            "INSERT INTO jobs (study_id, study_instance_uid, generation, fingerprint, state,"
            " state_at, created_at, instances) VALUES ('1', ?, 1, 'fp', 'sent', 1, 1, '[]')",
            (STUDY,))
    store = JobStore(path)
    assert store.schema_version == SCHEMA_VERSION == 2
    assert store.db.schema_version("jobs") == 2
    old = store.list_jobs()[0]
    assert old.state is S and old.claimed_by is None
    store.record_destination(old.job_id, "pacs", DestinationStatus.ACKNOWLEDGED)
    assert store.acknowledged_by_all(["pacs"]) == [old.job_id]
    # Opening again changes nothing; a newer schema is refused.
    assert JobStore(path).schema_version == 2
    with store.db.write() as conn:
        conn.execute(sa.text("UPDATE schema_version SET version = 99 WHERE component = 'jobs'"))
    from cad_node.storage.db import DatabaseError

    with pytest.raises(DatabaseError, match="version 99"):
        JobStore(path)


def test_a_worker_restarted_under_its_name_loses_its_old_claims(tmp_path: Path) -> None:
    """The claim of a worker's previous life expires even though the name heart-beats again."""
    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = _job_in(store, C, "restart")
    _, token = store.enqueue(job_id)
    store.heartbeat("w1", 1, ["inference"], "cpu", started_at=0.0)
    assert store.begin_delivery(job_id, token, 5, worker="w1", lease_s=30)[0] is Delivery.RUN
    with store.db.write() as conn:
        conn.execute(sa.update(JOBS).values(claimed_at=10.0))
    assert store.expired_claims(30, now=20.0) == []  # within the lease
    store.heartbeat("w1", 2, ["inference"], "cpu", started_at=50.0)  # killed and restarted
    assert store.expired_claims(30) == [job_id]


def test_orphaned_results_are_reaped_when_their_holder_is_gone(tmp_path: Path) -> None:
    """Results held by a worker (no shared storage) that stopped heart-beating."""
    store = JobStore(tmp_path / "jobs.sqlite")
    job_id = _job_in(store, RUN, "orphan")
    store.heartbeat("w2", 1, ["inference"], "cpu", started_at=0.0)
    store.transition(job_id, RR, now=1.0)
    store.set_results_host(job_id, "w2")
    assert store.expired_claims(30) == []             # w2 alive (heart-beat just now)...
    with store.db.write() as conn:
        conn.execute(sa.text("UPDATE workers SET last_seen = 0"))
    assert store.expired_claims(30) == [job_id]      # ... until it stops
