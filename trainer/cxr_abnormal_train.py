"""``cad-train train cxr-abnormal`` and ``cad-train evaluate cxr-abnormal`` (issue #12).

Model: :class:`cad_node.pipelines.cxr.abnormal_net.AbnormalNet`, its encoder
the frozen ``cxr-lungs`` down path (features cached once,
:mod:`trainer.cxr_abnormal_data`), its adapter, patch and whole-image heads
trained here.

Loss per batch (image labels ``y``, class-balanced weights):

* BCE of the image's largest lung-patch logit (multiple-instance learning: an
  abnormal image must have one abnormal patch, a normal image none);
* BCE of the whole-image logit;
* BCE of the fusion logit (a linear layer on the two, inputs detached);
* patch BCE on the located positives (JSRT nodules, NIH boxes) and
  ``neg_per_pos`` times as many negatives (at least ``neg_per_pos`` per image
  of the batch), the hardest (highest-scoring) of the batch's negative
  patches: balanced 1:3 with online hard-example mining.

Protocol: 5 fixed folds (config).  For outer test fold ``k`` the model trains
on three folds, fold ``(k + 1) mod 5`` is its validation fold, used only for
(a) the image rule (``max``/``whole``/``fusion``, by the mean validation AUC
over the five runs) and (b) the operating point: the highest threshold keeping
99% of the validation abnormals at or above it.  The test fold is predicted
once.  Figures are computed over the pooled test-fold predictions with
bootstrap 95% intervals (resampling images, stratified by label).  The shipped
model trains on folds 0-3, takes the rule chosen in cross-validation and fixes
its operating point on fold 4; the normal recall measured there is stored.
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import numpy.typing as npt
import typer
from rich.console import Console

from cad_node.pipelines.cxr.abnormal import boxes_from_patches
from cad_node.pipelines.cxr.abnormal_net import patch_boxes
from cad_node.results.findings import FindingType
from trainer.cxr_abnormal import auc, normal_recall_at_sensitivity, threshold_at_sensitivity
from trainer.cxr_abnormal_data import (
    AbnormalConfig,
    FeatureCache,
    Item,
    build_cache,
    derive_scales,
    load_abnormal_config,
    load_items,
    nodule_in_box,
    patch_labels,
)

if TYPE_CHECKING:
    import torch

    from cad_node.pipelines.cxr.abnormal_net import AbnormalNet

__all__ = [
    "FROC_RATES",
    "box_hit_rate",
    "evaluate_predictions",
    "jsrt_froc",
    "train_command",
]

#: False positives per image at which the JSRT FROC sensitivity is read.
FROC_RATES = (0.25, 0.5, 1.0, 2.0, 4.0)
#: ChestX-ray14 localisation convention: a hit is IoBB >= 0.3.
IOBB_HIT = 0.3
#: Sensitivity of the operating point.
SENSITIVITY = 0.99
#: Candidates per image for the FROC.
FROC_CANDIDATES = 10
RULES = ("max", "whole", "fusion")
_console = Console(stderr=True)
#: ``cxr-lungs`` bundle path -> (architecture, down-path weights), loaded once per process.
_LUNGS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {}


# --------------------------------------------------------------------------- model


def new_network(cfg: AbnormalConfig, scales: list[tuple[float, float]], image_rule: str = "max"
                ) -> tuple[AbnormalNet, dict[str, Any]]:
    """An :class:`AbnormalNet` with the ``cxr-lungs`` encoder weights; and its architecture."""
    import torch

    from cad_node.models.bundle import load_bundle
    from cad_node.models.network import build_network
    from cad_node.pipelines.cxr.abnormal_net import AbnormalNet, down_path

    key = str(Path(cfg.lungs_bundle).resolve())
    if key not in _LUNGS:
        lb = Path(key)
        bundle = load_bundle(lb.parent.name, models_dir=lb.parent.parent, version=lb.name)
        src = torch.nn.ModuleList(down_path(bundle.build_network("cpu")))
        _LUNGS[key] = (dict(bundle.manifest.architecture), src.state_dict())
    enc, enc_state = _LUNGS[key]
    arch = {"builder": "cxr-abnormal", "scales": [list(s) for s in scales], "encoder": enc,
            "width": cfg.train.width, "projection": cfg.train.projection,
            "image_rule": image_rule, "dropout": cfg.train.dropout}
    if not cfg.train.patch_context:  # the default is left out: 1.0.0's architecture unchanged
        arch["patch_context"] = False
    net = build_network(arch)
    assert isinstance(net, AbnormalNet)
    net.encoder.load_state_dict(enc_state, strict=True)
    for p in [*net.encoder.parameters(), *net.project16.parameters()]:
        p.requires_grad_(False)
    net.encoder.eval()
    return net, arch


@dataclass
class Descriptors:
    """Patch descriptors of the lung cells of every image, and whole-image descriptors.

    ``rows`` ``(R, scales, D)`` float16: one row per lung cell (all cells of an
    image without lung cells); ``row_image``/``row_cell`` locate it; image ``i``
    owns rows ``offsets[i]:offsets[i + 1]``.
    """

    rows: npt.NDArray[np.float16]
    row_image: npt.NDArray[np.int64]
    row_cell: npt.NDArray[np.int64]
    offsets: npt.NDArray[np.int64]
    whole: npt.NDArray[np.float32]
    projection: dict[str, Any]
    stats: dict[str, Any]


def fit_projection(cache: FeatureCache, idx: npt.NDArray[np.intp], k: int
                   ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """1x1 projection ``(weight (k, C), bias (k,))`` of f16 onto its top-``k`` principal components.

    Fitted on the (unlabelled) features of ``idx`` only.
    """
    x = cache.f16[idx].astype(np.float32).transpose(0, 2, 3, 1).reshape(-1, cache.f16.shape[1])
    mu = x.mean(0)
    _, _, vt = np.linalg.svd(x - mu, full_matrices=False)
    w = vt[:k].astype(np.float32)
    return w, (-w @ mu).astype(np.float32)


def build_descriptors(net: AbnormalNet, cache: FeatureCache, fit_idx: npt.NDArray[np.intp],
                      labels: npt.NDArray[np.int8]
                      ) -> tuple[Descriptors, npt.NDArray[np.int8]]:
    """Fix the projection and standardisation on ``fit_idx``; descriptors and row labels of all.

    Sets ``net``'s ``project16`` weights and descriptor statistics (buffers).
    """
    import torch

    w, b = fit_projection(cache, fit_idx, net.project16.out_channels)
    with torch.no_grad():
        net.project16.weight.copy_(torch.from_numpy(w)[:, :, None, None])
        assert net.project16.bias is not None
        net.project16.bias.copy_(torch.from_numpy(b))
    rows, r_img, r_cell, wholes, row_labels = [], [], [], [], []
    offsets = [0]
    with torch.inference_mode():
        for start in range(0, len(cache.names), 32):
            sl = slice(start, start + 32)
            desc, whole = net.descriptors(torch.from_numpy(cache.f8[sl].astype(np.float32)),
                                          torch.from_numpy(cache.f16[sl].astype(np.float32)))
            d = desc.flatten(2, 3).permute(0, 2, 1, 3).numpy()  # (b, 256, s, D)
            for j in range(d.shape[0]):
                i = start + j
                g = cache.grid[i].reshape(-1)
                cells = np.flatnonzero(g) if g.any() else np.arange(g.size)
                rows.append(d[j][cells].astype(np.float16))
                r_img.append(np.full(len(cells), i))
                r_cell.append(cells)
                row_labels.append(labels[i].reshape(labels.shape[1], -1)[:, cells].T)
                offsets.append(offsets[-1] + len(cells))
            wholes.append(whole.numpy())
    out = Descriptors(np.concatenate(rows), np.concatenate(r_img), np.concatenate(r_cell),
                      np.asarray(offsets), np.concatenate(wholes).astype(np.float32), {}, {})
    fit_rows = np.isin(out.row_image, fit_idx)
    x = out.rows[fit_rows].astype(np.float32).reshape(-1, out.rows.shape[-1])
    wh = out.whole[fit_idx]
    with torch.no_grad():
        net.desc_mean.copy_(torch.from_numpy(x.mean(0)))
        net.desc_std.copy_(torch.from_numpy(x.std(0) + 1e-4))
        net.whole_mean.copy_(torch.from_numpy(wh.mean(0)))
        net.whole_std.copy_(torch.from_numpy(wh.std(0) + 1e-4))
    out.stats = {k: v.clone() for k, v in net.state_dict().items()
                 if k.startswith(("project16.", "desc_", "whole_mean", "whole_std"))}
    return out, np.concatenate(row_labels).astype(np.int8)


def _bce(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None
         ) -> torch.Tensor:
    import torch

    return torch.nn.functional.binary_cross_entropy_with_logits(logits, target, weight=weight)


def patch_loss(patch_logits: torch.Tensor, labels: torch.Tensor, neg_per_pos: int,
               images: int) -> torch.Tensor:
    """BCE over the located positives and the hardest ``neg_per_pos`` x negatives.

    At least ``neg_per_pos`` negatives per image of the batch (``images``)
    are taken, so a batch without located positives still learns from its
    hardest negatives.
    """
    import torch

    pos = patch_logits[labels == 1]
    neg = patch_logits[labels == 0]
    n_neg = min(len(neg), neg_per_pos * max(len(pos), images))
    if n_neg == 0 and len(pos) == 0:
        return patch_logits.sum() * 0.0
    hard = torch.topk(neg, n_neg).values if n_neg else neg[:0]
    logits = torch.cat([pos, hard])
    target = torch.cat([torch.ones_like(pos), torch.zeros_like(hard)])
    return _bce(logits, target)


def _batch_rows(desc: Descriptors, b: npt.NDArray[np.intp]
                ) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
    """Row indices of images ``b`` and each row's position in ``b``."""
    parts = [np.arange(desc.offsets[i], desc.offsets[i + 1]) for i in b]
    local = np.concatenate([np.full(len(p), j) for j, p in enumerate(parts)])
    return np.concatenate(parts), local


