"""Held-out evaluation of the CT nodule scorer (LUNA16 protocol on synthetic insertions).

The held-out set is regenerated from the config's seed: other random draws
and a separate slab (``data.heldout_z_mm``) of the background CT, never seen
in training.  :func:`evaluate_heldout_set` runs the detector end to end (the
node's candidate generator, then the scorer) and reports the LUNA16
FROC/CPM (:mod:`trainer.froc`), patch AUCs and the generator's sensitivity.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from rich.progress import Progress

from trainer.config import InputConfig, TrainConfig
from trainer.data import (
    candidate_generator,
    cut_patches,
    dense_structure_points,
    exclusions_of,
    in_z,
    jittered,
    label_points,
)
from trainer.insertion import InsertedNodule, LungBackground, insert_nodules

if TYPE_CHECKING:  # pragma: no cover - torch is imported lazily (fast CLI start-up)
    import torch

    from cad_node.pipelines.ct_chest.features import ContextFusion

__all__ = [
    "MAX_CANDIDATES_PER_SCAN",
    "SIZE_BANDS",
    "auc",
    "evaluate_heldout_set",
    "froc_by_size_band",
    "generator_sensitivity_by_band",
    "score_points",
    "size_band",
]

#: LUNA16 evaluation cap on candidates per scan.
MAX_CANDIDATES_PER_SCAN = 100


def auc(scores: npt.NDArray[np.floating], labels: npt.NDArray[np.floating]) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half."""
    pos = scores[labels > 0.5]
    neg = scores[labels <= 0.5]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def score_points(
    net: torch.nn.Module,
    hu: npt.NDArray[np.float32],
    bg: LungBackground,
    points: npt.NDArray[np.float64],
    spec: InputConfig,
    dev: torch.device,
) -> npt.NDArray[np.float64]:
    """Probabilities of ``net`` at ``points`` of a HU array (same path as the scorer,
    test-time flips included when ``spec.tta_flips`` asks)."""
    import torch

    from cad_node.models.scorer import flip_averaged_logits

    out = np.empty(points.shape[0], dtype=np.float64)
    with torch.inference_mode():
        for s in range(0, points.shape[0], spec.batch_size):
            p = cut_patches(hu, bg, points[s : s + spec.batch_size], spec)
            x = torch.from_numpy(p[:, None]).to(dev)
            out[s : s + spec.batch_size] = torch.sigmoid(
                flip_averaged_logits(net, x, spec.tta_flips)).cpu().numpy()
    return out


