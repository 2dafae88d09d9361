"""Benchmark: ``cad-train prepare lidc`` on the real 133-slice LIDC-IDRI-0001 case.

Measures, in one run on this machine:

* the per-case time of :func:`trainer.prepare.prepare_lidc` (XML parse, per-reader
  masks, clustering, volume load, 1 mm resampling, compressed cache write);
* the same with ``--no-compress``;
* the wall time of the whole ``cad-train prepare lidc`` command (a fresh
  interpreter, including imports);
* a peer: SimpleITK's ``ImageSeriesReader`` reading the same 133 files (load
  only, no labels), to quote the prepare time as a ratio.

Usage: ``.venv/bin/python bench/prepare_lidc.py [--repeat 3]``
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def _data_root() -> Path:
    env = os.environ.get("CAD_NODE_TEST_DATA")
    return Path(env) if env else REPO.parent / "shared" / "data"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    import SimpleITK as sitk  # noqa: N813

    from trainer.prepare import prepare_lidc

    root = _data_root() / "lidc-idri-0001" / "LIDC-IDRI-0001"
    if not root.is_dir():
        print(f"missing {root}", file=sys.stderr)
        return 2
    series_dir = next(p.parent for p in root.rglob("069.xml"))
    files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(series_dir)))

    def peer() -> float:
        t = time.perf_counter()
        r = sitk.ImageSeriesReader()
        r.SetFileNames(files)
        r.Execute()
        return time.perf_counter() - t

    results: dict[str, list[float]] = {"peer": [], "compressed": [], "uncompressed": [],
                                       "cli": []}
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        for _ in range(args.repeat):
            results["peer"].append(peer())
            for key, compress in (("compressed", True), ("uncompressed", False)):
                out = Path(tmp) / key
                res = prepare_lidc(root, out, compress=compress, force=True, progress=False)
                assert res[0].status == "done", res
                results[key].append(res[0].seconds)
            t = time.perf_counter()
            subprocess.run([str(REPO / ".venv" / "bin" / "cad-train"), "prepare", "lidc",
                            str(root), str(Path(tmp) / "cli"), "--force"], check=True,
                           capture_output=True)
            results["cli"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"cpu count: {os.cpu_count()}, repeats: {args.repeat}")
    print(f"peer SimpleITK ImageSeriesReader (133 files): {med['peer']:.2f} s")
    for key in ("compressed", "uncompressed"):
        print(f"prepare lidc per case, {key}: {med[key]:.2f} s "
              f"({med[key] / med['peer']:.1f}x the peer load)")
    print(f"cad-train prepare lidc command wall time (fresh interpreter): {med['cli']:.2f} s")
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import trainer.cli"], check=True, cwd=REPO)
    print(f"  of which importing trainer.cli (all command modules): "
          f"{time.perf_counter() - t:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
