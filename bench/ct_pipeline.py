"""Benchmark of the ct-chest pipeline: wall time per stage and peak RSS.

Usage::

    .venv/bin/python bench/ct_pipeline.py            # LIDC-IDRI-0001 + a 600-slice CT
    .venv/bin/python bench/ct_pipeline.py --case lidc

Cases (each runs in a fresh subprocess so that peak RSS is its own):

* ``lidc``: the real 133-slice LIDC-IDRI-0001 series (512x512, 2.5 mm).
* ``stack600``: the same CT resampled (linear) along z to 600 slices
  (0.555 mm), written as a DICOM series in a temporary folder (not timed).

For each case the script prints the time to load the series
(``cad_node.imaging.load_series``), the peer time of SimpleITK's GDCM
series reader on the same files (same run, ratio printed), the pipeline's
stage times and the peak resident set size (``getrusage``).  The pipeline
runs with the CNN scorer when the ``ct-nodule-scorer`` bundle is installed.
Torch is limited to the machine's cores; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _lidc_dir() -> Path:
    root = Path(os.environ.get("CAD_NODE_TEST_DATA", REPO.parent / "shared" / "data"))
    found = list((root / "lidc-idri-0001" / "LIDC-IDRI-0001").rglob("069.xml"))
    if not found:
        raise SystemExit(f"LIDC-IDRI-0001 not found under {root} (set CAD_NODE_TEST_DATA)")
    return found[0].parent


def make_stack600(out: Path, n_slices: int = 600) -> list[Path]:
    """Resample LIDC-IDRI-0001 along z to ``n_slices`` and write it as DICOM."""
    import pydicom
    import SimpleITK as sitk  # noqa: N813
    from pydicom.uid import generate_uid

    from cad_node.imaging import load_series

    src = load_series(sorted(_lidc_dir().glob("*.dcm")))
    img = src.image
    size = list(img.GetSize())
    spacing = list(img.GetSpacing())
    new_dz = spacing[2] * (size[2] - 1) / (n_slices - 1)
    ref = sitk.Image(size[0], size[1], n_slices, img.GetPixelID())
    ref.SetOrigin(img.GetOrigin())
    ref.SetDirection(img.GetDirection())
    ref.SetSpacing((spacing[0], spacing[1], new_dz))
    res = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, -1024.0)
    arr = sitk.GetArrayFromImage(res)
    template = pydicom.dcmread(sorted(_lidc_dir().glob("*.dcm"))[0])
    series_uid = generate_uid(entropy_srcs=["cad-node bench stack600 series"])
    out.mkdir(parents=True, exist_ok=True)
    files = []
    origin = np.asarray(img.GetOrigin())
    for k in range(n_slices):
        ds = template.copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["cad-node bench stack600", str(k)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [f"{origin[0]:.6f}", f"{origin[1]:.6f}",
                                   f"{origin[2] + k * new_dz:.6f}"]
        ds.SliceLocation = f"{origin[2] + k * new_dz:.6f}"
        ds.SliceThickness = f"{new_dz:.6f}"
        stored = (arr[k].astype(np.int32) - int(ds.RescaleIntercept)).astype(np.int16)
        ds.PixelData = stored.tobytes()
        path = out / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def run_case(files: list[Path], models_dir: Path | None = None) -> dict[str, object]:
    """Load + analyse in this process; return timings and peak RSS."""
    import SimpleITK as sitk  # noqa: N813

    from cad_node.imaging import load_series
    from cad_node.pipelines import get_pipeline

    try:
        import torch

        torch.set_num_threads(max(1, os.cpu_count() or 1))
    except ImportError:
        pass
    t0 = time.perf_counter()
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(files[0].parent)))
    peer = reader.Execute()
    t_peer = time.perf_counter() - t0
    del peer
    t0 = time.perf_counter()
    series = load_series(files)
    t_load = time.perf_counter() - t0
    if models_dir is None:
        pipe = get_pipeline("ct-chest")
    else:  # another bundle directory (e.g. a candidate bundle not installed)
        from cad_node.pipelines.ct_chest.pipeline import CtChestPipeline

        pipe = CtChestPipeline(models_dir=models_dir)
    t0, c0 = time.perf_counter(), time.process_time()
    run = pipe.run_detailed(series)  # type: ignore[attr-defined]
    t_run, c_run = time.perf_counter() - t0, time.process_time() - c0
    res = run.result
    return {
        "slices": series.shape[0],
        "load_s": round(t_load, 2),
        "peer_sitk_gdcm_load_s": round(t_peer, 2),
        "stages_s": {k: round(v, 2) for k, v in run.timings_s.items()},
        "stages_cpu_s": {k: round(v, 2) for k, v in run.cpu_s.items()},
        "pipeline_s": round(t_run, 2),
        "pipeline_cpu_s": round(c_run, 2),
        "load_average_1min": round(os.getloadavg()[0], 2),
        "total_s": round(t_load + t_run, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 0),
        "status": res.status.value,
        "findings": len(res.findings),
        "candidates": len(run.candidates),
        "model": res.model.name if res.model else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["lidc", "stack600", "all"], default="all")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="bundle directory (default: the installed models/)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case([Path(p) for p in args.child], args.models_dir)))
        return
    cases = ["lidc", "stack600"] if args.case == "all" else [args.case]
    print(f"ct-chest benchmark, {os.cpu_count()} CPU(s), python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            if case == "lidc":
                files = sorted(_lidc_dir().glob("*.dcm"))
            else:
                files = make_stack600(Path(tmp) / "stack600")
            extra = [] if args.models_dir is None else ["--models-dir", str(args.models_dir)]
            proc = subprocess.run([sys.executable, __file__, *extra, "--child", *map(str, files)],
                                  capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stderr)
                raise SystemExit(f"case {case} failed")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            ratio = r["load_s"] / max(r["peer_sitk_gdcm_load_s"], 1e-6)
            print(f"\n[{case}] {r['slices']} slices, status {r['status']}, "
                  f"{r['candidates']} candidates, {r['findings']} findings, model {r['model']}")
            print(f"  load_series        {r['load_s']:6.2f} s   (SimpleITK/GDCM reader "
                  f"{r['peer_sitk_gdcm_load_s']:.2f} s, ratio {ratio:.2f})")
            print(f"  {'stage':<18} {'wall':>6}   {'CPU':>6}")
            for stage, sec in r["stages_s"].items():
                print(f"  {stage:<18} {sec:6.2f} s {r['stages_cpu_s'][stage]:6.2f} s")
            print(f"  pipeline           {r['pipeline_s']:6.2f} s {r['pipeline_cpu_s']:6.2f} s")
            print(f"  load + pipeline    {r['total_s']:6.2f} s")
            print(f"  peak RSS           {r['peak_rss_mb']:6.0f} MB")
            print(f"  (1-min load average at the end: {r['load_average_1min']}: wall times on a "
                  "shared machine include waiting for the CPU)")


if __name__ == "__main__":
    main()
