"""Time the result builders on the real 133-slice LIDC-IDRI-0001 CT.

Usage: ``.venv/bin/python bench/results_build.py [--repeats 3]``

Inputs: the series (read with pydicom, the reference peer), the consensus
nodule of the four LIDC readers as a >= 2-reader vote mask (``trainer.lidc``),
and threshold lung masks (HU < -400 inside the body, split at the midline) so
the SEG carries two large organ segments as in production.  Prints the median
wall time of each step and ratios against reading the series with pydicom and
against dciodvfy checking the same SEG.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
from scipy import ndimage

from cad_node.config import ResultsConfig
from cad_node.results import validate
from cad_node.results._common import BuildContext
from cad_node.results.findings import (
    AnalysisResult,
    AnalysisStatus,
    Finding,
    FindingSite,
    FindingType,
    ImageMask,
    ModelIdentity,
)
from cad_node.results.gsps import build_gsps
from cad_node.results.kos import build_kos
from cad_node.results.sc import build_key_images, build_summary_page
from cad_node.results.seg import build_seg
from cad_node.results.sr import build_sr
from trainer import lidc

DATA = Path(
    os.environ.get("CAD_NODE_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data")
)


def _median(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    (series_dir,) = [p.parent for p in (DATA / "lidc-idri-0001").rglob("069.xml")]
    files = sorted(series_dir.glob("*.dcm"))
    t_read, source = _median(lambda: [pydicom.dcmread(p) for p in files], args.repeats)
    assert isinstance(source, list)
    for ds in source:
        _ = ds.pixel_array  # decode once, as a pipeline would have
    hdrs = lidc.read_series_headers(series_dir)
    (cluster,) = [
        c
        for c in lidc.cluster_nodules(
            lidc.parse_lidc_xml(series_dir / "069.xml"),
            hdrs.positions_by_sop_uid,
            hdrs.pixel_spacing,
        )
        if c.n_readers >= 3
    ]
    votes: dict[str, np.ndarray] = {}
    for m in cluster.members:
        for uid, arr in lidc.rasterize_nodule(m, 512, 512).items():
            votes[uid] = votes.get(uid, 0) + arr.astype(np.int8)
    uids = tuple(sorted(u for u, v in votes.items() if (v >= 2).any()))
    nodule = ImageMask(np.stack([votes[u] >= 2 for u in uids]), uids)
    right = np.zeros((len(source), 512, 512), bool)
    left = np.zeros_like(right)
    for k, ds in enumerate(source):
        hu = pydicom.pixels.apply_modality_lut(ds.pixel_array, ds)
        lung = ndimage.binary_fill_holes(hu > -500) & (hu < -400)
        right[k, :, :256], left[k, :, 256:] = lung[:, :256], lung[:, 256:]
    all_uids = tuple(str(d.SOPInstanceUID) for d in source)
    result = AnalysisResult(
        pipeline="bench",
        status=AnalysisStatus.COMPLETED,
        series_instance_uid=str(source[0].SeriesInstanceUID),
        findings=[
            Finding(
                tracking_id="Nodule 1",
                finding_type=FindingType.NODULE,
                center_mm=cluster.center_mm,
                long_axis_mm=cluster.diameter_mm,
                mask=nodule,
            )
        ],
        organ_masks={
            FindingSite.RIGHT_LUNG: ImageMask(right, all_uids),
            FindingSite.LEFT_LUNG: ImageMask(left, all_uids),
        },
        model=ModelIdentity(name="bench", version="1", device_uid="2.25.1"),
    )
    settings = ResultsConfig()
    t_ctx, ctx = _median(lambda: BuildContext.create(result, source, settings), args.repeats)
    assert isinstance(ctx, BuildContext)
    t_seg, seg = _median(lambda: build_seg(ctx), args.repeats)
    t_sr, _ = _median(lambda: build_sr(ctx, seg), args.repeats)  # type: ignore[arg-type]
    t_key, _ = _median(lambda: build_key_images(ctx), args.repeats)
    t_sum, _ = _median(lambda: build_summary_page(ctx, 2), args.repeats)
    t_gsps, _ = _median(lambda: build_gsps(ctx), args.repeats)
    t_kos, _ = _median(lambda: build_kos(ctx), args.repeats)
    seg_ds = seg.dataset  # type: ignore[attr-defined]
    t_gate, _ = _median(lambda: validate(seg_ds, source, use_dciodvfy=False), args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "seg.dcm"
        seg_ds.save_as(path, enforce_file_format=True)
        t_dciodvfy, _ = _median(
            lambda: subprocess.run(
                ["/usr/bin/dciodvfy", str(path)], capture_output=True, check=False
            ),
            args.repeats,
        )
        size_mb = path.stat().st_size / 1e6
    print(f"source: {len(source)} slices, SEG: {seg_ds.NumberOfFrames} frames, {size_mb:.1f} MB")
    rows = [
        ("pydicom read of the series (peer)", t_read),
        ("context (sort, checks, UIDs)", t_ctx),
        ("SEG (3 segments)", t_seg),
        ("SR", t_sr),
        ("SC key image", t_key),
        ("SC summary page", t_sum),
        ("GSPS", t_gsps),
        ("KOS", t_kos),
        ("validate(SEG) without dciodvfy", t_gate),
        ("dciodvfy on the SEG (peer)", t_dciodvfy),
    ]
    for name, t in rows:
        print(f"{name:<36} {t:7.3f} s")
    total = t_ctx + t_seg + t_sr + t_key + t_sum + t_gsps + t_kos
    print(
        f"all builders {total:.2f} s = {total / t_read:.1f}x the pydicom read; "
        f"SEG = {t_seg / t_read:.1f}x read, {t_seg / t_dciodvfy:.2f}x dciodvfy(SEG)"
    )


if __name__ == "__main__":
    main()
