"""``cad-node peers add|remove|list``: who may send to the node.

``add`` and ``remove`` edit the configuration file atomically and validated,
keeping its comments and order (:mod:`cad_node.configedit`); with
``--reload`` the running node (pid in ``<storage_dir>/serve.pid``) is sent
SIGHUP and applies the change without dropping associations in flight.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cad_node.cli._common import EXIT_USAGE, load_settings_or_exit
from cad_node.config import DEFAULT_CONFIG_PATH, ConfigError, Settings

__all__ = ["register", "signal_reload"]

peers_app = typer.Typer(help="Peers allowed to send to the node (AE title and host).",
                        no_args_is_help=True)

ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Configuration file.")]
ReloadOpt = Annotated[bool, typer.Option(
    "--reload", help="Send SIGHUP to the running node so it applies the change now.")]


def signal_reload(settings: Settings) -> str:
    """SIGHUP the node whose pid is in ``<storage_dir>/serve.pid``; return what happened."""
    from cad_node.live import PID_FILENAME

    path = Path(settings.node.storage_dir) / PID_FILENAME
    try:
        pid = int(path.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as exc:
        return f"running node not signalled ({path}: {exc}); send it SIGHUP to apply"
    return f"node (pid {pid}) signalled to reload"


def _edit(fn: object, config: Path, reload: bool, *args: object) -> None:
    from cad_node.audit import cli_actor

    err = Console(stderr=True)
    try:
        settings, change = fn(config, *args, actor=cli_actor())  # type: ignore[operator]
    except ConfigError as exc:
        err.print(str(exc), markup=False, highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    Console().print(f"{config}: {change}", markup=False, highlight=False)
    if reload:
        Console().print(signal_reload(settings), markup=False, highlight=False)


@peers_app.command("list")
def list_peers(config: ConfigOpt = DEFAULT_CONFIG_PATH) -> None:
    """List the peers allowed to send (calling AE title and source host)."""
    settings = load_settings_or_exit(config)
    table = Table(title="peers" + (" (node.accept_any: every peer is accepted)"
                                   if settings.node.accept_any else ""))
    table.add_column("AE title")
    table.add_column("host")
    for p in settings.peers:
        table.add_row(p.ae_title, p.host)
    Console().print(table)


@peers_app.command("add")
def add(
    ae_title: Annotated[str, typer.Argument(help="Calling AE title of the peer.")],
    host: Annotated[str, typer.Argument(help="IP address or host name it connects from.")],
    config: ConfigOpt = DEFAULT_CONFIG_PATH,
    reload: ReloadOpt = False,
) -> None:
    """Allow AE_TITLE connecting from HOST to send to the node."""
    from cad_node.configedit import add_peer

    _edit(add_peer, config, reload, ae_title, host)


@peers_app.command("remove")
def remove(
    ae_title: Annotated[str, typer.Argument(help="Calling AE title of the peer.")],
    host: Annotated[str | None, typer.Argument(help="Only the entry with this host.")] = None,
    config: ConfigOpt = DEFAULT_CONFIG_PATH,
    reload: ReloadOpt = False,
) -> None:
    """Stop accepting AE_TITLE (from HOST, or from anywhere)."""
    from cad_node.configedit import remove_peer

    _edit(remove_peer, config, reload, ae_title, host)


def register(app: typer.Typer) -> None:
    """Add the ``peers`` command group to ``app``."""
    app.add_typer(peers_app, name="peers")
