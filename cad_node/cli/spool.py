"""``cad-node spool purge [--dry-run]``: apply the retention policy.

A study is deleted ``retention.days`` (or ``--days``) after every destination
acknowledged all of its results, never before (:mod:`cad_node.storage.retention`).
``--dry-run`` only lists the decisions and works while the node runs; a real
purge needs the spool lock, i.e. the node stopped (``cad-node serve`` applies
the policy itself every ``retention.interval_s`` when ``retention.days`` is set).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cad_node.cli._common import EXIT_USAGE, load_settings_or_exit
from cad_node.config import DEFAULT_CONFIG_PATH

__all__ = ["register"]

spool_app = typer.Typer(help="The spool of received studies.", no_args_is_help=True)


def _ts(value: float | None) -> str:
    if value is None:
        return "-"
    return dt.datetime.fromtimestamp(value, tz=dt.UTC).strftime("%Y-%m-%d %H:%M")


@spool_app.command("purge")
def purge(
    config: Annotated[Path, typer.Option("--config", "-c", help="Configuration file.")] = (
        DEFAULT_CONFIG_PATH),
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what would go.")] = False,
    days: Annotated[float | None, typer.Option(
        help="Days after acknowledgement (default retention.days).")] = None,
) -> None:
    """Delete studies whose results every destination acknowledged long enough ago."""
    from cad_node.audit import cli_actor
    from cad_node.jobs.store import JobStore
    from cad_node.storage.retention import RetentionPolicy, apply
    from cad_node.storage.spool import Spool, SpoolLockedError

    settings = load_settings_or_exit(config)
    err = Console(stderr=True)
    keep_days = days if days is not None else settings.retention.days
    if keep_days is None:
        err.print("retention.days is not set (studies are kept forever); give --days N",
                  highlight=False)
        raise typer.Exit(EXIT_USAGE)
    if keep_days < 0:
        err.print("--days must be >= 0", highlight=False)
        raise typer.Exit(EXIT_USAGE)
    policy = RetentionPolicy(keep_days)
    store = JobStore.from_settings(settings)
    if not Spool.index_path(settings.node.storage_dir).exists():
        Console().print("the spool is empty", highlight=False)
        return
    if dry_run:
        index = Spool.open_index_readonly(settings.node.storage_dir)
        try:
            decisions = policy.plan(settings, index, store)
        finally:
            index.close()
    else:
        try:
            spool = Spool.open(settings.node.storage_dir, settings.node.min_free_bytes)
        except SpoolLockedError:
            err.print("the node is running (spool locked): it applies retention itself when "
                      "retention.days is set; use --dry-run, or stop it first", highlight=False)
            raise typer.Exit(EXIT_USAGE) from None
        try:
            decisions = policy.plan(settings, spool.index, store)
            done = {d.study_instance_uid for d in apply(policy, settings, spool.index, store,
                                                         Path(spool.root), actor=cli_actor())}
        finally:
            spool.close()
    table = Table(title=f"retention: {keep_days:g} day(s) after acknowledgement"
                  + (" (dry run)" if dry_run else ""))
    for col in ("study UID", "instances", "job", "acknowledged", "due", "action", "reason"):
        table.add_column(col)
    for d in decisions:
        if dry_run:
            action = "would delete" if d.purge else "keep"
        else:
            action = "deleted" if d.study_instance_uid in done else "keep"
        table.add_row(d.study_instance_uid, str(d.instances), str(d.job_id or "-"),
                      _ts(d.acknowledged_at), _ts(d.due_at), action, d.reason)
    Console().print(table)


def register(app: typer.Typer) -> None:
    """Add the ``spool`` command group to ``app``."""
    app.add_typer(spool_app, name="spool")