def _segment_max(values: torch.Tensor, local: torch.Tensor, n: int) -> torch.Tensor:
    import torch

    out = torch.full((n,), float("-inf"), dtype=values.dtype)
    return out.scatter_reduce(0, local, values, reduce="amax", include_self=True)


def train_heads(net: AbnormalNet, desc: Descriptors, row_labels: npt.NDArray[np.int8],
                y: npt.NDArray[np.int_], idx: npt.NDArray[np.intp], cfg: AbnormalConfig,
                seed: int, log: Any = None) -> list[float]:
    """Train the patch, whole-image and fusion heads on the descriptors of ``idx``."""
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    bs = cfg.train.batch_size
    steps = cfg.train.epochs * math.ceil(len(idx) / bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.train.lr, total_steps=steps,
                                                pct_start=0.1)
    pos_frac = float(y[idx].mean())
    w_cls = torch.tensor([0.5 / max(1e-6, 1 - pos_frac), 0.5 / max(1e-6, pos_frac)])
    history = []
    for epoch in range(cfg.train.epochs):
        net.train()
        net.encoder.eval()
        order = rng.permutation(idx)
        losses = []
        for start in range(0, len(order), bs):
            b = order[start:start + bs]
            rows, local = _batch_rows(desc, b)
            x = torch.from_numpy(desc.rows[rows].astype(np.float32))
            logits = net.patch_logits_of(x)  # (r, s)
            mx = _segment_max(logits.amax(dim=1), torch.from_numpy(local), len(b))
            whole = net.whole_logits_of(torch.from_numpy(desc.whole[b]))
            fused = net.fuse(mx.detach(), whole.detach())
            yt = torch.from_numpy(y[b].astype(np.float32))
            wt = w_cls[torch.from_numpy(y[b]).long()]
            loss = (_bce(mx, yt, wt) + _bce(whole, yt, wt) + _bce(fused, yt, wt)
                    + patch_loss(logits, torch.from_numpy(row_labels[rows]),
                                 cfg.train.neg_per_pos, len(b)))
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            sched.step()
            losses.append(float(loss.item()))
        history.append(float(np.mean(losses)))
        if log is not None and (epoch + 1) % 10 == 0:
            log(f"  epoch {epoch + 1}/{cfg.train.epochs} loss {history[-1]:.4f}")
    net.eval()
    return history


