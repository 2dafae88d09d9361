"""Attribution on the JSRT nodule cases: heatmap peak in the top box, and the time it takes.

Usage::

    .venv/bin/python bench/cxr_attribution.py                 # all JSRT nodule cases
    .venv/bin/python bench/cxr_attribution.py --limit 30 --methods integrated-gradients

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


def main() -> None:
    """Run the benchmark and print JSON."""
    import numpy as np
    import torch
    from PIL import Image

    from cad_node.models.bundle import load_bundle
    from cad_node.pipelines.cxr.abnormal import load_abnormal_model, lung_bounding_box
    from cad_node.pipelines.cxr.abnormal_net import ImageLogit
    from cad_node.pipelines.cxr.attribution import (
        AttributionMethod,
        from_letterbox,
        lung_heatmap,
    )
    from cad_node.pipelines.cxr.lungs import segment

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "jsrt-scr")
    ap.add_argument("--limit", type=int, default=0, help="first N nodule cases (0: all)")
    ap.add_argument("--methods", default="integrated-gradients,deeplift")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--attribute", default="max", choices=("max", "whole", "fusion"),
                    help="image logit the heatmap explains (the pipeline: max)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    methods = [AttributionMethod(m) for m in args.methods.split(",")]
    seg_net = load_bundle("cxr-lungs").build_network("cpu")
    model = load_abnormal_model()
    with (args.data / "cases.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["label"] == "nodule"]
    if args.limit:
        rows = rows[: args.limit]
    stats: dict[str, dict[str, list[float] | int]] = {
        m.value: {"hits": 0, "peak_in_box": 0, "peak_near": 0, "peak_in_top_box": 0,
                  "seconds": []} for m in methods}
    forward: list[float] = []
    abnormal_decisions = 0
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
        hit = bool(cands) and cands[0].x0 <= cx <= cands[0].x1 and cands[0].y0 <= cy <= cands[0].y1

        def to_image(a: np.ndarray, shape: tuple[int, int] = shape) -> np.ndarray:
            return from_letterbox(a, shape)

        for m in methods:
            att = lung_heatmap(ImageLogit(model.net, args.attribute), x, lungs, to_image, m,
                               extra=extra)
            s = stats[m.value]
            s["seconds"].append(att.seconds)  # type: ignore[union-attr]
            peak = att.peak
            if peak is None:
                continue
            r, c = peak
            s["peak_near"] += int(math.hypot(c - cx, r - cy) <= radius)  # type: ignore[operator]
            if cands:
                b0 = cands[0]
                s["peak_in_top_box"] += int(  # type: ignore[operator]
                    b0.x0 <= c <= b0.x1 and b0.y0 <= r <= b0.y1)
            if hit:
                s["hits"] += 1  # type: ignore[operator]
                b = cands[0]
                s["peak_in_box"] += int(b.x0 <= c <= b.x1 and b.y0 <= r <= b.y1)  # type: ignore[operator]
    report: dict[str, object] = {
        "cases": len(rows), "abnormal_at_operating_point": abnormal_decisions,
        "model": f"{model.identity.name} {model.identity.version}",
        "attributed_logit": args.attribute,
        "forward_s_median": round(statistics.median(forward), 4) if forward else None,
        "threads": args.threads,
    }
    for name, s in stats.items():
        hits, k = int(s["hits"]), int(s["peak_in_box"])  # type: ignore[arg-type]
        secs = list(s["seconds"])  # type: ignore[arg-type]
        lo, hi = _wilson(k, hits)
        report[name] = {
            "hits": hits, "peak_in_box": k,
            "peak_in_box_rate": round(k / hits, 4) if hits else None,
            "peak_in_box_ci95": [round(lo, 4), round(hi, 4)],
            "peak_within_nodule_rate": round(int(s["peak_near"]) / len(rows), 4)  # type: ignore[arg-type]
            if rows else None,
            "peak_in_top_box_rate_all_cases": round(
                int(s["peak_in_top_box"]) / len(rows), 4) if rows else None,  # type: ignore[arg-type]
            "seconds_median": round(statistics.median(secs), 3) if secs else None,
            "seconds_max": round(max(secs), 3) if secs else None,
        }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
