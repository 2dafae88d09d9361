"""Benchmark of the cxr pipeline: study complete -> results built, per radiograph.

Usage::

    .venv/bin/python bench/cxr_pipeline.py                  # real SIIM CR, 10 repeats
    .venv/bin/python bench/cxr_pipeline.py --repeats 20 --threads 2

What is timed, per repeat, on the real SIIM CR (1024x1024, JPEG baseline):

* ``read``: ``pydicom.dcmread`` of the stored file (as the job runner does);
* ``load``: :func:`cad_node.pipelines.load_input` (decode, VOI, geometry, view);
* ``run``: :meth:`CxrPipeline.run` (letter-box, U-Net forward pass, resample,
  post-processing, measurements; with a ``cxr-abnormal`` bundle installed also
  the abnormality model: probability, decision, boxes);
* ``build``: :func:`cad_node.results.build_results` for SR, SEG, SC and GSPS
  (no dciodvfy: the conformance gate is a separate stage of the runner).

The peers, measured in the same process and run, are the bare forward passes
on one ``1x1x256x256`` input (``torch.inference_mode``): the ``cxr-lungs``
U-Net, and (when installed) the ``cxr-abnormal`` network; the ratio is taken
against their sum, the bare model work of one radiograph.  The first
repeat is reported separately (cold: bundle verification, network build, JPEG
decoder import); the figure of merit is the median of the warm repeats.  Peak
RSS is ``getrusage(RUSAGE_SELF).ru_maxrss`` at the end.  Nothing is
downloaded; torch uses ``--threads`` intra-op threads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _cr_file() -> Path:
    root = Path(os.environ.get("CAD_NODE_TEST_DATA", REPO.parent / "shared" / "data"))
    found = sorted((root / "cxr-dicom-siim").glob("*.dcm"))
    if not found:
        raise SystemExit(f"cxr-dicom-siim not found under {root} (set CAD_NODE_TEST_DATA)")
    return found[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import pydicom
    import torch

    torch.set_num_threads(args.threads)
    from cad_node.config import ResultsConfig
    from cad_node.pipelines import get_pipeline, load_input
    from cad_node.results import build_results

    path = _cr_file()
    pipeline = get_pipeline("cxr")
    settings = ResultsConfig(use_dciodvfy=False)
    stages: dict[str, list[float]] = {"read": [], "load": [], "run": [], "build": [],
                                      "total": []}
    peer: list[float] = []
    peer_abnormal: list[float] = []
    net = None
    abnormal_net = None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        ds = pydicom.dcmread(path)
        t1 = time.perf_counter()
        loaded = load_input("cxr", [ds])
        t2 = time.perf_counter()
        result = pipeline.run(loaded)
        t3 = time.perf_counter()
        objs = build_results(result, [ds], settings=settings, objects=("sr", "seg", "sc", "gsps"))
        t4 = time.perf_counter()
        assert result.status.value == "completed", result.failure_reason
        for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
            stages[k].append(v)
        if net is None:
            from cad_node.models.bundle import load_bundle

            net = pipeline.network(load_bundle("cxr-lungs"))  # type: ignore[attr-defined]
            try:
                from cad_node.pipelines.cxr.abnormal import load_abnormal_model

                abnormal_net = load_abnormal_model().net
            except FileNotFoundError:
                abnormal_net = None
        x = torch.zeros(1, 1, 256, 256)
        with torch.inference_mode():
            p0 = time.perf_counter()
            net(x)
            peer.append(time.perf_counter() - p0)
            if abnormal_net is not None:
                p0 = time.perf_counter()
                abnormal_net(x)
                peer_abnormal.append(time.perf_counter() - p0)
    warm = {k: statistics.median(v[1:]) if len(v) > 1 else v[0] for k, v in stages.items()}
    peer_s = statistics.median(peer[1:] or peer) + (
        statistics.median(peer_abnormal[1:] or peer_abnormal) if peer_abnormal else 0.0)
    out = {
        "case": "SIIM CR 1024x1024 JPEG baseline",
        "repeats": args.repeats, "threads": args.threads,
        "objects": [o.kind for o in objs],
        "cold_total_s": round(stages["total"][0], 3),
        "warm_median_s": {k: round(v, 3) for k, v in warm.items()},
        "peer_unet_forward_median_s": round(statistics.median(peer[1:] or peer), 4),
        "peer_abnormal_forward_median_s": (
            round(statistics.median(peer_abnormal[1:] or peer_abnormal), 4)
            if peer_abnormal else None),
        "ratio_total_to_peer": round(warm["total"] / peer_s, 1),
        "abnormal": result.measurements.get("abnormal_probability"),
        "boxes": sum(1 for f in result.findings if f.region is not None
                     and f.region.kind == "box"),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
        "load_average": os.getloadavg()[0],
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
