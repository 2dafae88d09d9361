"""``cad-node config check``: validate a configuration file before deploying it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cad_node.config import DEFAULT_CONFIG_PATH, ConfigError, load_config

#: Exit status for an invalid configuration (usage error, as click uses).
EXIT_CONFIG_ERROR = 2

config_app = typer.Typer(help="Inspect and validate configuration.", no_args_is_help=True)


@config_app.command("check")
def check(
    file: Annotated[Path, typer.Argument(help="YAML file to validate.")] = DEFAULT_CONFIG_PATH,
) -> None:
    """Validate FILE (and CAD_NODE_* overrides); exit 2 naming each bad key."""
    err = Console(stderr=True)
    try:
        settings = load_config(file)
    except ConfigError as exc:
        err.print(f"[red]{exc}[/red]", markup=True, highlight=False)
        raise typer.Exit(EXIT_CONFIG_ERROR) from None
    out = Console()
    out.print(
        f"{file}: OK — AE {settings.node.ae_title} on {settings.node.host}:{settings.node.port}, "
        f"{len(settings.peers)} peer(s), {len(settings.destinations)} destination(s), "
        f"{len(settings.routing.rules)} routing rule(s), storage {settings.node.storage_dir}",
        highlight=False,
    )
    origin = "built-in" if settings.routing.builtin else "from the file"
    table = Table(title=f"effective routing rules ({origin})")
    for col in ("rule", "pipeline", "series", "match"):
        table.add_column(col)
    for rule in settings.routing.rules:
        match = ", ".join(f"{k}={v}" for k, v in
                          rule.match.model_dump(exclude_none=True).items())
        table.add_row(rule.name, rule.pipeline, rule.series, match)
    out.print(table)
    for warning in settings.warnings():
        err.print(f"warning: {warning}", markup=False, highlight=False)


def register(app: typer.Typer) -> None:
    """Add the ``config`` command group to ``app``."""
    app.add_typer(config_app, name="config")