def predict(net: AbnormalNet, desc: Descriptors, idx: npt.NDArray[np.intp], scales: int
            ) -> dict[str, Any]:
    """Image probabilities per rule ``(n,)`` and patch probabilities ``(n, s, 16, 16)``.

    Patches not centred on a lung cell get probability 0 (they are never used).
    """
    import torch

    net.eval()
    out: dict[str, Any] = {r: np.zeros(len(idx)) for r in RULES}
    patches = np.zeros((len(idx), scales, 16 * 16))
    with torch.inference_mode():
        rows, local = _batch_rows(desc, idx)
        logits = net.patch_logits_of(torch.from_numpy(desc.rows[rows].astype(np.float32)))
        mx = _segment_max(logits.amax(dim=1), torch.from_numpy(local), len(idx))
        whole = net.whole_logits_of(torch.from_numpy(desc.whole[idx]))
        fused = net.fuse(mx, whole)
        for r, v in (("max", mx), ("whole", whole), ("fusion", fused)):
            out[r] = torch.sigmoid(v).double().numpy()
        prob = torch.sigmoid(logits).double().numpy()
    patches[local, :, desc.row_cell[rows]] = prob
    out["patches"] = patches.reshape(len(idx), scales, 16, 16)
    return out


def candidates_of(pred_patches: npt.NDArray[np.float64], cache: FeatureCache, i: int,
                  input_boxes: npt.NDArray[np.float64], max_boxes: int = FROC_CANDIDATES
                  ) -> list[tuple[tuple[float, float, float, float], float]]:
    """Merged boxes (stored pixels) and probabilities of cached image ``i``."""
    lb = cache.lung_box[i]
    shape = (int(cache.shape[i][0]), int(cache.shape[i][1]))
    boxes = boxes_from_patches(pred_patches, cache.grid[i], input_boxes, shape,
                               (float(lb[0]), float(lb[1]), float(lb[2]), float(lb[3])),
                               FindingType.ABNORMAL, max_boxes=max_boxes)
    return [((b.x0, b.y0, b.x1, b.y1), b.probability) for b in boxes]


# --------------------------------------------------------------------------- metrics


def jsrt_froc(images: Sequence[tuple[Sequence[tuple[tuple[float, float, float, float], float]],
                                     tuple[float, float, float] | None]],
              rates: Sequence[float] = FROC_RATES) -> npt.NDArray[np.float64]:
    """Sensitivity at ``rates`` false positives per image (JSRT: one nodule per abnormal image).

    ``images``: per image, its candidates ``((x0, y0, x1, y1), probability)``
    and its nodule ``(x, y, d)`` or ``None``.  A candidate hits when its box
    contains the nodule centre; a found nodule counts once, at its most
    probable hit, and its other hits are neither hits nor false positives
    (the LUNA16 rules, :mod:`trainer.froc`); every other candidate is a false
    positive.  The curve is :mod:`trainer.froc`'s.
    """
    from trainer.froc import _froc_curve, _sens_at

    is_nod: list[bool] = []
    prob: list[float] = []
    excl: list[bool] = []
    for cands, nodule in images:
        rest = list(cands)
        if nodule is not None:
            hits = [c for c in rest if nodule_in_box(nodule, c[0])]
            if hits:
                is_nod.append(True)
                prob.append(max(p for _, p in hits))
                excl.append(False)
                rest = [c for c in rest if not nodule_in_box(nodule, c[0])]
            else:
                is_nod.append(True)
                prob.append(-math.inf)
                excl.append(True)
        for _, p in rest:
            is_nod.append(False)
            prob.append(p)
            excl.append(False)
    fps, sens, _ = _froc_curve(np.asarray(is_nod, bool), np.asarray(prob, float),
                               np.asarray(excl, bool), len(images))
    return np.asarray(_sens_at(fps, sens, rates), float)


