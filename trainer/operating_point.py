"""The operating threshold of the CT pipeline, chosen by a stated rule (not by eye).

The rule (:class:`OperatingRuleConfig`, ``operating_point`` in a training
config) is read on what the node itself reports: the ``ct-chest`` pipeline,
run end to end with the freshly trained scorer, on

* the held-out synthetic volumes of :mod:`trainer.heldout` (findings inside
  the held-out slab; a finding whose centre lies strictly within an inserted
  nodule's radius is a true positive, a second one on the same nodule is
  neither, every other finding is a false positive), and
* each real negative scan (``data.real_negatives``): every finding outside the
  scan's irrelevant-finding regions (its sub-consensus LIDC reader clusters,
  LUNA16's "irrelevant findings") is a false positive.

With ``cap_background`` the background CT itself (unmodified) counts as a
real negative scan too: every finding outside its reference nodule(s)
(``data.exclusions``) is a false positive.

The threshold is the lowest one at which the held-out synthetic set has at
most ``fp_per_scan`` false positives per scan **and** no real negative scan has
more than ``max_per_negative_scan`` false positives, never below
``min_threshold``.  The ``test_scans`` are then measured at that threshold and
reported; the rule never sees them.  It is placed halfway between the lowest admitted and the
highest rejected reported probability (4 decimals, the precision of the
reported probabilities).  The pipeline runs here with up to
:data:`~cad_node.pipelines.ct_chest.pipeline.CHARACTERISE_TOP` findings per
scan (it reports 10 in service); the threshold is never put below the lowest
probability of a scan that hit that cap, where the counts would be incomplete.
"""

from __future__ import annotations

