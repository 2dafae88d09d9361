"""``cad-node jobs list|show|retry|resend``: inspect and act on the job table."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cad_node.cli._common import EXIT_USAGE, load_settings_or_exit
from cad_node.config import DEFAULT_CONFIG_PATH, Settings

jobs_app = typer.Typer(help="Inspect and act on jobs.", no_args_is_help=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Configuration file.")]


def _ts(value: float | None) -> str:
    if value is None:
        return "-"
    return dt.datetime.fromtimestamp(value, tz=dt.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _store(settings: Settings):  # type: ignore[no-untyped-def]
    from cad_node.jobs.store import JobStore

    return JobStore.from_settings(settings)


@jobs_app.command("list")
def list_jobs(
    config: ConfigOpt = DEFAULT_CONFIG_PATH,
    state: Annotated[list[str] | None, typer.Option(help="Only jobs in this state.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many jobs.")] = 50,
    study: Annotated[str | None, typer.Option(help="Only jobs of this Study Instance UID.")] = None,
) -> None:
    """List jobs, newest first (all generations of a study with --study)."""
    from cad_node.jobs.states import JobState

    settings = load_settings_or_exit(config)
    try:
        states = [JobState(s) for s in state] if state else None
    except ValueError:
        Console(stderr=True).print(
            f"--state: use one of {', '.join(s.value for s in JobState)}", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    table = Table(title="jobs")
    for col in ("job", "study UID", "gen", "state", "since", "attempts", "turnaround", "error"):
        table.add_column(col)
    for job in _store(settings).list_jobs(states=states, limit=limit,
                                          study_instance_uid=study):
        ta = f"{job.turnaround_s:.1f} s" if job.turnaround_s is not None else "-"
        sup = f" (superseded by {job.superseded_by})" if job.superseded_by else ""
        table.add_row(str(job.job_id), job.study_instance_uid, str(job.generation),
                      job.state.value + sup, _ts(job.state_at), str(job.attempts), ta,
                      (job.error or "")[:80])
    Console().print(table)


@jobs_app.command("show")
def show(job_id: int, config: ConfigOpt = DEFAULT_CONFIG_PATH) -> None:
    """Show one job with its timeline and the objects each destination acknowledged."""
    from cad_node.jobs.store import JobNotFoundError

    settings = load_settings_or_exit(config)
    store = _store(settings)
    try:
        job = store.get(job_id)
    except JobNotFoundError:
        Console(stderr=True).print(f"no job {job_id}", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    out = Console()
    out.print(f"job {job.job_id}: study {job.study_instance_uid} generation {job.generation}, "
              f"{len(job.instances)} instance(s), state {job.state.value}, "
              f"attempts {job.attempts}, deliveries {job.deliveries}", highlight=False)
    if job.supersedes:
        out.print(f"supersedes job {job.supersedes}", highlight=False)
    if job.superseded_by:
        out.print(f"superseded by job {job.superseded_by}", highlight=False)
    if job.next_attempt_at:
        out.print(f"next attempt at {_ts(job.next_attempt_at)}", highlight=False)
    if job.turnaround_s is not None:
        out.print(f"turnaround {job.turnaround_s:.1f} s", highlight=False)
    timeline = Table(title="timeline")
    for col in ("time (UTC)", "state", "attempt", "error", "detail"):
        timeline.add_column(col)
    for ev in store.events(job_id):
        timeline.add_row(_ts(ev.at), ev.state.value, str(ev.attempt), ev.error or "",
                         ev.detail or "")
    out.print(timeline)
    sent = store.sent_objects(job_id)
    if sent:
        objs = Table(title="acknowledged objects")
        for col in ("destination", "kind", "SOP Instance UID", "status", "at"):
            objs.add_column(col)
        for o in sent:
            objs.add_row(o.destination, o.kind, o.sop_instance_uid, f"0x{o.status:04X}",
                         _ts(o.sent_at))
        out.print(objs)


def _act(job_id: int, config: Path, resend: bool) -> None:
    from cad_node.audit import cli_actor
    from cad_node.jobs.actions import resend_job, retry_job
    from cad_node.jobs.store import InvalidTransitionError, JobNotFoundError

    settings = load_settings_or_exit(config)
    store = _store(settings)
    err = Console(stderr=True)
    try:
        (resend_job if resend else retry_job)(settings, store, job_id, actor=cli_actor())
    except JobNotFoundError:
        err.print(f"no job {job_id}", highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    except InvalidTransitionError as exc:
        err.print(str(exc), highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    Console().print(f"job {job_id}: {'resend' if resend else 'retry'} queued", highlight=False)


@jobs_app.command("retry")
def retry(job_id: int, config: ConfigOpt = DEFAULT_CONFIG_PATH) -> None:
    """Run a failed or dead job again from the start."""
    _act(job_id, config, resend=False)


@jobs_app.command("resend")
def resend(job_id: int, config: ConfigOpt = DEFAULT_CONFIG_PATH) -> None:
    """Send a job's stored results again to every destination."""
    _act(job_id, config, resend=True)


def register(app: typer.Typer) -> None:
    """Add the ``jobs`` command group to ``app``."""
    app.add_typer(jobs_app, name="jobs")
