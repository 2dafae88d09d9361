"""``cad-node status``: queues, workers and recent jobs at a glance (rich tables)."""

from __future__ import annotations

import datetime as dt
import sqlite3
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cad_node.cli._common import load_settings_or_exit
from cad_node.config import DEFAULT_CONFIG_PATH, Settings

#: A worker whose last heartbeat is older than this is shown as gone (seconds).
WORKER_STALE_S = 20.0


def queue_lengths(settings: Settings) -> dict[str, int | None]:
    """Messages waiting per queue (None: broker unreachable)."""
    from cad_node.jobs.celery_app import BROKER_FILENAME, QUEUE_INFERENCE, QUEUE_IO

    queues = (QUEUE_INFERENCE, QUEUE_IO)
    url = settings.jobs.broker_url
    try:
        if url is None:
            path = Path(settings.node.storage_dir) / BROKER_FILENAME
            if not path.exists():
                return dict.fromkeys(queues, 0)
            with sqlite3.connect(path, timeout=5) as conn:
                rows = dict(conn.execute(
                    "SELECT q.name, COUNT(m.id) FROM kombu_queue q LEFT JOIN kombu_message m"
                    " ON m.queue_id = q.id AND m.visible = 1 GROUP BY q.name").fetchall())
            return {q: int(rows.get(q, 0)) for q in queues}
        if url.startswith(("redis://", "rediss://")):
            import redis

            client = redis.Redis.from_url(url, socket_timeout=3)
            return {q: int(client.llen(q)) for q in queues}
    except Exception:
        return dict.fromkeys(queues)
    return dict.fromkeys(queues)


def _ts(value: float | None) -> str:
    if value is None:
        return "-"
    return dt.datetime.fromtimestamp(value, tz=dt.UTC).strftime("%H:%M:%S")


def status(
    config: Annotated[Path, typer.Option("--config", "-c", help="Configuration file.")] = (
        DEFAULT_CONFIG_PATH),
    limit: Annotated[int, typer.Option(help="Recent jobs to show.")] = 10,
) -> None:
    """Show queues, workers and recent jobs with their turnaround."""
    settings = load_settings_or_exit(config)
    from cad_node.jobs.routing import NOT_ROUTED, not_routed_reason
    from cad_node.jobs.states import JobState
    from cad_node.jobs.store import JobStore

    store = JobStore.from_settings(settings)
    out = Console()
    broker = settings.jobs.broker_url or "embedded SQLite"
    qt = Table(title=f"queues ({broker.split('@')[-1]})")
    qt.add_column("queue")
    qt.add_column("waiting", justify="right")
    for name, n in queue_lengths(settings).items():
        qt.add_row(name, "unreachable" if n is None else str(n))
    out.print(qt)
    st = Table(title="jobs by state")
    st.add_column("state")
    st.add_column("jobs", justify="right")
    for state, n in store.count_by_state().items():
        st.add_row(state.value, str(n))
    st.add_row(f"({NOT_ROUTED}, among failed)", str(sum(
        1 for j in store.list_jobs(states=[JobState.FAILED], limit=None)
        if not_routed_reason(j.error) is not None and j.superseded_by is None)))
    out.print(st)
    wt = Table(title="workers")
    for col in ("worker", "pid", "queues", "device", "last seen", "alive"):
        wt.add_column(col)
    now = time.time()
    for w in store.workers():
        alive = now - w["last_seen"] < WORKER_STALE_S
        wt.add_row(w["hostname"], str(w["pid"]), w["queues"], w["device"], _ts(w["last_seen"]),
                   "yes" if alive else "no")
    out.print(wt)
    jt = Table(title="recent jobs")
    for col in ("job", "study UID", "state", "complete", "turnaround", "attempts", "error"):
        jt.add_column(col)
    for job in store.list_jobs(limit=limit):
        ta = f"{job.turnaround_s:.1f} s" if job.turnaround_s is not None else "-"
        reason = not_routed_reason(job.error)
        shown = NOT_ROUTED if reason is not None else job.state.value
        error = reason if reason is not None else (job.error or "")
        jt.add_row(str(job.job_id), job.study_instance_uid, shown,
                   _ts(job.completed_at), ta, str(job.attempts), error[:80])
    out.print(jt)


def register(app: typer.Typer) -> None:
    """Add the ``status`` command to ``app``."""
    app.command("status")(status)