import dataclasses
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from trainer.config import TrainConfig, resolve_ct_dir
from trainer.insertion import (
    ExclusionZone,
    InsertedNodule,
    LungBackground,
    NoduleKind,
    Placement,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from cad_node.imaging.volume import LoadedSeries
    from cad_node.pipelines.ct_chest.features import ContextFusion

__all__ = [
    "ScanFindings",
    "choose_threshold",
    "describe_rule",
    "label_findings",
    "measure_operating_point",
    "report_test_scan",
]


@dataclass(frozen=True)
class ScanFindings:
    """The reported findings of one scan: probability, centre and label each.

    ``labels``: 1 true positive, 0 false positive, -1 neither (a second hit on
    a nodule, or inside an irrelevant-finding region).
    """

    scan_id: str
    probabilities: npt.NDArray[np.float64]
    centers_mm: npt.NDArray[np.float64]
    labels: npt.NDArray[np.int8]
    n_nodules: int = 0
    #: The scan reported as many findings as the pipeline ever reports.
    capped: bool = False


def describe_rule(fp_per_scan: float, max_per_negative_scan: int, min_threshold: float,
                  negative_scans: Sequence[str], background: str | None = None,
                  test_scans: Sequence[str] = ()) -> str:
    """The rule in one sentence (manifest ``operating_rule`` and model card).

    ``background``: the background CT whose non-reference findings are capped
    (``cap_background``); ``test_scans``: scans reported at the threshold only.
    """
    neg = ", ".join(negative_scans) or "none"
    text = (
        f"lowest threshold of the ct-chest pipeline's final probability at which the "
        f"held-out synthetic set has at most {fp_per_scan:g} false positive(s) per scan "
    )
    if background is not None and not negative_scans:
        text += (f"and the background scan {background} has at most {max_per_negative_scan} "
                 f"finding(s) other than its reference nodule")
    elif background is not None:
        text += (f"and neither the background scan {background} (outside its reference "
                 f"nodule) nor any real negative scan ({neg}) has more than "
                 f"{max_per_negative_scan} finding(s) outside its irrelevant-finding regions")
    else:
        text += (f"and no real negative scan ({neg}) has more than {max_per_negative_scan} "
                 f"finding(s) outside its irrelevant-finding regions")
    text += f"; never below {min_threshold:g}"
    if test_scans:
        text += f"; {', '.join(test_scans)} played no part in choosing it (test scans)"
    return text


def label_findings(
    probabilities: npt.NDArray[np.float64],
    centers_mm: npt.NDArray[np.float64],
    nodules: Sequence[InsertedNodule],
    ignore: Sequence[ExclusionZone],
) -> npt.NDArray[np.int8]:
    """Label findings (most probable first) as LUNA16 does: 1 hit, 0 FP, -1 neither."""
    labels = np.zeros(len(probabilities), dtype=np.int8)
    found: set[int] = set()
    for i in np.argsort(-probabilities, kind="stable"):
        c = centers_mm[i]
        hits = [j for j, n in enumerate(nodules)
                if np.linalg.norm(c - np.asarray(n.center_mm)) < n.diameter_mm / 2]
        if hits:
            new = [j for j in hits if j not in found]
            labels[i] = 1 if new else -1
            found.update(hits)
        elif any(np.linalg.norm(c - np.asarray(z.center_mm)) < z.radius_mm for z in ignore):
            labels[i] = -1
    return labels


def _fp_at(scans: Sequence[ScanFindings], t: float) -> list[int]:
    return [int(((s.probabilities >= t) & (s.labels == 0)).sum()) for s in scans]


def choose_threshold(
    synthetic: Sequence[ScanFindings],
    negatives: Sequence[ScanFindings],
    *,
    fp_per_scan: float,
    max_per_negative_scan: int,
    min_threshold: float,
) -> dict[str, Any]:
    """Apply the rule of the module docstring; return the threshold and what it gives."""
    probs = np.unique(np.round(np.concatenate(
        [s.probabilities for s in [*synthetic, *negatives]] + [np.zeros(0)]), 4))
    floor = max([min_threshold] + [float(s.probabilities.min()) for s in [*synthetic, *negatives]
                                   if s.capped and s.probabilities.size])

    def ok(t: float) -> bool:
        syn = sum(_fp_at(synthetic, t)) <= fp_per_scan * max(len(synthetic), 1)
        neg = all(n <= max_per_negative_scan for n in _fp_at(negatives, t))
        return syn and neg

    floor = round(floor, 4)
    candidates = sorted({floor} | {float(v) for v in probs if v >= floor})
    admitted = [t for t in candidates if ok(t)]
    if not admitted:
        threshold = 1.0
    elif admitted[0] == floor:
        threshold = floor
    else:
        # no reported probability lies between the highest rejected candidate
        # and the lowest admitted one: halfway between them
        rejected = max(t for t in candidates if t < admitted[0])
        threshold = round((admitted[0] + rejected) / 2, 4)
    n_nod = sum(s.n_nodules for s in synthetic)
    tp = sum(int(((s.probabilities >= threshold) & (s.labels == 1)).sum()) for s in synthetic)
    return {
        "threshold": threshold,
        "heldout_synthetic": {
            "scans": len(synthetic),
            "nodules": n_nod,
            "true_positives": tp,
            "sensitivity": round(tp / n_nod, 4) if n_nod else None,
            "false_positives": sum(_fp_at(synthetic, threshold)),
            "fp_per_scan": round(sum(_fp_at(synthetic, threshold)) / max(len(synthetic), 1), 4),
        },
        "real_negative_scans": [
            {
                "scan": s.scan_id,
                "false_positives": fp,
                "findings_above": [
                    {"probability": round(float(p), 4),
                     "center_mm": [round(float(v), 1) for v in c],
                     "label": "false positive" if lab == 0 else "not counted"}
                    for p, c, lab in zip(s.probabilities, s.centers_mm, s.labels, strict=True)
                    if p >= threshold
                ],
            }
            for s, fp in zip(negatives, _fp_at(negatives, threshold), strict=True)
        ],
    }


#: Probabilities, centres and "hit the report cap" of one pipeline run.
_Run = tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], bool]


def _run_pipeline(series: LoadedSeries, models_dir: Path,
                  fusions: Sequence[ContextFusion | None] | None = None) -> list[_Run]:
    """Reported findings (probabilities, centres) of the ct-chest pipeline on ``series``.

    One run per entry of ``fusions`` (:meth:`CtChestPipeline.run_variants`);
    ``None``: one run exactly as the node does it, with the bundle as installed.
    """
    from cad_node.pipelines.ct_chest.pipeline import CHARACTERISE_TOP, CtChestPipeline

    # as many findings as the pipeline characterises, not just the 10 it reports,
    # so that the counts below a high threshold are complete
    pipe = CtChestPipeline(models_dir=models_dir, max_findings=CHARACTERISE_TOP)
    results = ([pipe.run(series, device="cpu")] if fusions is None
               else pipe.run_variants(series, fusions, device="cpu"))
    out: list[_Run] = []
    for result in results:
        p = np.asarray([f.probability for f in result.findings], dtype=np.float64)
        c = np.asarray([f.center_mm for f in result.findings], dtype=np.float64).reshape(-1, 3)
        out.append((p, c, len(result.findings) >= CHARACTERISE_TOP))
    return out


def _load_series(directory: Path) -> LoadedSeries:
    from cad_node.imaging import load_series

    files = sorted(f for f in directory.rglob("*")
                   if f.is_file() and f.suffix.lower() in {".dcm", ""})
    return load_series(files)


