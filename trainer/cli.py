"""The ``cad-train`` command line (typer + rich).

Command groups live in their own modules with a ``register(app)`` function,
listed in :data:`COMMAND_MODULES`.
"""

from __future__ import annotations

import importlib

import typer

__all__ = ["COMMAND_MODULES", "app", "main"]

app = typer.Typer(
    name="cad-train",
    help="Prepare data, train, evaluate and export cad-node model bundles.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Modules under ``trainer`` whose ``register(app)`` adds commands.
COMMAND_MODULES: list[str] = ["train", "export", "prepare", "evaluate"]


def _register_all() -> None:
    for name in COMMAND_MODULES:
        module = importlib.import_module(f"trainer.{name}")
        module.register(app)


_register_all()


def main() -> None:
    """Console-script entry point."""
    app()
