"""Helpers shared by the ``cad-node`` command modules."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from cad_node.config import ConfigError, Settings, load_config

__all__ = ["EXIT_USAGE", "load_settings_or_exit"]

#: Exit status for an invalid configuration, unknown name or refused action
#: (the usage-error status click and typer use).
EXIT_USAGE = 2


def load_settings_or_exit(config: Path) -> Settings:
    """Load and validate ``config``; on error print each bad key and exit with 2.

    Parameters
    ----------
    config : Path
        Configuration file (``CAD_NODE_*`` environment overrides apply).

    Returns
    -------
    Settings
        The validated configuration.

    Raises
    ------
    typer.Exit
        With :data:`EXIT_USAGE` when the file is missing or invalid; nothing
        else (no port, no broker) has been touched by then.
    """
    try:
        return load_config(config)
    except ConfigError as exc:
        Console(stderr=True).print(str(exc), markup=False, highlight=False)
        raise typer.Exit(EXIT_USAGE) from None