def box_hit_rate(images: Sequence[tuple[Sequence[tuple[tuple[float, float, float, float], float]],
                                        Sequence[tuple[float, float, float, float]]]],
                 top: int = 1) -> float:
    """Share of images whose ``top`` most probable boxes include one with IoBB >= 0.3.

    IoBB is :func:`trainer.froc.box_iobb` (intersection over the detected
    box), with the boxes' pixel-edge coordinates turned into its inclusive
    pixel convention.
    """
    from trainer.froc import box_iobb

    hits = 0
    for cands, truth in images:
        gts = np.asarray([[b[0], b[1], b[2] - 1, b[3] - 1] for b in truth], float)
        for box, _ in list(cands)[:top]:
            if (box_iobb([box[0], box[1], box[2] - 1, box[3] - 1], gts) >= IOBB_HIT).any():
                hits += 1
                break
    return hits / len(images) if images else float("nan")


def _ci(values: Sequence[float]) -> list[float]:
    v = np.asarray([x for x in values if np.isfinite(x)], float)
    if len(v) == 0:
        return [float("nan"), float("nan")]
    return [round(float(np.quantile(v, 0.025)), 4), round(float(np.quantile(v, 0.975)), 4)]


def evaluate_predictions(scores: npt.NDArray[np.float64], y: npt.NDArray[np.int_],
                         called: npt.NDArray[np.bool_], *, bootstrap: int, seed: int
                         ) -> dict[str, Any]:
    """AUC, normal recall at FN = 1% and sens/spec of ``called``, with stratified bootstrap CIs."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    boot: dict[str, list[float]] = {"auc": [], "nr": [], "sens": [], "spec": []}
    for _ in range(bootstrap):
        i = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        boot["auc"].append(auc(scores[i], y[i]))
        boot["nr"].append(normal_recall_at_sensitivity(scores[i], y[i], SENSITIVITY))
        boot["sens"].append(float(called[i][y[i] == 1].mean()))
        boot["spec"].append(float((~called[i][y[i] == 0]).mean()))
    return {
        "n": len(y), "abnormal": int(y.sum()), "normal": int((y == 0).sum()),
        "auc": round(auc(scores, y), 4), "auc_ci95": _ci(boot["auc"]),
        "normal_recall_at_fn1pct": round(normal_recall_at_sensitivity(scores, y, SENSITIVITY), 4),
        "normal_recall_at_fn1pct_ci95": _ci(boot["nr"]),
        "sensitivity_at_operating_point": round(float(called[y == 1].mean()), 4),
        "sensitivity_ci95": _ci(boot["sens"]),
        "specificity_at_operating_point": round(float((~called[y == 0]).mean()), 4),
        "specificity_ci95": _ci(boot["spec"]),
    }


def _localisation(items: Sequence[Item], cands: dict[int, list[Any]], *, bootstrap: int,
                  seed: int) -> dict[str, Any]:
    """JSRT FROC and NIH IoBB hit rates of the candidates of ``items`` (index -> candidates)."""
    jsrt = [(cands[i], it.nodule) for i, it in enumerate(items) if it.source == "jsrt"]
    nih = [(cands[i], it.boxes) for i, it in enumerate(items) if it.boxes]
    out: dict[str, Any] = {}
    rng = np.random.default_rng(seed)
    if jsrt and any(n is not None for _, n in jsrt):
        sens = jsrt_froc(jsrt)
        boot = []
        for _ in range(bootstrap):
            sample = [jsrt[j] for j in rng.integers(0, len(jsrt), len(jsrt))]
            if any(n is not None for _, n in sample):
                boot.append(jsrt_froc(sample))
        b = np.asarray(boot)
        out["jsrt_froc"] = {
            "images": len(jsrt), "nodules": sum(n is not None for _, n in jsrt),
            "hit_rule": "a candidate box contains the nodule centre",
            "candidates_per_image": FROC_CANDIDATES,
            "fp_per_image": list(FROC_RATES),
            "sensitivity": [round(float(s), 4) for s in sens],
            "sensitivity_ci95": [_ci(list(b[:, k])) for k in range(len(FROC_RATES))],
            "sensitivity_at_1fp": round(float(sens[FROC_RATES.index(1.0)]), 4),
            "reference": "Schilham 2006 (classic JSRT CAD): about 51% at 2 FP/image",
        }
    if nih:
        boot1, boot3 = [], []
        for _ in range(bootstrap):
            sample = [nih[j] for j in rng.integers(0, len(nih), len(nih))]
            boot1.append(box_hit_rate(sample, 1))
            boot3.append(box_hit_rate(sample, 3))
        out["nih_box_hits"] = {
            "images": len(nih), "rule": "IoBB >= 0.3 (ChestX-ray14 convention)",
            "top1_hit_rate": round(box_hit_rate(nih, 1), 4), "top1_ci95": _ci(boot1),
            "top3_hit_rate": round(box_hit_rate(nih, 3), 4), "top3_ci95": _ci(boot3),
        }
    return out


# --------------------------------------------------------------------------- protocol


@dataclass
class Prepared:
    """Everything the protocol needs, computed once per run."""

    items: list[Item]
    cache: FeatureCache
    scales: list[tuple[float, float]]
    y: npt.NDArray[np.int_]
    folds: npt.NDArray[np.int_]
    desc: Descriptors
    row_labels: npt.NDArray[np.int8]


def prepare(cfg: AbnormalConfig, run_dir: Path) -> Prepared:
    """Items, patch scales, cached features and descriptors.

    The fixed f16 projection and the descriptor statistics are fitted on the
    unlabelled features of the shipped model's training folds (every fold but
    ``validation_fold``) and used by every model of the run.
    """
    items = load_items(cfg)
    scales = derive_scales(cfg, items)
    enc_net, _ = new_network(cfg, scales)
    cache = build_cache(items, Path(cfg.lungs_bundle), enc_net, run_dir,
                        log=lambda m: _console.print(m))
    labels = np.stack([patch_labels(it, scales, cache.grid[i],
                                    (int(cache.shape[i][0]), int(cache.shape[i][1])))
                       for i, it in enumerate(items)])
    y = np.asarray([it.label for it in items], int)
    fold_of = {n: f for f, names in enumerate(cfg.folds.assignment) for n in names}
    folds = np.asarray([fold_of[it.name] for it in items], int)
    fit = np.flatnonzero(folds != cfg.folds.validation_fold)
    import hashlib

    import torch

    parts: list[Any] = [cache.names, scales, cfg.train.projection, fit.tolist()]
    if not cfg.train.patch_context:  # the default keeps the earlier caches' keys
        parts.append("no-patch-context")
    key = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]
    path = run_dir / f"descriptors-{key}.npz"
    if path.is_file():
        z = np.load(path)
        stats = {k[6:]: torch.from_numpy(z[k]) for k in z.files if k.startswith("stats:")}
        desc = Descriptors(z["rows"], z["row_image"], z["row_cell"], z["offsets"], z["whole"],
                           {}, stats)
        return Prepared(items, cache, scales, y, folds, desc, z["row_labels"])
    desc, row_labels = build_descriptors(enc_net, cache, fit, labels)
    np.savez(path, rows=desc.rows, row_image=desc.row_image, row_cell=desc.row_cell,
             offsets=desc.offsets, whole=desc.whole, row_labels=row_labels,
             **{f"stats:{k}": v.numpy() for k, v in desc.stats.items()})
    return Prepared(items, cache, scales, y, folds, desc, row_labels)


def _network_for(cfg: AbnormalConfig, prep: Prepared, image_rule: str = "max"
                 ) -> tuple[AbnormalNet, dict[str, Any]]:
    net, arch = new_network(cfg, prep.scales, image_rule)
    net.load_state_dict(prep.desc.stats, strict=False)
    return net, arch


def cross_validate(cfg: AbnormalConfig, run_dir: Path, prep: Prepared | None = None
                   ) -> dict[str, Any]:
    """The cross-validation protocol of the module docstring; writes ``run_dir/cv.json``."""
    import torch

    torch.set_num_threads(cfg.train.threads)
    t0 = time.monotonic()
    prep = prep or prepare(cfg, run_dir)
    items, cache, scales, y, folds = prep.items, prep.cache, prep.scales, prep.y, prep.folds
    k = cfg.folds.k
    n = len(items)
    test_scores = {r: np.zeros(n) for r in RULES}
    called = {r: np.zeros(n, bool) for r in RULES}
    val_auc: dict[str, list[float]] = {r: [] for r in RULES}
    thresholds: dict[str, list[float]] = {r: [] for r in RULES}
    cands: dict[int, list[Any]] = {}
    input_boxes = patch_boxes(scales).numpy().astype(np.float64)
    nih = np.asarray([it.source == "nih" for it in items])
    for f in range(k):
        v = (f + 1) % k
        tr = np.flatnonzero((folds != f) & (folds != v))
        va, te = np.flatnonzero(folds == v), np.flatnonzero(folds == f)
        net, _ = _network_for(cfg, prep)
        _console.print(f"fold {f}: train {len(tr)}, validation fold {v} ({len(va)}), "
                       f"test {len(te)}")
        train_heads(net, prep.desc, prep.row_labels, y, tr, cfg, seed=cfg.seed + f,
                    log=lambda m: _console.print(m))
        pv = predict(net, prep.desc, va, len(scales))
        pt = predict(net, prep.desc, te, len(scales))
        for r in RULES:
            val_auc[r].append(auc(pv[r], y[va]))
            t = threshold_at_sensitivity(pv[r], y[va], SENSITIVITY)
            thresholds[r].append(t)
            test_scores[r][te] = pt[r]
            called[r][te] = pt[r] >= t
        for j, i in enumerate(te):
            cands[int(i)] = candidates_of(pt["patches"][j], cache, int(i), input_boxes)
    rule = max(RULES, key=lambda r: float(np.mean(val_auc[r])))
    report: dict[str, Any] = {
        "protocol": ("5 fixed folds (config); per outer fold: train on 3 folds, validation "
                     "fold (k+1) mod 5 for the image rule and the operating point, test fold "
                     "predicted once; figures over the pooled test folds"),
        "scales_hw_px_at_256": [list(s) for s in scales],
        "validation_auc_by_rule": {r: [round(a, 4) for a in val_auc[r]] for r in RULES},
        "image_rule_chosen_on_validation": rule,
        "operating_thresholds_by_fold": {r: [round(t, 4) for t in thresholds[r]] for r in RULES},
        "bootstrap_samples": cfg.bootstrap,
        "epochs": cfg.train.epochs,
    }
    ynih = y[nih]
    for r in RULES:
        report[f"nih_{r}"] = evaluate_predictions(test_scores[r][nih], ynih, called[r][nih],
                                                  bootstrap=cfg.bootstrap, seed=cfg.seed)
    js = ~nih
    if js.any():
        report["jsrt_" + rule] = evaluate_predictions(
            test_scores[rule][js], y[js], called[rule][js], bootstrap=cfg.bootstrap,
            seed=cfg.seed)
    report["localisation"] = _localisation(items, cands, bootstrap=cfg.bootstrap, seed=cfg.seed)
    report["seconds"] = round(time.monotonic() - t0, 1)
    (run_dir / "cv.json").write_text(json.dumps(report, indent=1))
    (run_dir / "cv_scores.json").write_text(json.dumps({
        "names": [it.name for it in items], "y": y.tolist(), "folds": folds.tolist(),
        **{r: test_scores[r].round(6).tolist() for r in RULES},
        "candidates": {items[i].name: c for i, c in cands.items()}}))
    return report


#: Licence of the shipped weights.
LICENSE = ("Weights: a derived work of NIH ChestX-ray14 (no restrictions on use; attribution "
           "required), JSRT and the SCR masks (research and education use only, no "
           "redistribution beyond those terms); code Apache-2.0")
#: Intended use of every ``cxr-abnormal`` bundle.
INTENDED_USE = ("Research and engineering use only. Not for diagnostic use. Gives an "
                "abnormal-vs-normal probability of a frontal chest radiograph and boxes on the "
                "most suspicious regions; trained on far less than clinical-grade data; it "
                "does not replace a radiologist.")


def train_final(cfg: AbnormalConfig, run_dir: Path, models_dir: Path, rule: str,
                cv: dict[str, Any] | None, force: bool = False, prep: Prepared | None = None
                ) -> Path:
    """Train the shipped model (all folds but the validation one), fix its operating point."""
    import torch

    from cad_node.models.network import count_parameters
    from trainer.export import write_bundle

    torch.set_num_threads(cfg.train.threads)
    t0 = time.monotonic()
    prep = prep or prepare(cfg, run_dir)
    items, scales, y, folds = prep.items, prep.scales, prep.y, prep.folds
    v = cfg.folds.validation_fold
    tr, va = np.flatnonzero(folds != v), np.flatnonzero(folds == v)
    net, arch = _network_for(cfg, prep, image_rule=rule)
    history = train_heads(net, prep.desc, prep.row_labels, y, tr, cfg, seed=cfg.seed + 100,
                          log=lambda m: _console.print(m))
    pv = predict(net, prep.desc, va, len(scales))
    thr = threshold_at_sensitivity(pv[rule], y[va], SENSITIVITY)
    box_thr = threshold_at_sensitivity(pv["max"], y[va], SENSITIVITY)
    nih_va = np.asarray([items[i].source == "nih" for i in va])
    op = {
        "threshold": round(thr, 6), "image_rule": rule, "box_threshold": round(box_thr, 6),
        "validation_fold": v, "validation_images": len(va),
        "validation_abnormal": int(y[va].sum()), "validation_normal": int((y[va] == 0).sum()),
        "sensitivity_validation": round(float((pv[rule][y[va] == 1] >= thr).mean()), 4),
        "normal_recall_validation": round(float((pv[rule][y[va] == 0] < thr).mean()), 4),
        "normal_recall_validation_nih": round(float(
            (pv[rule][nih_va][y[va][nih_va] == 0] < thr).mean()), 4),
        "validation_auc": round(auc(pv[rule], y[va]), 4),
    }
    rule_text = (f"highest threshold keeping {SENSITIVITY:.0%} of the abnormal images of "
                 f"validation fold {v} ({op['validation_abnormal']} abnormal, "
                 f"{op['validation_normal']} normal; NIH + JSRT) at or above it")
    wall = time.monotonic() - t0
    metrics: dict[str, Any] = {"operating_point": op}
    if cv is not None:
        metrics["cross_validation"] = cv
    provenance = {
        "trainer": "trainer.cxr_abnormal_train", "seed": cfg.seed, "epochs": cfg.train.epochs,
        "wall_time_s": round(wall, 1), "threads": cfg.train.threads,
        "torch": torch.__version__, "python": platform.python_version(),
        "train_images": len(tr), "validation_fold": v,
        "final_training_loss": round(history[-1], 4),
        "trained_parameters": count_parameters(net),
        "lungs_encoder": str(cfg.lungs_bundle),
    }
    training_data = {
        "description": cfg.data.description, "terms": cfg.data.terms,
        "train_images": len(tr), "validation_images": len(va),
        "nih_train": int(sum(items[i].source == "nih" for i in tr)),
        "jsrt_train": int(sum(items[i].source == "jsrt" for i in tr)),
    }
    output = {"kind": "logit", "positive_class": "abnormal", "threshold": round(thr, 6),
              "operating_threshold": round(thr, 6), "operating_rule": rule_text}
    state = {k: t.detach().clone() for k, t in net.state_dict().items()}
    card = render_card(cfg, metrics, provenance, training_data, scales)
    return write_bundle(
        models_dir, name=cfg.bundle.name, version=cfg.bundle.version, state_dict=state,
        task="chest radiograph abnormal-vs-normal probability and lesion boxes",
        architecture=arch,
        input_spec={"kind": "radiograph", "size": 256, "normalisation": "histeq",
                    "labels": ["abnormal"]},
        training_data=training_data, metrics=metrics, output_spec=output, model_card=card,
        provenance=provenance, license_text=LICENSE, intended_use=INTENDED_USE, force=force)


def _fmt(e: dict[str, Any], key: str) -> str:
    ci = e.get(f"{key}_ci95") or e.get(key.replace("_at_operating_point", "") + "_ci95")
    v = e.get(key)
    return f"{v:.3f} ({ci[0]:.3f}-{ci[1]:.3f})" if v is not None and ci else "n/a"


def render_card(cfg: AbnormalConfig, metrics: dict[str, Any], provenance: dict[str, Any],
                training_data: dict[str, Any], scales: list[tuple[float, float]]) -> str:
    """The bundle's MODEL_CARD.md."""
    op = metrics["operating_point"]
    cv = metrics.get("cross_validation")
    cv_text = "Cross-validation was not run for this bundle."
    if cv:
        rule = cv["image_rule_chosen_on_validation"]
        rows = []
        for r in RULES:
            e = cv[f"nih_{r}"]
            rows.append(f"| {r}{' (chosen)' if r == rule else ''} | {_fmt(e, 'auc')} | "
                        f"{_fmt(e, 'normal_recall_at_fn1pct')} | "
                        f"{_fmt(e, 'sensitivity_at_operating_point')} | "
                        f"{_fmt(e, 'specificity_at_operating_point')} |")
        loc = cv.get("localisation", {})
        fr = loc.get("jsrt_froc")
        froc = "not measured"
        if fr:
            froc = "; ".join(f"{r} FP/image: {s:.3f} ({c[0]:.3f}-{c[1]:.3f})" for r, s, c in zip(
                fr["fp_per_image"], fr["sensitivity"], fr["sensitivity_ci95"], strict=True))
        nb = loc.get("nih_box_hits")
        nbt = (f"top box {nb['top1_hit_rate']:.3f} ({nb['top1_ci95'][0]:.3f}-"
               f"{nb['top1_ci95'][1]:.3f}), any of the top 3 {nb['top3_hit_rate']:.3f} on "
               f"{nb['images']} images" if nb else "not measured")
        e = cv[f"nih_{rule}"]
        cv_text = f"""5-fold cross-validation (folds fixed in `trainer/configs/cxr-abnormal.yaml`;
each outer fold: training on three folds, the next fold for validation, the test fold
predicted once). Bootstrap 95% intervals ({cv['bootstrap_samples']} resamples).

NIH ChestX-ray14 starter ({e['n']} images: {e['abnormal']} abnormal, {e['normal']} normal),
pooled test folds; sensitivity/specificity at each fold's validation-chosen operating point:

| image rule | AUC | normal recall at FN = 1% | sensitivity | specificity |
|---|---|---|---|---|
{chr(10).join(rows)}

The image rule was chosen by the mean validation AUC ({cv['validation_auc_by_rule']}).

JSRT nodule FROC (hit: a box contains the nodule centre; {fr['images'] if fr else 0} images,
{fr['nodules'] if fr else 0} nodules): {froc}. **Sensitivity at 1 FP/image:
{fr['sensitivity_at_1fp'] if fr else 'n/a'}**, against about 0.51 at 2 FP/image for a
classic JSRT CAD (Schilham 2006).

NIH official boxes, hit at IoBB >= 0.3: {nbt}."""
    return f"""# {cfg.bundle.name} {cfg.bundle.version}

**Not for diagnostic use.** Research and engineering use only. **Trained on far less than
clinical-grade training data** (657 images, NLP-mined labels): its figures below are low
and their intervals wide.

## What it does
Gives an abnormal-vs-normal probability for a frontal chest radiograph and boxes on the
most suspicious regions inside the lungs. Multi-scale patch scoring: {len(scales)} patch
sizes (h x w, pixels of the 256-pixel input: {', '.join(f'{int(h)}x{int(w)}' for h, w in scales)};
k-means of the official ChestX-ray14 box shapes and of 2x the JSRT nodule diameters) on a
16x16 grid, plus a whole-image branch, on the frozen encoder of the `cxr-lungs` bundle
(its down path, weights copied). Image probability: `{op['image_rule']}`. Boxes: the
top lung patches merged (greedy, IoU >= 0.3, probability-weighted corners), clipped to
the lungs' bounding box; finding type "Abnormal" (not a nodule detector).

## Training data and its terms
{cfg.data.description}

{cfg.data.terms}

These weights are a derived work of those data and carry their terms. The data are not
in this bundle or the repository. {training_data['train_images']} training images
({training_data['nih_train']} NIH, {training_data['jsrt_train']} JSRT); validation fold
{op['validation_fold']} ({op['validation_images']} images) was never trained on.

## Operating point
Threshold {op['threshold']:.4f}: the highest threshold keeping 99% of the validation
abnormals at or above it. Measured on that validation fold: sensitivity
{op['sensitivity_validation']:.3f}, normal recall {op['normal_recall_validation']:.3f}
(NIH normals only: {op['normal_recall_validation_nih']:.3f}), AUC {op['validation_auc']:.3f}.
These validation figures chose the threshold; the cross-validated figures below did not.

## Measured (cross-validation; never tuned on the test folds)
{cv_text}

## Training
`cad-train train cxr-abnormal trainer/configs/cxr-abnormal.yaml`: {cfg.train.epochs} epochs,
AdamW (lr {cfg.train.lr}, one-cycle, weight decay {cfg.train.weight_decay}), batch
{cfg.train.batch_size}; losses: max-patch MIL BCE, whole-image BCE, fusion BCE, and patch
BCE on located positives (JSRT nodule centres, NIH boxes) with {cfg.train.neg_per_pos}x as many
hardest negatives (online hard-example mining). {provenance['trained_parameters']} trained
parameters; seed {cfg.seed}; {provenance['threads']} CPU threads; wall time
{provenance['wall_time_s']} s; torch {provenance['torch']}.

## Citations
Wang X et al. ChestX-ray8. IEEE CVPR 2017:3462-3471 (acknowledging the NIH Clinical
Center). Shiraishi J et al. AJR 2000;174:71-74. van Ginneken B et al. Med Image Anal
2006;10:19-40. Schilham AMR, van Ginneken B, Loog M. A computer-aided diagnosis system for
detection of lung nodules in chest radiographs with an evaluation on a public database.
Med Image Anal 2006;10:247-258.
"""


