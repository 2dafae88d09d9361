# mypy: disallow-untyped-calls=False
"""The late fusion of the CNN scorer with context features, fitted and ablated.

:func:`calibration_set` builds data the CNN did not train on as *positives*:
``context.rounds`` fresh insertion rounds in the training slab (their own
seed), labelled against their truth, plus the generator candidates of the
training part of each ``data.real_negatives`` scan (negatives, reader marks
dropped).  The backgrounds' structures themselves were seen by the CNN as
negatives during training, so its logits there are on the confident side: the
fusion can only under-weight the context features, not over-weight them.

:func:`fit_variants` fits one :class:`~cad_node.pipelines.ct_chest.features.ContextFusion`
per ablation variant (no feature, each feature alone, all), so that the
held-out evaluation and the operating-point run can report which feature
moves which figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from rich.progress import Progress

from cad_node.pipelines.ct_chest.features import CONTEXT_FEATURES, ContextFusion
from trainer.config import TrainConfig, resolve_ct_dir
from trainer.data import exclusions_of, half_extent_mm, in_z, label_points, lung_mask_of
from trainer.insertion import ExclusionZone, LungBackground, insert_nodules

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from cad_node.pipelines.ct_chest.candidates import Candidate

__all__ = [
    "CalibrationSet",
    "ScanContext",
    "calibration_set",
    "fit_variants",
    "scan_context",
    "variant_names",
]


@dataclass(frozen=True)
class ScanContext:
    """The generator's candidates of one volume with their CNN logits and context features."""

    candidates: list[Candidate]
    centers_mm: npt.NDArray[np.float64]
    logits: npt.NDArray[np.float64]
    features: npt.NDArray[np.float64]


def _logits(net: torch.nn.Module, hu: npt.NDArray[np.float32], bg: LungBackground,
            points: npt.NDArray[np.float64], cfg: TrainConfig,
            dev: torch.device) -> npt.NDArray[np.float64]:
    import torch

    from cad_node.models.scorer import flip_averaged_logits
    from trainer.data import cut_patches

    spec = cfg.input
    out = np.empty(points.shape[0], dtype=np.float64)
    with torch.inference_mode():
        for s in range(0, points.shape[0], spec.batch_size):
            p = cut_patches(hu, bg, points[s : s + spec.batch_size], spec)
            x = torch.from_numpy(p[:, None]).to(dev)
            out[s : s + spec.batch_size] = flip_averaged_logits(
                net, x, spec.tta_flips).cpu().numpy()
    return out


def scan_context(
    net: torch.nn.Module, hu: npt.NDArray[np.float32], bg: LungBackground, cfg: TrainConfig,
    dev: torch.device, z_range_mm: Sequence[float] | None = None,
) -> ScanContext:
    """Run the node's generator on ``hu`` and measure logits and context features."""
    from cad_node.pipelines.ct_chest.candidates import generate_candidates
    from cad_node.pipelines.ct_chest.features import context_features

    image = bg.to_image(hu)
    cands = generate_candidates(image, bg.lung)
    pts = np.asarray([c.center_mm for c in cands], dtype=np.float64).reshape(-1, 3)
    if z_range_mm is not None:
        keep = in_z(pts, z_range_mm)
        cands = [c for c, k in zip(cands, keep, strict=True) if k]
        pts = pts[keep]
    return ScanContext(cands, pts, _logits(net, hu, bg, pts, cfg, dev),
                       context_features(image, bg.lung, cands))


@dataclass(frozen=True)
class CalibrationSet:
    """Fusion training data: logits, context features and labels (1 nodule, 0 not)."""

    logits: npt.NDArray[np.float64]
    features: npt.NDArray[np.float64]
    labels: npt.NDArray[np.float64]
    counts: dict[str, Any]


def calibration_set(
    cfg: TrainConfig, bg: LungBackground, net: torch.nn.Module, dev: torch.device,
    config_dir: Path | None = None, progress: Progress | None = None,
) -> CalibrationSet:
    """Fresh insertion rounds in the training slab plus the real negatives (module doc)."""
    from cad_node.imaging import load_series
    from trainer.data import reader_marks

    d = cfg.data
    ctx_cfg = cfg.context
    assert ctx_cfg is not None
    rng = np.random.default_rng(cfg.seed + 32_452_843)
    excl = exclusions_of(cfg)
    lo: list[npt.NDArray[np.float64]] = []
    fe: list[npt.NDArray[np.float64]] = []
    la: list[npt.NDArray[np.float64]] = []
    counts: dict[str, Any] = {"rounds": ctx_cfg.rounds, "positives": 0, "negatives": 0,
                              "real_negatives": {}}
    total = ctx_cfg.rounds + len(d.real_negatives)
    task = progress.add_task("context fusion data", total=total) if progress else None
    for _ in range(ctx_cfg.rounds):
        hu, truth = insert_nodules(
            bg, d.nodules_per_round, rng, diameter_range_mm=d.diameter_range_mm,
            z_range_mm=d.train_z_mm,
            exclusions=[ExclusionZone(z.center_mm, z.radius_mm + half_extent_mm(cfg.input))
                        for z in excl],
        )
        sc = scan_context(net, hu, bg, cfg, dev, d.train_z_mm)
        lab = label_points(sc.centers_mm, truth, excl, d.negative_margin_mm,
                           half_extent_mm(cfg.input))
        keep = lab >= 0
        lo.append(sc.logits[keep])
        fe.append(sc.features[keep])
        la.append(lab[keep].astype(np.float64))
        counts["positives"] += int((lab == 1).sum())
        counts["negatives"] += int((lab == 0).sum())
        if progress is not None and task is not None:
            progress.advance(task)
    for rn in d.real_negatives:
        directory = resolve_ct_dir(rn.ct, config_dir)
        files = sorted(f for f in directory.rglob("*")
                       if f.is_file() and f.suffix.lower() in {".dcm", ""})
        series = load_series(files)
        rbg = LungBackground.from_image(series.image, lung_mask_of(series.image))
        zones = reader_marks(files[0].parent, series) if rn.lidc_xml else []
        zones += [ExclusionZone(e.center_mm, e.radius_mm) for e in rn.exclusions]
        sc = scan_context(net, rbg.hu, rbg, cfg, dev, rn.z_mm)
        keep = label_points(sc.centers_mm, [], zones, d.negative_margin_mm) == 0
        lo.append(sc.logits[keep])
        fe.append(sc.features[keep])
        la.append(np.zeros(int(keep.sum())))
        counts["negatives"] += int(keep.sum())
        counts["real_negatives"][rn.ct] = int(keep.sum())
        if progress is not None and task is not None:
            progress.advance(task)
    return CalibrationSet(np.concatenate(lo), np.concatenate(fe), np.concatenate(la), counts)


def variant_names(features: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """Ablation variants: CNN alone (a fitted recalibration), each feature alone, all."""
    out: list[tuple[str, tuple[str, ...]]] = [("cnn only", ())]
    out += [(f"+{f}", (f,)) for f in features]
    if len(features) > 1:
        out.append(("+all", tuple(features)))
    return out


def fit_variants(cal: CalibrationSet, features: Sequence[str] = CONTEXT_FEATURES,
                 l2: float = 1e-2) -> dict[str, ContextFusion]:
    """One fusion per :func:`variant_names` variant, fitted on ``cal``."""
    return {name: ContextFusion.fit(cal.logits, cal.features, cal.labels, used, l2=l2)
            for name, used in variant_names(features)}