def irrelevant_regions(series_dir: Path, series: LoadedSeries) -> list[ExclusionZone]:
    """The sub-consensus reader clusters of a series' LIDC XML (LUNA16 irrelevant findings)."""
    from trainer.data import lidc_findings

    return [
        ExclusionZone((float(f.center_mm[0]), float(f.center_mm[1]), float(f.center_mm[2])),
                      max(f.diameter_mm / 2, 5.0))
        for f in lidc_findings(series_dir, series)
        if f.kind == "irrelevant" and f.source == "cluster"
    ]


def measure_operating_point(
    cfg: TrainConfig,
    net: torch.nn.Module,
    bg: LungBackground,
    heldout_volumes: Sequence[tuple[npt.NDArray[np.float32], list[InsertedNodule]]],
    config_dir: Path | None = None,
    fusions: Mapping[str, ContextFusion] | None = None,
    primary: str | None = None,
) -> dict[str, Any]:
    """Run the pipeline with ``net`` on the held-out and real negative scans; apply the rule.

    With ``fusions`` (:mod:`trainer.context`) the pipeline runs once per
    fusion on every scan (:meth:`CtChestPipeline.run_variants`); the result is
    that of ``fusions[primary]``, and ``ablation`` holds the rule's outcome for
    every fusion.
    """
    from trainer.checkpoint import bundle_meta
    from trainer.export import write_bundle

    rule = cfg.operating_point
    assert rule is not None
    scans = cfg.data.real_negatives if rule.negative_scans is None else rule.negative_scans
    meta = bundle_meta(cfg)
    names = list(fusions) if fusions else ["bundle"]
    variants = list(fusions.values()) if fusions else None
    n = len(names)
    with tempfile.TemporaryDirectory(prefix="cad-train-op-") as tmp:
        models = Path(tmp)
        from cad_node.pipelines.ct_chest.pipeline import SCORER_BUNDLE

        write_bundle(models, name=SCORER_BUNDLE, version=cfg.bundle.version,
                     state_dict=net.state_dict(), task=meta["task"],
                     architecture=meta["architecture"], input_spec=meta["input"],
                     output_spec=meta["output"], training_data={"note": "operating point run"})
        base = _load_series(resolve_ct_dir(cfg.data.ct[0], config_dir))
        z0, z1 = cfg.data.heldout_z_mm
        excl = [ExclusionZone(e.center_mm, e.radius_mm) for e in cfg.data.exclusions]
        synthetic: list[list[ScanFindings]] = [[] for _ in range(n)]
        for r, (hu, truth) in enumerate(heldout_volumes):
            series = dataclasses.replace(base, image=bg.to_image(hu))
            for v, (p, c, capped) in enumerate(_run_pipeline(series, models, variants)):
                inside = (c[:, 2] >= z0) & (c[:, 2] <= z1)
                p, c = p[inside], c[inside]
                synthetic[v].append(ScanFindings(f"heldout-{r}", p, c,
                                                 label_findings(p, c, truth, excl),
                                                 n_nodules=len(truth), capped=capped))
        # the background CT itself, unmodified: its real (excluded) nodule(s)
        reference = [InsertedNodule(e.center_mm, 2 * e.radius_mm, NoduleKind.SOLID,
                                    Placement.PARENCHYMAL, 0.0) for e in excl]
        backgrounds = [ScanFindings(cfg.data.ct[0], p, c, label_findings(p, c, reference, []),
                                    capped=capped)
                       for p, c, capped in _run_pipeline(base, models, variants)]
        negatives: list[list[ScanFindings]] = [[] for _ in range(n)]
        if rule.cap_background:
            for v, b in enumerate(backgrounds):
                # the reference nodule (and a second mark on it) is neither; the rest FPs
                lab = np.where(b.labels != 0, -1, 0).astype(np.int8)
                negatives[v].append(dataclasses.replace(b, labels=lab))
        for rn in scans:
            for v, sf in enumerate(_negative_scan(rn, models, config_dir, variants)):
                negatives[v].append(sf)
        tests: list[list[ScanFindings]] = [[] for _ in range(n)]
        for rn in rule.test_scans:
            for v, sf in enumerate(_negative_scan(rn, models, config_dir, variants)):
                tests[v].append(sf)
    outcomes = [_outcome(cfg, synthetic[v], negatives[v], backgrounds[v], tests[v])
                for v in range(n)]
    main = names.index(primary) if primary in names else 0
    out = outcomes[main]
    if fusions:
        out["context_fusion"] = names[main]
        out["ablation"] = {
            name: {
                "threshold": o["threshold"],
                "heldout_synthetic": o["heldout_synthetic"],
                "background_scan": {k: o["background_scan"][k]
                                    for k in ("reference_found", "others_above")},
                "test_scans": [{k: t[k] for k in ("scan", "false_positives",
                                                  "false_positives_unseen")}
                               for t in o["test_scans"]],
            }
            for name, o in zip(names, outcomes, strict=True)
        }
    return out