# --------------------------------------------------------------------------- CLI


def train_command(config: Path, out: Path | None, models_dir: Path | None, *,
                  cross_validation: bool = True, force: bool = False) -> Path:
    """``cad-train train cxr-abnormal CONFIG``: cross-validate, train the shipped model, export."""
    from cad_node.models.bundle import default_models_dir

    cfg = load_abnormal_config(config)
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.train.threads))
    run_dir = out or Path("runs") / "cxr-abnormal"
    run_dir.mkdir(parents=True, exist_ok=True)
    import torch

    torch.set_num_threads(cfg.train.threads)
    prep = prepare(cfg, run_dir)
    cv = cross_validate(cfg, run_dir, prep) if cross_validation else None
    rule = cv["image_rule_chosen_on_validation"] if cv else "max"
    return train_final(cfg, run_dir, models_dir or default_models_dir(), rule, cv,
                       force=force, prep=prep)


def evaluate_command(bundle: Path, out: Path | None) -> dict[str, Any]:
    """The cross-validated figures stored in ``bundle`` (recomputed intervals are in ``cv``)."""
    from cad_node.models.bundle import load_bundle

    b = load_bundle(bundle.parent.name, models_dir=bundle.parent.parent, version=bundle.name)
    metrics = dict(b.manifest.metrics)
    if out is not None:
        out.write_text(json.dumps(metrics, indent=1))
    return metrics


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """Human-readable lines of the figures (for the CLI)."""
    lines = []
    op = metrics.get("operating_point", {})
    if op:
        lines.append(f"operating point {op['threshold']} ({op['image_rule']}): validation "
                     f"sensitivity {op['sensitivity_validation']}, normal recall "
                     f"{op['normal_recall_validation']}")
    cv = metrics.get("cross_validation") or metrics
    rule = cv.get("image_rule_chosen_on_validation")
    for r in RULES:
        e = cv.get(f"nih_{r}")
        if e:
            lines.append(
                f"NIH CV [{r}{'*' if r == rule else ''}]: AUC {e['auc']} {e['auc_ci95']}; "
                f"normal recall at FN=1% {e['normal_recall_at_fn1pct']} "
                f"{e['normal_recall_at_fn1pct_ci95']}; sens {e['sensitivity_at_operating_point']}"
                f" {e['sensitivity_ci95']}; spec {e['specificity_at_operating_point']} "
                f"{e['specificity_ci95']}")
    loc = cv.get("localisation", {})
    if "jsrt_froc" in loc:
        fr = loc["jsrt_froc"]
        lines.append(f"JSRT FROC sens at {fr['fp_per_image']} FP/image: {fr['sensitivity']} "
                     f"(CI {fr['sensitivity_ci95']}); at 1 FP/image {fr['sensitivity_at_1fp']} "
                     "vs Schilham 2006 ~0.51 at 2 FP/image")
    if "nih_box_hits" in loc:
        nb = loc["nih_box_hits"]
        lines.append(f"NIH boxes IoBB>=0.3: top-1 {nb['top1_hit_rate']} {nb['top1_ci95']}, "
                     f"top-3 {nb['top3_hit_rate']} {nb['top3_ci95']} ({nb['images']} images)")
    return lines