def evaluate_heldout_set(
    cfg: TrainConfig,
    bg: LungBackground,
    net: torch.nn.Module,
    dev: torch.device,
    progress: Progress | None = None,
    on_volume: Callable[[npt.NDArray[np.float32], list[InsertedNodule]], None] | None = None,
    fusions: Mapping[str, ContextFusion] | None = None,
    primary: str | None = None,
) -> dict[str, Any]:
    """Evaluate on held-out insertions (other seeds, other slab).

    ``fusions`` (:mod:`trainer.context`): the scores are those of
    ``fusions[primary]`` (the CNN logit fused with the candidates' context
    features) instead of the CNN's sigmoid, and ``froc_by_fusion`` gives the
    LUNA16 FROC of every fusion (the ablation).

    ``on_volume`` is called with each held-out volume and its truth (the
    operating-point run of :mod:`trainer.operating_point` uses them).

    * ``patch_auc``: AUC of the scorer between patches centred on the inserted
      nodules and the candidate generator's negatives in the slab;
      ``patch_auc_vs_vessels``: the same against local maxima of dense in-lung
      structures (vessels) of the slab.
    * ``froc``: LUNA16 FROC/CPM (``trainer.froc``) of the end-to-end
      detector (candidate generator + scorer, at most 100 candidates per scan)
      with one "scan" per held-out volume, restricted to the held-out slab.
    * ``real_nodule_probability``: the score at each excluded real nodule's
      centre (never seen in training).
    """
    d = cfg.data
    rng = np.random.default_rng(cfg.seed + 104729)
    gen = candidate_generator()
    excl = exclusions_of(cfg)
    task = progress.add_task("held-out evaluation", total=d.heldout_rounds) if progress else None
    all_scores: list[npt.NDArray[np.float64]] = []
    all_labels: list[npt.NDArray[np.float64]] = []
    scans: list[dict[str, Any]] = []
    vessel_scores: list[npt.NDArray[np.float64]] = []
    nodule_scores: list[npt.NDArray[np.float64]] = []
    fpr_scans: list[dict[str, Any]] = []
    # Separate generator: the held-out set itself does not depend on these draws.
    rng_fpr = np.random.default_rng(cfg.seed + 15485863)
    gen_hits: dict[str, dict[str, list[int]]] = {"placement": {}, "kind": {}, "size_band": {}}
    by_fusion: dict[str, list[dict[str, Any]]] = {}
    for r in range(d.heldout_rounds):
        hu, truth = insert_nodules(
            bg,
            d.heldout_nodules_per_round,
            rng,
            diameter_range_mm=d.diameter_range_mm,
            z_range_mm=d.heldout_z_mm,
            exclusions=excl,
        )
        if on_volume is not None:
            on_volume(hu, truth)
        centers = np.asarray([n.center_mm for n in truth], dtype=np.float64).reshape(-1, 3)
        ctx = None
        if fusions:
            from trainer.context import scan_context

            ctx = scan_context(net, hu, bg, cfg, dev, d.heldout_z_mm)
            cand = ctx.centers_mm
        elif gen is not None:
            cand = gen(bg.to_image(hu), bg.lung)
        else:
            cand = dense_structure_points(bg, hu, 400, rng, d.heldout_z_mm)
        cand = cand[in_z(cand, d.heldout_z_mm)]
        lab = label_points(cand, truth, excl, d.negative_margin_mm)
        if ctx is not None and fusions is not None:
            variant_scores = {k: f.probability(ctx.logits, ctx.features)
                              for k, f in fusions.items()}
            cand_scores = variant_scores[primary or next(iter(fusions))]
            for k, v in variant_scores.items():
                by_fusion.setdefault(k, []).append(
                    {"scan_id": f"heldout-{r}", "nodules": truth, "candidates": cand,
                     "scores": v})
        else:
            cand_scores = score_points(net, hu, bg, cand, cfg.input, dev)
        nod_scores = score_points(net, hu, bg, centers, cfg.input, dev)
        neg = lab == 0
        # patch AUCs are the CNN's own (nodule centres are scored by the CNN alone)
        cnn_cand = cand_scores if ctx is None else 1.0 / (1.0 + np.exp(-ctx.logits))
        all_scores += [nod_scores, cnn_cand[neg]]
        all_labels += [np.ones(len(nod_scores)), np.zeros(int(neg.sum()))]
        dense = dense_structure_points(bg, hu, 600, rng, d.heldout_z_mm, min_pleura_mm=3.0)
        dense = dense[label_points(dense, truth, excl, d.negative_margin_mm) == 0]
        vessel_scores.append(score_points(net, hu, bg, dense, cfg.input, dev))
        nodule_scores.append(nod_scores)
        scans.append(
            {
                "scan_id": f"heldout-{r}",
                "nodules": truth,
                "candidates": cand,
                "scores": cand_scores,
            }
        )
        # Which nodules the candidate generator found (by placement and type).
        found = [
            bool(cand.size)
            and bool(
                (np.linalg.norm(cand - np.asarray(n.center_mm), axis=1) < n.diameter_mm / 2).any()
            )
            for n in truth
        ]
        for n, f in zip(truth, found, strict=True):
            for key, val in (("placement", n.placement.value), ("kind", n.kind.value),
                             ("size_band", size_band(n.diameter_mm))):
                cell = gen_hits[key].setdefault(val, [0, 0])
                cell[0] += int(f)
                cell[1] += 1
        # LUNA16 false-positive-reduction-track style: the candidate list also
        # holds a (jittered) candidate for every nodule the generator missed.
        missed = [n for n, f in zip(truth, found, strict=True) if not f]
        extra = np.zeros((0, 3))
        if missed:
            extra = jittered(
                np.asarray([n.center_mm for n in missed], dtype=np.float64),
                np.asarray([n.diameter_mm / 2 for n in missed], dtype=np.float64),
                d.positive_jitter_mm,
                rng_fpr,
            )
        fpr_scans.append(
            {
                "scan_id": f"heldout-{r}",
                "nodules": truth,
                "candidates": np.concatenate([cand, extra]),
                "scores": np.concatenate(
                    [cand_scores, _extra_scores(net, hu, bg, extra, cfg, dev, fusions, primary)]
                ),
            }
        )
        if progress is not None and task is not None:
            progress.advance(task)
    scores = np.concatenate(all_scores)
    labels = np.concatenate(all_labels)
    result: dict[str, Any] = {
        "heldout_scans": d.heldout_rounds,
        "heldout_nodules": int(sum(len(s["nodules"]) for s in scans)),
        "heldout_negative_patches": int((labels == 0).sum()),
        "patch_auc": auc(scores, labels),
        "heldout_vessel_patches": int(sum(v.size for v in vessel_scores)),
        "patch_auc_vs_vessels": auc(
            np.concatenate(nodule_scores + vessel_scores),
            np.concatenate(
                [np.ones(sum(v.size for v in nodule_scores)),
                 np.zeros(sum(v.size for v in vessel_scores))]
            ),
        ),
        "candidate_source": "cad_node.pipelines.ct_chest.candidates" if gen else "dense_structures",
    }
    result["froc"] = _froc(scans)
    if by_fusion:
        result["context_fusion"] = primary
        result["froc_by_fusion"] = {
            k: {key: val for key, val in _froc(v).items()
                if key in ("cpm", "sensitivity_at", "cpm_ci", "n_true_positives")}
            for k, v in by_fusion.items()
        }
    result["froc_fp_reduction"] = _froc(fpr_scans)
    result["froc_by_size_band"] = froc_by_size_band(scans)
    result["generator_sensitivity"] = {
        key: {val: f"{h}/{t}" for val, (h, t) in sorted(cells.items())}
        for key, cells in gen_hits.items()
    }
    if d.heldout_small_rounds > 0:
        result["generator_sensitivity_small_set"] = generator_sensitivity_by_band(cfg, bg)
    # The excluded real nodule(s), scored where the reference places them.
    real = np.asarray([e.center_mm for e in d.exclusions], dtype=np.float64).reshape(-1, 3)
    if real.size:
        result["real_nodule_probability"] = [
            round(float(v), 4) for v in score_points(net, bg.hu, bg, real, cfg.input, dev)
        ]
    return result


