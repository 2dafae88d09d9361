"""REST API on a real socket: read-only without a token, writes with one, audited."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cad_node.audit import read_events
from cad_node.config import Settings
from cad_node.jobs.states import JobState
from cad_node.jobs.store import JobStore
from cad_node.storage.spool import Spool
from cad_node.web import STAGES, WebContext, WebServer

TOKEN = "s3cret-token-for-bob-0123"


def _request(url: str, method: str = "GET", token: str | None = None) -> tuple[int, Any]:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=20) as rsp:
            body = rsp.read().decode()
            kind = rsp.headers.get("Content-Type", "")
            return rsp.status, json.loads(body) if "json" in kind else body
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read().decode())


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[str, JobStore, Settings, dict[str, Settings]]]:
    storage = tmp_path / "var"
    settings = Settings.model_validate({
        "node": {"storage_dir": str(storage)},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                          "port": 1}],
        "web": {"enabled": True, "tokens": [{"name": "bob", "token": TOKEN}]},
    })
    spool = Spool.open(storage)
    store = JobStore.for_storage(storage)
    job, _ = store.record_study_complete(
        study_id="1", study_instance_uid="1.2.3.4", generation=1, fingerprint="f",
        instances=[{"series_instance_uid": "1.2.3.4.5", "sop_instance_uid": "1.2.3.4.5.6",
                    "path": "/nowhere/1.dcm", "received_at": 100.0}], now=110.0)
    store.transition(job.job_id, JobState.QUEUED)
    store.transition(job.job_id, JobState.RUNNING)
    store.transition(job.job_id, JobState.FAILED,
                     error="not routed: no routing rule matched: 1 instance(s), fewer than 40")
    current = {"settings": settings}
    ctx = WebContext(settings=lambda: current["settings"], store=store,
                     index=lambda: spool.index, environ={})
    server = WebServer(ctx, "127.0.0.1", 0)
    server.start()
    try:
        yield f"http://127.0.0.1:{server.port}", store, settings, current
    finally:
        server.stop()
        spool.close()


def test_the_page_uses_local_assets_only(web: Any) -> None:
    base, *_ = web
    code, html = _request(base + "/")
    assert code == 200 and "<title>cad-node status</title>" in html
    refs = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert refs and all(r.startswith(("/static/", "data:")) for r in refs), refs
    for ref in (r for r in refs if r.startswith("/static/")):
        code, body = _request(base + ref)
        assert code == 200 and "http://" not in body and "https://" not in body
    assert _request(base + "/static/../app.py")[0] == 404


def test_reads_need_no_token_and_show_not_routed(web: Any) -> None:
    base, *_ = web
    code, data = _request(base + "/api/overview")
    assert code == 200
    assert data["jobs"]["not routed"] == 1 and data["writes_enabled"]
    assert data["disk"]["watermark_bytes"] == 2 * 1024**3
    code, job = _request(base + "/api/jobs/1")
    assert code == 200 and job["state"] == "not routed"
    assert job["not_routed_reason"] == "no routing rule matched: 1 instance(s), fewer than 40"
    timeline = {t["stage"]: t for t in job["timeline"]}
    assert list(timeline) == list(STAGES)
    assert timeline["complete"]["duration_s"] == pytest.approx(10.0)
    assert timeline["routed"]["error"].startswith("not routed:")
    assert timeline["sent"]["at"] is None
    code, models = _request(base + "/api/models")
    assert code == 200 and any(m.get("name") == "ct-nodule-scorer" and m["card"] for m in models)


def test_writes_need_a_valid_token_and_are_audited(web: Any) -> None:
    base, store, settings, current = web
    assert _request(base + "/api/jobs/1/retry", "POST")[0] == 401
    assert _request(base + "/api/jobs/1/retry", "POST", token="not-the-token-at-all")[0] == 401
    assert store.get(1).state is JobState.FAILED
    code, body = _request(base + "/api/jobs/1/retry", "POST", token=TOKEN)
    assert code == 200 and body["job_state"] == "queued", body
    assert store.get(1).state is JobState.QUEUED
    code, body = _request(base + "/api/jobs/1/resend", "POST", token=TOKEN)
    assert code == 409  # queued: nothing to resend
    assert _request(base + "/api/jobs/99/retry", "POST", token=TOKEN)[0] == 404
    assert _request(base + "/api/reload", "POST", token=TOKEN)[0] == 503
    actions = [e for e in read_events(Path(settings.node.storage_dir) / "audit")
               if e["event"] == "admin-action"]
    assert [(e["actor"], e["action"], e["outcome"]) for e in actions] == [
        ("bob", "retry", 0), ("bob", "resend", 4)]
    # No token configured at all: writes are off.
    current["settings"] = settings.model_copy(
        update={"web": settings.web.model_copy(update={"tokens": []})})
    assert _request(base + "/api/jobs/1/retry", "POST", token=TOKEN)[0] == 403


def test_dead_letter_replay_queues_every_dead_job(web: Any) -> None:
    base, store, *_ = web
    dead, _ = store.record_study_complete(
        study_id="2", study_instance_uid="1.2.3.9", generation=1, fingerprint="g",
        instances=[{"series_instance_uid": "1.2.3.9.1", "sop_instance_uid": "1.2.3.9.1.1",
                    "path": "/nowhere/2.dcm", "received_at": 100.0}], now=110.0)
    store.transition(dead.job_id, JobState.DEAD, error="delivered 4 times")
    assert _request(base + "/api/dead-letter/replay", "POST")[0] == 401
    code, body = _request(base + "/api/dead-letter/replay", "POST", token=TOKEN)
    assert code == 200 and body == {"replayed": [dead.job_id]}
    assert store.get(dead.job_id).state is JobState.QUEUED  # no results yet: analysed again
    assert store.get(1).state is JobState.FAILED  # failed (not dead) jobs are left alone


def test_workers_show_alive_device_and_current_job(web: Any) -> None:
    import time

    base, store, *_ = web
    busy, _ = store.record_study_complete(
        study_id="3", study_instance_uid="1.2.3.7", generation=1, fingerprint="h",
        instances=[{"series_instance_uid": "1.2.3.7.1", "sop_instance_uid": "1.2.3.7.1.1",
                    "path": "/nowhere/3.dcm", "received_at": 100.0}], now=110.0)
    store.transition(busy.job_id, JobState.QUEUED)
    store.transition(busy.job_id, JobState.RUNNING, detail="delivery 1 on gpu0@host, device cuda:0")
    store.heartbeat("gpu0@host", 4242, ["inference"], "cuda:0", time.time())
    store.heartbeat("old@host", 4243, ["io"], "cpu", time.time() - 3600)
    with store.db.write() as conn:  # the old worker's last heartbeat was an hour ago
        import sqlalchemy as sa

        from cad_node.jobs.store import WORKERS
        conn.execute(sa.update(WORKERS).where(WORKERS.c.hostname == "old@host")
                     .values(last_seen=time.time() - 3600))
    workers = {w["hostname"]: w for w in _request(base + "/api/overview")[1]["workers"]}
    assert workers["gpu0@host"]["alive"] and workers["gpu0@host"]["device"] == "cuda:0"
    assert workers["gpu0@host"]["current_job"] == busy.job_id
    assert not workers["old@host"]["alive"] and workers["old@host"]["current_job"] is None


def test_uid_flagged_instances_are_shown(tmp_path: Path) -> None:
    from cad_node.storage.index import NewInstance

    storage = tmp_path / "var"
    settings = Settings.model_validate({"node": {"storage_dir": str(storage)}})
    spool = Spool.open(storage)
    defect = "SOP Instance UID (0008,0018): component 5 has a leading zero"
    for i, (uid, defects) in enumerate([("1.2.3.4.5", ()), ("1.2.3.4.06", (defect,))], 1):
        spool.index.add_instance(NewInstance(
            i, uid, "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.3.4", "1.2.840.10008.1.2.1",
            "P", None, "CT", f"000000/{i:010d}.dcm", 10, "", 100.0 + i, uid_defects=defects))
    ctx = WebContext(settings=lambda: settings, store=JobStore.for_storage(storage),
                     index=lambda: spool.index, environ={})
    server = WebServer(ctx, "127.0.0.1", 0)
    server.start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        code, studies = _request(base + "/api/studies")
        assert code == 200
        assert [(s["instances"], s["uid_flagged"]) for s in studies] == [(2, 1)]
        assert _request(base + "/api/studies/1.2.3/uid-defects") == (200, {"1.2.3.4.06": defect})
        assert _request(base + "/api/studies/9.9/uid-defects")[0] == 404
        code, script = _request(base + "/static/app.js")
        assert code == 200 and "uid_flagged" in script
    finally:
        server.stop()
        spool.close()
