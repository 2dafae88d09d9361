"""End to end with real components on loopback: storescu -> cad-node serve -> Orthanc.

* ``cad-node serve`` (SCP + embedded SQLite broker + supervised worker) in a subprocess;
* dcmtk ``storescu`` as the modality;
* Orthanc as the PACS, checked through its REST API;
* redis-server for the scale-out scenario.

The first scenario uses the real LIDC-IDRI-0001 CT; the others use small
synthetic phantom studies (trainer/synthetic.py) to keep the suite short.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest

from cad_node.config import load_config
from cad_node.jobs.states import JobState
from cad_node.jobs.store import Job, JobStore
from tests.conftest import STORESCU, free_port, require_program
from tests.system.conftest import OrthancServer, RedisServer, ServeProcess
from tests.unit.test_jobs_celery import phantom_study, start_worker, stop_worker, write_config

pytestmark = pytest.mark.slow

OBJECTS = ("sr", "seg", "sc")
_DONE = {JobState.SENT, JobState.FAILED, JobState.DEAD}


class Node(ServeProcess):
    """A ``cad-node serve`` subprocess on a free port."""

    def __init__(self, workdir: Path, pacs_port: int, *, broker_url: str | None = None,
                 no_worker: bool = False) -> None:
        super().__init__()
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_port()
        self.config = write_config(workdir / "cad-node.yaml", workdir / "var", pacs_port,
                                   broker_url=broker_url, objects=OBJECTS)
        self.metrics_port = free_port()
        text = self.config.read_text().replace("port: 11112", f"port: {self.port}")
        text = text.replace("metrics:\n  enabled: false",
                            f"metrics:\n  enabled: true\n  host: 127.0.0.1\n"
                            f"  port: {self.metrics_port}")
        self.config.write_text(text)
        self.settings = load_config(self.config)
        self.store = JobStore.for_storage(self.settings.node.storage_dir)
        self.no_worker = no_worker

    def start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        self.spawn(*(["--no-worker"] if self.no_worker else []), env=env)
        self.wait_serving(60)

    def send(self, files: list[Path]) -> None:
        exe = require_program(STORESCU)
        proc = subprocess.run([exe, "-aet", "MODALITY", "-aec", "CADNODE", "127.0.0.1",
                               str(self.port), *map(str, files)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def jobs(self, study_uid: str) -> list[Job]:
        return sorted(self.store.list_jobs(study_instance_uid=study_uid, limit=None),
                      key=lambda j: j.job_id)

    def wait_job(self, study_uid: str, states: set[JobState], *, count: int = 1,
                 timeout: float = 300.0) -> Job:
        """Wait until the study has ``count`` jobs and the newest is in ``states``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.jobs(study_uid)
            if len(jobs) >= count and jobs[count - 1].state in states:
                return jobs[count - 1]
            time.sleep(0.2)
        jobs = self.jobs(study_uid)
        detail = [(j.job_id, j.state.value, j.error) for j in jobs]
        raise AssertionError(f"study {study_uid}: jobs {detail}\n{self.log()}")


def _study_uid(files: list[Path]) -> str:
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)


def _results_in_pacs(
    pacs: OrthancServer, study_uid: str, sources: set[str]
) -> list[dict[str, Any]]:
    """Instances of the study in Orthanc that are not source images."""
    return [i for i in pacs.study_instances(study_uid)
            if i["MainDicomTags"]["SOPInstanceUID"] not in sources]


def _sop_uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def _alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[-1].split()[0] != "Z"
    except OSError:
        return False


def _running_count(store: JobStore, job_id: int) -> int:
    return sum(1 for e in store.events(job_id) if e.state is JobState.RUNNING)


@pytest.fixture(scope="module")
def node(orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("node"), orthanc.dicom_port)
    with n.running():
        yield n


@pytest.fixture(scope="module")
def ct_job(node: Node, ct_files: list[Path], orthanc: OrthancServer) -> Job:
    """The real CT sent once with storescu and processed."""
    node.send(ct_files)
    return node.wait_job(_study_uid(ct_files), _DONE, timeout=600)


