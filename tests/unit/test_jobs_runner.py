"""The send stage's decisions against real SCPs: retry, permanent failure, horizon -> dead."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cad_node.config import DestinationConfig, JobsConfig, NodeConfig, RetryConfig, Settings
from cad_node.export.sender import OutboundObject
from cad_node.jobs.runner import MANIFEST_NAME, JobRunner, SendStep, resolve_device
from cad_node.jobs.states import JobState
from cad_node.jobs.store import Job
from tests.conftest import free_port
from tests.unit.test_export import _StatusSCP


def _settings(tmp_path: Path, port: int, horizon_s: float = 60.0) -> Settings:
    return Settings(
        node=NodeConfig(storage_dir=str(tmp_path / "var")),
        destinations=[DestinationConfig(name="scp", ae_title="STATUSSCP", host="127.0.0.1",
                                        port=port, objects=["seg"], timeout_s=2.0)],
        jobs=JobsConfig(retry=RetryConfig(initial_s=1.0, max_interval_s=4.0, jitter=0.0,
                                          horizon_s=horizon_s)),
    )


def _ready_job(runner: JobRunner, files: list[Path]) -> Job:
    """A job in results-ready whose 'results' are real CT files (labelled as SEG)."""
    store = runner.store
    job, _ = store.record_study_complete(
        study_id="1", study_instance_uid="1.2.826.0.1.3680043.8.498.9", generation=1,
        fingerprint="fp", instances=[{"series_instance_uid": "1.2", "sop_instance_uid": "1.2.3",
                                      "path": str(files[0]), "received_at": 0.0}])
    store.enqueue(job.job_id)
    store.transition(job.job_id, JobState.RUNNING)
    out = runner.results_dir(job)
    out.mkdir(parents=True)
    entries = []
    for i, f in enumerate(files):
        obj = OutboundObject.from_file(f, "seg")
        name = f"step01_seg_{i:03d}.dcm"
        (out / name).write_bytes(f.read_bytes())
        entries.append({"file": name, "kind": "seg", "sop_class_uid": obj.sop_class_uid,
                        "sop_instance_uid": obj.sop_instance_uid,
                        "transfer_syntax_uid": obj.transfer_syntax_uid})
    (out / MANIFEST_NAME).write_text(json.dumps(entries))
    return store.transition(job.job_id, JobState.RESULTS_READY)


@pytest.fixture(scope="module")
def ct_files(lidc_dir: Path) -> list[Path]:
    return sorted(lidc_dir.glob("*.dcm"))[:2]


def test_retryable_then_success_sends_each_object_once(tmp_path: Path,
                                                       ct_files: list[Path]) -> None:
    scp = _StatusSCP([0x0000, 0xA702])  # first stored, second out of resources
    try:
        runner = JobRunner(_settings(tmp_path, scp.port), device="cpu")
        job = _ready_job(runner, ct_files)
        first = runner.send(job.job_id, now=1000.0)
        assert first.step is SendStep.RETRY
        assert first.retry_at == pytest.approx(1001.0)  # initial_s, no jitter
        job = runner.store.get(job.job_id)
        assert job.state is JobState.RESULTS_READY and job.attempts == 1
        assert "0xA702" in (job.error or "")
        second = runner.send(job.job_id, now=1002.0)
        assert second.step is SendStep.SENT
    finally:
        scp.close()
    # The object acknowledged the first time was not sent again.
    uids = [OutboundObject.from_file(f, "seg").sop_instance_uid for f in ct_files]
    assert scp.received == [uids[0], uids[1], uids[1]]
    assert len(runner.store.sent_objects(job.job_id)) == 2


def test_permanent_status_fails_the_job(tmp_path: Path, ct_files: list[Path]) -> None:
    scp = _StatusSCP([0xA900])
    try:
        runner = JobRunner(_settings(tmp_path, scp.port), device="cpu")
        job = _ready_job(runner, ct_files[:1])
        decision = runner.send(job.job_id)
    finally:
        scp.close()
    assert decision.step is SendStep.FAILED
    job = runner.store.get(job.job_id)
    assert job.state is JobState.FAILED and "0xA900" in (job.error or "")


def test_horizon_exhausted_means_dead(tmp_path: Path, ct_files: list[Path]) -> None:
    runner = JobRunner(_settings(tmp_path, free_port(), horizon_s=10.0), device="cpu")
    job = _ready_job(runner, ct_files[:1])
    t = 5000.0
    steps = []
    for _ in range(10):
        decision = runner.send(job.job_id, now=t)
        steps.append(decision.step)
        if decision.step is not SendStep.RETRY:
            break
        assert decision.retry_at is not None and decision.retry_at <= 5010.0
        t = decision.retry_at
    assert steps[-1] is SendStep.DEAD and steps[:-1] and set(steps[:-1]) == {SendStep.RETRY}
    job = runner.store.get(job.job_id)
    assert job.state is JobState.DEAD and "horizon" in (job.error or "")


def test_superseded_job_is_not_sent(tmp_path: Path, ct_files: list[Path]) -> None:
    runner = JobRunner(_settings(tmp_path, free_port()), device="cpu")
    job = _ready_job(runner, ct_files[:1])
    newer, _ = runner.store.record_study_complete(
        study_id="1", study_instance_uid=job.study_instance_uid, generation=2,
        fingerprint="fp2", instances=job.instances)
    assert runner.send(job.job_id).step is SendStep.SKIPPED
    old = runner.store.get(job.job_id)
    assert old.state is JobState.FAILED and f"superseded by job {newer.job_id}" in (old.error or "")


def test_device_falls_back_to_cpu_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    assert resolve_device("auto") == "cpu"
    assert resolve_device("cuda:0") == "cpu"
    assert resolve_device("cpu") == "cpu"


def test_objects_failing_the_gate_are_quarantined_not_sent(tmp_path: Path,
                                                           lidc_dir: Path) -> None:
    """A real SR with a Type 1 attribute removed fails the real gate and is quarantined."""
    import copy

    import pydicom

    from cad_node.results import build_results
    from cad_node.results.findings import AnalysisResult, AnalysisStatus, ModelIdentity

    files = sorted(lidc_dir.glob("*.dcm"))
    sources = [pydicom.dcmread(f) for f in files]
    result = AnalysisResult(
        pipeline="ct-chest", status=AnalysisStatus.COMPLETED,
        series_instance_uid=str(sources[0].SeriesInstanceUID),
        model=ModelIdentity(name="test-model", version="1",
                            device_uid="1.2.826.0.1.3680043.8.498.5"))
    runner = JobRunner(_settings(tmp_path, free_port()), device="cpu")
    objects = build_results(result, sources, settings=runner.settings.results, objects=["sr"])
    assert [o.kind for o in objects] == ["sr"]
    good = objects[0]
    broken = type(good)(good.kind, copy.deepcopy(good.dataset), 2, "broken copy")
    del broken.dataset.CompletionFlag  # Type 1 in SR Document General (PS3.3 C.17.2)
    job = _ready_job(runner, files[:1])
    out = tmp_path / "out"
    out.mkdir()
    entries, bad = runner.gate_and_store(job, 1, "ct-chest", [good, broken], sources, out)
    assert [e["file"] for e in entries] == ["step01_sr_001.dcm"]
    assert (out / "step01_sr_001.dcm").exists() and not (out / "step01_sr_002.dcm").exists()
    qdir = runner.quarantine_dir(job)
    assert qdir.name == f"job-{job.job_id:08d}"  # named by node ids, never by UIDs
    assert (qdir / "step01_sr_002.dcm").exists()
    reasons = (qdir / "reasons.txt").read_text()
    assert reasons.startswith("step01_sr_002.dcm: ") and len(bad) == 1


def test_resend_sends_every_object_again(tmp_path: Path, ct_files: list[Path]) -> None:
    """``jobs resend``: acknowledgements forgotten, the stored results go out again."""
    scp = _StatusSCP([])
    try:
        runner = JobRunner(_settings(tmp_path, scp.port), device="cpu")
        job = _ready_job(runner, ct_files)
        assert runner.send(job.job_id).step is SendStep.SENT
        assert runner.store.forget_sent(job.job_id) == 2
        runner.store.enqueue(job.job_id, state=JobState.RESULTS_READY, reset_attempts=True,
                             detail="jobs resend")
        assert runner.send(job.job_id).step is SendStep.SENT
    finally:
        scp.close()
    uids = [OutboundObject.from_file(f, "seg").sop_instance_uid for f in ct_files]
    assert scp.received == uids + uids
    details = [e.detail for e in runner.store.events(job.job_id)]
    assert "jobs resend" in details


def test_two_destinations_one_permanent_one_retrying(tmp_path: Path,
                                                     ct_files: list[Path]) -> None:
    """One destination fails permanently while the other is still retrying.

    Policy (cad_node/jobs/runner.py): the permanent failure does not stop the
    other destination; the job stays results-ready until every destination
    has settled, the retry skips the settled one, and then the job is failed
    (a destination failed permanently) with the other one acknowledged.
    """
    from cad_node.jobs.store import DestinationStatus

    refusing = _StatusSCP([0xA900])           # permanent: 0xA900 (PS3.4 B.2.3)
    busy = _StatusSCP([0xA702, 0x0000])       # retryable once, then stored
    try:
        settings = _settings(tmp_path, refusing.port)
        settings = settings.model_copy(update={"destinations": [
            settings.destinations[0].model_copy(update={"name": "refusing"}),
            settings.destinations[0].model_copy(update={"name": "busy", "port": busy.port}),
        ]})
        runner = JobRunner(settings, device="cpu")
        job = _ready_job(runner, ct_files[:1])
        first = runner.send(job.job_id, now=1000.0)
        assert first.step is SendStep.RETRY
        job = runner.store.get(job.job_id)
        assert job.state is JobState.RESULTS_READY
        dests = runner.store.destinations(job.job_id)
        assert dests["refusing"].state is DestinationStatus.FAILED
        assert "0xA900" in (dests["refusing"].error or "")
        assert dests["busy"].state is DestinationStatus.RETRYING
        assert runner.store.acknowledged_by_all(["refusing", "busy"]) == []
        second = runner.send(job.job_id, now=1002.0)
    finally:
        refusing.close()
        busy.close()
    assert second.step is SendStep.FAILED
    job = runner.store.get(job.job_id)
    assert job.state is JobState.FAILED and "refusing" in (job.error or "")
    dests = runner.store.destinations(job.job_id)
    assert dests["busy"].state is DestinationStatus.ACKNOWLEDGED
    assert dests["refusing"].state is DestinationStatus.FAILED
    uid = OutboundObject.from_file(ct_files[0], "seg").sop_instance_uid
    assert refusing.received == [uid]         # the retry did not go to the settled one
    assert busy.received == [uid, uid]
    assert runner.store.acknowledged_by_all(["busy"]) == [job.job_id]
    assert runner.store.acknowledged_by_all(["refusing", "busy"]) == []


def test_profiles_and_the_below_operating_point_variant_reach_their_destinations(
    tmp_path: Path, ct_files: list[Path]
) -> None:
    """``objects: ohif`` and ``below_operating_point`` per destination (issue #13/#14).

    The manifest holds both variants of an SR; each destination receives only
    the one its profile asks for.
    """
    plain, below = _StatusSCP([0x0000] * 4), _StatusSCP([0x0000] * 4)
    try:
        settings = Settings(
            node=NodeConfig(storage_dir=str(tmp_path / "var")),
            destinations=[
                DestinationConfig(name="ohif", ae_title="STATUSSCP", host="127.0.0.1",
                                  port=plain.port, objects="ohif", timeout_s=2.0),
                DestinationConfig(name="qa", ae_title="STATUSSCP", host="127.0.0.1",
                                  port=below.port, objects=["sr"], timeout_s=2.0,
                                  below_operating_point=True),
            ],
        )
        assert [str(k) for k in settings.destinations[0].objects] == ["sr", "seg", "sc"]
        runner = JobRunner(settings, device="cpu")
        assert runner._variants() == [False, True]
        assert [str(k) for k in runner._kinds(True)] == ["sr"]
        job = _ready_job(runner, ct_files)
        out = runner.results_dir(job)
        entries = json.loads((out / MANIFEST_NAME).read_text())
        entries[0]["kind"], entries[1]["kind"] = "sr", "sr"
        entries[1]["below_operating_point"] = True
        (out / MANIFEST_NAME).write_text(json.dumps(entries))
        assert runner.send(job.job_id, now=1000.0).step is SendStep.SENT
    finally:
        plain.close()
        below.close()
    uids = [OutboundObject.from_file(f, "sr").sop_instance_uid for f in ct_files]
    assert plain.received == [uids[0]] and below.received == [uids[1]]
