"""Celery configuration and a real worker on the embedded SQLite broker.

The worker is ``cad-node worker`` in a subprocess; the job is a synthetic
phantom study (trainer/synthetic.py) analysed by the real lung pipeline and
sent to a real Orthanc.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cad_node.config import load_config
from cad_node.jobs.celery_app import (
    QUEUE_INFERENCE,
    QUEUE_IO,
    TASK_ANALYSE,
    TASK_SEND,
    configure_app,
)
from cad_node.jobs.states import JobState
from cad_node.jobs.store import JobStore
from cad_node.jobs.tasks import publish_analyse
from tests.system.conftest import OrthancServer


def write_config(path: Path, storage: Path, pacs_port: int, *, broker_url: str | None = None,
                 objects: tuple[str, ...] = ("seg",), retry_initial_s: float = 0.5) -> Path:
    """A node configuration for tests (short timers, one Orthanc destination)."""
    cfg = {
        "node": {"ae_title": "CADNODE", "host": "127.0.0.1", "port": 11112,
                 "storage_dir": str(storage), "accept_any": True, "min_free_bytes": 0},
        "destinations": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1",
                          "port": pacs_port, "objects": list(objects), "timeout_s": 5}],
        "study": {"series_quiet_s": 1, "study_quiet_s": 1.5, "force_complete_s": 600,
                  "poll_interval_s": 0.2},
        "jobs": {"broker_url": broker_url, "soft_time_limit_s": 300, "hard_time_limit_s": 360,
                 "visibility_timeout_s": 400, "max_deliveries": 3,
                 "retry": {"initial_s": retry_initial_s, "max_interval_s": 2.0,
                           "multiplier": 2.0, "jitter": 0.2, "horizon_s": 120}},
        "routing": {"rules": [{"name": "chest-ct", "pipeline": "ct-chest",
                               "match": {"modality": ["CT"], "orientation": "axial",
                                         "min_instances": 20}}]},
        "results": {"use_dciodvfy": True},
        "metrics": {"enabled": False},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def phantom_study(out_dir: Path, seed: int, slices: int = 40) -> list[Path]:
    """A small synthetic chest CT (phantom) written as DICOM."""
    from trainer.synthetic import make_phantom, write_dicom_series

    ph = make_phantom(shape=(slices, 96, 96), spacing=(2.5, 3.0, 3.0), seed=seed, vessels=False)
    return write_dicom_series(ph.volume_hu, ph.spacing, ph.origin, out_dir, seed=seed,
                              patient_id=f"PHANTOM{seed}")


def instance_records(paths: list[Path]) -> list[dict[str, object]]:
    """StoredInstance-like records for the job table, read from real headers."""
    import pydicom

    out = []
    for i, p in enumerate(sorted(paths)):
        ds = pydicom.dcmread(p, stop_before_pixels=True)
        out.append({"instance_id": i, "study_instance_uid": str(ds.StudyInstanceUID),
                    "series_instance_uid": str(ds.SeriesInstanceUID),
                    "sop_instance_uid": str(ds.SOPInstanceUID),
                    "sop_class_uid": str(ds.SOPClassUID),
                    "transfer_syntax_uid": str(ds.file_meta.TransferSyntaxUID),
                    "path": str(p), "modality": "CT", "received_at": time.time()})
    return out


def start_worker(
    config: Path, queues: str = "inference,io", name: str = "w1"
) -> subprocess.Popen[bytes]:
    """``cad-node worker`` as a subprocess in its own process group."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, "-c", "from cad_node.cli import main; main()", "worker",
         "--config", str(config), "--queues", queues, "--device", "cpu",
         "--hostname", f"{name}@%h"],
        env=env, start_new_session=True,
    )


