"""The ``cad-node`` command line (typer + rich).

Each command group lives in its own module with a ``register(app)`` function;
add the module's name to :data:`COMMAND_MODULES` to expose it.
"""

from __future__ import annotations

import importlib

import typer

__all__ = ["COMMAND_MODULES", "app", "main"]

app = typer.Typer(
    name="cad-node",
    help="PACS-integrated computer-aided detection node.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Modules under ``cad_node.cli`` whose ``register(app)`` adds commands.
COMMAND_MODULES: list[str] = [
    "config_cmd",
    "report",
    "serve",
    "worker",
    "jobs",
    "destinations",
    "status",
    "analyze",
    "peers",
    "spool",
    "db",
]


def _register_all() -> None:
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"{__name__}.{name}")
        module.register(app)


_register_all()


def main() -> None:
    """Console-script entry point."""
    app()
