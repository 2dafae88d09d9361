"""``cad-node db migrate``: an embedded node's SQLite index and job table into a real PostgreSQL."""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from typer.testing import CliRunner

from cad_node.cli import app
from cad_node.jobs.states import JobState
from cad_node.jobs.store import DestinationStatus, JobStore
from cad_node.storage.index import NewInstance, SpoolIndex
from cad_node.storage.spool import Spool
from tests.system.conftest import PostgresServer

STUDY = "1.2.826.0.1.3680043.8.498.91"


def _embedded_node(storage: Path) -> tuple[dict[str, int], dict[str, int]]:
    index = SpoolIndex(Spool.index_path(storage), storage / "spool" / "objects")
    for i in range(1, 6):
        index.add_instance(NewInstance(
            i, f"{STUDY}.1.{i}", "1.2.840.10008.5.1.4.1.1.2", STUDY, f"{STUDY}.1",
            "1.2.840.10008.1.2.1", "P1", "ACC", "CT", f"000000/{i:010d}.dcm", 100, "",
            time.time()))
    jobs = JobStore(storage / "jobs.sqlite")
    for n in range(3):
        job, _ = jobs.record_study_complete(
            study_id="1", study_instance_uid=STUDY, generation=n + 1, fingerprint=f"fp{n}",
            instances=[{"series_instance_uid": f"{STUDY}.1", "sop_instance_uid": f"{STUDY}.1.1",
                        "path": "/x", "received_at": 0.0}])
        jobs.enqueue(job.job_id)
    jobs.record_sent(job.job_id, "pacs", "1.2.3.4", "1.2.840.10008.5.1.4.1.1.88.34", "sr", 0)
    jobs.record_destination(job.job_id, "pacs", DestinationStatus.ACKNOWLEDGED)
    jobs.heartbeat("w1", 1, ["inference"], "cpu", 0.0)
    return index.table_counts(), jobs.table_counts()


def test_db_migrate_sqlite_to_postgresql(tmp_path: Path, postgres: PostgresServer) -> None:
    storage = tmp_path / "var"
    index_counts, job_counts = _embedded_node(storage)
    assert index_counts == {"patient": 1, "study": 1, "series": 1, "instance": 5}
    assert job_counts["jobs"] == 3 and job_counts["job_events"] == 9
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"node": {"storage_dir": str(storage)}}))
    result = CliRunner().invoke(app, ["db", "migrate", "--config", str(config),
                                      "--to", postgres.url])
    assert result.exit_code == 0, result.output
    assert "counts match" in result.output
    target_index = SpoolIndex(postgres.url, storage / "spool" / "objects")
    target_jobs = JobStore(postgres.url)
    assert target_index.table_counts() == index_counts
    assert target_jobs.table_counts() == job_counts
    assert target_index.study(STUDY) is not None and target_index.study(STUDY).revision == 5
    # The copied jobs keep their ids and states; new rows get fresh ids (sequences moved on).
    assert [j.state for j in target_jobs.list_jobs()] == [JobState.QUEUED] * 3
    new, created = target_jobs.record_study_complete(
        study_id="2", study_instance_uid=STUDY + ".2", generation=1, fingerprint="new",
        instances=[{"series_instance_uid": "1.2", "sop_instance_uid": "1.2.3", "path": "/y",
                    "received_at": 0.0}])
    assert created and new.job_id == 4
    assert target_jobs.acknowledged_by_all(["pacs"]) == [3]
    # A second migration into the now non-empty target is refused.
    again = CliRunner().invoke(app, ["db", "migrate", "--config", str(config),
                                     "--to", postgres.url])
    assert again.exit_code == 1 and "not empty" in again.output