def test_real_ct_results_arrive_in_source_study(
    node: Node, ct_job: Job, ct_files: list[Path], orthanc: OrthancServer,
    tmp_path: Path,
) -> None:
    from cad_node.results import validate

    assert ct_job.state is JobState.SENT, ct_job.error
    study_uid = ct_job.study_instance_uid
    sources = [pydicom.dcmread(f) for f in ct_files]
    results = _results_in_pacs(orthanc, study_uid, {str(d.SOPInstanceUID) for d in sources})
    modalities = sorted({r["MainDicomTags"].get("Modality", "") for r in
                         (orthanc.get(f"/series/{i['ParentSeries']}") for i in results)})
    assert {"SR", "SEG"} <= set(modalities) and len(modalities) >= 3, modalities
    sent = node.store.sent_objects(ct_job.job_id)
    assert {o.kind for o in sent} == set(OBJECTS)
    assert {r["MainDicomTags"]["SOPInstanceUID"] for r in results} == \
        {o.sop_instance_uid for o in sent}
    # Every object as stored by the PACS passes the conformance gate (incl. dciodvfy).
    datasets = []
    for r in results:
        path = tmp_path / f"{r['ID']}.dcm"
        path.write_bytes(orthanc.instance_file(r["ID"]))
        datasets.append(pydicom.dcmread(path))
    for ds in datasets:
        assert ds.StudyInstanceUID == study_uid
        report = validate(ds, sources, others=datasets, use_dciodvfy=True)
        assert report.ok and report.dciodvfy_ran, (ds.Modality, report.errors)
    # The node's own gate ran dciodvfy on every object it sent.
    manifest = json.loads(
        (node.settings.node.storage_path / "results" / ct_job.node_name / "manifest.json")
        .read_text())
    assert manifest and all(e["dciodvfy_ran"] is True for e in manifest), manifest
    timeline = [e.state.value for e in node.store.events(ct_job.job_id)]
    assert timeline[:3] == ["received", "complete", "queued"] and timeline[-1] == "sent"
    # Prometheus metrics of the running node.
    with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics",
                                timeout=10) as rsp:
        metrics = set(rsp.read().decode().splitlines())
    assert f"cad_node_instances_received_total {float(len(ct_files))}" in metrics
    assert 'cad_node_jobs{state="sent"} 1.0' in metrics
    assert "cad_node_turnaround_seconds_count 1.0" in metrics


def test_same_study_twice_unchanged_gives_no_second_set(
    node: Node, ct_job: Job, ct_files: list[Path], orthanc: OrthancServer,
) -> None:
    study_uid = ct_job.study_instance_uid
    before = len(orthanc.study_instances(study_uid))
    node.send(ct_files)
    # Wait past the study-quiet timer and a few assembler polls.
    time.sleep(node.settings.study.study_quiet_s + 3.0)
    jobs = node.jobs(study_uid)
    assert [j.job_id for j in jobs] == [ct_job.job_id]
    assert len(orthanc.study_instances(study_uid)) == before


def test_one_more_slice_gives_a_superseding_job(
    node: Node, orthanc: OrthancServer, tmp_path: Path,
) -> None:
    files = sorted(phantom_study(tmp_path / "p", seed=21))
    study_uid = _study_uid(files)
    node.send(files[:-1])
    first = node.wait_job(study_uid, _DONE)
    assert first.state is JobState.SENT, first.error
    node.send(files[-1:])
    second = node.wait_job(study_uid, _DONE, count=2)
    assert second.state is JobState.SENT, second.error
    assert second.supersedes == first.job_id and second.generation == first.generation + 1
    assert node.store.get(first.job_id).superseded_by == second.job_id
    assert len(second.instances) == len(first.instances) + 1
    old = {o.sop_instance_uid for o in node.store.sent_objects(first.job_id)}
    new = {o.sop_instance_uid for o in node.store.sent_objects(second.job_id)}
    assert old and new and not old & new  # new results, new UIDs
    in_pacs = {r["MainDicomTags"]["SOPInstanceUID"]
               for r in _results_in_pacs(orthanc, study_uid, _sop_uids(files))}
    assert new <= in_pacs


def test_pacs_down_job_waits_in_retry_then_sends_once(
    node: Node, orthanc: OrthancServer, tmp_path: Path,
) -> None:
    files = sorted(phantom_study(tmp_path / "p", seed=22))
    study_uid = _study_uid(files)
    orthanc.stop()
    try:
        node.send(files)
        deadline = time.monotonic() + 300
        job = node.wait_job(study_uid, {JobState.RESULTS_READY, *_DONE})
        while time.monotonic() < deadline:
            job = node.jobs(study_uid)[0]
            if job.attempts >= 2 or job.state in _DONE:
                break
            time.sleep(0.2)
        assert job.state is JobState.RESULTS_READY and job.attempts >= 2, job
        assert job.error and job.next_attempt_at is not None
    finally:
        orthanc.start()
    job = node.wait_job(study_uid, _DONE)
    assert job.state is JobState.SENT, job.error
    sent = node.store.sent_objects(job.job_id)
    results = _results_in_pacs(orthanc, study_uid, _sop_uids(files))
    assert len(results) == len(sent) == len({o.sop_instance_uid for o in sent})
    assert {r["MainDicomTags"]["SOPInstanceUID"] for r in results} == \
        {o.sop_instance_uid for o in sent}
    retries = [e for e in node.store.events(job.job_id)
               if e.state is JobState.RESULTS_READY and e.error]
    assert len(retries) >= 2


