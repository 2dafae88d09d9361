"""``cad-node jobs``, ``destinations echo`` and ``status`` against real files and a real Orthanc."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cad_node.cli import app
from cad_node.jobs.states import JobState
from cad_node.jobs.store import JobStore
from tests.conftest import free_port
from tests.system.conftest import OrthancServer
from tests.unit.test_jobs_celery import write_config

runner = CliRunner(env={"COLUMNS": "250"})


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-cli"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _broker_messages(storage: Path) -> int:
    with sqlite3.connect(storage / "broker.sqlite") as db:
        return int(db.execute("SELECT COUNT(*) FROM kombu_message WHERE visible = 1")
                   .fetchone()[0])


def _job(store: JobStore, fp: str) -> int:
    job, _ = store.record_study_complete(
        study_id="1", study_instance_uid="1.2.826.0.1.3680043.8.498.7", generation=1,
        fingerprint=fp, instances=[{"series_instance_uid": "1.2.3", "sop_instance_uid": "1.2.3.4",
                                    "path": "/nonexistent/1.dcm", "received_at": 1.0}])
    return job.job_id


def test_destinations_echo(tmp_path: Path, pacs: OrthancServer) -> None:
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "var", pacs.dicom_port)
    ok = runner.invoke(app, ["destinations", "echo", "pacs", "--config", str(cfg)])
    assert ok.exit_code == 0, ok.output
    assert "C-ECHO Success" in ok.output
    unknown = runner.invoke(app, ["destinations", "echo", "nope", "--config", str(cfg)])
    assert unknown.exit_code == 2 and "no destination named 'nope'" in unknown.output
    down = write_config(tmp_path / "d.yaml", tmp_path / "var", free_port())
    failed = runner.invoke(app, ["destinations", "echo", "pacs", "--config", str(down)])
    assert failed.exit_code == 1 and "C-ECHO failed" in failed.output


def test_jobs_list_show_retry_resend(tmp_path: Path) -> None:
    storage = tmp_path / "var"
    cfg = write_config(tmp_path / "c.yaml", storage, free_port())
    store = JobStore.for_storage(storage)
    a = _job(store, "fp-a")
    store.enqueue(a)
    store.transition(a, JobState.RUNNING)
    store.transition(a, JobState.FAILED, error="LungSegmentationError: no lungs")
    listed = runner.invoke(app, ["jobs", "list", "--config", str(cfg), "--state", "failed"])
    assert listed.exit_code == 0, listed.output
    assert "LungSegmentationError" in listed.output
    by_study = runner.invoke(app, ["jobs", "list", "--config", str(cfg), "--study",
                                   "1.2.826.0.1.3680043.8.498.7"])
    assert by_study.exit_code == 0 and "LungSegmentationError" in by_study.output
    other = runner.invoke(app, ["jobs", "list", "--config", str(cfg), "--study", "1.2.3"])
    assert other.exit_code == 0 and "LungSegmentationError" not in other.output
    shown = runner.invoke(app, ["jobs", "show", str(a), "--config", str(cfg)])
    assert shown.exit_code == 0
    for word in ("received", "complete", "queued", "running", "failed"):
        assert word in shown.output
    assert runner.invoke(app, ["jobs", "show", "99", "--config", str(cfg)]).exit_code == 2
    # retry: back to queued with a fresh attempt count, and a message in the broker.
    retried = runner.invoke(app, ["jobs", "retry", str(a), "--config", str(cfg)])
    assert retried.exit_code == 0, retried.output
    job = store.get(a)
    assert job.state is JobState.QUEUED and job.error is None and job.attempts == 0
    assert _broker_messages(storage) == 1
    # retry of a queued job is refused; resend of a job without results too.
    assert runner.invoke(app, ["jobs", "retry", str(a), "--config", str(cfg)]).exit_code == 2
    store.transition(a, JobState.FAILED, error="x")
    refused = runner.invoke(app, ["jobs", "resend", str(a), "--config", str(cfg)])
    assert refused.exit_code == 2 and "no results" in refused.output
    bad_state = runner.invoke(app, ["jobs", "list", "--config", str(cfg), "--state", "nope"])
    assert bad_state.exit_code == 2


def test_status_shows_queues_workers_and_jobs(tmp_path: Path) -> None:
    storage = tmp_path / "var"
    cfg = write_config(tmp_path / "c.yaml", storage, free_port())
    store = JobStore.for_storage(storage)
    a = _job(store, "fp-s")
    store.heartbeat("w1@host", 1234, ["inference"], "cpu", 0.0)
    out = runner.invoke(app, ["status", "--config", str(cfg)])
    assert out.exit_code == 0, out.output
    for word in ("inference", "io", "w1@host", "complete", str(a)):
        assert word in out.output


def test_worker_rejects_unknown_queues(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "c.yaml", tmp_path / "var", free_port())
    out = runner.invoke(app, ["worker", "--config", str(cfg), "--queues", "inference,gpu"])
    assert out.exit_code == 2 and "unknown queue(s) ['gpu']" in out.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs: {device: tpu}\n")
    out = runner.invoke(app, ["worker", "--config", str(bad)])
    assert out.exit_code == 2 and "jobs.device" in out.output