def _extra_scores(
    net: torch.nn.Module, hu: npt.NDArray[np.float32], bg: LungBackground,
    points: npt.NDArray[np.float64], cfg: TrainConfig, dev: torch.device,
    fusions: Mapping[str, ContextFusion] | None, primary: str | None,
) -> npt.NDArray[np.float64]:
    """Scores at added points (FP-reduction track): CNN, fused when ``fusions``.

    The added points are not generator candidates: their context features are
    measured at a nominal 6 mm scale.
    """
    if not fusions or points.shape[0] == 0:
        return score_points(net, hu, bg, points, cfg.input, dev)
    from cad_node.pipelines.ct_chest.candidates import Candidate
    from cad_node.pipelines.ct_chest.features import context_features

    fusion = fusions[primary or next(iter(fusions))]
    image = bg.to_image(hu)
    idx = np.rint(bg.geometry.physical_to_index(points)).astype(int)[:, ::-1]
    idx = np.clip(idx, 0, np.asarray(hu.shape) - 1)
    cands = [Candidate((float(p[0]), float(p[1]), float(p[2])),
                       (int(i[0]), int(i[1]), int(i[2])), 6.0, 0.0)
             for p, i in zip(points, idx, strict=True)]
    p = score_points(net, hu, bg, points, cfg.input, dev)
    logit = np.log(np.clip(p, 1e-9, 1 - 1e-9) / np.clip(1 - p, 1e-9, 1.0))
    return fusion.probability(logit, context_features(image, bg.lung, cands))


#: Nodule size bands (diameter, mm) of the per-band reports: [lo, hi).
SIZE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("3-6 mm", 3.0, 6.0),
    ("6-10 mm", 6.0, 10.0),
    ("10-20 mm", 10.0, 20.0),
    (">20 mm", 20.0, float("inf")),
)


def size_band(diameter_mm: float) -> str:
    """The :data:`SIZE_BANDS` name of a diameter (``"<3 mm"`` below the first)."""
    for name, lo, hi in SIZE_BANDS:
        if lo <= diameter_mm < hi:
            return name
    return "<3 mm"


