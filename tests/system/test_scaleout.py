"""Scale-out on real engines: PostgreSQL + Redis, one receiver and two workers as two "hosts".

Every server is started by the tests: PostgreSQL (``initdb`` + ``pg_ctl`` in a
temporary directory on a free port), redis-server, Orthanc (the PACS),
``cad-node serve --no-worker`` (the receiver, with its WADO-RS fetch
endpoint) and two ``cad-node worker`` processes.  Each worker runs in its
own mount namespace (``unshare --mount``) in which the receiver's
``storage_dir`` is hidden under an empty tmpfs, with its own empty working
directory, HOME and TMPDIR: it can reach the receiver's studies only over
WADO-RS, and the job table only through PostgreSQL.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from cad_node.jobs.states import JobState
from cad_node.jobs.store import JobStore
from tests.conftest import STORESCU, free_port, in_ci, require_program
from tests.system.conftest import OrthancServer, PostgresServer, RedisServer, kill_process_tree
from tests.unit.job_pipelines import GATE_ENV, WORKER_PRELUDE
from tests.unit.test_jobs_celery import phantom_study

REPO = Path(__file__).resolve().parents[2]
FINAL = {JobState.SENT, JobState.FAILED, JobState.DEAD}
LEASE_S = 4.0


def _config(path: Path, storage: Path, *, pg: PostgresServer, redis_url: str,
            pacs: OrthancServer, scp_port: int, wado_port: int,
            fetch_url: str | None = None) -> Path:
    cfg = {
        "node": {"ae_title": "CADNODE", "host": "127.0.0.1", "port": scp_port,
                 "storage_dir": str(storage), "accept_any": True, "min_free_bytes": 0},
        "destinations": [{"name": "pacs", "ae_title": pacs.ae_title, "host": "127.0.0.1",
                          "port": pacs.dicom_port, "objects": ["sr"], "timeout_s": 10}],
        "study": {"series_quiet_s": 1, "study_quiet_s": 1.5, "force_complete_s": 600,
                  "poll_interval_s": 0.2},
        "jobs": {"broker_url": redis_url, "embedded_worker": False, "soft_time_limit_s": 200,
                 "hard_time_limit_s": 240, "visibility_timeout_s": 600, "max_deliveries": 4,
                 "heartbeat_s": 1.0, "claim_lease_s": LEASE_S,
                 "retry": {"initial_s": 0.5, "max_interval_s": 2.0, "multiplier": 2.0,
                           "jitter": 0.2, "horizon_s": 120}},
        "routing": {"rules": [
            {"name": "gated", "pipeline": "test-gated",
             "match": {"modality": ["CT"], "series_description": "^GATED"}},
            {"name": "chest-ct", "pipeline": "ct-chest",
             "match": {"modality": ["CT"], "orientation": "axial", "min_instances": 20}},
        ]},
        "results": {"use_dciodvfy": False},
        "metrics": {"enabled": False},
        "storage": {"database_url": pg.url, "wado_host": "127.0.0.1", "wado_port": wado_port,
                    "fetch_url": fetch_url},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@dataclass
class Cluster:
    """The receiver, the workers and their servers."""

    root: Path
    pg: PostgresServer
    redis: RedisServer
    pacs: OrthancServer
    scp_port: int = field(default_factory=free_port)
    wado_port: int = field(default_factory=free_port)
    receiver: subprocess.Popen[bytes] | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def receiver_storage(self) -> Path:
        return self.root / "receiver" / "var"

    def store(self) -> JobStore:
        return JobStore(self.pg.url)

    def start_receiver(self) -> None:
        cfg = _config(self.root / "receiver.yaml", self.receiver_storage, pg=self.pg,
                      redis_url=self.redis.url, pacs=self.pacs, scp_port=self.scp_port,
                      wado_port=self.wado_port)
        log = open(self.root / "receiver.log", "ab")
        self.receiver = subprocess.Popen(
            [sys.executable, "-c", "from cad_node.cli import main; main()", "serve",
             "--no-worker", "--config", str(cfg)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
        log.close()
        _wait_port(self.scp_port, self.receiver)
        _wait_port(self.wado_port, self.receiver)

    def stop_receiver(self) -> None:
        if self.receiver is not None:
            self.receiver.send_signal(signal.SIGTERM)
            try:
                self.receiver.wait(timeout=30)
            except subprocess.TimeoutExpired:
                kill_process_tree(self.receiver.pid)
                self.receiver.wait(timeout=10)
            self.receiver = None

    def start_worker(self, name: str) -> None:
        host = self.root / name  # the other "host": its own empty directories
        for sub in ("var", "home", "tmp"):
            (host / sub).mkdir(parents=True, exist_ok=True)
        cfg = _config(host / "worker.yaml", host / "var", pg=self.pg, redis_url=self.redis.url,
                      pacs=self.pacs, scp_port=self.scp_port, wado_port=self.wado_port,
                      fetch_url=f"http://127.0.0.1:{self.wado_port}")
        env = dict(os.environ, HOME=str(host / "home"), TMPDIR=str(host / "tmp"),
                   OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                   # the worker imports the test pipelines (tests.unit.job_pipelines) from
                   # the checkout, as another host would have the node's code installed
                   PYTHONPATH=os.pathsep.join(
                       p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p),
                   **{GATE_ENV: str(self.root / "gate")})
        hidden = self.receiver_storage
        log = open(host / "worker.log", "ab")
        self.workers[name] = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c",
             f'mount -t tmpfs none "{hidden}" && exec "$0" "$@"',
             sys.executable, "-c", WORKER_PRELUDE, "worker", "--config", str(cfg),
             "--queues", "inference,io", "--device", "cpu", "--concurrency", "1",
             "--hostname", f"{name}@%h"],
            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            cwd=host / "home")
        log.close()

    def wait_workers(self, names: list[str], timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        store = self.store()
        while time.monotonic() < deadline:
            seen = {w["hostname"].split("@")[0] for w in store.workers()
                    if time.time() - w["last_seen"] < 3}
            if set(names) <= seen:
                return
            for n in names:
                assert self.workers[n].poll() is None, f"worker {n} exited; see {self.root}"
            time.sleep(0.3)
        raise AssertionError(f"workers {names} never heart-beat")

    def kill_worker(self, name: str) -> None:
        proc = self.workers.pop(name)
        kill_process_tree(proc.pid)
        proc.wait(timeout=10)

    def send(self, files: list[Path]) -> None:
        exe = require_program(STORESCU)
        proc = subprocess.run([exe, "-aet", "MODALITY", "-aec", "CADNODE", "127.0.0.1",
                               str(self.scp_port), *map(str, files)],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr

    def close(self) -> None:
        for name in list(self.workers):
            proc = self.workers.pop(name)
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    pass
            kill_process_tree(proc.pid)
        self.stop_receiver()


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"process exited with {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise AssertionError(f"port {port} never opened")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, orthanc: OrthancServer,
            ) -> Iterator[Cluster]:
    if shutil.which("unshare") is None or os.geteuid() != 0:
        msg = ("unshare --mount as root is needed to hide the receiver's storage from the "
               "workers (util-linux; run the suite as root, as CI does)")
        if in_ci():
            pytest.fail(msg)
        pytest.skip(msg)
    root = tmp_path_factory.mktemp("scaleout")
    pg = PostgresServer()
    pg.start()
    redis = RedisServer(root / "redis")
    redis.workdir.mkdir()
    redis.start()
    c = Cluster(root, pg, redis, orthanc)
    try:
        c.start_receiver()
        c.start_worker("w1")
        c.start_worker("w2")
        c.wait_workers(["w1", "w2"])
        yield c
    finally:
        c.close()
        redis.stop()
        pg.cleanup()


def _study(root: Path, seed: int, description: str | None = None) -> list[Path]:
    paths = phantom_study(root / f"study{seed}", seed=seed, slices=40)
    if description is not None:
        import pydicom

        for p in paths:
            ds = pydicom.dcmread(p)
            ds.SeriesDescription = description
            ds.save_as(p)
    return paths


def _study_uid(paths: list[Path]) -> str:
    import pydicom

    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)


def _wait_jobs(store: JobStore, uids: list[str], timeout: float) -> dict[str, list[int]]:
    deadline = time.monotonic() + timeout
    while True:
        jobs = {u: store.list_jobs(study_instance_uid=u, limit=None) for u in uids}
        if all(js and all(j.state in FINAL for j in js) for js in jobs.values()):
            return {u: [j.job_id for j in js] for u, js in jobs.items()}
        if time.monotonic() > deadline:
            raise AssertionError({u: [(j.job_id, j.state.value, j.error) for j in js]
                                  for u, js in jobs.items()})
        time.sleep(0.5)


def _running_on(store: JobStore, job_id: int) -> list[str]:
    return [str(e.detail).split(" on ")[1].split(",")[0] for e in store.events(job_id)
            if e.state is JobState.RUNNING and e.detail and " on " in e.detail]


def _assert_one_result_set(cluster: Cluster, store: JobStore, uid: str, job_id: int) -> None:
    job = store.get(job_id)
    assert job.state is JobState.SENT, (job.error, store.events(job_id))
    sent = store.sent_objects(job_id)
    assert sent and len({o.sop_instance_uid for o in sent}) == len(sent)
    in_pacs = cluster.pacs.study_instances(uid)
    assert sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in in_pacs) == sorted(
        o.sop_instance_uid for o in sent)
    assert [e.state for e in store.events(job_id)].count(JobState.SENT) == 1


def test_kill_9_of_a_worker_mid_job_is_finished_by_the_other(cluster: Cluster) -> None:
    paths = _study(cluster.root, 51, "GATED kill test")
    uid = _study_uid(paths)
    gate = cluster.root / "gate"
    cluster.send(paths)
    store = cluster.store()
    deadline = time.monotonic() + 120
    while not gate.with_suffix(".running").exists():
        assert time.monotonic() < deadline, "the gated pipeline never ran"
        time.sleep(0.1)
    job = store.list_jobs(study_instance_uid=uid)[0]
    assert job.state is JobState.RUNNING and job.claimed_by
    victim = job.claimed_by.split("@")[0]
    cluster.kill_worker(victim)  # SIGKILL of the whole worker (main + pool process)
    gate.touch()  # the next run passes the gate at once
    ids = _wait_jobs(store, [uid], timeout=120)
    assert len(ids[uid]) == 1
    ran = _running_on(store, ids[uid][0])
    assert len(ran) == 2 and ran[0].startswith(victim) and not ran[1].startswith(victim), ran
    _assert_one_result_set(cluster, store, uid, ids[uid][0])
    cluster.start_worker(victim)  # back to two workers for the next test
    cluster.wait_workers(["w1", "w2"])
    gate.unlink()
    gate.with_suffix(".running").unlink()


def test_four_studies_once_each_through_postgres_and_receiver_restarts(cluster: Cluster) -> None:
    # The first study is gated: its job holds one worker (concurrency 1, prefetch 1,
    # acks late) until the gate opens, so the other worker must take the next job.
    # Without it both workers working was left to chance: one idle worker keeps up
    # with studies that arrive 2 s apart and take 1.3 s each.
    gate = cluster.root / "gate"
    gate.unlink(missing_ok=True)
    gate.with_suffix(".running").unlink(missing_ok=True)
    gated = _study(cluster.root, 60, "GATED four-study test")
    studies = [gated] + [_study(cluster.root, 60 + n) for n in range(1, 4)]
    uids = [_study_uid(p) for p in studies]
    store = cluster.store()
    cluster.send(gated)
    deadline = time.monotonic() + 120
    while not gate.with_suffix(".running").exists():
        assert time.monotonic() < deadline, "the gated pipeline never ran"
        time.sleep(0.1)
    claimed = store.list_jobs(study_instance_uid=uids[0])[0].claimed_by
    assert claimed
    holder = claimed.split("@")[0]
    for paths in studies[1:]:
        cluster.send(paths)
    # PostgreSQL restarted while jobs are queued or running.
    deadline = time.monotonic() + 120
    while not any(j.state in (JobState.QUEUED, JobState.RUNNING)
                  for u in uids[1:] for j in store.list_jobs(study_instance_uid=u)):
        assert time.monotonic() < deadline, "no job started"
        time.sleep(0.2)
    cluster.pg.restart()
    # The receiver restarted while the workers are busy.
    cluster.stop_receiver()
    time.sleep(1.0)
    cluster.start_receiver()
    # The gate opens once a job has run on the other worker (one of the other
    # studies', or the gated one if a lapsed lease re-published it).
    deadline = time.monotonic() + 120
    while not any(not w.startswith(holder) for u in uids
                  for j in store.list_jobs(study_instance_uid=u)
                  for w in _running_on(store, j.job_id)):
        assert time.monotonic() < deadline, f"only {holder} took jobs while it was held"
        time.sleep(0.2)
    gate.touch()
    ids = _wait_jobs(store, uids, timeout=300)
    for uid in uids:
        assert len(ids[uid]) == 1, f"study {uid} has jobs {ids[uid]}"  # exactly one job each
        _assert_one_result_set(cluster, store, uid, ids[uid][0])
        assert len(_running_on(store, ids[uid][0])) >= 1
    workers = {w for uid in uids for w in _running_on(store, ids[uid][0])}
    assert len(workers) == 2, f"both workers should have worked: {workers}"
    # The receiver's storage stayed the receiver's: no worker wrote below it.
    assert not (cluster.receiver_storage / "results").exists()
    for name in ("w1", "w2"):
        assert not any((cluster.root / name / "var" / "fetch").glob("job-*/*.dcm"))
    gate.unlink()
    gate.with_suffix(".running").unlink()
