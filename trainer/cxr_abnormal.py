"""Issue #12, first step: a cross-validated abnormal-vs-normal baseline on NIH ChestX-ray14.

``cad-train evaluate cxr-abnormal-cv BUNDLE IMAGES ENTRIES`` (no node integration yet).

Features (no training of the image network): the frozen ``cxr-lungs``
U-Net's deepest encoder activations, averaged inside the predicted lungs and
over the whole image, plus the lung areas and the CTR in pixels; a
logistic regression (torch, L2) on standardised features.  Labels: "No
Finding" = normal, anything else = abnormal (NLP-mined, ~90% accurate).

Protocol: stratified 5-fold cross-validation, folds fixed by a seed.  In each
outer fold the operating point (the threshold at 99% sensitivity) is chosen
on out-of-fold scores of an inner 4-fold CV of the *training* folds only, then
applied unchanged to the test fold.  Reported, with case-bootstrap 95%
intervals over the pooled out-of-fold scores: AUC; sensitivity and
specificity at the inner-chosen operating points; and "normal recall at
FN = 1%" (the share of normals below the highest threshold that keeps 99% of
abnormals above it), the figure of merit of the reference system.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
import typer

from cad_node.pipelines.cxr.lungs import network_input, postprocess, probabilities_at

__all__ = ["auc", "cross_validate", "extract_features", "normal_recall_at_sensitivity"]

SENSITIVITY = 0.99


def extract_features(bundle_dir: Path, images: Path, entries: Path
                     ) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int_], list[str]]:
    """Features ``(n, d)``, labels (1 = abnormal) and image names, in file order."""
    import torch
    from PIL import Image

    from cad_node.models.bundle import load_bundle

    bundle = load_bundle(bundle_dir.parent.name, models_dir=bundle_dir.parent.parent,
                         version=bundle_dir.name)
    net = bundle.build_network("cpu")
    grabbed: dict[str, torch.Tensor] = {}
    modules = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]

    def hook(_m: Any, _i: Any, out: torch.Tensor) -> None:
        prev = grabbed.get("deep")
        if prev is None or out.shape[-1] < prev.shape[-1] or (
                out.shape[-1] == prev.shape[-1] and out.shape[1] >= prev.shape[1]):
            grabbed["deep"] = out

    handles = [m.register_forward_hook(hook) for m in modules]
    with entries.open(newline="", encoding="utf-8") as fh:
        labels = {r["Image Index"]: r["Finding Labels"] for r in csv.DictReader(fh)}
    feats, ys, names = [], [], []
    for path in sorted(images.glob("*.png")):
        if path.name not in labels:
            continue
        img = np.asarray(Image.open(path).convert("L"), np.float32) / 255.0
        grabbed.clear()
        with torch.inference_mode():
            logits = net(torch.from_numpy(network_input(img))[None, None])
        deep = grabbed["deep"][0]  # (c, h, w)
        probs = probabilities_at(logits[0], img.shape)
        masks = postprocess(probs)
        lungs = torch.from_numpy((probs[0] + probs[1]).astype(np.float32))[None, None]
        small = torch.nn.functional.interpolate(lungs, size=deep.shape[-2:], mode="area")[0, 0]
        w = small / small.sum().clamp(min=1e-6)
        inside = (deep * w).sum(dim=(1, 2)).numpy()
        overall = deep.mean(dim=(1, 2)).numpy()
        n = img.size
        shape_feats = [masks.right_lung.sum() / n, masks.left_lung.sum() / n,
                       masks.heart.sum() / n]
        lung = masks.right_lung | masks.left_lung
        shape_feats += [float(img[lung].mean()) if lung.any() else 0.0,
                        float(img[lung].std()) if lung.any() else 0.0]
        feats.append(np.concatenate([inside, overall, shape_feats]))
        ys.append(0 if labels[path.name] == "No Finding" else 1)
        names.append(path.name)
    for h in handles:
        h.remove()
    return np.asarray(feats, np.float64), np.asarray(ys, int), names


def auc(scores: npt.NDArray[np.float64], labels: npt.NDArray[np.int_]) -> float:
    """Mann-Whitney AUC (ties count one half)."""
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return float("nan")
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def threshold_at_sensitivity(scores: npt.NDArray[np.float64], labels: npt.NDArray[np.int_],
                             sensitivity: float = SENSITIVITY) -> float:
    """Highest threshold t with share(abnormal scores >= t) >= ``sensitivity``."""
    pos = np.sort(scores[labels == 1])
    k = int(np.floor((1 - sensitivity) * len(pos)))
    return float(pos[k])


def normal_recall_at_sensitivity(scores: npt.NDArray[np.float64],
                                 labels: npt.NDArray[np.int_],
                                 sensitivity: float = SENSITIVITY) -> float:
    """Share of normals strictly below the threshold that keeps ``sensitivity`` of abnormals."""
    t = threshold_at_sensitivity(scores, labels, sensitivity)
    return float(np.mean(scores[labels == 0] < t))


def _fit_predict(x_tr: npt.NDArray[np.float64], y_tr: npt.NDArray[np.int_],
                 x_te: npt.NDArray[np.float64], l2: float = 1e-2) -> npt.NDArray[np.float64]:
    import torch

    mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
    xt = torch.from_numpy((x_tr - mu) / sd).float()
    yt = torch.from_numpy(y_tr).float()
    w = torch.zeros(xt.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    pos_weight = torch.tensor((len(y_tr) - y_tr.sum()) / max(1, y_tr.sum()))
    opt = torch.optim.LBFGS([w, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        z = xt @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            z, yt, weight=torch.where(yt > 0, pos_weight, torch.tensor(1.0)))
        loss = loss + l2 * (w * w).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    with torch.no_grad():
        z = torch.from_numpy((x_te - mu) / sd).float() @ w + b
    out: npt.NDArray[np.float64] = torch.sigmoid(z).numpy().astype(np.float64)
    return out


def _folds(labels: npt.NDArray[np.int_], k: int, seed: int) -> list[npt.NDArray[np.intp]]:
    rng = np.random.default_rng(seed)
    folds: list[list[int]] = [[] for _ in range(k)]
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        for i, j in enumerate(idx):
            folds[i % k].append(int(j))
    return [np.asarray(sorted(f)) for f in folds]


def _bootstrap(fn: Any, scores: npt.NDArray[np.float64], labels: npt.NDArray[np.int_],
               samples: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    vals = []
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    for _ in range(samples):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        vals.append(fn(scores[idx], labels[idx]))
    return float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))


def cross_validate(x: npt.NDArray[np.float64], y: npt.NDArray[np.int_], *, k: int = 5,
                   seed: int = 12, bootstrap: int = 2000) -> dict[str, Any]:
    """Stratified k-fold CV with inner-CV operating points (module docstring)."""
    t0 = time.monotonic()
    oof = np.zeros(len(y))
    at_op = np.zeros(len(y), bool)  # called abnormal at the inner-chosen operating point
    thresholds = []
    for f, test in enumerate(_folds(y, k, seed)):
        train = np.setdiff1d(np.arange(len(y)), test)
        inner = np.zeros(len(train))
        for inner_test in _folds(y[train], 4, seed + 100 + f):
            inner_train = np.setdiff1d(np.arange(len(train)), inner_test)
            inner[inner_test] = _fit_predict(x[train][inner_train], y[train][inner_train],
                                             x[train][inner_test])
        t = threshold_at_sensitivity(inner, y[train])
        thresholds.append(t)
        oof[test] = _fit_predict(x[train], y[train], x[test])
        at_op[test] = oof[test] >= t
    sens = float(at_op[y == 1].mean())
    spec = float((~at_op[y == 0]).mean())
    rng = np.random.default_rng(seed)
    boot_sens, boot_spec = [], []
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    for _ in range(bootstrap):
        boot_sens.append(at_op[rng.choice(pos, len(pos))].mean())
        boot_spec.append((~at_op[rng.choice(neg, len(neg))]).mean())
    return {
        "n": len(y), "abnormal": int(y.sum()), "normal": int((y == 0).sum()), "folds": k,
        "seed": seed, "bootstrap_samples": bootstrap,
        "auc": round(auc(oof, y), 4),
        "auc_ci95": [round(v, 4) for v in _bootstrap(auc, oof, y, bootstrap, seed)],
        "normal_recall_at_fn1pct": round(normal_recall_at_sensitivity(oof, y), 4),
        "normal_recall_at_fn1pct_ci95": [round(v, 4) for v in _bootstrap(
            normal_recall_at_sensitivity, oof, y, bootstrap, seed)],
        "operating_points_inner_cv": [round(t, 4) for t in thresholds],
        "sensitivity_at_operating_point": round(sens, 4),
        "sensitivity_ci95": [round(float(np.quantile(boot_sens, q)), 4) for q in (0.025, 0.975)],
        "specificity_at_operating_point": round(spec, 4),
        "specificity_ci95": [round(float(np.quantile(boot_spec, q)), 4) for q in (0.025, 0.975)],
        "seconds": round(time.monotonic() - t0, 1),
    }


def run(bundle_dir: Path, images: Path, entries: Path, out: Path | None = None
        ) -> dict[str, Any]:
    """Extract features and cross-validate; optionally write the JSON report."""
    import json

    x, y, _ = extract_features(bundle_dir, images, entries)
    report = cross_validate(x, y)
    report["features"] = int(x.shape[1])
    if out is not None:
        out.write_text(json.dumps(report, indent=1))
    return report


def register_evaluate(ev: typer.Typer) -> None:
    """Add ``cad-train evaluate cxr-abnormal-cv`` to the ``evaluate`` group."""

    @ev.command("cxr-abnormal-cv")
    def cxr_abnormal_cv_cmd(
        bundle: Annotated[Path, typer.Argument(help="cxr-lungs bundle (frozen features).")],
        images: Annotated[Path, typer.Argument(help="Folder of PNG radiographs.")],
        entries: Annotated[Path, typer.Argument(help="Data_Entry CSV (Finding Labels).")],
        out: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
    ) -> None:
        """5-fold CV: AUC and normal recall at FN = 1% with bootstrap 95% intervals."""
        try:
            report = run(bundle, images, entries, out)
        except (ValueError, FileNotFoundError, KeyError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"AUC {report['auc']} (95% CI {report['auc_ci95']}); normal recall at "
                   f"FN=1% {report['normal_recall_at_fn1pct']} "
                   f"(95% CI {report['normal_recall_at_fn1pct_ci95']})")
