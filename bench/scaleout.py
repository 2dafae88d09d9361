"""Scale-out benchmark: 8 studies through 1 then 2 workers on PostgreSQL + Redis.

Starts, in this run, a PostgreSQL cluster (initdb + pg_ctl on a free port),
redis-server, Orthanc (the PACS), ``cad-node serve --no-worker`` (receiver
with its WADO-RS fetch endpoint) and N ``cad-node worker`` processes, each in
its own mount namespace with the receiver's storage hidden (the layout of
tests/system/test_scaleout.py).  Sends 8 synthetic chest CTs (40 slices,
96 x 96, trainer/synthetic.py) with dcmtk storescu and reports:

* throughput (studies/min) from the first study-complete hand-off to the last
  result acknowledged by Orthanc, with 1 and with 2 workers, and their ratio;
* the job table's own cost per job (the sequence of job-store calls one job
  makes, hand-off to ``sent``) on PostgreSQL and on the embedded SQLite file,
  measured in the same run;
* with ``--real-ct``, the 133-slice LIDC-IDRI-0001 CT once end to end through
  the 2-worker PostgreSQL cluster (turnaround and objects in Orthanc).

Usage::

    .venv/bin/python bench/scaleout.py [--studies 8] [--real-ct] [--db-jobs 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cad_node.jobs.states import JobState  # noqa: E402
from cad_node.jobs.store import DestinationStatus, JobStore  # noqa: E402
from tests.system.conftest import OrthancServer, PostgresServer, RedisServer  # noqa: E402
from tests.system.test_scaleout import (  # noqa: E402
    FINAL,
    Cluster,
    _study,
    _study_uid,
    _wait_jobs,
)


def job_table_cost(store: JobStore, n: int) -> float:
    """Milliseconds of job-store calls per job (what one job does, hand-off to sent)."""
    uid0 = f"1.2.826.0.1.3680043.8.498.{int(time.time())}"
    t0 = time.perf_counter()
    for i in range(n):
        uid = f"{uid0}.{i}"
        job, _ = store.record_study_complete(
            study_id=str(i), study_instance_uid=uid, generation=1, fingerprint="fp",
            instances=[{"series_instance_uid": uid + ".1", "sop_instance_uid": uid + ".1.1",
                        "path": "/x", "received_at": 0.0}] * 40)
        _, token = store.enqueue(job.job_id)
        store.mark_published(job.job_id, token)
        store.begin_delivery(job.job_id, token, 3, worker="bench", lease_s=30)
        store.transition(job.job_id, JobState.RUNNING)
        store.transition(job.job_id, JobState.RESULTS_READY)
        store.set_results_host(job.job_id, "bench")
        _, token = store.enqueue(job.job_id, state=JobState.RESULTS_READY)
        store.mark_published(job.job_id, token)
        store.begin_delivery(job.job_id, token, 3, worker="bench", lease_s=30)
        store.destinations(job.job_id)
        store.sent_objects(job.job_id, "pacs")
        store.record_sent(job.job_id, "pacs", uid + ".9", "1.2.840.10008.5.1.4.1.1.88.34",
                          "sr", 0)
        store.record_destination(job.job_id, "pacs", DestinationStatus.ACKNOWLEDGED)
        store.transition(job.job_id, JobState.SENT)
    return (time.perf_counter() - t0) / n * 1000


def run(n_workers: int, studies: int, root: Path, pacs: OrthancServer, seed0: int) -> float:
    """Studies per minute through ``n_workers`` workers (fresh database and broker)."""
    pg = PostgresServer()
    pg.start()
    redis = RedisServer(root / f"redis{n_workers}")
    redis.workdir.mkdir(parents=True)
    redis.start()
    cluster = Cluster(root / f"run{n_workers}", pg, redis, pacs)
    cluster.root.mkdir(parents=True)
    try:
        cluster.start_receiver()
        names = [f"w{k + 1}" for k in range(n_workers)]
        for name in names:
            cluster.start_worker(name)
        cluster.wait_workers(names)
        paths = [_study(cluster.root, seed0 + k) for k in range(studies)]
        uids = [_study_uid(p) for p in paths]
        for p in paths:
            cluster.send(p)
        store = cluster.store()
        ids = _wait_jobs(store, uids, timeout=1800)
        jobs = [store.get(i[0]) for i in ids.values()]
        bad = [(j.job_id, j.state.value, j.error) for j in jobs if j.state is not JobState.SENT]
        if bad:
            raise SystemExit(f"jobs not sent: {bad}")
        start = min(j.completed_at or 0.0 for j in jobs)
        end = max(j.sent_at or 0.0 for j in jobs)
        turnaround = statistics.median(j.turnaround_s or 0.0 for j in jobs)
        rate = studies / (end - start) * 60
        print(f"{n_workers} worker(s): {studies} studies in {end - start:.1f} s = "
              f"{rate:.2f} studies/min (median turnaround {turnaround:.1f} s)", flush=True)
        return rate
    finally:
        cluster.close()
        redis.stop()
        pg.cleanup()


def real_ct(root: Path, pacs: OrthancServer) -> None:
    """The 133-slice LIDC-IDRI-0001 CT once through the 2-worker PostgreSQL cluster."""
    data = Path(os.environ.get("CAD_NODE_TEST_DATA", REPO.parent / "shared" / "data"))
    hits = list((data / "lidc-idri-0001").rglob("069.xml"))
    if not hits:
        raise SystemExit(f"LIDC-IDRI-0001 not found under {data}")
    files = sorted(hits[0].parent.glob("*.dcm"))
    pg = PostgresServer()
    pg.start()
    redis = RedisServer(root / "redis-ct")
    redis.workdir.mkdir(parents=True)
    redis.start()
    cluster = Cluster(root / "real-ct", pg, redis, pacs)
    cluster.root.mkdir(parents=True)
    try:
        cluster.start_receiver()
        for name in ("w1", "w2"):
            cluster.start_worker(name)
        cluster.wait_workers(["w1", "w2"])
        uid = _study_uid(files)
        cluster.send(files)
        store = cluster.store()
        ids = _wait_jobs(store, [uid], timeout=1800)
        job = store.get(ids[uid][0])
        sent = store.sent_objects(job.job_id)
        in_pacs = pacs.study_instances(uid)
        ran = [e.detail for e in store.events(job.job_id) if e.state is JobState.RUNNING]
        ready = [e.detail for e in store.events(job.job_id)
                 if e.state is JobState.RESULTS_READY]
        print(f"real CT ({len(files)} slices): job {job.job_id} {job.state.value}, turnaround "
              f"{job.turnaround_s:.1f} s, {len(sent)} object(s) acknowledged "
              f"({', '.join(sorted(o.kind for o in sent))}), {len(in_pacs)} instance(s) in "
              f"Orthanc for the study; ran: {ran}; {ready[-1] if ready else ''}", flush=True)
        assert job.state in FINAL
    finally:
        cluster.close()
        redis.stop()
        pg.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--db-jobs", type=int, default=200)
    parser.add_argument("--real-ct", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="cad-node-scaleout-"))
    print(f"cores: {os.cpu_count()}, load average {os.getloadavg()}", flush=True)
    pg = PostgresServer()
    pg.start()
    try:
        pg_ms = job_table_cost(JobStore(pg.url), args.db_jobs)
        sqlite_ms = job_table_cost(JobStore(root / "jobs.sqlite"), args.db_jobs)
    finally:
        pg.cleanup()
    print(f"job table per job ({args.db_jobs} jobs, 16 calls each): PostgreSQL {pg_ms:.1f} ms, "
          f"SQLite {sqlite_ms:.1f} ms (ratio {pg_ms / sqlite_ms:.2f})", flush=True)
    pacs = OrthancServer(root / "orthanc")
    pacs.start()
    try:
        if not args.skip_throughput:
            one = run(1, args.studies, root, pacs, seed0=700)
            two = run(2, args.studies, root, pacs, seed0=800)
            print(f"2 workers / 1 worker: {two / one:.2f}x", flush=True)
        if args.real_ct:
            real_ct(root, pacs)
    finally:
        pacs.stop()
    print(f"load average at the end {os.getloadavg()}")


if __name__ == "__main__":
    main()
