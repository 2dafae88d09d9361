"""Benchmark of the ct-lesion pipeline on the real 133-slice LIDC-IDRI-0001 CT.

Usage::

    .venv/bin/python bench/ct_lesion.py [--threads 1] [--repeat 3]

Each run is a fresh subprocess (its own peak RSS, ``getrusage``): load the
series (``cad_node.imaging.load_series``), run ``CtLesionPipeline`` with the
shipped ``ct-lesion`` bundle, print the stage times, the pipeline wall time
and the peak RSS.  Goals (issue #15): pipeline <= 15 s, peak RSS < 3 GB.  The
peer in the same run is the ct-chest pipeline on the same loaded series.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

GOAL_S = 15.0
GOAL_RSS_MB = 3072.0

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
import torch
torch.set_num_threads({threads})
from cad_node.imaging import load_series
files = sorted(Path({series!r}).glob("*.dcm"))
t = time.perf_counter(); s = load_series(files); load_s = time.perf_counter() - t
if {which!r} == "ct-lesion":
    from cad_node.pipelines.ct_lesion.pipeline import CtLesionPipeline
    t = time.perf_counter(); run = CtLesionPipeline(threads={threads}).run_detailed(s)
else:
    from cad_node.pipelines.ct_chest.pipeline import CtChestPipeline
    t = time.perf_counter(); run = CtChestPipeline().run_detailed(s)
wall = time.perf_counter() - t
print(json.dumps({{"load_s": load_s, "pipeline_s": wall, "stages": run.timings_s,
                  "findings": len(run.result.findings), "status": run.result.status.value,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}}))
"""


def _series() -> Path:
    from tests.conftest import data_root

    root = data_root() / "lidc-idri-0001" / "LIDC-IDRI-0001"
    found = [p.parent for p in root.rglob("069.xml")]
    if len(found) != 1:
        raise SystemExit(f"LIDC-IDRI-0001 not found under {root}")
    return found[0]


def _run(which: str, threads: int) -> dict[str, object]:
    code = _CHILD.format(repo=str(REPO), threads=threads, series=str(_series()), which=which)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, check=True, timeout=900)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    runs = [_run("ct-lesion", args.threads) for _ in range(args.repeat)]
    peer = [_run("ct-chest", args.threads) for _ in range(args.repeat)]
    wall = statistics.median(float(r["pipeline_s"]) for r in runs)  # type: ignore[arg-type]
    rss = max(float(r["peak_rss_mb"]) for r in runs)  # type: ignore[arg-type]
    pw = statistics.median(float(r["pipeline_s"]) for r in peer)  # type: ignore[arg-type]
    print(f"LIDC-IDRI-0001 (133 slices), {args.threads} thread(s), {args.repeat} run(s), "
          f"{os.cpu_count()} cores")
    for r in runs:
        print(f"  ct-lesion: load {r['load_s']:.2f} s, pipeline {r['pipeline_s']:.2f} s "
              f"{ {k: round(v, 2) for k, v in r['stages'].items()} }, "  # type: ignore[union-attr]
              f"findings {r['findings']}, peak RSS {r['peak_rss_mb']:.0f} MB")
    print(f"ct-lesion pipeline median {wall:.2f} s (goal {GOAL_S:.0f} s: {wall / GOAL_S:.2f}); "
          f"peak RSS {rss:.0f} MB (goal < {GOAL_RSS_MB:.0f} MB)")
    print(f"peer ct-chest pipeline, same series, same run: median {pw:.2f} s; "
          f"ct-lesion / ct-chest = {wall / pw:.2f}")


if __name__ == "__main__":
    main()