def test_worker_killed_mid_job_runs_again_once(
    node: Node, orthanc: OrthancServer, tmp_path: Path,
) -> None:
    files = sorted(phantom_study(tmp_path / "p", seed=23, slices=60))
    study_uid = _study_uid(files)
    node.send(files)
    job = node.wait_job(study_uid, {JobState.RUNNING, JobState.RESULTS_READY, *_DONE})
    assert job.state is JobState.RUNNING, f"job finished before it could be killed: {job}"
    workers = [w for w in node.store.workers() if w["hostname"].startswith("embedded-")]
    pid = int(workers[0]["pid"])
    os.killpg(pid, signal.SIGKILL)  # the worker and its pool processes
    job = node.wait_job(study_uid, _DONE, timeout=400)
    assert job.state is JobState.SENT, job.error
    assert _running_count(node.store, job.job_id) == 2
    sent = node.store.sent_objects(job.job_id)
    results = _results_in_pacs(orthanc, study_uid, _sop_uids(files))
    assert {r["MainDicomTags"]["SOPInstanceUID"] for r in results} == \
        {o.sop_instance_uid for o in sent}
    assert len(results) == len(sent)


def test_embedded_restart_with_queued_job(
    orthanc: OrthancServer, tmp_path: Path,
) -> None:
    files = sorted(phantom_study(tmp_path / "p", seed=24))
    study_uid = _study_uid(files)
    receiver = Node(tmp_path / "node", orthanc.dicom_port, no_worker=True)
    receiver.start()
    try:
        receiver.send(files)
        job = receiver.wait_job(study_uid, {JobState.QUEUED})
    finally:
        receiver.stop()
    with sqlite3.connect(receiver.workdir / "var" / "broker.sqlite") as db:
        waiting = db.execute("SELECT COUNT(*) FROM kombu_message WHERE visible = 1").fetchone()[0]
    assert waiting == 1 and receiver.store.get(job.job_id).state is JobState.QUEUED
    restarted = Node(tmp_path / "node", orthanc.dicom_port)
    restarted.start()
    worker_pid = None
    try:
        done = restarted.wait_job(study_uid, _DONE)
        assert restarted.proc is not None
        mine = f"embedded-{restarted.proc.pid}@"
        worker_pid = next(int(w["pid"]) for w in restarted.store.workers()
                          if w["hostname"].startswith(mine))
        # kill -9 of serve itself: its embedded worker must not live on as an orphan.
        os.kill(restarted.proc.pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and _alive(worker_pid):
            time.sleep(0.2)
        orphan = _alive(worker_pid)
    finally:
        restarted.stop()
        if worker_pid is not None and _alive(worker_pid):
            os.killpg(worker_pid, signal.SIGKILL)
    assert done.job_id == job.job_id and done.state is JobState.SENT, done.error
    assert _running_count(restarted.store, job.job_id) == 1
    assert not orphan, "the embedded worker outlived serve"


def test_redis_two_workers_four_studies(
    orthanc: OrthancServer, redis_server: RedisServer, tmp_path: Path,
) -> None:
    receiver = Node(tmp_path / "node", orthanc.dicom_port, broker_url=redis_server.url,
                    no_worker=True)
    studies = [sorted(phantom_study(tmp_path / f"p{i}", seed=30 + i, slices=36))
               for i in range(4)]
    receiver.start()
    workers = [start_worker(receiver.config, name=f"gpu{i}") for i in range(2)]
    try:
        for files in studies:
            receiver.send(files)
        jobs = [receiver.wait_job(_study_uid(f), _DONE, timeout=600) for f in studies]
    finally:
        for w in workers:
            stop_worker(w)
        receiver.stop()
    for files, job in zip(studies, jobs, strict=True):
        assert job.state is JobState.SENT, job.error
        assert _running_count(receiver.store, job.job_id) == 1
        sent = receiver.store.sent_objects(job.job_id)
        results = _results_in_pacs(orthanc, job.study_instance_uid, _sop_uids(files))
        assert len(results) == len(sent) > 0
    names = {w["hostname"].split("@")[0] for w in receiver.store.workers()}
    assert {"gpu0", "gpu1"} <= names
