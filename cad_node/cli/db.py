"""``cad-node db``: database maintenance.

``cad-node db migrate --to postgresql://user@host/db`` moves the embedded
node's SQLite spool index and job table into PostgreSQL (checked by counting
every table's rows on both sides), before switching ``storage.database_url``.
Stop the node (``serve`` and workers) first: the copy is a snapshot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cad_node.cli._common import EXIT_USAGE, load_settings_or_exit
from cad_node.config import DEFAULT_CONFIG_PATH

db_app = typer.Typer(help="Database maintenance (schema versions, SQLite -> PostgreSQL).",
                     no_args_is_help=True)


@db_app.command("migrate")
def migrate(
    to: Annotated[str, typer.Option("--to", help="Target database URL (postgresql://...).")],
    config: Annotated[Path, typer.Option("--config", "-c", help="Configuration file.")] = (
        DEFAULT_CONFIG_PATH),
) -> None:
    """Copy the SQLite index and job table below ``node.storage_dir`` to ``--to``."""
    from cad_node.jobs import store as jobs_store
    from cad_node.storage import index as spool_index
    from cad_node.storage.copy import CopyMismatchError, copy_tables
    from cad_node.storage.db import DatabaseError, normalise_url
    from cad_node.storage.spool import Spool

    err = Console(stderr=True)
    settings = load_settings_or_exit(config)
    try:
        normalise_url(to)
    except (DatabaseError, ValueError) as exc:
        err.print(f"--to: {exc}", markup=False)
        raise typer.Exit(EXIT_USAGE) from None
    storage = Path(settings.node.storage_dir)
    index_file = Spool.index_path(storage)
    jobs_file = storage / jobs_store.DB_FILENAME
    missing = [str(p) for p in (index_file, jobs_file) if not p.exists()]
    if missing:
        err.print(f"nothing to migrate: {', '.join(missing)} missing", markup=False)
        raise typer.Exit(EXIT_USAGE)
    out = Table(title=f"copied to {normalise_url(to).render_as_string(hide_password=True)}")
    for col in ("store", "table", "rows"):
        out.add_column(col)
    try:
        # Opening each store brings its schema to the current version on both sides.
        src_index = spool_index.SpoolIndex(index_file, storage / "spool" / "objects")
        dst_index = spool_index.SpoolIndex(to, storage / "spool" / "objects")
        counts = copy_tables(src_index.db, dst_index.db, spool_index.METADATA)
        for table, n in counts.items():
            out.add_row("index", table, str(n))
        src_jobs, dst_jobs = jobs_store.JobStore(jobs_file), jobs_store.JobStore(to)
        counts = copy_tables(src_jobs.db, dst_jobs.db, jobs_store.METADATA)
        for table, n in counts.items():
            out.add_row("jobs", table, str(n))
    except (ValueError, CopyMismatchError, DatabaseError) as exc:
        err.print(f"migration failed: {exc}", markup=False)
        raise typer.Exit(1) from None
    Console().print(out)
    Console().print("counts match; set storage.database_url to the target and restart.")


def register(app: typer.Typer) -> None:
    """Add the ``db`` command group to ``app``."""
    app.add_typer(db_app, name="db")