def froc_by_size_band(scans: list[dict[str, Any]]) -> dict[str, Any]:
    """LUNA16 FROC per size band: nodules of the other bands count as irrelevant findings.

    A mark on a nodule of another band is then neither a hit nor a false
    positive, so each band's FP rate is that of the whole detector.  A band
    without nodules is left out.
    """
    import trainer.froc as froc

    out: dict[str, Any] = {}
    for name, lo, hi in SIZE_BANDS:
        if not any(lo <= n.diameter_mm < hi for s in scans for n in s["nodules"]):
            continue
        refs = [
            froc.ReferenceNodule(s["scan_id"], n.center_mm, n.diameter_mm,
                                 irrelevant=not lo <= n.diameter_mm < hi)
            for s in scans for n in s["nodules"]
        ]
        res = froc.luna16_froc(refs, _candidates(scans), [s["scan_id"] for s in scans],
                               max_candidates=MAX_CANDIDATES_PER_SCAN)
        d = res.to_dict()
        out[name] = {k: d[k] for k in ("n_nodules", "n_true_positives", "sensitivity_at", "cpm")
                     if k in d}
        if "cpm_note" in d:
            out[name]["cpm_note"] = d["cpm_note"]
    return out


def _candidates(scans: list[dict[str, Any]]) -> list[Any]:
    import trainer.froc as froc

    return [
        froc.Candidate(scan["scan_id"], (float(c[0]), float(c[1]), float(c[2])), float(p))
        for scan in scans
        for c, p in zip(scan["candidates"], scan["scores"], strict=True)
    ]


def generator_sensitivity_by_band(cfg: TrainConfig, bg: LungBackground) -> dict[str, Any]:
    """The candidate generator's sensitivity by size band on the small-nodule held-out set.

    ``data.heldout_small_rounds`` volumes, each with
    ``heldout_small_nodules_per_round`` nodules of ``heldout_small_diameter_mm``
    (log-uniform) in the held-out slab, from their own seed.  A nodule is found
    when a candidate's centre lies strictly within its radius (all candidates
    of the generator, no scorer).
    """
    d = cfg.data
    gen = candidate_generator()
    if gen is None:
        return {"error": "no candidate generator installed"}
    rng = np.random.default_rng(cfg.seed + 7_368_787)
    cells: dict[str, list[int]] = {}
    for _ in range(d.heldout_small_rounds):
        hu, truth = insert_nodules(
            bg, d.heldout_small_nodules_per_round, rng,
            diameter_range_mm=d.heldout_small_diameter_mm, z_range_mm=d.heldout_z_mm,
            exclusions=exclusions_of(cfg),
        )
        cand = gen(bg.to_image(hu), bg.lung)
        for n in truth:
            hit = bool(cand.size) and bool(
                (np.linalg.norm(cand - np.asarray(n.center_mm), axis=1) < n.diameter_mm / 2).any()
            )
            cell = cells.setdefault(size_band(n.diameter_mm), [0, 0])
            cell[0] += int(hit)
            cell[1] += 1
    order = [name for name, _, _ in SIZE_BANDS]
    return {
        "scans": d.heldout_small_rounds,
        "diameter_range_mm": list(d.heldout_small_diameter_mm),
        "found": {k: f"{h}/{t}" for k, (h, t) in
                  sorted(cells.items(), key=lambda kv: order.index(kv[0])
                         if kv[0] in order else -1)},
    }


def _froc(scans: list[dict[str, Any]]) -> dict[str, Any]:
    """LUNA16 FROC/CPM via ``trainer.froc`` (see that module for the protocol)."""
    try:
        import trainer.froc as froc
    except ImportError:
        return {"error": "trainer.froc is not installed; FROC not computed"}
    return _luna16_froc(froc, scans)


def _luna16_froc(froc: Any, scans: list[dict[str, Any]]) -> dict[str, Any]:
    refs = [
        froc.ReferenceNodule(scan["scan_id"], n.center_mm, n.diameter_mm)
        for scan in scans
        for n in scan["nodules"]
    ]
    cands = [
        froc.Candidate(scan["scan_id"], tuple(float(v) for v in c), float(p))
        for scan in scans
        for c, p in zip(scan["candidates"], scan["scores"], strict=True)
    ]
    res = froc.luna16_froc(
        refs,
        cands,
        [scan["scan_id"] for scan in scans],
        max_candidates=MAX_CANDIDATES_PER_SCAN,
        bootstrap=1000,
        seed=0,
    )
    out: dict[str, Any] = res.to_dict()
    # Sensitivity of the candidate generator alone (all candidates kept).
    out["max_sensitivity"] = (
        round(float(res.sensitivity.max()), 6) if res.defined and res.sensitivity.size else 0.0
    )
    return out