def stop_worker(proc: subprocess.Popen[bytes]) -> None:
    """Warm shutdown, then kill the group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def wait_state(store: JobStore, job_id: int, states: set[JobState], timeout: float) -> JobState:
    """Poll the job table until the job reaches one of ``states``."""
    deadline = time.monotonic() + timeout
    state = store.get(job_id).state
    while time.monotonic() < deadline:
        state = store.get(job_id).state
        if state in states:
            return state
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {state.value} after {timeout} s: "
                         f"{store.events(job_id)}")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-celery"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def test_celery_settings(tmp_path: Path) -> None:
    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "var", 4242))
    app = configure_app(cfg)
    conf = app.conf
    assert conf.broker_url == f"sqla+sqlite:///{(tmp_path / 'var' / 'broker.sqlite').resolve()}"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_soft_time_limit == 300 and conf.task_time_limit == 360
    redis_cfg = cfg.model_copy(update={"jobs": cfg.jobs.model_copy(
        update={"broker_url": "redis://127.0.0.1:6379/0"})})
    conf = configure_app(redis_cfg).conf
    assert conf.broker_url == "redis://127.0.0.1:6379/0"
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit
    assert {q.name for q in conf.task_queues} == {QUEUE_INFERENCE, QUEUE_IO}
    assert conf.task_routes[TASK_ANALYSE]["queue"] == QUEUE_INFERENCE
    assert conf.task_routes[TASK_SEND]["queue"] == QUEUE_IO


def test_embedded_broker_job_survives_restart_and_is_sent(
    tmp_path: Path, pacs: OrthancServer
) -> None:
    """Publish with no worker running (message durable in SQLite), then start one."""
    config = write_config(tmp_path / "c.yaml", tmp_path / "var", pacs.dicom_port)
    settings = load_config(config)
    configure_app(settings)
    store = JobStore.for_storage(settings.node.storage_dir)
    paths = phantom_study(tmp_path / "study", seed=11)
    records = instance_records(paths)
    job, _ = store.record_study_complete(
        study_id="1", study_instance_uid=str(records[0]["study_instance_uid"]), generation=1,
        fingerprint="fp-11", instances=records)
    publish_analyse(store, job.job_id)
    # The message is a row in the SQLite broker file, readable by a fresh connection.
    import sqlite3
    with sqlite3.connect(tmp_path / "var" / "broker.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM kombu_message WHERE visible = 1").fetchone()[0] == 1
    worker = start_worker(config)
    try:
        state = wait_state(store, job.job_id, {JobState.SENT, JobState.FAILED, JobState.DEAD}, 240)
    finally:
        stop_worker(worker)
    job = store.get(job.job_id)
    assert state is JobState.SENT, job.error
    sent = store.sent_objects(job.job_id)
    stored = {i["MainDicomTags"]["SOPInstanceUID"]
              for i in pacs.study_instances(job.study_instance_uid)}
    assert {o.sop_instance_uid for o in sent} <= stored
    assert [o.kind for o in sent] == ["seg"]
    states = [e.state.value for e in store.events(job.job_id)]
    assert states[:2] == ["received", "complete"] and states[-1] == "sent"
    assert "running" in states and "results-ready" in states
    assert any(w["device"] == "cpu" for w in store.workers())


def test_time_limits_end_the_job(tmp_path: Path, pacs: OrthancServer) -> None:
    """A job longer than the time limits ends failed or dead -- never stuck in running."""
    config = write_config(tmp_path / "c.yaml", tmp_path / "var", pacs.dicom_port)
    text = config.read_text()
    text = text.replace("soft_time_limit_s: 300", "soft_time_limit_s: 0.3")
    text = text.replace("hard_time_limit_s: 360", "hard_time_limit_s: 0.6")
    config.write_text(text)
    settings = load_config(config)
    assert settings.jobs.hard_time_limit_s == 0.6
    configure_app(settings)
    store = JobStore.for_storage(settings.node.storage_dir)
    records = instance_records(phantom_study(tmp_path / "study", seed=12))
    job, _ = store.record_study_complete(
        study_id="1", study_instance_uid=str(records[0]["study_instance_uid"]), generation=1,
        fingerprint="fp-12", instances=records)
    publish_analyse(store, job.job_id)
    worker = start_worker(config)
    try:
        state = wait_state(store, job.job_id, {JobState.SENT, JobState.FAILED, JobState.DEAD}, 120)
    finally:
        stop_worker(worker)
    job = store.get(job.job_id)
    assert state in {JobState.FAILED, JobState.DEAD}, store.events(job.job_id)
    assert "time limit" in (job.error or ""), job.error


def test_reconfiguring_publishes_to_the_new_broker(tmp_path: Path) -> None:
    """A process that configures the app twice (CLI, tests) must not reuse the old broker."""
    import sqlite3

    for name in ("a", "b"):
        cfg = load_config(write_config(tmp_path / f"{name}.yaml", tmp_path / name, 4242))
        configure_app(cfg)
        store = JobStore.for_storage(cfg.node.storage_dir)
        job, _ = store.record_study_complete(
            study_id="1", study_instance_uid="1.2.826.0.1.3680043.8.498.3", generation=1,
            fingerprint=name, instances=[{"series_instance_uid": "1.2", "sop_instance_uid": "1.3",
                                          "path": "/x", "received_at": 0.0}])
        publish_analyse(store, job.job_id)
    for name in ("a", "b"):
        with sqlite3.connect(tmp_path / name / "broker.sqlite") as db:
            assert db.execute("SELECT COUNT(*) FROM kombu_message").fetchone()[0] == 1


def test_tasks_land_in_their_own_queues(tmp_path: Path) -> None:
    """analyse -> ``inference`` and send -> ``io``, in the real embedded broker.

    GPU hosts run ``cad-node worker --queues inference``; a task routed by a
    default exchange into ``io`` would never reach them.
    """
    import sqlite3

    from cad_node.jobs.tasks import publish_send

    cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "var", 4242))
    configure_app(cfg)
    store = JobStore.for_storage(cfg.node.storage_dir)
    job, _ = store.record_study_complete(
        study_id="1", study_instance_uid="1.2.826.0.1.3680043.8.498.4", generation=1,
        fingerprint="q", instances=[{"series_instance_uid": "1.2", "sop_instance_uid": "1.3",
                                     "path": "/x", "received_at": 0.0}])
    publish_analyse(store, job.job_id)
    store.transition(job.job_id, JobState.RUNNING)  # as a worker would, before send
    publish_send(store, job.job_id)
    with sqlite3.connect(tmp_path / "var" / "broker.sqlite") as db:
        rows = db.execute(
            "SELECT q.name, m.payload FROM kombu_message m JOIN kombu_queue q ON m.queue_id = q.id"
        ).fetchall()
    by_queue: dict[str, list[str]] = {}
    for queue, payload in rows:
        task = TASK_ANALYSE if TASK_ANALYSE in payload else TASK_SEND
        by_queue.setdefault(queue, []).append(task)
    assert by_queue == {QUEUE_INFERENCE: [TASK_ANALYSE], QUEUE_IO: [TASK_SEND]}


def test_tasks_land_in_their_own_queues_on_redis(tmp_path: Path) -> None:
    """The same on a real redis-server (scale-out mode): one message per list."""
    import redis

    from cad_node.jobs.tasks import publish_send
    from tests.system.conftest import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    try:
        cfg = load_config(write_config(tmp_path / "c.yaml", tmp_path / "var", 4242,
                                       broker_url=server.url))
        configure_app(cfg)
        store = JobStore.for_storage(cfg.node.storage_dir)
        job, _ = store.record_study_complete(
            study_id="1", study_instance_uid="1.2.826.0.1.3680043.8.498.5", generation=1,
            fingerprint="r", instances=[{"series_instance_uid": "1.2",
                                         "sop_instance_uid": "1.3", "path": "/x",
                                         "received_at": 0.0}])
        publish_analyse(store, job.job_id)
        store.transition(job.job_id, JobState.RUNNING)
        publish_send(store, job.job_id)
        client = redis.Redis(host="127.0.0.1", port=server.port)
        inference = [m.decode() for m in client.lrange(QUEUE_INFERENCE, 0, -1)]
        io = [m.decode() for m in client.lrange(QUEUE_IO, 0, -1)]
        assert len(inference) == 1 and TASK_ANALYSE in inference[0]
        assert len(io) == 1 and TASK_SEND in io[0]
    finally:
        configure_app(load_config(write_config(tmp_path / "d.yaml", tmp_path / "d", 4242)))
        server.stop()
