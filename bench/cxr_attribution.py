"""Attribution on the JSRT nodule cases: heatmap peak in the top box, and the time it takes.

Usage::

    .venv/bin/python bench/cxr_attribution.py                 # the pipeline's variant
    .venv/bin/python bench/cxr_attribution.py --variants \
        max:integrated-gradients:blurred,top-patch:layer-integrated-gradients:blurred

A variant is ``target:method:baseline``: the logit explained (``max``, ``fusion``,
``whole``: :class:`~cad_node.pipelines.cxr.abnormal_net.ImageLogit`; ``top-patch``:
:class:`~cad_node.pipelines.cxr.abnormal_net.TopPatchLogit`), the method
(:class:`~cad_node.pipelines.cxr.attribution.AttributionMethod`) and the baseline
(:class:`~cad_node.pipelines.cxr.attribution.Baseline`).

Protocol (issue #12: do not tune on what you report).  The JSRT nodule cases
are split once, before any variant was measured, by their number
(``JPCLN<nnn>``): **odd numbers are the dev half**, on which a variant is
chosen; **even numbers are the report half**.  Every figure is given for
``dev``, ``report`` and ``all``.  The choice rule, fixed in advance: the
highest ``peak_in_top_box_rate_all_cases`` on ``dev`` (the heatmap/box
agreement over every dev case, a larger count than the dev hits), ties
broken by ``peak_within_nodule_rate`` on ``dev``.

For each JSRT nodule case (``../shared/data/jsrt-scr``, 512 px, nodule centre
in ``cases.csv``): the shipped ``cxr-lungs`` masks, the installed
``cxr-abnormal`` model (:func:`cad_node.pipelines.cxr.abnormal.load_abnormal_model`),
its top candidate box (the most probable merged box inside the lungs,
whatever the decision) and, per method, the lung-restricted heatmap
(:func:`cad_node.pipelines.cxr.attribution.lung_heatmap`) exactly as the
pipeline makes it.

Reported, per method:

* ``hits``: cases whose top box contains the nodule centre (the issue's hit rule);
* ``peak_in_box_rate``: among those, the share whose heatmap maximum lies in
  that box (issue #12, Must hold), with a Wilson 95% interval;
* ``peak_in_top_box_rate_all_cases``: among all cases, the share whose heatmap
  maximum lies in the top box (heatmap and box agree, hit or not);
* ``peak_within_nodule_rate``: among all cases, the share whose heatmap
  maximum lies within one nodule radius (``size_mm / 2`` at 0.7 mm/px) of the centre;
* ``positive_share_in_top_box_median``: median over cases of the share of
  the heatmap's mass (lung-restricted, smoothed, positive) inside the top
  box, against ``top_box_share_of_lungs_median`` (what a heatmap spread evenly
  over the lungs would give): how local the attribution is;
* ``seconds``: median and maximum wall time of one attribution, against the
  bare forward pass of the same network measured in the same run.

Say in the report whether the cases were among the model's training data
(see its MODEL_CARD.md): the rate then describes fit, not generalisation.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def _half(image: str) -> str:
    """``dev`` (odd case number) or ``report`` (even): the fixed split of the protocol."""
    digits = "".join(ch for ch in Path(image).stem if ch.isdigit())
    return "dev" if int(digits) % 2 else "report"


def _summary(cases: list[dict[str, object]], variant: str) -> dict[str, object]:
    import numpy as np

    rows = [c[variant] for c in cases]  # type: ignore[index]
    n = len(rows)
    hits = [r for r, c in zip(rows, cases, strict=True) if c["hit"]]
    k = sum(int(r["peak_in_box"]) for r in hits)  # type: ignore[index]
    lo, hi = _wilson(k, len(hits))
    in_top = sum(int(r["peak_in_top_box"]) for r in rows)  # type: ignore[index]
    lo2, hi2 = _wilson(in_top, n)
    secs = [float(r["seconds"]) for r in rows]  # type: ignore[index]
    shares = [float(r["share_in_top_box"]) for r in rows  # type: ignore[index]
              if r["share_in_top_box"] is not None]  # type: ignore[index]
    return {
        "cases": n, "hits": len(hits),
        "hits_with_heatmap": sum(int(r["peak"] is not None) for r in hits),  # type: ignore[index]
        "peak_in_box": k,
        "peak_in_box_rate": round(k / len(hits), 4) if hits else None,
        "peak_in_box_ci95": [round(lo, 4), round(hi, 4)],
        "peak_in_top_box": in_top,
        "peak_in_top_box_rate_all_cases": round(in_top / n, 4) if n else None,
        "peak_in_top_box_ci95": [round(lo2, 4), round(hi2, 4)],
        "peak_within_nodule_rate": round(
            sum(int(r["peak_near"]) for r in rows) / n, 4) if n else None,  # type: ignore[index]
        "no_heatmap": sum(int(r["peak"] is None) for r in rows),  # type: ignore[index]
        "positive_share_in_top_box_median": round(float(np.median(shares)), 4)
        if shares else None,
        "top_box_share_of_lungs_median": round(float(np.median(
            [float(c["box_share_of_lungs"]) for c in cases])), 4) if n else None,  # type: ignore[arg-type]
        "seconds_median": round(float(np.median(secs)), 3) if secs else None,
        "seconds_max": round(max(secs), 3) if secs else None,
    }


def main() -> None:
    """Run the benchmark and print JSON."""
    import numpy as np
    import torch
    from PIL import Image

    from cad_node.models.bundle import load_bundle
    from cad_node.pipelines.cxr.abnormal import load_abnormal_model, lung_bounding_box
    from cad_node.pipelines.cxr.abnormal_net import ImageLogit, TopPatchLogit
    from cad_node.pipelines.cxr.attribution import (
        AttributionMethod,
        Baseline,
        from_letterbox,
        lung_heatmap,
    )
    from cad_node.pipelines.cxr.lungs import segment
    from cad_node.pipelines.cxr.triage import (
        ATTRIBUTED_LOGIT,
        ATTRIBUTION_BASELINE,
        ATTRIBUTION_METHOD,
    )

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "jsrt-scr")
    ap.add_argument("--limit", type=int, default=0, help="first N nodule cases (0: all)")
    ap.add_argument("--variants",
                    default=f"{ATTRIBUTED_LOGIT}:{ATTRIBUTION_METHOD}:{ATTRIBUTION_BASELINE}",
                    help="comma-separated target:method:baseline (default: the pipeline's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--cases-out", type=Path, default=None, help="per-case JSON")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    variants: list[tuple[str, str, AttributionMethod, Baseline]] = []
    for spec in args.variants.split(","):
        target, m, b = spec.split(":")
        if target not in ("max", "fusion", "whole", "top-patch"):
            ap.error(f"unknown target {target!r} in {spec!r}")
        variants.append((spec, target, AttributionMethod(m), Baseline(b)))
    seg_net = load_bundle("cxr-lungs").build_network("cpu")
    model = load_abnormal_model()
    with (args.data / "cases.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["label"] == "nodule"]
    if args.limit:
        rows = rows[: args.limit]
    forward: list[float] = []
    abnormal_decisions = 0
    cases: list[dict[str, object]] = []
    for row in rows:
        with Image.open(args.data / "images" / row["image"]) as im:
            image = np.asarray(im.convert("L"), np.float32) / 255.0
        masks = segment(seg_net, image)
        lungs = masks.right_lung | masks.left_lung
        shape = (int(image.shape[0]), int(image.shape[1]))
        raw = model.scores(image, lungs)
        abnormal_decisions += int(raw["image"][model.net.image_rule] >= model.threshold)
        cands = model.candidates(raw, lung_bounding_box(lungs), max_boxes=1)
        cx, cy = float(row["x"]), float(row["y"])
        radius = float(row["size_mm"]) / 2 / 0.7
        x = model.preprocess(image)
        grid = model.lung_grid(lungs, shape)
        extra = () if grid is None else (grid,)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.net(x, *extra)
        forward.append(time.perf_counter() - t0)
        top = cands[0] if cands else None
        hit = top is not None and top.x0 <= cx <= top.x1 and top.y0 <= cy <= top.y1
        in_box = np.zeros(shape, bool)
        if top is not None:
            in_box[max(0, int(top.y0)):int(np.ceil(top.y1)) + 1,
                   max(0, int(top.x0)):int(np.ceil(top.x1)) + 1] = True
        case: dict[str, object] = {
            "image": row["image"], "half": _half(row["image"]), "hit": hit,
            "box_share_of_lungs": float((in_box & lungs).sum() / max(1, lungs.sum()))}

        def to_image(a: np.ndarray, shape: tuple[int, int] = shape) -> np.ndarray:
            return from_letterbox(a, shape)

        for spec, target, m, b in variants:
            explained = (TopPatchLogit.of(model.net, x, grid) if target == "top-patch"
                         else ImageLogit(model.net, target))
            att = lung_heatmap(explained, x, lungs, to_image, m, extra=extra, baseline=b)
            peak = att.peak
            total = float(att.heatmap.sum())
            rec: dict[str, object] = {
                "seconds": att.seconds, "peak": peak, "peak_near": False,
                "peak_in_top_box": False, "peak_in_box": False,
                "share_in_top_box": float(att.heatmap[in_box].sum()) / total
                if total > 0 else None}
            if peak is not None:
                r, c = peak
                rec["peak_near"] = math.hypot(c - cx, r - cy) <= radius
                if top is not None:
                    inside = top.x0 <= c <= top.x1 and top.y0 <= r <= top.y1
                    rec["peak_in_top_box"] = inside
                    rec["peak_in_box"] = inside and hit
            case[spec] = rec
        cases.append(case)
    report: dict[str, object] = {
        "cases": len(rows), "abnormal_at_operating_point": abnormal_decisions,
        "model": f"{model.identity.name} {model.identity.version}",
        "split": "dev = odd JSRT case number, report = even (fixed before measuring)",
        "forward_s_median": round(statistics.median(forward), 4) if forward else None,
        "threads": args.threads,
    }
    for spec, *_ in variants:
        report[spec] = {half: _summary([c for c in cases if half in ("all", c["half"])], spec)
                        for half in ("dev", "report", "all")}
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    if args.cases_out is not None:
        args.cases_out.write_text(json.dumps(cases, indent=0) + "\n")


if __name__ == "__main__":
    main()
