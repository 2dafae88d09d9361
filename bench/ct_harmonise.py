"""What slice-profile harmonisation does to the ct-chest pipeline on the two real CTs.

Usage::

    .venv/bin/python bench/ct_harmonise.py --plain models --harmonised DIR [--threshold T]

Runs the pipeline on LIDC-IDRI-0001 and LIDC-IDRI-0002 with two bundle directories
(the same weights without and with ``harmonise_slice_thickness_mm``) and prints, per
scan: the harmonisation note, the candidate generator's output (count, scale bands,
how many candidates of one run have one of the other within 2.5 mm, how many lie
beside the mediastinum: 35 <= |x| <= 65 mm from the scan's mid-line), and the
findings at or above ``--threshold`` (default: the harmonised bundle's operating
threshold) outside the irrelevant-finding regions.  A diagnostic, not a tuning loop:
see docs/benchmarks.md.  Torch runs on one thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

#: |x| band (mm from the mid-line between the lungs) counted as "beside the mediastinum".
HILAR_BAND_MM = (35.0, 65.0)
#: Candidates of two runs closer than this are "the same".
SAME_MM = 2.5


def _bands(scales: np.ndarray) -> dict[str, int]:
    edges = [(0, 6), (6, 10), (10, 20), (20, 1e9)]
    names = ["< 6 mm", "6-10 mm", "10-20 mm", ">= 20 mm"]
    return {n: int(((scales >= lo) & (scales < hi)).sum()) for n, (lo, hi) in zip(names, edges,
                                                                                   strict=True)}


def main() -> None:
    """Run both bundle directories on both scans and print the comparison."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plain", type=Path, default=REPO / "models")
    ap.add_argument("--harmonised", type=Path, required=True)
    ap.add_argument("--threshold", type=float, default=None)
    args = ap.parse_args()
    from ct_real_scans import each_scan  # this script's folder is on sys.path

    from cad_node.pipelines.ct_chest.pipeline import CHARACTERISE_TOP, CtChestPipeline
    from trainer.operating_point import irrelevant_regions

    summary: dict[str, object] = {}
    for case, d, series in each_scan():
        zones = irrelevant_regions(d, series)
        runs = {}
        for label, models in (("plain", args.plain), ("harmonised", args.harmonised)):
            t = time.perf_counter()
            run = CtChestPipeline(models_dir=models, max_findings=CHARACTERISE_TOP).run_detailed(
                series, device="cpu")
            runs[label] = (run, time.perf_counter() - t)
        thr = (args.threshold if args.threshold is not None
               else float(runs["harmonised"][0].result.measurements["operating_threshold"]))
        lungs = runs["plain"][0].lungs
        assert lungs is not None
        from cad_node.imaging.volume import index_to_lps

        mid_x = float(index_to_lps(series.image, np.argwhere(lungs.lungs).mean(0))[0])
        cands = {k: np.array([c.center_mm for c in r.candidates]).reshape(-1, 3)
                 for k, (r, _) in runs.items()}
        out: dict[str, object] = {"threshold": thr, "lung_mid_x_mm": round(mid_x, 1)}
        for label, (run, secs) in runs.items():
            c = cands[label]
            other = cands["harmonised" if label == "plain" else "plain"]
            dist = (np.linalg.norm(c[:, None] - other[None], axis=2).min(1) if len(other)
                    else np.full(len(c), np.inf))
            ax = np.abs(c[:, 0] - mid_x)
            above = []
            for f in run.result.findings:
                p = float(f.probability or 0.0)
                fc = np.asarray(f.center_mm)
                if p < thr or any(np.linalg.norm(fc - np.asarray(z.center_mm)) < z.radius_mm
                                  for z in zones):
                    continue
                above.append({"p": round(p, 4), "center_mm": [round(float(v), 1) for v in fc],
                              "abs_x_from_mid_mm": round(abs(float(fc[0]) - mid_x), 1),
                              "long_axis_mm": f.long_axis_mm})
            out[label] = {
                "notes": [n for n in run.result.notes if "harmonisation" in n],
                "candidates": len(c),
                "scale_bands": _bands(np.array([x.scale_mm for x in run.candidates])),
                f"shared_with_other_run_within_{SAME_MM}_mm": int((dist < SAME_MM).sum()),
                "beside_mediastinum": int(((ax >= HILAR_BAND_MM[0])
                                           & (ax <= HILAR_BAND_MM[1])).sum()),
                "findings_above_outside_irrelevant": len(above),
                "findings_above": above,
                "pipeline_s": round(secs, 1),
            }
        summary[case] = out
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
