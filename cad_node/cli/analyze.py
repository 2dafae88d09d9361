"""``cad-node analyze DIR [--out OUT]``: run the matching pipelines offline.

No network: the DICOM files under DIR are grouped into series, the routing
rules of the configuration (``--config``; the shipped ``config/cad-node.yaml``
when present, else the built-in chest-CT rule) select series, each selected
series is loaded (geometry checks) and analysed by its rule's pipeline with a
progress bar, and the findings are printed.  With ``--out``, each analysis
is written to ``OUT/analysis_<nnn>/``: ``findings.json`` (+ mask sidecar),
the result objects (SR/SEG/SC, each through the conformance gate; failures go
to ``rejected/``), and ``OUT/summary.json`` describes every analysis.  Output
names are built from counters only, never from UIDs.

Exit status: 0 all analyses completed and all objects passed the gate; 1 an
analysis failed (bad input: the reason is printed and recorded) or an object
was rejected; 2 unusable arguments or no series matched.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import pydicom
import typer
from pydicom.errors import InvalidDicomError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cad_node.config import (
    BUILTIN_RULES,
    DEFAULT_CONFIG_PATH,
    DEFAULT_OBJECT_KINDS,
    ConfigError,
    ObjectKind,
    RoutingRule,
    Settings,
    load_config,
    parse_object_kinds,
)
from cad_node.imaging import SeriesError, SeriesInfo, group_series, select_series
from cad_node.imaging.series import sources_of
from cad_node.pipelines import get_pipeline, load_input
from cad_node.results.findings import AnalysisResult, AnalysisStatus

__all__ = ["DEFAULT_RULE", "EXIT_FAILED", "EXIT_INPUT_ERROR", "analyze", "register"]

#: Exit status when an analysis failed or an object was rejected.
EXIT_FAILED = 1
#: Exit status for unusable arguments / nothing to analyse.
EXIT_INPUT_ERROR = 2

#: First built-in rule (kept for callers of the old name); see BUILTIN_RULES.
DEFAULT_RULE = BUILTIN_RULES[0]


def _settings(config: Path | None) -> Settings:
    if config is not None:
        return load_config(config)
    if DEFAULT_CONFIG_PATH.is_file():
        return load_config(DEFAULT_CONFIG_PATH)
    return Settings()


def _failed(pipeline: str, info: SeriesInfo, reason: str) -> AnalysisResult:
    return AnalysisResult(pipeline=pipeline, status=AnalysisStatus.FAILED, failure_reason=reason,
                          series_instance_uid=info.series_instance_uid or "unknown")


def _read_full(info: SeriesInfo) -> list[pydicom.Dataset]:
    out = []
    for src in info.sources:
        if isinstance(src, pydicom.Dataset):
            out.append(src)
        else:
            try:
                out.append(pydicom.dcmread(src))
            except (InvalidDicomError, OSError, EOFError):
                continue
    return out


def _findings_table(result: AnalysisResult) -> Table:
    table = Table(title=f"{result.pipeline}: findings")
    table.add_column("id", no_wrap=True)
    for name in ("p", "site", "type", "long x short mm", "volume mm3", "mean HU", "Brock",
                 "centre LPS mm"):
        table.add_column(name)
    for f in result.findings:
        table.add_row(
            f.tracking_id,
            f"{f.probability:.3f}" if f.probability is not None else "-",
            f.site.meaning if f.site else "-",
            f.nodule_type.value if f.nodule_type else "-",
            f"{f.long_axis_mm:.1f} x {f.short_axis_mm:.1f}" if f.long_axis_mm and f.short_axis_mm
            else "-",
            f"{f.volume_mm3:.0f}" if f.volume_mm3 else "-",
            f"{f.mean_hu:.0f}" if f.mean_hu is not None else "-",
            f"{f.malignancy_probability:.3f}" if f.malignancy_probability is not None else "-",
            ", ".join(f"{v:.1f}" for v in f.center_mm) if f.center_mm else "-",
        )
    return table


def _write_objects(
    result: AnalysisResult, info: SeriesInfo, folder: Path, settings: Settings,
    objects: list[ObjectKind], use_dciodvfy: bool, err: Console,
) -> tuple[list[dict[str, str]], int]:
    from cad_node.results import build_results, validate
    from cad_node.results.io import save_result

    folder.mkdir(parents=True, exist_ok=True)
    save_result(result, folder / "findings.json")
    if result.model is None:
        return [], 0
    datasets = _read_full(info)
    built = build_results(result, datasets, settings=settings.results, objects=objects)
    written: list[dict[str, str]] = []
    rejected = 0
    for obj in built:
        verdict = validate(obj, datasets, others=built,
                           use_dciodvfy=use_dciodvfy and settings.results.use_dciodvfy)
        target = folder if verdict.ok else folder / "rejected"
        target.mkdir(exist_ok=True)
        obj.dataset.save_as(target / obj.filename, enforce_file_format=True)
        written.append({"file": str((target / obj.filename).relative_to(folder.parent)),
                        "kind": obj.kind, "role": obj.role,
                        "verdict": "ok" if verdict.ok else "rejected"})
        if not verdict.ok:
            rejected += 1
            for line in verdict.errors:
                err.print(f"{obj.filename}: {line}", markup=False)
    return written, rejected


def analyze(
    directory: Annotated[Path, typer.Argument(help="Folder of DICOM files (recursive).")],
    out: Annotated[Path | None, typer.Option("--out", help="Write results here.")] = None,
    config: Annotated[Path | None, typer.Option("--config", help="Node YAML (routing rules).")]
    = None,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")] = "cpu",
    objects: Annotated[str, typer.Option("--objects", help="Comma-separated: sr,seg,sc,gsps,kos.")]
    = ",".join(DEFAULT_OBJECT_KINDS),
    dciodvfy: Annotated[bool, typer.Option("--dciodvfy/--no-dciodvfy",
                                           help="Run dciodvfy in the gate.")] = True,
) -> None:
    """Run the matching pipelines on DIRECTORY offline and print the findings."""
    console = Console(soft_wrap=True)
    err = Console(stderr=True, soft_wrap=True)
    if not directory.is_dir():
        err.print(f"{directory}: not a folder", markup=False)
        raise typer.Exit(EXIT_INPUT_ERROR)
    try:
        settings = _settings(config)
    except ConfigError as exc:
        err.print(str(exc), markup=False)
        raise typer.Exit(EXIT_INPUT_ERROR) from None
    rules = list(settings.routing.rules)
    try:
        kinds = parse_object_kinds(objects)
    except ValueError as exc:
        err.print(f"--objects: {exc}", markup=False)
        raise typer.Exit(EXIT_INPUT_ERROR) from None

    skipped: list[str] = []
    series = group_series(sources_of([directory]),
                          on_error=lambda s, r: skipped.append(f"{s}: {r}"))
    if skipped:
        console.print(f"skipped {len(skipped)} file(s) that are not DICOM images "
                      f"(first: {skipped[0]})", markup=False)
    if not series:
        err.print(f"{directory}: no DICOM series found", markup=False)
        raise typer.Exit(EXIT_INPUT_ERROR)

    jobs: list[tuple[RoutingRule, SeriesInfo]] = []
    for rule in rules:
        chosen = select_series(series, rule)
        for uid, reason in chosen.rejected.items():
            console.print(f"series {uid}: not analysed: {reason}", markup=False)
        jobs.extend((rule, info) for info in chosen)
    if not jobs:
        err.print("no series matched any routing rule", markup=False)
        raise typer.Exit(EXIT_INPUT_ERROR)

    summary: list[dict[str, Any]] = []
    status = 0
    # as the job runner does: a pipeline with ``reconcile`` (ct-lesion) runs after
    # the others on its series and sees their results (no finding reported twice)
    from cad_node.jobs.runner import _reconciles

    jobs.sort(key=lambda job: _reconciles(job[0].pipeline))
    earlier: dict[str, list[Any]] = {}
    for n, (rule, info) in enumerate(jobs, start=1):
        t0 = time.perf_counter()
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                      TextColumn("{task.fields[stage]}"), TimeElapsedColumn(),
                      console=console, transient=False) as bar:
            task = bar.add_task(f"{rule.pipeline} #{n}", total=1.0, stage="loading series")
            try:
                loaded = load_input(rule.pipeline, info)
            except SeriesError as exc:
                result = _failed(rule.pipeline, info, f"series cannot be loaded: {exc}")
            else:
                def progress(stage: str, frac: float, _task: Any = task) -> None:
                    bar.update(_task, completed=frac, stage=stage)

                try:
                    pipeline = get_pipeline(rule.pipeline)
                except KeyError as exc:
                    result = _failed(rule.pipeline, info, str(exc).strip("'\""))
                else:
                    result = pipeline.run(loaded, device=device, progress=progress)
                    before = earlier.setdefault(info.series_instance_uid, [])
                    reconcile = getattr(pipeline, "reconcile", None)
                    if callable(reconcile) and before:
                        result = reconcile(result, list(before), loaded)
                    before.append(result)
            bar.update(task, completed=1.0, stage=result.status.value)
        elapsed = time.perf_counter() - t0
        entry: dict[str, Any] = {
            "analysis": n, "rule": rule.name, "pipeline": rule.pipeline,
            "series_instance_uid": info.series_instance_uid,
            "study_instance_uid": info.study_instance_uid,
            "status": result.status.value, "failure_reason": result.failure_reason,
            "seconds": round(elapsed, 2),
            "findings": json.loads(result.model_dump_json())["findings"],
            "measurements": result.measurements, "qualitative": result.qualitative,
            "notes": result.notes, "objects": [],
        }
        if result.status is AnalysisStatus.FAILED:
            console.print(f"analysis {n} FAILED: {result.failure_reason}", markup=False)
            status = EXIT_FAILED
        else:
            console.print(_findings_table(result))
            for k, v in {**result.measurements, **result.qualitative}.items():
                # Ratios (e.g. the cardiothoracic ratio) need more than one decimal.
                console.print(f"  {k}: {v:.1f}" if isinstance(v, float) and abs(v) >= 10
                              else f"  {k}: {v:.3f}" if isinstance(v, float)
                              else f"  {k}: {v}",
                              markup=False)
            for note in result.notes:
                console.print(f"  note: {note}", markup=False)
        if out is not None:
            try:
                written, rejected = _write_objects(result, info, out / f"analysis_{n:03d}",
                                                   settings, kinds, dciodvfy, err)
            except (ValueError, TypeError) as exc:
                err.print(f"analysis {n}: cannot build results: {exc}", markup=False)
                written, rejected = [], 1
            entry["objects"] = written
            if rejected:
                status = EXIT_FAILED
        summary.append(entry)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"analyses": summary}, indent=2))
        console.print(f"results written to {out}", markup=False)
    if status:
        raise typer.Exit(status)


def register(app: typer.Typer) -> None:
    """Add the ``analyze`` command to ``app``."""
    app.command("analyze")(analyze)
