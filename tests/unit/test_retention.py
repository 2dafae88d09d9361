"""Retention: a study goes N days after every destination acknowledged it, never before.

Real spool (files + SQLite index), real job table, an injected clock.
"""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest

from cad_node.config import Settings
from cad_node.jobs.states import JobState
from cad_node.jobs.store import DestinationStatus, Job, JobStore
from cad_node.storage.parse import split_part10
from cad_node.storage.retention import RetentionPolicy, apply, purge_study
from cad_node.storage.spool import Spool
from tests.unit.test_jobs_celery import phantom_study

DAY = 86400.0
KINDS = ("sr", "seg")


class FakeClock:
    """Epoch seconds that move only when the test says so."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _settings(storage: Path, destinations: int = 2) -> Settings:
    return Settings.model_validate({
        "node": {"storage_dir": str(storage)},
        "destinations": [{"name": f"d{i}", "ae_title": f"D{i}", "host": "127.0.0.1",
                          "port": 104 + i, "objects": list(KINDS)}
                         for i in range(destinations)],
    })


def _store_study(spool: Spool, files: list[Path]) -> str:
    for f in files:
        raw = f.read_bytes()
        ts, offset = split_part10(raw)
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        spool.store(raw[offset:], sop_class_uid=str(ds.SOPClassUID),
                    sop_instance_uid=str(ds.SOPInstanceUID), transfer_syntax_uid=ts)
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _hand_off(spool: Spool, store: JobStore, uid: str) -> Job:
    st = spool.index.study(uid)
    assert st is not None
    spool.index.mark_handed(st.study_id, 1, "fp-" + uid[-6:], st.revision, 0.0)
    job, _ = store.record_study_complete(
        study_id=str(st.study_id), study_instance_uid=uid, generation=1,
        fingerprint="fp-" + uid[-6:], instances=spool.index.instances_for_study(uid))
    return job


def _results(settings: Settings, store: JobStore, job: Job, state: JobState) -> list[str]:
    """Give the job a manifest of one object per kind and move it to ``state``."""
    out = Path(settings.node.storage_dir) / "results" / job.node_name
    out.mkdir(parents=True)
    uids = [f"2.25.{job.job_id}{n}" for n in range(len(KINDS))]
    (out / "manifest.json").write_text(json.dumps(
        [{"file": f"{k}.dcm", "kind": k, "sop_instance_uid": u, "sop_class_uid": "1.2"}
         for k, u in zip(KINDS, uids, strict=True)]))
    for s in (JobState.QUEUED, JobState.RUNNING, JobState.RESULTS_READY):
        store.transition(job.job_id, s)
    if state is JobState.SENT:
        store.transition(job.job_id, JobState.SENT)
    return uids


@pytest.fixture
def world(tmp_path: Path):  # type: ignore[no-untyped-def]
    storage = tmp_path / "var"
    settings = _settings(storage)
    spool = Spool.open(storage)
    store = JobStore.for_storage(storage)
    try:
        yield settings, spool, store, tmp_path
    finally:
        spool.close()


def test_acknowledged_everywhere_goes_only_after_n_days(world) -> None:  # type: ignore[no-untyped-def]
    settings, spool, store, tmp = world
    uid = _store_study(spool, phantom_study(tmp / "a", seed=1, slices=8))
    job = _hand_off(spool, store, uid)
    for u, k in zip(_results(settings, store, job, JobState.SENT), KINDS, strict=True):
        for d in settings.destinations:
            store.record_sent(job.job_id, d.name, u, "1.2", k, 0)
    acked = max(o.sent_at for o in store.sent_objects(job.job_id))
    files = [i.path for i in spool.index.instances_for_study(uid)]
    assert all(p.exists() for p in files)
    clock = FakeClock(acked + 7 * DAY - 1)
    policy = RetentionPolicy(7, clock=clock)
    [decision] = policy.plan(settings, spool.index, store)
    assert not decision.purge and decision.due_at == pytest.approx(acked + 7 * DAY)
    assert apply(policy, settings, spool.index, store, spool.root, actor="test") == []
    assert all(p.exists() for p in files)

    clock.now = acked + 7 * DAY
    done = apply(policy, settings, spool.index, store, spool.root, actor="test")
    assert [d.study_instance_uid for d in done] == [uid]
    assert not any(p.exists() for p in files)
    assert spool.index.study(uid) is None and spool.index.instances_for_study(uid) == []
    assert not (Path(settings.node.storage_dir) / "results" / job.node_name).exists()
    assert store.get(job.job_id).state is JobState.SENT  # history stays


def test_never_purged_unless_every_destination_acknowledged_everything(  # type: ignore[no-untyped-def]
    world,
) -> None:
    settings, spool, store, tmp = world
    cases = {}
    # (a) d1 acknowledged only one of the two objects, (b) nobody acknowledged,
    # (f) every object acknowledged, but d1's send outcome is "retrying" (a resend),
    # (c) sent, but a destination d2 was configured afterwards, (d) still results-ready,
    # (e) new instances arrived after the hand-off.
    for name, seed in (("a", 11), ("b", 12), ("c", 13), ("d", 14), ("e", 15), ("f", 16)):
        files = phantom_study(tmp / name, seed=seed, slices=8)
        uid = _store_study(spool, files[:7] if name == "e" else files)
        job = _hand_off(spool, store, uid)
        uids = _results(settings, store, job,
                        JobState.RESULTS_READY if name == "d" else JobState.SENT)
        acks = {"a": [("d0", 0), ("d0", 1), ("d1", 0)], "b": [],
                "c": [("d0", 0), ("d0", 1), ("d1", 0), ("d1", 1)],
                "d": [("d0", 0), ("d0", 1), ("d1", 0), ("d1", 1)],
                "e": [("d0", 0), ("d0", 1), ("d1", 0), ("d1", 1)],
                "f": [("d0", 0), ("d0", 1), ("d1", 0), ("d1", 1)]}[name]
        for dest, n in acks:
            store.record_sent(job.job_id, dest, uids[n], "1.2", KINDS[n], 0)
        if name == "e":
            _store_study(spool, files[7:])
        if name == "f":
            store.record_destination(job.job_id, "d0", DestinationStatus.ACKNOWLEDGED)
            store.record_destination(job.job_id, "d1", DestinationStatus.RETRYING)
        cases[name] = uid
    later = _settings(Path(settings.node.storage_dir), destinations=3)  # d2 added
    policy = RetentionPolicy(0, clock=FakeClock(1e12))  # far in the future
    reasons = {n: d.reason for d in policy.plan(later, spool.index, store)
               for n, u in cases.items() if u == d.study_instance_uid}
    assert not any(d.purge for d in policy.plan(later, spool.index, store)), reasons
    assert apply(policy, later, spool.index, store, spool.root, actor="test") == []
    assert "d1 has not acknowledged 1 of 2" in reasons["a"]
    assert "d0 has not acknowledged 2 of 2" in reasons["b"]
    assert "d2 has not acknowledged 2 of 2" in reasons["c"]
    assert "results-ready" in reasons["d"]
    assert reasons["e"] == "instances not handed on yet"
    assert reasons["f"] == "destination d1 is retrying"
    # With the two destinations that acknowledged it, only (c) goes.
    done = apply(policy, settings, spool.index, store, spool.root, actor="test")
    assert [d.study_instance_uid for d in done] == [cases["c"]]
    for name in "abdef":
        kept = spool.index.instances_for_study(cases[name])
        assert kept and all(i.path.exists() for i in kept), name
    assert spool.index.study(cases["c"]) is None


def test_a_study_that_changes_while_purged_is_kept(world) -> None:  # type: ignore[no-untyped-def]
    settings, spool, store, tmp = world
    files = phantom_study(tmp / "r", seed=21, slices=8)
    uid = _store_study(spool, files[:7])
    job = _hand_off(spool, store, uid)
    for u, k in zip(_results(settings, store, job, JobState.SENT), KINDS, strict=True):
        for d in settings.destinations:
            store.record_sent(job.job_id, d.name, u, "1.2", k, 0)
    st = spool.index.study(uid)
    assert st is not None
    decision = RetentionPolicy(0, clock=FakeClock(1e12)).decide(settings, spool.index, store, st)
    assert decision.purge
    _store_study(spool, files[7:])  # an instance arrives after the decision
    assert not purge_study(spool.index, spool.root, decision, [])
    kept = spool.index.instances_for_study(uid)
    assert len(kept) == 8 and all(i.path.exists() for i in kept)


def test_the_serve_sweeper_applies_the_configured_policy(world) -> None:  # type: ignore[no-untyped-def]
    from cad_node.storage.retention import RetentionSweeper

    settings, spool, store, tmp = world
    uid = _store_study(spool, phantom_study(tmp / "s", seed=41, slices=8))
    job = _hand_off(spool, store, uid)
    for u, k in zip(_results(settings, store, job, JobState.SENT), KINDS, strict=True):
        for d in settings.destinations:
            store.record_sent(job.job_id, d.name, u, "1.2", k, 0)

    class _Node:  # the running NodeServer: only its open spool is used
        def __init__(self) -> None:
            self.spool = spool

    current = {"settings": settings}
    sweeper = RetentionSweeper(lambda: current["settings"], store, _Node())
    assert sweeper.sweep() == []  # retention.days unset: keep forever
    current["settings"] = settings.model_copy(update={"retention": settings.retention.model_copy(
        update={"days": 0.0})})
    assert [d.study_instance_uid for d in sweeper.sweep()] == [uid]
    assert spool.index.study(uid) is None
