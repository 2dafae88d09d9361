"""Prometheus metrics from the job table (scraped over HTTP) and structured job logs."""

from __future__ import annotations

import json
import logging
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry

from cad_node.jobs.states import JobState
from cad_node.jobs.store import JobStore
from cad_node.logs import StructuredFormatter, job_logger
from cad_node.metrics import start_metrics_server
from tests.conftest import free_port

STUDY = "1.2.826.0.1.3680043.8.498.11"


def _job(store: JobStore, fp: str, now: float) -> int:
    job, _ = store.record_study_complete(
        study_id="1", study_instance_uid=STUDY, generation=1, fingerprint=fp, now=now,
        instances=[{"series_instance_uid": "1.2", "sop_instance_uid": "1.2.3", "path": "/x",
                    "received_at": now - 5}])
    return job.job_id


def test_metrics_endpoint(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "jobs.sqlite")
    a = _job(store, "a", 100.0)
    store.enqueue(a, now=100.0)
    store.transition(a, JobState.RUNNING, now=101.0)
    store.transition(a, JobState.RESULTS_READY, now=110.0)
    store.transition(a, JobState.RESULTS_READY, error="refused", count_attempt=True, now=111.0)
    store.transition(a, JobState.SENT, now=115.0)  # turnaround 15 s
    _job(store, "b", 200.0)  # stays complete
    port = free_port()
    server = start_metrics_server(store, "127.0.0.1", port, registry=CollectorRegistry())
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as rsp:
            text = rsp.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    lines = set(text.splitlines())
    assert 'cad_node_jobs{state="sent"} 1.0' in lines
    assert 'cad_node_jobs{state="complete"} 1.0' in lines
    assert 'cad_node_jobs{state="dead"} 0.0' in lines
    assert 'cad_node_turnaround_seconds_bucket{le="10.0"} 0.0' in lines
    assert 'cad_node_turnaround_seconds_bucket{le="20.0"} 1.0' in lines
    assert "cad_node_turnaround_seconds_sum 15.0" in lines
    assert 'cad_node_send_failures_total{state="results-ready"} 1.0' in lines


def test_job_log_lines_carry_study_and_job() -> None:
    record_holder: list[logging.LogRecord] = []

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            record_holder.append(record)

    logger = logging.getLogger("cad_node.test.jobs")
    logger.addHandler(_Keep())
    logger.setLevel(logging.INFO)

    class _Job:
        job_id = 42
        study_instance_uid = STUDY

    job_logger(logger, _Job()).info("sent %d object(s)", 3)
    line = json.loads(StructuredFormatter(json_lines=True).format(record_holder[0]))
    assert line["study_uid"] == STUDY and line["job_id"] == 42
    assert line["msg"] == "sent 3 object(s)" and line["level"] == "INFO"
    plain = StructuredFormatter().format(record_holder[0])
    assert plain.endswith(f"[study_uid={STUDY} job_id=42]")
