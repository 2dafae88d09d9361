"""``cad-node destinations list|add|remove|echo``: the result destinations."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from cad_node.cli._common import EXIT_USAGE, load_settings_or_exit
from cad_node.config import DEFAULT_CONFIG_PATH

#: Exit status for an invalid configuration or unknown destination.
#: Exit status when the destination does not answer C-ECHO with Success.
EXIT_ECHO_FAILED = 1

destinations_app = typer.Typer(help="Result destinations.", no_args_is_help=True)
ConfigOpt = Annotated[Path, typer.Option("--config", "-c", help="Configuration file.")]


@destinations_app.command("list")
def list_destinations(config: ConfigOpt = DEFAULT_CONFIG_PATH) -> None:
    """List the configured destinations and their output profiles."""
    settings = load_settings_or_exit(config)
    table = Table(title="destinations")
    for col in ("name", "AE title", "address", "objects", "timeout"):
        table.add_column(col)
    for d in settings.destinations:
        table.add_row(d.name, d.ae_title, f"{d.host}:{d.port}", ",".join(d.objects),
                      f"{d.timeout_s:g} s")
    Console().print(table)


@destinations_app.command("echo")
def echo(
    name: Annotated[str, typer.Argument(help="Destination name.")],
    config: ConfigOpt = DEFAULT_CONFIG_PATH,
) -> None:
    """C-ECHO destination NAME; exit 1 unless it answers Success."""
    from cad_node.export.sender import echo as c_echo

    settings = load_settings_or_exit(config)
    try:
        dest = settings.destination(name)
    except KeyError:
        known = ", ".join(d.name for d in settings.destinations) or "none configured"
        Console(stderr=True).print(f"no destination named {name!r} (known: {known})",
                                   highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
    result = c_echo(dest, calling_ae=settings.node.ae_title)
    where = f"{dest.ae_title}@{dest.host}:{dest.port}"
    if result.ok:
        Console().print(f"{name} ({where}): C-ECHO Success in {result.elapsed_s * 1000:.0f} ms",
                        highlight=False)
        return
    status = f"status 0x{result.status:04X}" if result.status is not None else result.error
    Console(stderr=True).print(f"{name} ({where}): C-ECHO failed: {status}", highlight=False)
    raise typer.Exit(EXIT_ECHO_FAILED)


@destinations_app.command("add")
def add(
    name: Annotated[str, typer.Argument(help="Destination name (letters, digits, _.-).")],
    ae_title: Annotated[str, typer.Argument(help="Its AE title.")],
    host: Annotated[str, typer.Argument(help="Its IP address or host name.")],
    port: Annotated[int, typer.Argument(help="Its DICOM port.")],
    objects: Annotated[str | None, typer.Option(
        help="Output profile, comma-separated (sr,seg,sc,gsps,kos); default sr,seg,sc.")] = None,
    config: ConfigOpt = DEFAULT_CONFIG_PATH,
    reload: Annotated[bool, typer.Option(
        "--reload", help="Send SIGHUP to the running node so it applies the change now.")] = False,
) -> None:
    """Add a result destination (validated, atomic, comments kept)."""
    from cad_node.cli.peers import _edit
    from cad_node.configedit import add_destination

    kinds = [k.strip() for k in objects.split(",") if k.strip()] if objects else None
    _edit(add_destination, config, reload, name, ae_title, host, port, kinds)


@destinations_app.command("remove")
def remove(
    name: Annotated[str, typer.Argument(help="Destination name.")],
    config: ConfigOpt = DEFAULT_CONFIG_PATH,
    reload: Annotated[bool, typer.Option(
        "--reload", help="Send SIGHUP to the running node so it applies the change now.")] = False,
) -> None:
    """Remove the destination NAME."""
    from cad_node.cli.peers import _edit
    from cad_node.configedit import remove_destination

    _edit(remove_destination, config, reload, name)


def register(app: typer.Typer) -> None:
    """Add the ``destinations`` command group to ``app``."""
    app.add_typer(destinations_app, name="destinations")
