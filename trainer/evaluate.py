"""``cad-train evaluate``: challenge metrics from CSV files, with a FROC plot and a report.

* ``cad-train evaluate luna16 ANNOTATIONS CANDIDATES OUT`` reads LUNA16-format
  CSVs (``seriesuid,coordX,coordY,coordZ,diameter_mm`` and
  ``seriesuid,coordX,coordY,coordZ,probability``; ``--excluded`` for the
  irrelevant findings, ``--series`` for the list of evaluated scans) and writes
  ``OUT/froc.png``, ``OUT/report.md`` and ``OUT/metrics.json``
  (:func:`trainer.froc.luna16_froc`).
* ``cad-train evaluate deeplesion GROUND_TRUTH DETECTIONS OUT`` reads lesion
  boxes from a ``DL_info.csv`` (optionally one split) and detections
  ``File_name,x1,y1,x2,y2,score``; it reports sensitivity at 0.5-16 FPs per
  image with IoU >= 0.5 *and* with IoBB >= 0.5, each labelled.
* ``cad-train evaluate dice PREDICTION TRUTH`` prints the Dice coefficient of
  two masks (``.npy``, ``.npz`` with one array or ``--key``, or any image
  SimpleITK reads).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from trainer import froc

__all__ = [
    "EvaluationInputError",
    "evaluate_deeplesion_files",
    "evaluate_luna16_files",
    "read_luna16_candidates",
    "read_luna16_references",
    "register",
]

_SERIES = "seriesuid"
_XYZ = ("coordX", "coordY", "coordZ")


class EvaluationInputError(ValueError):
    """An input CSV is unusable; the message names the file and row."""


def _rows(path: Path, required: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise EvaluationInputError(f"{path}: cannot read ({exc})") from exc
    try:
        with handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in reader.fieldnames or []]
            missing = [c for c in required if c not in header]
            if missing:
                raise EvaluationInputError(f"{path}: missing column(s) {', '.join(missing)}")
            reader.fieldnames = header
            return [(i + 2, row) for i, row in enumerate(reader)]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise EvaluationInputError(f"{path}: not a UTF-8 CSV text file ({exc})") from None


def _number(row: dict[str, str], column: str, path: Path, line: int) -> float:
    """A finite number from ``row[column]`` (NaN/inf would corrupt the FROC ranking)."""
    try:
        value = float(row[column])
    except (TypeError, ValueError):
        raise EvaluationInputError(f"{path}, row {line}: {column} is not a number") from None
    if not math.isfinite(value):
        raise EvaluationInputError(f"{path}, row {line}: {column} is {row[column]!r}, not finite")
    return value


def _xyz(row: dict[str, str], path: Path, line: int) -> tuple[float, float, float]:
    return (_number(row, "coordX", path, line), _number(row, "coordY", path, line),
            _number(row, "coordZ", path, line))


def read_luna16_references(path: Path, *, irrelevant: bool = False) -> list[froc.ReferenceNodule]:
    """Read ``annotations.csv`` (or ``annotations_excluded.csv`` with ``irrelevant``)."""
    out: list[froc.ReferenceNodule] = []
    for line, row in _rows(path, (_SERIES, *_XYZ, "diameter_mm")):
        d = _number(row, "diameter_mm", path, line)
        out.append(froc.ReferenceNodule(row[_SERIES].strip(), _xyz(row, path, line), d,
                                        irrelevant=irrelevant))
    return out


def read_luna16_candidates(path: Path) -> list[froc.Candidate]:
    """Read a LUNA16 submission (``seriesuid,coordX,coordY,coordZ,probability``)."""
    out: list[froc.Candidate] = []
    for line, row in _rows(path, (_SERIES, *_XYZ, "probability")):
        p = _number(row, "probability", path, line)
        out.append(froc.Candidate(row[_SERIES].strip(), _xyz(row, path, line), p))
    return out


def _series_list(path: Path) -> list[str]:
    uids: list[str] = []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.reader(f):
                if row and row[0].strip() and row[0].strip() != _SERIES:
                    uids.append(row[0].strip())
    except (UnicodeDecodeError, csv.Error) as exc:
        raise EvaluationInputError(f"{path}: not a UTF-8 CSV text file ({exc})") from None
    except OSError as exc:
        raise EvaluationInputError(f"{path}: cannot read ({exc})") from exc
    return uids


def evaluate_luna16_files(
    annotations: Path,
    candidates: Path,
    out: Path,
    *,
    excluded: Path | None = None,
    series: Path | None = None,
    bootstrap: int = 1000,
    seed: int = 0,
    max_candidates: int = froc.LUNA16_MAX_CANDIDATES,
    name: str = "CAD",
) -> froc.FrocResult:
    """Run the LUNA16 evaluation on CSV files and write plot, report and JSON to ``out``."""
    refs = read_luna16_references(annotations)
    if excluded is not None:
        refs += read_luna16_references(excluded, irrelevant=True)
    cands = read_luna16_candidates(candidates)
    uids = _series_list(series) if series is not None else None
    result = froc.luna16_froc(refs, cands, uids, max_candidates=max_candidates,
                              bootstrap=bootstrap, seed=seed)
    out.mkdir(parents=True, exist_ok=True)
    froc.plot_froc(result, out / "froc.png", title=f"FROC – {name}")
    report = froc.luna16_markdown(
        result, title=f"LUNA16 evaluation – {name}", plot_name="froc.png",
        extra={"annotations": str(annotations), "irrelevant findings": str(excluded),
               "candidates": str(candidates), "bootstrap seed": str(seed)})
    (out / "report.md").write_text(report, encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    return result


def _deeplesion_inputs(
    ground_truth: Path, detections: Path, split: str | None
) -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
    from trainer.deeplesion import read_dl_info

    records, problems = read_dl_info(ground_truth)
    if problems:
        raise EvaluationInputError("; ".join(problems))
    gts: dict[str, list[tuple[float, ...]]] = {}
    for r in records:
        if split is None or r.split == split:
            gts.setdefault(r.file_name, []).append(r.bbox)
    dets: dict[str, list[tuple[float, ...]]] = {k: [] for k in gts}
    for line, row in _rows(detections, ("File_name", "x1", "y1", "x2", "y2", "score")):
        key = row["File_name"].strip()
        if key not in dets:
            continue  # detections on images outside the evaluated set
        dets[key].append(tuple(_number(row, c, detections, line)
                               for c in ("x1", "y1", "x2", "y2", "score")))
    names = sorted(gts)
    return (names, [np.asarray(dets[n], dtype=float).reshape(-1, 5) for n in names],
            [np.asarray(gts[n], dtype=float).reshape(-1, 4) for n in names])


def evaluate_deeplesion_files(
    ground_truth: Path, detections: Path, out: Path, *, split: str | None = "test",
    threshold: float = 0.5,
) -> list[froc.DeepLesionResult]:
    """DeepLesion sensitivity with IoU and with IoBB; plot, report and JSON in ``out``."""
    _, dets, gts = _deeplesion_inputs(ground_truth, detections, split)
    results = [froc.deeplesion_sensitivity(dets, gts, overlap=o, threshold=threshold)
               for o in ("iou", "iobb")]
    out.mkdir(parents=True, exist_ok=True)
    froc.plot_froc(results[0], out / "froc.png", title="DeepLesion FROC (IoU)")
    (out / "report.md").write_text(
        froc.deeplesion_markdown(results, title=f"DeepLesion evaluation ({split or 'all'})",
                                 plot_name="froc.png"), encoding="utf-8")
    (out / "metrics.json").write_text(json.dumps([r.to_dict() for r in results], indent=2),
                                      encoding="utf-8")
    return results


def _load_mask(path: Path, key: str | None) -> np.ndarray:
    if path.suffix == ".npy":
        return np.asarray(np.load(path)) > 0
    if path.suffix == ".npz":
        data = np.load(path)
        names = list(data.keys())
        if key is None and len(names) != 1:
            raise EvaluationInputError(f"{path}: holds {names}; choose one with --key")
        return np.asarray(data[key or names[0]]) > 0
    import SimpleITK as sitk  # noqa: N813

    return np.asarray(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))) > 0


def register(app: typer.Typer) -> None:
    """Add ``cad-train evaluate luna16|deeplesion|dice``."""
    ev = typer.Typer(help="Evaluate with the challenges' protocols (LUNA16, DeepLesion, Dice).",
                     no_args_is_help=True)

    def fail(exc: Exception) -> typer.Exit:
        typer.echo(f"error: {exc}", err=True)
        return typer.Exit(2)

    @ev.command("luna16")
    def luna16_cmd(
        annotations: Annotated[Path, typer.Argument(help="annotations.csv (reference nodules).")],
        candidates: Annotated[Path, typer.Argument(help="CAD marks with probability.")],
        out: Annotated[Path, typer.Argument(help="Output folder for froc.png, report.md.")],
        excluded: Annotated[Path | None, typer.Option(
            help="annotations_excluded.csv (irrelevant findings).")] = None,
        series: Annotated[Path | None, typer.Option(
            help="seriesuids.csv: the evaluated scans (default: all named).")] = None,
        bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples (0: none).")] = 1000,
        seed: Annotated[int, typer.Option(help="Bootstrap seed.")] = 0,
        max_candidates: Annotated[int, typer.Option(help="Per-scan cap.")] = (
            froc.LUNA16_MAX_CANDIDATES),
        name: Annotated[str, typer.Option(help="System name in the report.")] = "CAD",
    ) -> None:
        """LUNA16 FROC and CPM with bootstrap confidence intervals."""
        try:
            r = evaluate_luna16_files(annotations, candidates, out, excluded=excluded,
                                      series=series, bootstrap=bootstrap, seed=seed,
                                      max_candidates=max_candidates, name=name)
        except (EvaluationInputError, ValueError, OSError) as exc:
            raise fail(exc) from None
        cpm = f"{r.cpm:.3f}" if r.defined else froc.UNDEFINED_CPM
        typer.echo(f"CPM {cpm}  " + "  ".join(
            f"{f:g}:{s:.3f}" for f, s in zip(r.fp_rates, r.sensitivity_at, strict=True)))
        typer.echo(f"wrote {out / 'report.md'} and {out / 'froc.png'}")

    @ev.command("deeplesion")
    def deeplesion_cmd(
        ground_truth: Annotated[Path, typer.Argument(help="DL_info.csv.")],
        detections: Annotated[Path, typer.Argument(help="File_name,x1,y1,x2,y2,score CSV.")],
        out: Annotated[Path, typer.Argument(help="Output folder.")],
        split: Annotated[str, typer.Option(help="train, val, test or all.")] = "test",
    ) -> None:
        """DeepLesion sensitivity at 0.5-16 FPs/image (IoU >= 0.5 and IoBB >= 0.5)."""
        try:
            results = evaluate_deeplesion_files(ground_truth, detections, out,
                                                split=None if split == "all" else split)
        except (EvaluationInputError, ValueError, OSError) as exc:
            raise fail(exc) from None
        for r in results:
            typer.echo(f"{r.overlap.upper()}>={r.threshold:g}  " + "  ".join(
                f"{f:g}:{s:.3f}" for f, s in zip(r.fp_rates, r.sensitivity_at, strict=True)))

    @ev.command("dice")
    def dice_cmd(
        prediction: Annotated[Path, typer.Argument(help="Predicted mask.")],
        truth: Annotated[Path, typer.Argument(help="Reference mask.")],
        key: Annotated[str | None, typer.Option(help="Array name inside .npz files.")] = None,
    ) -> None:
        """Dice coefficient of two masks."""
        try:
            value = froc.dice(_load_mask(prediction, key), _load_mask(truth, key))
        except (EvaluationInputError, ValueError, OSError, RuntimeError) as exc:
            raise fail(exc) from None
        typer.echo(f"{value:.6f}")

    from trainer.ct_lesion import evaluate_command as ct_lesion_cmd

    ev.command("ct-lesion")(ct_lesion_cmd)
    from trainer.cxr_lungs import register_evaluate as register_cxr_evaluate

    register_cxr_evaluate(ev)  # cad-train evaluate cxr-lungs, cxr-plausibility
    from trainer.cxr_abnormal import register_evaluate as register_abnormal_evaluate

    register_abnormal_evaluate(ev)  # cad-train evaluate cxr-abnormal-cv (issue #12 baseline)
    from trainer.cxr_abnormal_train import register_evaluate as register_abnormal_model

    register_abnormal_model(ev)  # cad-train evaluate cxr-abnormal (issue #12 patch model)
    app.add_typer(ev, name="evaluate")
