"""The ct-chest pipeline on the two real CTs: findings at the operating point.

Usage::

    .venv/bin/python bench/ct_real_scans.py                 # the installed bundle
    .venv/bin/python bench/ct_real_scans.py --models-dir DIR

For LIDC-IDRI-0001 (one LUNA16 nodule) and LIDC-IDRI-0002 (no LUNA16 nodule;
one sub-consensus nodule, an "irrelevant finding") it prints the pipeline's
operating threshold and every reported finding with its probability, centre
and what it is: the reference nodule (centre within its radius), inside an
irrelevant-finding region (sub-consensus reader cluster), or a false positive.
It ends with the counts at the threshold, as JSON.  Torch runs on one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


#: The two real CTs with reader XML, in the order the benchmarks report them.
REAL_SCANS = ("lidc-idri-0001", "lidc-idri-0002")


def _series_dir(root: Path, case: str) -> Path:
    found = sorted((root / case).rglob("0*.xml"))
    if not found:
        raise SystemExit(f"{case} not found under {root} (set CAD_NODE_TEST_DATA)")
    return found[0].parent


def each_scan() -> Iterator[tuple[str, Path, Any]]:
    """``(case, series folder, loaded series)`` of :data:`REAL_SCANS`, one torch thread."""
    import torch

    torch.set_num_threads(1)
    from trainer.operating_point import _load_series

    root = Path(os.environ.get("CAD_NODE_TEST_DATA", REPO.parent / "shared" / "data"))
    for case in REAL_SCANS:
        d = _series_dir(root, case)
        yield case, d, _load_series(d)


def main() -> None:
    """Run the pipeline on both scans and print the findings."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models-dir", type=Path, default=REPO / "models")
    args = ap.parse_args()
    from cad_node.pipelines.ct_chest.pipeline import CtChestPipeline
    from trainer import lidc
    from trainer.operating_point import irrelevant_regions

    summary: dict[str, object] = {}
    for case, d, series in each_scan():
        t = time.perf_counter()
        result = CtChestPipeline(models_dir=args.models_dir).run(series, device="cpu")
        secs = time.perf_counter() - t
        thr = float(result.measurements["operating_threshold"])
        zones = irrelevant_regions(d, series)
        xml = lidc.find_lidc_xml(d, series.series_instance_uid)
        refs = []
        if xml is not None:
            ann = lidc.parse_lidc_xml(xml, series_instance_uid=series.series_instance_uid)
            pos = {u: tuple(float(v) for v in ds.ImagePositionPatient)
                   for u, ds in zip(series.sop_instance_uids, series.datasets, strict=True)}
            ann, _ = lidc.remap_rois_by_z(ann, pos)  # type: ignore[arg-type]
            ds0 = series.datasets[0]
            ps = (float(ds0.PixelSpacing[0]), float(ds0.PixelSpacing[1]))
            cl = lidc.cluster_nodules(ann, pos, ps, rows=int(ds0.Rows),  # type: ignore[arg-type]
                                      cols=int(ds0.Columns))
            refs = [f for f in lidc.luna16_consensus(ann, cl, pos, ps)  # type: ignore[arg-type]
                    if f.kind == "nodule"]
        print(f"{case}: threshold {thr:.4f}, pipeline {secs:.1f} s, "
              f"{len(result.findings)} findings reported")
        counts = {"reference_found": 0, "irrelevant": 0, "false_positive": 0}
        above: list[dict[str, object]] = []
        for f in result.findings:
            c = np.asarray(f.center_mm)
            if any(np.linalg.norm(c - np.asarray(r.center_mm)) < r.diameter_mm / 2 for r in refs):
                what = "reference nodule"
            elif any(np.linalg.norm(c - np.asarray(z.center_mm)) < z.radius_mm for z in zones):
                what = "irrelevant-finding region"
            else:
                what = "false positive"
            prob = float(f.probability or 0.0)
            flag = ">=" if prob >= thr else "< "
            print(f"  {flag} p {prob:.4f}  centre ({c[0]:.1f}, {c[1]:.1f}, {c[2]:.1f}) mm"
                  f"  long axis {f.long_axis_mm} mm  {what}")
            if prob >= thr:
                key = {"reference nodule": "reference_found",
                       "irrelevant-finding region": "irrelevant"}.get(what, "false_positive")
                counts[key] += 1
                above.append({"p": prob, "center_mm": [round(v, 1) for v in c],
                              "what": what})
        summary[case] = {"threshold": thr, "above_threshold": counts, "findings_above": above,
                         "reported": len(result.findings), "pipeline_s": round(secs, 2)}
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