def register_evaluate(ev: typer.Typer) -> None:
    """Add ``cad-train evaluate cxr-abnormal`` to the ``evaluate`` group."""

    @ev.command("cxr-abnormal")
    def cxr_abnormal_cmd(
        bundle: Annotated[Path, typer.Argument(help="Bundle folder models/cxr-abnormal/<v>.")],
        config: Annotated[Path | None, typer.Argument(
            help="cxr-abnormal YAML: re-run the cross-validation (else: the bundle's figures)."
        )] = None,
        out: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
        run_dir: Annotated[Path, typer.Option(help="Feature cache folder.")] = Path(
            "runs/cxr-abnormal"),
    ) -> None:
        """AUC, normal recall at FN=1%, sens/spec at the operating point, JSRT FROC, NIH IoBB."""
        try:
            if config is not None:
                cfg = load_abnormal_config(config)
                run_dir.mkdir(parents=True, exist_ok=True)
                metrics = {"operating_point": evaluate_command(bundle, None).get(
                    "operating_point", {}), "cross_validation": cross_validate(cfg, run_dir)}
                if out is not None:
                    out.write_text(json.dumps(metrics, indent=1))
            else:
                metrics = evaluate_command(bundle, out)
        except (ValueError, FileNotFoundError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        for line in summary_lines(metrics):
            typer.echo(line)
