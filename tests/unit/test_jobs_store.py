"""The job table: durable hand-off, de-duplication, supersession, state machine, deliveries."""

from __future__ import annotations

import multiprocessing
from dataclasses import dataclass
from pathlib import Path

import pytest

from cad_node.jobs.states import JobState, can_transition
from cad_node.jobs.store import Delivery, InvalidTransitionError, JobNotFoundError, JobStore

STUDY = "1.2.826.0.1.3680043.8.498.1"


@dataclass(frozen=True)
class _Instance:
    """Same fields as the ingest side's StoredInstance."""

    instance_id: int
    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path
    modality: str
    received_at: float


def _instances(n: int, t0: float = 1000.0) -> tuple[_Instance, ...]:
    return tuple(
        _Instance(i, STUDY, STUDY + ".1", f"{STUDY}.1.{i}", "1.2.840.10008.5.1.4.1.1.2",
                  "1.2.840.10008.1.2.1", Path(f"/spool/{i}.dcm"), "CT", t0 + i)
        for i in range(n)
    )


def _complete(store: JobStore, n: int, fingerprint: str, generation: int = 1,
              now: float = 2000.0) -> tuple:
    return store.record_study_complete(
        study_id="s1", study_instance_uid=STUDY, generation=generation,
        fingerprint=fingerprint, instances=_instances(n), now=now,
    )


def test_handoff_is_durable_and_records_timeline(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    job, created = _complete(store, 3, "fp-a")
    assert created
    # A second store on the same file (a restarted process) sees the committed row.
    again = JobStore(tmp_path / "jobs.sqlite").get(job.job_id)
    assert again.state is JobState.COMPLETE
    assert again.received_at == 1000.0  # the earliest instance's received_at
    assert again.completed_at == 2000.0
    assert [i["path"] for i in again.instances] == ["/spool/0.dcm", "/spool/1.dcm", "/spool/2.dcm"]
    states = [e.state for e in store.timeline(STUDY)]
    assert states == [JobState.RECEIVED, JobState.COMPLETE]


def test_same_study_twice_unchanged_is_one_job(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    first, created1 = _complete(store, 3, "fp-a")
    second, created2 = _complete(store, 3, "fp-a", now=3000.0)
    assert created1 and not created2
    assert first.job_id == second.job_id
    assert len(store.list_jobs()) == 1


def test_reopened_study_supersedes(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    old, _ = _complete(store, 3, "fp-a")
    new, created = _complete(store, 4, "fp-b", generation=2)
    assert created and new.job_id != old.job_id
    assert new.supersedes == old.job_id
    assert store.get(old.job_id).superseded_by == new.job_id
    assert store.get(new.job_id).superseded_by is None


def test_state_machine_rejects_skips(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = _complete(store, 1, "fp")
    with pytest.raises(InvalidTransitionError):
        store.transition(job.job_id, JobState.SENT)
    assert not can_transition(JobState.COMPLETE, JobState.RUNNING)
    assert can_transition(JobState.RESULTS_READY, JobState.RESULTS_READY)
    with pytest.raises(JobNotFoundError):
        store.get(999)


def test_full_lifecycle_with_retry_attempts(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = _complete(store, 2, "fp")
    job, token = store.enqueue(job.job_id, now=2001.0)
    assert job.state is JobState.QUEUED
    decision, job = store.begin_delivery(job.job_id, token, max_deliveries=3)
    assert decision is Delivery.RUN and job.deliveries == 1
    store.transition(job.job_id, JobState.RUNNING, now=2002.0)
    store.transition(job.job_id, JobState.RESULTS_READY, now=2010.0)
    store.transition(job.job_id, JobState.RESULTS_READY, error="association refused",
                     count_attempt=True, next_attempt_at=2020.0, now=2011.0)
    job = store.transition(job.job_id, JobState.SENT, now=2021.0)
    assert job.attempts == 1 and job.error is None
    assert job.first_failure_at == 2011.0
    assert job.turnaround_s == pytest.approx(21.0)
    events = store.events(job.job_id)
    assert [e.state.value for e in events] == [
        "received", "complete", "queued", "running", "results-ready", "results-ready", "sent"]
    failed = [e for e in events if e.error]
    assert failed[0].error == "association refused" and failed[0].attempt == 1


def test_stale_token_and_delivery_limit(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = _complete(store, 1, "fp")
    _, old_token = store.enqueue(job.job_id)
    _, token = store.enqueue(job.job_id)  # re-enqueued: the first message is stale
    assert store.begin_delivery(job.job_id, old_token, 2)[0] is Delivery.STALE
    assert store.begin_delivery(job.job_id, token, 2)[0] is Delivery.RUN
    assert store.begin_delivery(job.job_id, token, 2)[0] is Delivery.RUN
    decision, dead = store.begin_delivery(job.job_id, token, 2)
    assert decision is Delivery.DEAD
    assert dead.state is JobState.DEAD and "delivered 3 times" in (dead.error or "")
    # An operator retry gives a fresh token and a fresh delivery count.
    job, token2 = store.enqueue(dead.job_id, reset_attempts=True, detail="jobs retry")
    assert job.state is JobState.QUEUED and job.deliveries == 0 and job.error is None
    assert store.begin_delivery(job.job_id, token2, 2)[0] is Delivery.RUN


def test_sent_objects_are_idempotent(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = _complete(store, 1, "fp")
    for _ in range(2):
        store.record_sent(job.job_id, "pacs", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.88.34", "sr", 0)
    assert [o.sop_instance_uid for o in store.sent_objects(job.job_id)] == ["1.2.3.4"]
    assert store.forget_sent(job.job_id) == 1
    assert store.sent_objects(job.job_id) == []


def _claim(args: tuple[str, int, str]) -> str:
    path, job_id, token = args
    return JobStore(path).begin_delivery(job_id, token, 1)[0].value


def test_concurrent_deliveries_from_processes_run_once(tmp_path: Path) -> None:
    """Two processes racing for the same message: exactly one runs it (SQLite locking)."""
    store = JobStore(tmp_path / "jobs.sqlite")
    job, _ = _complete(store, 1, "fp")
    _, token = store.enqueue(job.job_id)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        outcomes = pool.map(_claim, [(str(store.path), job.job_id, token)] * 2)
    assert sorted(outcomes) == ["dead", "run"]
    assert store.count_by_state()[JobState.DEAD] == 1
