"""Benchmark: scorer training throughput and candidate-scoring time on CPU.

Measures, on the real LIDC-IDRI-0001 CT:

1. Training throughput (patches/s) of the shipped scorer architecture —
   augmentation + forward + backward + AdamW step, batch 32, 32^3 patches —
   with 1 and 2 torch threads.
2. Scoring 300 candidates with the shipped bundle (``CandidateScorer``):
   patch extraction and network time separately.
3. A peer for patch extraction, measured in the same run: resampling the
   whole volume to the patch spacing with SimpleITK and slicing the patches
   out of it (what the scorer avoids).

Usage::

    .venv/bin/python bench/train_throughput.py [--ct DIR] [--threads 1 2]

Prints a markdown table for ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk  # noqa: N813
import torch

from cad_node.models import load_bundle
from cad_node.models.network import build_network
from cad_node.models.patches import extract_patches
from cad_node.models.scorer import CandidateScorer
from trainer.config import AugmentConfig
from trainer.data import load_ct, lung_mask_of
from trainer.loop import augmenter as _augmenter

REPO = Path(__file__).resolve().parent.parent
N_CANDIDATES = 300


def _default_ct() -> Path:
    root = Path(os.environ.get("CAD_NODE_TEST_DATA", REPO.parent / "shared" / "data"))
    return root / "lidc-idri-0001"


def _lung_points(image: sitk.Image, lung: np.ndarray, n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    idx = np.argwhere(lung)
    pick = idx[rng.choice(idx.shape[0], size=n, replace=False)][:, ::-1].astype(float)
    return np.array([image.TransformContinuousIndexToPhysicalPoint(p) for p in pick])


def bench_training(patches: np.ndarray, arch: dict, threads: int, steps: int = 12) -> float:
    """Patches/s of augmentation + forward + backward + optimiser step."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build_network(arch)
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    aug = _augmenter(AugmentConfig(), 0)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    bs = 32
    y = torch.from_numpy((np.arange(bs) % 3 == 0).astype(np.float32))
    x_all = torch.from_numpy(patches[:, None])

    def step(i: int) -> None:
        sel = torch.arange(i * bs, (i + 1) * bs) % x_all.shape[0]
        xb = aug(x_all[sel])
        opt.zero_grad(set_to_none=True)
        loss_fn(net(xb), y).backward()
        opt.step()

    step(0)  # warm-up (oneDNN primitive creation)
    t = time.perf_counter()
    for i in range(1, steps + 1):
        step(i)
    return steps * bs / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=Path, default=_default_ct())
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    load0 = os.getloadavg()[0]
    image = load_ct(args.ct)
    lung = lung_mask_of(image)
    bundle = load_bundle("ct-nodule-scorer")
    spec = bundle.manifest.input
    try:
        from cad_node.pipelines.ct_chest.candidates import generate_candidates

        cands = generate_candidates(image, lung)
        centers = np.array([c.center_mm for c in cands], dtype=float)
        source = "generate_candidates"
    except ImportError:
        centers = np.zeros((0, 3))
        source = "random lung points"
    if centers.shape[0] < N_CANDIDATES:
        extra = _lung_points(image, lung, N_CANDIDATES - centers.shape[0], 1)
        centers = np.concatenate([centers, extra]) if centers.size else extra
        source += " + random lung points"
    centers = centers[:N_CANDIDATES]

    rows: list[tuple[str, str]] = []
    patches = extract_patches(
        image, _lung_points(image, lung, 256, 2), spec.patch_size, spec.spacing_mm,
        hu_window=spec.hu_window,
    )
    for th in args.threads:
        rate = max(bench_training(patches, bundle.manifest.architecture, th)
                   for _ in range(args.repeat))
        rows.append((f"training throughput, {th} thread(s)", f"{rate:.0f} patches/s"))

    for th in args.threads:
        torch.set_num_threads(th)
        scorer = CandidateScorer(bundle, device="cpu")
        scorer.score(image, centers[:8])  # warm-up
        ext, tot = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            x = scorer.patches(image, centers)
            ext.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            scorer.score(image, centers)
            tot.append(time.perf_counter() - t0)
        rows.append((f"score {N_CANDIDATES} candidates, {th} thread(s), total",
                     f"{min(tot):.2f} s"))
        rows.append((f"  of which patch extraction ({x.shape[0]} patches)", f"{min(ext):.2f} s"))

    # Peer: resample the whole volume to the patch spacing, then slice patches.
    t0 = time.perf_counter()
    size = [round(sz * sp / ns) for sz, sp, ns in
            zip(image.GetSize(), image.GetSpacing(), spec.spacing_mm, strict=True)]
    res = sitk.Resample(image, size, sitk.Transform(), sitk.sitkLinear, image.GetOrigin(),
                        spec.spacing_mm, image.GetDirection(), -1024.0, sitk.sitkFloat32)
    arr = sitk.GetArrayViewFromImage(res)
    d, h, w = spec.patch_size
    for c in centers:
        k, j, i = np.rint(res.TransformPhysicalPointToContinuousIndex(c.tolist())[::-1]).astype(int)
        _ = np.array(arr[max(k - d // 2, 0):k + d // 2, max(j - h // 2, 0):j + h // 2,
                         max(i - w // 2, 0):i + w // 2])
    peer = time.perf_counter() - t0
    rows.append(("peer: SimpleITK whole-volume resample + slicing", f"{peer:.2f} s"))
    rows.append(("ratio peer / direct patch sampling", f"{peer / min(ext):.1f}x"))

    print(f"Bundle {bundle.name} {bundle.version}, {bundle.manifest.architecture['channels']} "
          f"channels, patch {tuple(spec.patch_size)} @ {tuple(spec.spacing_mm)} mm; "
          f"candidates: {source}; CPU: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; torch {torch.__version__}; load average at start "
          f"{load0:.2f}, at end {os.getloadavg()[0]:.2f}")
    print()
    print("| measurement | value |")
    print("|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