def _outcome(cfg: TrainConfig, synthetic: Sequence[ScanFindings],
             negatives: Sequence[ScanFindings], background: ScanFindings,
             tests: Sequence[ScanFindings]) -> dict[str, Any]:
    """The rule's threshold and what it gives on every scan."""
    rule = cfg.operating_point
    assert rule is not None
    scans = cfg.data.real_negatives if rule.negative_scans is None else rule.negative_scans
    out = choose_threshold(synthetic, negatives, fp_per_scan=rule.fp_per_scan,
                           max_per_negative_scan=rule.max_per_negative_scan,
                           min_threshold=rule.min_threshold)
    p, c, lab = background.probabilities, background.centers_mm, background.labels
    t = out["threshold"]
    out["background_scan"] = {
        "scan": background.scan_id,
        "reference_nodules": len(cfg.data.exclusions),
        "reference_found": int(((p >= t) & (lab == 1)).sum()),
        "others_above": int(((p >= t) & (lab != 1)).sum()),
        "findings_above": [
            {"probability": round(float(pp), 4), "center_mm": [round(float(v), 1) for v in cc],
             "label": "reference nodule" if ll == 1 else "other"}
            for pp, cc, ll in zip(p, c, lab, strict=True) if pp >= t
        ],
    }
    trained = {rn.ct: rn.z_mm for rn in cfg.data.real_negatives}
    out["test_scans"] = [report_test_scan(s, t, trained=s.scan_id in trained,
                                          training_z_mm=trained.get(s.scan_id))
                         for s in tests]
    out["rule"] = describe_rule(rule.fp_per_scan, rule.max_per_negative_scan,
                                rule.min_threshold, [rn.ct for rn in scans],
                                background=cfg.data.ct[0] if rule.cap_background else None,
                                test_scans=[rn.ct for rn in rule.test_scans])
    return out


def _negative_scan(rn: Any, models: Path, config_dir: Path | None,
                   fusions: Sequence[ContextFusion | None] | None = None) -> list[ScanFindings]:
    """Run the pipeline on a real scan without a LUNA16 nodule and label its findings."""
    directory = resolve_ct_dir(rn.ct, config_dir)
    series = _load_series(directory)
    zones = irrelevant_regions(directory, series) if rn.lidc_xml else []
    zones += [ExclusionZone(e.center_mm, e.radius_mm) for e in rn.exclusions]
    return [ScanFindings(rn.ct, p, c, label_findings(p, c, [], zones), capped=capped)
            for p, c, capped in _run_pipeline(series, models, fusions)]


def report_test_scan(
    scan: ScanFindings, threshold: float, *, trained: bool = False,
    training_z_mm: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """A test scan at the threshold: its false positives, each located.

    ``trained``: the scan also gave training negatives (``data.real_negatives``),
    from ``training_z_mm`` (patient z, mm; ``None``: the whole scan).  Each
    finding says whether it lies where training negatives came from;
    ``false_positives_unseen`` counts the false positives elsewhere (the
    independent part of the test).
    """
    above = scan.probabilities >= threshold
    fps = above & (scan.labels == 0)
    if not trained:
        seen = np.zeros(len(scan.probabilities), dtype=bool)
    elif training_z_mm is None:
        seen = np.ones(len(scan.probabilities), dtype=bool)
    else:
        lo, hi = training_z_mm
        seen = (scan.centers_mm[:, 2] >= lo) & (scan.centers_mm[:, 2] <= hi)
    slab: str | list[float] | None = None
    if trained:
        slab = "whole scan" if training_z_mm is None else [float(v) for v in training_z_mm]
    return {
        "scan": scan.scan_id,
        "threshold": threshold,
        "training_negatives_z_mm": slab,
        "false_positives": int(fps.sum()),
        "false_positives_unseen": int((fps & ~seen).sum()),
        "irrelevant_findings_above": int((above & (scan.labels == -1)).sum()),
        "capped": scan.capped,
        "findings_above": [
            {"probability": round(float(p), 4), "center_mm": [round(float(v), 1) for v in c],
             "label": "false positive" if lab == 0 else "irrelevant finding",
             "in_training_slab": bool(sn)}
            for p, c, lab, sn in zip(scan.probabilities, scan.centers_mm, scan.labels, seen,
                                     strict=True)
            if p >= threshold
        ],
        "highest_below": (round(float(scan.probabilities[~above].max()), 4)
                          if (~above).any() else None),
    }
