"""``cad-node report``: write the result objects for a folder of source instances.

Reads ``--findings F.json`` (plus its mask sidecar ``F.masks.npz``, see
:mod:`cad_node.results.io`), the DICOM files under ``--source DIR`` (files
that are not DICOM, such as LIDC XML, are skipped), builds the objects of the
output profile and passes each through the conformance gate.  Objects that
pass are written to ``OUT/<kind>_<nnn>.dcm``; objects that fail go to
``OUT/rejected/`` and the command exits with status 1.  File names are made
from the object kind and number only, never from UIDs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import pydicom
import typer
from pydicom.errors import InvalidDicomError
from rich.console import Console
from rich.table import Table

from cad_node.config import (
    DEFAULT_OBJECT_KINDS,
    OUTPUT_PROFILES,
    ConfigError,
    ResultsConfig,
    load_config,
    parse_object_kinds,
)
from cad_node.results import build_results, validate
from cad_node.results.io import load_result

__all__ = ["EXIT_INPUT_ERROR", "EXIT_REJECTED", "register", "report"]

#: Exit status when an object failed the conformance gate.
EXIT_REJECTED = 1
#: Exit status for unusable input (usage error, as click uses).
EXIT_INPUT_ERROR = 2


def _read_source(folder: Path) -> list[pydicom.Dataset]:
    out: list[pydicom.Dataset] = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            out.append(pydicom.dcmread(path))
        except (InvalidDicomError, EOFError):
            continue
    return out


def report(
    findings: Annotated[Path, typer.Option("--findings", help="AnalysisResult JSON (F.json).")],
    source: Annotated[Path, typer.Option("--source", help="Folder with the source DICOM files.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    objects: Annotated[
        str, typer.Option("--objects", help="Comma-separated kinds: sr,seg,sc,gsps,kos, "
                          "or a profile: ohif, legacy-pacs, archive.")
    ] = ",".join(DEFAULT_OBJECT_KINDS),
    below_operating_point: Annotated[
        bool, typer.Option("--below-operating-point/--at-operating-point",
                           help="Also report candidates below the operating point (labelled).")
    ] = False,
    config: Annotated[
        Path | None, typer.Option("--config", help="Node YAML (results section).")
    ] = None,
    dciodvfy: Annotated[
        bool, typer.Option("--dciodvfy/--no-dciodvfy", help="Run dciodvfy in the gate.")
    ] = True,
) -> None:
    """Build SR/SEG/SC/... for SOURCE from FINDINGS and write them to OUT."""
    err = Console(stderr=True)
    try:
        profile = OUTPUT_PROFILES.get(objects.strip())
        kinds = list(profile) if profile is not None else parse_object_kinds(objects)
    except ValueError as exc:
        err.print(f"--objects: {exc}", markup=False)
        raise typer.Exit(EXIT_INPUT_ERROR) from None
    try:
        settings = (
            load_config(config).results if config is not None else ResultsConfig.model_validate({})
        )
    except ConfigError as exc:
        err.print(str(exc), markup=False)
        raise typer.Exit(EXIT_INPUT_ERROR) from None
    if not findings.is_file():
        err.print(f"--findings: {findings} is not a file", markup=False)
        raise typer.Exit(EXIT_INPUT_ERROR)
    if not source.is_dir():
        err.print(f"--source: {source} is not a folder", markup=False)
        raise typer.Exit(EXIT_INPUT_ERROR)
    try:
        result = load_result(findings)
        datasets = _read_source(source)
        if not datasets:
            raise ValueError(f"{source}: no DICOM files")
        built = build_results(result, datasets, settings=settings, objects=kinds,
                              below_operating_point=below_operating_point)
    except (ValueError, TypeError) as exc:
        err.print(f"cannot build results: {exc}", markup=False)
        raise typer.Exit(EXIT_INPUT_ERROR) from None
    out.mkdir(parents=True, exist_ok=True)
    table = Table("file", "kind", "role", "verdict")
    rejected = 0
    for obj in built:
        verdict = validate(
            obj, datasets, others=built, use_dciodvfy=dciodvfy and settings.use_dciodvfy
        )
        target = out if verdict.ok else out / "rejected"
        target.mkdir(exist_ok=True)
        obj.dataset.save_as(target / obj.filename, enforce_file_format=True)
        if not verdict.ok:
            rejected += 1
            for line in verdict.errors:
                err.print(f"{obj.filename}: {line}", markup=False)
        table.add_row(obj.filename, obj.kind, obj.role, "ok" if verdict.ok else "REJECTED")
    Console().print(table)
    if rejected:
        raise typer.Exit(EXIT_REJECTED)


def register(app: typer.Typer) -> None:
    """Add the ``report`` command to ``app``."""
    app.command("report")(report)
