"""``cad-train train MODEL CONFIG``: train the models the node ships.

First model: ``ct-nodule-scorer``, the CT nodule-candidate scorer
(false-positive reduction) of the ``ct-chest`` pipeline.

Training data (no large annotated set can be downloaded here)
--------------------------------------------------------------
* **Background**: one or more real chest CTs (the config's ``data.ct``; the
  shipped bundle uses LIDC-IDRI-0001).  Lungs come from the node's own
  :func:`cad_node.pipelines.ct_chest.lungs.segment_lungs`.
* **Positives**: synthetic nodules (:mod:`trainer.insertion`) inserted into
  the training slab (``data.train_z_mm``), patches centred on them with a
  small random offset, plus the real candidate-generator detections that hit
  them (centre within the radius).
* **Negatives**: the candidates the node's own generator
  (:func:`cad_node.pipelines.ct_chest.candidates.generate_candidates`)
  returns on the same volumes — vessels, bifurcations, pleura, diaphragm —
  plus local maxima of dense in-lung structures, excluding anything near an
  inserted nodule.
* **Exclusions**: ``data.exclusions`` (the real LIDC-IDRI-0001 nodule) are
  kept out of positives and negatives, so finding it later is honest
  generalisation.
* **Held-out set**: different seeds, a separate slab (``data.heldout_z_mm``),
  evaluated end to end (candidate generator + scorer) with the LUNA16 FROC.

Training
--------
Deterministic seeds (torch, numpy, :func:`monai.utils.set_determinism`),
checkpoints every epoch (``last.pt``) and ``--resume``, mixed precision on CUDA
only, MONAI augmentations (flips, 90-degree rotations, intensity jitter) and
DDP when launched by ``torchrun`` (``WORLD_SIZE > 1``: ``gloo`` on CPU,
``nccl`` on GPU; rank 0 builds the data cache and writes checkpoints).

Usage::

    cad-train train ct-nodule-scorer trainer/configs/ct-nodule-scorer.yaml --out runs/scorer
    cad-train train ct-nodule-scorer CONFIG --out runs/scorer --resume     # after an interruption
    cad-train train ct-nodule-scorer CONFIG --out runs/scorer --evaluate-only
    torchrun --nproc-per-node=4 "$(which cad-train)" train ct-nodule-scorer CONFIG --out runs/ddp
    cad-train export runs/scorer/final.pt --models-dir models

Each DDP process sees a disjoint shard of every epoch's permutation; the
per-process batch size is ``optim.batch_size`` (the effective batch is
``world_size`` times larger).  The tests exercise this path with two CPU
processes and ``gloo``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813
import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from scipy import ndimage

from cad_node.models.patches import extract_patches_array, normalize_hu
from trainer.insertion import (
    ExclusionZone,
    InsertedNodule,
    LungBackground,
    insert_nodules,
)

if TYPE_CHECKING:  # pragma: no cover - torch is imported lazily (fast CLI start-up)
    import torch

__all__ = [
    "MODELS",
    "TrainConfig",
    "load_train_config",
    "prepare_data",
    "register",
    "train",
]

_console = Console(stderr=True)

#: Models ``cad-train train`` knows how to train.
MODELS = ("ct-nodule-scorer",)
#: Smoothed HU above which an in-lung voxel counts as a dense structure (vessel).
DENSE_HU = -550.0
#: LUNA16 evaluation cap on candidates per scan.
MAX_CANDIDATES_PER_SCAN = 100


# --------------------------------------------------------------------------- config


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExclusionConfig(_Strict):
    """A sphere kept out of training (e.g. a real nodule)."""

    center_mm: tuple[float, float, float]
    radius_mm: float = Field(gt=0)
    note: str = ""


class DataConfig(_Strict):
    """Where the backgrounds come from and how many insertions to make."""

    #: CT series directories; relative paths are looked up under
    #: ``CAD_NODE_TEST_DATA`` (default ``../shared/data``) and the config's folder.
    ct: list[str] = Field(min_length=1)
    exclusions: list[ExclusionConfig] = Field(default_factory=list)
    train_z_mm: tuple[float, float]
    heldout_z_mm: tuple[float, float]
    diameter_range_mm: tuple[float, float] = (4.0, 30.0)
    train_rounds: int = Field(8, ge=1)
    nodules_per_round: int = Field(20, ge=1)
    positive_copies: int = Field(2, ge=1)
    positive_jitter_mm: float = Field(2.0, ge=0)
    negatives_per_round: int = Field(150, ge=1)
    heldout_rounds: int = Field(4, ge=1)
    heldout_nodules_per_round: int = Field(8, ge=1)
    #: Margin (mm) beyond a nodule's radius inside which no negative is taken.
    negative_margin_mm: float = Field(4.0, ge=0)
    #: Optional real annotated data: the OUT folder of ``cad-train prepare lidc``.
    #: Its LUNA16 consensus nodules become positives, the node's candidates and
    #: dense structures of the same scans negatives (irrelevant findings are
    #: neither).  Relative paths are resolved like ``ct``.
    lidc_prepared: str | None = None
    #: Case names to use from ``lidc_prepared`` (default: every prepared case).
    lidc_cases: list[str] | None = None
    #: Jittered copies of each real nodule.
    lidc_positive_copies: int = Field(4, ge=1)
    #: Negatives per real scan.
    lidc_negatives_per_case: int = Field(150, ge=1)


class InputConfig(_Strict):
    """Patch geometry (copied into the bundle's input spec)."""

    spacing_mm: tuple[float, float, float] = (1.25, 1.25, 1.25)
    patch_size: tuple[int, int, int] = (32, 32, 32)
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    batch_size: int = 64


class AugmentConfig(_Strict):
    """MONAI augmentation probabilities and ranges."""

    flip_prob: float = Field(0.5, ge=0, le=1)
    rot90_prob: float = Field(0.5, ge=0, le=1)
    intensity_shift: float = Field(0.03, ge=0)
    intensity_scale: float = Field(0.05, ge=0)
    intensity_prob: float = Field(0.5, ge=0, le=1)


class OptimConfig(_Strict):
    """Optimisation settings."""

    epochs: int = Field(10, ge=1)
    batch_size: int = Field(32, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    #: torch intra-op threads on CPU (0 = leave torch's default).
    threads: int = Field(2, ge=0)
    amp: bool = True
    augment: AugmentConfig = AugmentConfig()


class BundleConfig(_Strict):
    """Identity of the bundle this training produces."""

    name: str
    version: str
    task: str = "ct-nodule-candidate-scoring"
    threshold: float = Field(0.5, ge=0, le=1)


def _default_architecture() -> dict[str, Any]:
    from cad_node.models.network import DEFAULT_ARCHITECTURE

    return dict(DEFAULT_ARCHITECTURE)


class TrainConfig(_Strict):
    """A training configuration (``trainer/configs/*.yaml``)."""

    model: str
    seed: int = 20240601
    bundle: BundleConfig
    data: DataConfig
    input: InputConfig = InputConfig()
    architecture: dict[str, Any] = Field(default_factory=lambda: _default_architecture())
    optim: OptimConfig = OptimConfig()


def load_train_config(path: Path) -> TrainConfig:
    """Read and validate a YAML training config.

    Raises
    ------
    ValueError
        Missing file, invalid YAML or invalid keys; the message names the file.
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{path}: cannot read config: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    try:
        cfg = TrainConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(f"{path}: invalid training config: {problems}") from None
    if cfg.model not in MODELS:
        raise ValueError(f"{path}: unknown model {cfg.model!r} (known: {', '.join(MODELS)})")
    return cfg


def resolve_ct_dir(entry: str, config_dir: Path | None = None) -> Path:
    """Resolve a ``data.ct`` entry to an existing directory.

    Raises
    ------
    FileNotFoundError
        Not found; the message lists the places looked at.
    """
    p = Path(entry)
    tried: list[Path] = []
    candidates = [p] if p.is_absolute() else []
    if not p.is_absolute():
        env = os.environ.get("CAD_NODE_TEST_DATA")
        repo = Path(__file__).resolve().parent.parent
        roots = [Path(env)] if env else []
        roots += [repo.parent / "shared" / "data", Path.cwd()]
        if config_dir is not None:
            roots.append(config_dir)
        candidates = [r / p for r in roots]
    for c in candidates:
        tried.append(c)
        if c.is_dir():
            return c
    raise FileNotFoundError(f"CT directory {entry!r} not found (looked in {tried})")


# --------------------------------------------------------------------------- data


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=_console,
        transient=False,
    )


def load_ct(directory: Path) -> sitk.Image:
    """Load a CT series directory as a HU image.

    Uses the node's own loader (:func:`cad_node.imaging.load_series`) so
    training sees exactly what inference sees.
    """
    from cad_node.imaging import load_series

    files = sorted(
        f for f in directory.rglob("*") if f.is_file() and f.suffix.lower() in {".dcm", ""}
    )
    if not files:
        raise FileNotFoundError(f"{directory}: no DICOM files")
    return load_series(files).image


def lung_mask_of(image: sitk.Image) -> npt.NDArray[np.bool_]:
    """The node's lung segmentation (left | right), source grid ``(z, y, x)``."""
    from cad_node.pipelines.ct_chest.lungs import segment_lungs

    seg = segment_lungs(image)
    return np.asarray(seg.left | seg.right, dtype=bool)


def _generator() -> Callable[[sitk.Image, npt.NDArray[np.bool_]], npt.NDArray[np.float64]] | None:
    """The node's candidate generator, when that module is installed."""
    try:
        from cad_node.pipelines.ct_chest.candidates import generate_candidates
    except ImportError:
        return None

    def run(image: sitk.Image, lung: npt.NDArray[np.bool_]) -> npt.NDArray[np.float64]:
        cands = generate_candidates(image, lung)
        if not cands:
            return np.zeros((0, 3))
        return np.asarray([c.center_mm for c in cands], dtype=np.float64)

    return run


def dense_structure_points(
    bg: LungBackground,
    hu: npt.NDArray[np.float32],
    max_points: int,
    rng: np.random.Generator,
    z_range_mm: Sequence[float] | None = None,
    spacing_mm: float = 5.0,
    min_pleura_mm: float = 0.0,
) -> npt.NDArray[np.float64]:
    """Random points on dense in-lung structures (vessels, bifurcations, fissures).

    Hard negatives that do not depend on any candidate generator: voxels of
    the lung mask whose smoothed HU exceeds :data:`DENSE_HU`, shuffled and
    thinned to at most one per ``spacing_mm`` cube.  With ``z_range_mm`` only
    slices whose centre lies in that range are used; ``min_pleura_mm`` > 0
    keeps only points that far inside the lung (vessels rather than pleura).
    """
    sx, sy, sz = bg.geometry.spacing
    ks = np.arange(hu.shape[0])
    if z_range_mm is not None:
        z = bg.z_of_slices()
        ks = ks[(z >= z_range_mm[0]) & (z <= z_range_mm[1])]
        if ks.size == 0:
            return np.zeros((0, 3))
    k0, k1 = int(ks.min()), int(ks.max()) + 1
    m0, m1 = max(k0 - 4, 0), min(k1 + 4, hu.shape[0])
    sm = ndimage.gaussian_filter(hu[m0:m1], (1.0 / sz, 1.0 / sy, 1.0 / sx))
    dense = (sm > DENSE_HU) & bg.lung[m0:m1]
    if min_pleura_mm > 0:
        dense &= bg.dist_to_pleura_mm[m0:m1] > min_pleura_mm
    dense[: k0 - m0] = False
    dense[k1 - m0 :] = False
    idx = np.argwhere(dense)
    if idx.shape[0] == 0:
        return np.zeros((0, 3))
    idx[:, 0] += m0
    idx = idx[rng.permutation(idx.shape[0])]
    pts = bg.geometry.index_to_physical(idx[:, ::-1].astype(np.float64))
    cells = np.floor(pts / spacing_mm).astype(np.int64)
    _, first = np.unique(cells, axis=0, return_index=True)
    pts = pts[np.sort(first)]
    return pts[:max_points]


def _in_z(points: npt.NDArray[np.float64], z_range: Sequence[float]) -> npt.NDArray[np.bool_]:
    return (points[:, 2] >= z_range[0]) & (points[:, 2] <= z_range[1])


def _dist_to(
    points: npt.NDArray[np.float64], centers: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    if centers.size == 0 or points.size == 0:
        return np.full((points.shape[0], max(centers.shape[0], 1)), np.inf)
    return np.linalg.norm(points[:, None, :] - centers[None, :, :], axis=2)


@dataclass(frozen=True)
class RealNodule:
    """A reference nodule of a real annotated scan (LUNA16 consensus)."""

    center_mm: tuple[float, float, float]
    diameter_mm: float


def label_points(
    points: npt.NDArray[np.float64],
    nodules: Sequence[InsertedNodule | RealNodule],
    exclusions: Sequence[ExclusionZone],
    margin_mm: float,
    exclusion_margin_mm: float | None = None,
) -> npt.NDArray[np.int8]:
    """Label candidate points: 1 hit (centre strictly within a radius), 0 clear, -1 drop.

    Points within ``margin_mm`` beyond a nodule's radius are ambiguous and
    dropped (-1); so are points within ``exclusion_margin_mm`` (default
    ``margin_mm``) beyond an exclusion zone's radius — use the patch
    half-extent there so an excluded nodule never appears in a patch.
    """
    ex_margin = margin_mm if exclusion_margin_mm is None else exclusion_margin_mm
    labels = np.zeros(points.shape[0], dtype=np.int8)
    if nodules:
        centers = np.asarray([n.center_mm for n in nodules])
        radii = np.asarray([n.diameter_mm / 2 for n in nodules])
        d = _dist_to(points, centers)
        hit = (d < radii[None, :]).any(axis=1)
        near = (d < radii[None, :] + margin_mm).any(axis=1)
        labels[near & ~hit] = -1
        labels[hit] = 1
    for zone in exclusions:
        dz = np.linalg.norm(points - np.asarray(zone.center_mm), axis=1)
        labels[dz < zone.radius_mm + ex_margin] = -1
    return labels


def _jittered(
    centers: npt.NDArray[np.float64], radii: npt.NDArray[np.float64], max_mm: float,
    rng: np.random.Generator,
) -> npt.NDArray[np.float64]:
    lim = np.minimum(max_mm, 0.3 * radii)[:, None]
    v = rng.standard_normal(centers.shape)
    v /= np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-9)
    return centers + v * lim * rng.uniform(0, 1, size=(centers.shape[0], 1)) ** (1 / 3)


@dataclass
class PatchSet:
    """Training patches (normalised, float16) with labels and provenance counts."""

    x: npt.NDArray[np.float16]
    y: npt.NDArray[np.float32]
    counts: dict[str, Any]


def _half_extent_mm(spec: InputConfig) -> float:
    """Largest half-extent of a patch (mm)."""
    return float(max(n * s for n, s in zip(spec.patch_size, spec.spacing_mm, strict=True)) / 2)


def _exclusions(cfg: TrainConfig) -> list[ExclusionZone]:
    return [ExclusionZone(e.center_mm, e.radius_mm) for e in cfg.data.exclusions]


def prepare_data(
    cfg: TrainConfig,
    bg: LungBackground,
    progress: Progress | None = None,
    config_dir: Path | None = None,
) -> PatchSet:
    """Insert nodules round by round and cut labelled training patches.

    With ``data.lidc_prepared`` the real annotated scans are added too.
    """
    rng = np.random.default_rng(cfg.seed)
    gen = _generator()
    excl = _exclusions(cfg)
    d = cfg.data
    spec = cfg.input
    xs: list[npt.NDArray[np.float16]] = []
    ys: list[npt.NDArray[np.float32]] = []
    counts: dict[str, Any] = {
        "rounds": d.train_rounds,
        "inserted_nodules": 0,
        "positive_patches": 0,
        "negative_patches": 0,
        "negative_sources": {"candidate_generator": 0, "dense_structures": 0},
        "kinds": {},
        "placements": {},
        "candidate_generator": "cad_node.pipelines.ct_chest.candidates" if gen else "none",
    }
    task = progress.add_task("insert + cut patches", total=d.train_rounds) if progress else None
    for _ in range(d.train_rounds):
        hu, truth = insert_nodules(
            bg,
            d.nodules_per_round,
            rng,
            diameter_range_mm=d.diameter_range_mm,
            z_range_mm=d.train_z_mm,
            # No inserted nodule's patch may show an excluded (real) nodule.
            exclusions=[
                ExclusionZone(z.center_mm, z.radius_mm + _half_extent_mm(spec)) for z in excl
            ],
        )
        counts["inserted_nodules"] += len(truth)
        for n in truth:
            counts["kinds"][n.kind.value] = counts["kinds"].get(n.kind.value, 0) + 1
            counts["placements"][n.placement.value] = (
                counts["placements"].get(n.placement.value, 0) + 1
            )
        centers = np.asarray([n.center_mm for n in truth], dtype=np.float64).reshape(-1, 3)
        radii = np.asarray([n.diameter_mm / 2 for n in truth], dtype=np.float64)
        pos = [
            _jittered(centers, radii, d.positive_jitter_mm, rng) for _ in range(d.positive_copies)
        ]
        neg_sources: list[tuple[str, npt.NDArray[np.float64]]] = []
        if gen is not None:
            cand = gen(bg.to_image(hu), bg.lung)
            cand = cand[_in_z(cand, d.train_z_mm)]
            lab = label_points(cand, truth, excl, d.negative_margin_mm, _half_extent_mm(spec))
            pos.append(cand[lab == 1])
            neg_sources.append(("candidate_generator", cand[lab == 0]))
        dense = dense_structure_points(bg, hu, 2 * d.negatives_per_round, rng, d.train_z_mm)
        lab = label_points(dense, truth, excl, d.negative_margin_mm, _half_extent_mm(spec))
        neg_sources.append(("dense_structures", dense[lab == 0]))
        # Cap negatives per round: generator candidates take at most half (they
        # repeat from round to round on one background), dense points fill up.
        negs: list[npt.NDArray[np.float64]] = []
        budget = d.negatives_per_round
        for name, pts in neg_sources:
            if budget <= 0:
                break
            cap = budget // 2 if name == "candidate_generator" else budget
            if pts.shape[0] > cap:
                pts = pts[rng.choice(pts.shape[0], size=cap, replace=False)]
            counts["negative_sources"][name] += int(pts.shape[0])
            negs.append(pts)
            budget -= pts.shape[0]
        pos_pts = np.concatenate(pos) if pos else np.zeros((0, 3))
        neg_pts = np.concatenate(negs) if negs else np.zeros((0, 3))
        pts = np.concatenate([pos_pts, neg_pts])
        patches = extract_patches_array(
            hu, bg.geometry, pts, spec.patch_size, spec.spacing_mm
        )
        xs.append(normalize_hu(patches, spec.hu_window).astype(np.float16))
        ys.append(
            np.concatenate([np.ones(len(pos_pts)), np.zeros(len(neg_pts))]).astype(np.float32)
        )
        counts["positive_patches"] += len(pos_pts)
        counts["negative_patches"] += len(neg_pts)
        if progress is not None and task is not None:
            progress.advance(task)
    if d.lidc_prepared is not None:
        lx, ly, lcounts = _lidc_patches(cfg, rng, config_dir, progress)
        xs += lx
        ys += ly
        counts["lidc"] = lcounts
    return PatchSet(x=np.concatenate(xs), y=np.concatenate(ys), counts=counts)


def _lidc_patches(
    cfg: TrainConfig,
    rng: np.random.Generator,
    config_dir: Path | None,
    progress: Progress | None,
) -> tuple[list[npt.NDArray[np.float16]], list[npt.NDArray[np.float32]], dict[str, Any]]:
    """Labelled patches from scans prepared by ``cad-train prepare lidc``."""
    import csv

    from trainer.prepare import load_lidc_case

    d = cfg.data
    spec = cfg.input
    assert d.lidc_prepared is not None
    root = resolve_ct_dir(d.lidc_prepared, config_dir)
    index = root / "index.csv"
    if not index.is_file():
        raise FileNotFoundError(f"{index}: not a 'cad-train prepare lidc' output folder")
    with index.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows or "case_id" not in rows[0]:
        raise ValueError(f"{index}: no case_id column / no cases")
    cases = d.lidc_cases or [r["case_id"] for r in rows]
    gen = _generator()
    xs: list[npt.NDArray[np.float16]] = []
    ys: list[npt.NDArray[np.float32]] = []
    counts: dict[str, Any] = {
        "folder": d.lidc_prepared,
        "cases": 0,
        "nodules": 0,
        "positive_patches": 0,
        "negative_patches": 0,
    }
    task = progress.add_task("real LIDC cases", total=len(cases)) if progress else None
    for case_id in cases:
        case = load_lidc_case(root, case_id)
        with np.load(root / "cases" / f"{case_id}.npz") as npz:
            direction = (
                tuple(float(v) for v in npz["direction"])
                if "direction" in npz.files
                else (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
            )
        image = sitk.GetImageFromArray(case.volume_hu)
        image.SetSpacing(tuple(float(v) for v in case.spacing_zyx[::-1]))
        image.SetOrigin(case.origin_xyz)
        image.SetDirection(direction)
        bg = LungBackground.from_image(image, lung_mask_of(image))
        nodules = [
            RealNodule(tuple(float(v) for v in n["center_mm"]), float(n["diameter_mm"]))
            for n in case.nodules
        ]
        irrelevant = [
            ExclusionZone(
                tuple(float(v) for v in f["center_mm"]),
                max(float(f.get("diameter_mm") or 0.0) / 2, 5.0),
            )
            for f in case.irrelevant
            if f.get("center_mm") is not None
        ]
        centers = np.asarray([n.center_mm for n in nodules], dtype=np.float64).reshape(-1, 3)
        radii = np.asarray([n.diameter_mm / 2 for n in nodules], dtype=np.float64)
        pos = [
            _jittered(centers, radii, d.positive_jitter_mm, rng)
            for _ in range(d.lidc_positive_copies)
        ]
        negs: list[npt.NDArray[np.float64]] = []
        if gen is not None:
            cand = gen(image, bg.lung)
            lab = label_points(cand, nodules, irrelevant, d.negative_margin_mm)
            pos.append(cand[lab == 1])
            negs.append(cand[lab == 0][: d.lidc_negatives_per_case // 2])
        dense = dense_structure_points(bg, bg.hu, 2 * d.lidc_negatives_per_case, rng)
        dense = dense[label_points(dense, nodules, irrelevant, d.negative_margin_mm) == 0]
        room = d.lidc_negatives_per_case - sum(len(n) for n in negs)
        negs.append(dense[: max(room, 0)])
        pos_pts = np.concatenate(pos)
        neg_pts = np.concatenate(negs)
        pts = np.concatenate([pos_pts, neg_pts])
        patches = extract_patches_array(bg.hu, bg.geometry, pts, spec.patch_size, spec.spacing_mm)
        xs.append(normalize_hu(patches, spec.hu_window).astype(np.float16))
        ys.append(
            np.concatenate([np.ones(len(pos_pts)), np.zeros(len(neg_pts))]).astype(np.float32)
        )
        counts["cases"] += 1
        counts["nodules"] += len(nodules)
        counts["positive_patches"] += len(pos_pts)
        counts["negative_patches"] += len(neg_pts)
        if progress is not None and task is not None:
            progress.advance(task)
    return xs, ys, counts


# --------------------------------------------------------------------------- training


@contextmanager
def _distributed() -> Iterator[tuple[int, int]]:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield 0, 1
        return
    import torch
    import torch.distributed as dist

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend=backend)
    try:
        yield dist.get_rank(), dist.get_world_size()
    finally:
        dist.destroy_process_group()


def _augmenter(cfg: AugmentConfig, seed: int) -> Callable[[torch.Tensor], torch.Tensor]:
    import torch
    from monai.transforms import (
        Compose,
        RandAxisFlip,
        RandRotate90,
        RandScaleIntensity,
        RandShiftIntensity,
    )

    tf = Compose(
        [
            RandAxisFlip(prob=cfg.flip_prob),
            RandRotate90(prob=cfg.rot90_prob, max_k=3, spatial_axes=(1, 2)),
            RandScaleIntensity(factors=cfg.intensity_scale, prob=cfg.intensity_prob),
            RandShiftIntensity(offsets=cfg.intensity_shift, prob=cfg.intensity_prob),
        ]
    )
    tf.set_random_state(seed=seed)

    def apply(batch: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.as_tensor(tf(sample)) for sample in batch])

    return apply


def _auc(scores: npt.NDArray[np.floating], labels: npt.NDArray[np.floating]) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula, ties counted half."""
    pos = scores[labels > 0.5]
    neg = scores[labels <= 0.5]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


def _bundle_meta(cfg: TrainConfig) -> dict[str, Any]:
    return {
        "name": cfg.bundle.name,
        "version": cfg.bundle.version,
        "task": cfg.bundle.task,
        "architecture": dict(cfg.architecture),
        "input": cfg.input.model_dump(mode="json"),
        "output": {"kind": "logit", "positive_class": "nodule", "threshold": cfg.bundle.threshold},
    }


def _seed_all(seed: int) -> None:
    import torch
    from monai.utils import set_determinism

    set_determinism(seed=seed)
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def train(
    cfg: TrainConfig,
    out_dir: Path,
    *,
    resume: bool = False,
    device: str = "auto",
    config_dir: Path | None = None,
    evaluate_heldout: bool = True,
    stop_after_epochs: int | None = None,
) -> Path:
    """Train the CT nodule-candidate scorer; return the final checkpoint path.

    Writes ``out_dir/data.npz`` (patch cache), ``last.pt`` every epoch,
    ``final.pt``, ``metrics.json`` and ``MODEL_CARD.md`` (with the held-out
    evaluation when ``evaluate_heldout``).

    ``stop_after_epochs`` stops this invocation after that many epochs
    (a time-boxed run, or a simulated interruption) and returns ``last.pt``;
    ``resume=True`` later continues exactly where it stopped: data order,
    augmentation and dropout are seeded per epoch, and the optimiser,
    scheduler and torch RNG states are restored, so an interrupted and
    resumed run ends with the same weights as an uninterrupted one.
    """
    import torch

    from cad_node.models.network import build_network, count_parameters

    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.optim.threads > 0:
        torch.set_num_threads(cfg.optim.threads)
    _seed_all(cfg.seed)
    dev = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    )
    t_start = time.perf_counter()
    with _distributed() as (rank, world), _progress() as progress:
        is_main = rank == 0
        if world > 1 and dev.type == "cuda":
            dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}")
        cache = out_dir / "data.npz"
        counts_file = out_dir / "data_counts.json"
        bg: LungBackground | None = None
        if is_main and not (cache.is_file() and counts_file.is_file()):
            bg = _background(cfg, config_dir, progress)
            data = prepare_data(cfg, bg, progress, config_dir)
            np.savez(cache, x=data.x, y=data.y)
            counts_file.write_text(json.dumps(data.counts, indent=2), encoding="utf-8")
        if world > 1:
            torch.distributed.barrier()
        with np.load(cache) as npz:
            x_all, y_all = npz["x"], npz["y"]
        counts = json.loads(counts_file.read_text(encoding="utf-8"))

        net = build_network(cfg.architecture).to(dev)
        model: torch.nn.Module = net
        if world > 1:
            model = torch.nn.parallel.DistributedDataParallel(
                net, device_ids=[dev.index] if dev.type == "cuda" else None
            )
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr,
                                weight_decay=cfg.optim.weight_decay)
        n = x_all.shape[0]
        steps_per_epoch = max(1, math.ceil(n / world / cfg.optim.batch_size))
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg.optim.lr, total_steps=cfg.optim.epochs * steps_per_epoch
        )
        use_amp = cfg.optim.amp and dev.type == "cuda"
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
        n_pos = float(y_all.sum())
        pos_weight = torch.tensor((n - n_pos) / max(n_pos, 1.0), device=dev)
        loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight)
        start_epoch = 0
        history: list[dict[str, float]] = []
        last = out_dir / "last.pt"
        if resume and last.is_file():
            ck = torch.load(last, map_location="cpu", weights_only=False)
            net.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            start_epoch = int(ck["epoch"]) + 1
            history = list(ck["history"])
            torch.set_rng_state(ck["torch_rng"])
            _console.print(f"resumed from {last} at epoch {start_epoch}")
        ep_task = progress.add_task("epochs", total=cfg.optim.epochs, completed=start_epoch)
        seen = 0
        t_train = time.perf_counter()
        end_epoch = cfg.optim.epochs
        if stop_after_epochs is not None:
            end_epoch = min(end_epoch, start_epoch + stop_after_epochs)
        for epoch in range(start_epoch, end_epoch):
            augment = _augmenter(cfg.optim.augment, cfg.seed + 7919 * rank + 104729 * epoch)
            g = np.random.default_rng(cfg.seed + 1000 * epoch)
            order = g.permutation(n)[rank::world]
            model.train()
            total, batches = 0.0, 0
            b_task = progress.add_task(f"epoch {epoch + 1}", total=steps_per_epoch)
            for b in range(steps_per_epoch):
                idx = np.sort(order[b * cfg.optim.batch_size : (b + 1) * cfg.optim.batch_size])
                if idx.size < 2:
                    progress.advance(b_task)
                    continue
                xb = augment(torch.from_numpy(x_all[idx].astype(np.float32))[:, None]).to(dev)
                yb = torch.from_numpy(y_all[idx]).to(dev)
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device_type=dev.type, enabled=use_amp):
                    loss = loss_fn(model(xb).float(), yb)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                sched.step()
                total += float(loss.detach())
                batches += 1
                seen += int(idx.size)
                progress.advance(b_task)
            progress.remove_task(b_task)
            history.append({"epoch": epoch + 1, "loss": total / max(batches, 1)})
            if is_main:
                torch.save(
                    {
                        "model": net.state_dict(),
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "epoch": epoch,
                        "history": history,
                        "torch_rng": torch.get_rng_state(),
                        "config": cfg.model_dump(mode="json"),
                    },
                    out_dir / "last.tmp",
                )
                (out_dir / "last.tmp").replace(last)
            progress.advance(ep_task)
        train_s = time.perf_counter() - t_train
        if world > 1:
            torch.distributed.barrier()
        if end_epoch < cfg.optim.epochs:
            return last
        if not is_main:
            return out_dir / "final.pt"

        net.eval()
        metrics: dict[str, Any] = {
            "final_training_loss": history[-1]["loss"] if history else None,
            "training_patches_per_s": seen / train_s if train_s > 0 and seen else None,
        }
        if evaluate_heldout:
            if bg is None:
                bg = _background(cfg, config_dir, progress)
            metrics.update(evaluate_heldout_set(cfg, bg, net, dev, progress))
        training_data = _training_data(cfg, counts, x_all.shape[0])
        provenance = {
            "trainer": "cad-train train",
            "config": cfg.model_dump(mode="json"),
            "seed": cfg.seed,
            "parameters": count_parameters(net),
            "device": str(dev),
            "world_size": world,
            "wall_time_s": round(time.perf_counter() - t_start, 1),
            "torch": torch.__version__,
        }
        metrics = _plain(metrics)
        training_data = _plain(training_data)
        provenance = _plain(provenance)
        final = out_dir / "final.pt"
        # Plain Python types only, so export can load it with weights_only=True.
        torch.save(
            {
                "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                "bundle": _plain(_bundle_meta(cfg)),
                "training_data": training_data,
                "metrics": metrics,
                "provenance": provenance,
                "history": _plain(history),
            },
            final,
        )
        (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2), encoding="utf-8")
        from trainer.export import render_model_card

        (out_dir / "MODEL_CARD.md").write_text(
            render_model_card(cfg, training_data, metrics, provenance), encoding="utf-8"
        )
        return final


def reevaluate(
    cfg: TrainConfig, out_dir: Path, *, device: str = "auto", config_dir: Path | None = None
) -> Path:
    """Re-run the held-out evaluation of a finished run (``final.pt``).

    The held-out set is regenerated from the config's seed (identical to the
    one of the run), the metrics in ``final.pt``, ``metrics.json`` and
    ``MODEL_CARD.md`` are replaced; the weights are not touched.
    """
    import torch

    from cad_node.models.network import build_network

    final = out_dir / "final.pt"
    if not final.is_file():
        raise FileNotFoundError(f"{final}: no finished run to evaluate")
    ck = torch.load(final, map_location="cpu", weights_only=True)
    if cfg.optim.threads > 0:
        torch.set_num_threads(cfg.optim.threads)
    dev = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    )
    net = build_network(ck["bundle"]["architecture"])
    net.load_state_dict(ck["model"])
    net.to(dev).eval()
    with _progress() as progress:
        bg = _background(cfg, config_dir, progress)
        heldout = evaluate_heldout_set(cfg, bg, net, dev, progress)
    metrics = {k: v for k, v in ck["metrics"].items() if k in {
        "final_training_loss", "training_patches_per_s"}}
    metrics.update(heldout)
    ck["metrics"] = _plain(metrics)
    torch.save(ck, out_dir / "final.tmp")
    (out_dir / "final.tmp").replace(final)
    (out_dir / "metrics.json").write_text(json.dumps(ck["metrics"], indent=2), encoding="utf-8")
    from trainer.export import render_model_card

    (out_dir / "MODEL_CARD.md").write_text(
        render_model_card(cfg, ck["training_data"], ck["metrics"], ck["provenance"]),
        encoding="utf-8",
    )
    return final


def _plain(value: Any) -> Any:
    """JSON round-trip: numpy scalars become floats/ints, tuples lists."""
    def default(o: Any) -> Any:
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.floating):
            return float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        raise TypeError(f"not JSON serialisable: {type(o).__name__}")

    return json.loads(json.dumps(value, default=default))


def _background(cfg: TrainConfig, config_dir: Path | None, progress: Progress) -> LungBackground:
    if len(cfg.data.ct) != 1:
        raise ValueError("this trainer version uses exactly one background CT (data.ct)")
    task = progress.add_task("load CT + lungs", total=3)
    image = load_ct(resolve_ct_dir(cfg.data.ct[0], config_dir))
    progress.advance(task)
    lung = lung_mask_of(image)
    progress.advance(task)
    bg = LungBackground.from_image(image, lung)
    progress.advance(task)
    return bg


def _training_data(cfg: TrainConfig, counts: dict[str, Any], n_patches: int) -> dict[str, Any]:
    return {
        "description": (
            "Real chest CT lung background(s) with synthetic nodules inserted "
            "(trainer.insertion: solid, part-solid, ground-glass; parenchymal, "
            "juxtapleural, juxtavascular; partial-volume blending, texture, scanner-level "
            "noise). Negatives: real candidates of the node's candidate generator and "
            "dense in-lung structures (vessels) of the same volumes."
        ),
        "background_ct": list(cfg.data.ct),
        "train_z_mm": list(cfg.data.train_z_mm),
        "heldout_z_mm": list(cfg.data.heldout_z_mm),
        "diameter_range_mm": list(cfg.data.diameter_range_mm),
        "excluded_regions": [e.model_dump(mode="json") for e in cfg.data.exclusions],
        "patches": n_patches,
        **counts,
    }


# --------------------------------------------------------------------------- evaluation


def score_points(
    net: torch.nn.Module,
    hu: npt.NDArray[np.float32],
    bg: LungBackground,
    points: npt.NDArray[np.float64],
    spec: InputConfig,
    dev: torch.device,
) -> npt.NDArray[np.float64]:
    """Probabilities of ``net`` at ``points`` of a HU array (same path as the scorer)."""
    import torch

    out = np.empty(points.shape[0], dtype=np.float64)
    with torch.inference_mode():
        for s in range(0, points.shape[0], spec.batch_size):
            p = extract_patches_array(
                hu, bg.geometry, points[s : s + spec.batch_size], spec.patch_size, spec.spacing_mm
            )
            x = torch.from_numpy(normalize_hu(p, spec.hu_window)[:, None]).to(dev)
            out[s : s + spec.batch_size] = torch.sigmoid(net(x).float()).cpu().numpy()
    return out


def evaluate_heldout_set(
    cfg: TrainConfig,
    bg: LungBackground,
    net: torch.nn.Module,
    dev: torch.device,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Evaluate on held-out insertions (other seeds, other slab).

    * ``patch_auc``: AUC of the scorer between patches centred on the inserted
      nodules and the candidate generator's negatives in the slab;
      ``patch_auc_vs_vessels``: the same against local maxima of dense in-lung
      structures (vessels) of the slab.
    * ``froc``: LUNA16 FROC/CPM (``trainer.froc``) of the end-to-end
      detector (candidate generator + scorer, at most 100 candidates per scan)
      with one "scan" per held-out volume, restricted to the held-out slab.
    * ``real_nodule_probability``: the score at each excluded real nodule's
      centre (never seen in training).
    """
    d = cfg.data
    rng = np.random.default_rng(cfg.seed + 104729)
    gen = _generator()
    excl = _exclusions(cfg)
    task = progress.add_task("held-out evaluation", total=d.heldout_rounds) if progress else None
    all_scores: list[npt.NDArray[np.float64]] = []
    all_labels: list[npt.NDArray[np.float64]] = []
    scans: list[dict[str, Any]] = []
    vessel_scores: list[npt.NDArray[np.float64]] = []
    nodule_scores: list[npt.NDArray[np.float64]] = []
    fpr_scans: list[dict[str, Any]] = []
    # Separate generator: the held-out set itself does not depend on these draws.
    rng_fpr = np.random.default_rng(cfg.seed + 15485863)
    gen_hits: dict[str, dict[str, list[int]]] = {"placement": {}, "kind": {}}
    for r in range(d.heldout_rounds):
        hu, truth = insert_nodules(
            bg,
            d.heldout_nodules_per_round,
            rng,
            diameter_range_mm=d.diameter_range_mm,
            z_range_mm=d.heldout_z_mm,
            exclusions=excl,
        )
        centers = np.asarray([n.center_mm for n in truth], dtype=np.float64).reshape(-1, 3)
        if gen is not None:
            cand = gen(bg.to_image(hu), bg.lung)
        else:
            cand = dense_structure_points(bg, hu, 400, rng, d.heldout_z_mm)
        cand = cand[_in_z(cand, d.heldout_z_mm)]
        lab = label_points(cand, truth, excl, d.negative_margin_mm)
        cand_scores = score_points(net, hu, bg, cand, cfg.input, dev)
        nod_scores = score_points(net, hu, bg, centers, cfg.input, dev)
        neg = lab == 0
        all_scores += [nod_scores, cand_scores[neg]]
        all_labels += [np.ones(len(nod_scores)), np.zeros(int(neg.sum()))]
        dense = dense_structure_points(bg, hu, 600, rng, d.heldout_z_mm, min_pleura_mm=3.0)
        dense = dense[label_points(dense, truth, excl, d.negative_margin_mm) == 0]
        vessel_scores.append(score_points(net, hu, bg, dense, cfg.input, dev))
        nodule_scores.append(nod_scores)
        scans.append(
            {
                "scan_id": f"heldout-{r}",
                "nodules": truth,
                "candidates": cand,
                "scores": cand_scores,
            }
        )
        # Which nodules the candidate generator found (by placement and type).
        found = [
            bool(cand.size)
            and bool(
                (np.linalg.norm(cand - np.asarray(n.center_mm), axis=1) < n.diameter_mm / 2).any()
            )
            for n in truth
        ]
        for n, f in zip(truth, found, strict=True):
            for key, val in (("placement", n.placement.value), ("kind", n.kind.value)):
                cell = gen_hits[key].setdefault(val, [0, 0])
                cell[0] += int(f)
                cell[1] += 1
        # LUNA16 false-positive-reduction-track style: the candidate list also
        # holds a (jittered) candidate for every nodule the generator missed.
        missed = [n for n, f in zip(truth, found, strict=True) if not f]
        extra = np.zeros((0, 3))
        if missed:
            extra = _jittered(
                np.asarray([n.center_mm for n in missed], dtype=np.float64),
                np.asarray([n.diameter_mm / 2 for n in missed], dtype=np.float64),
                d.positive_jitter_mm,
                rng_fpr,
            )
        fpr_scans.append(
            {
                "scan_id": f"heldout-{r}",
                "nodules": truth,
                "candidates": np.concatenate([cand, extra]),
                "scores": np.concatenate(
                    [cand_scores, score_points(net, hu, bg, extra, cfg.input, dev)]
                ),
            }
        )
        if progress is not None and task is not None:
            progress.advance(task)
    scores = np.concatenate(all_scores)
    labels = np.concatenate(all_labels)
    result: dict[str, Any] = {
        "heldout_scans": d.heldout_rounds,
        "heldout_nodules": int(sum(len(s["nodules"]) for s in scans)),
        "heldout_negative_patches": int((labels == 0).sum()),
        "patch_auc": _auc(scores, labels),
        "heldout_vessel_patches": int(sum(v.size for v in vessel_scores)),
        "patch_auc_vs_vessels": _auc(
            np.concatenate(nodule_scores + vessel_scores),
            np.concatenate(
                [np.ones(sum(v.size for v in nodule_scores)),
                 np.zeros(sum(v.size for v in vessel_scores))]
            ),
        ),
        "candidate_source": "cad_node.pipelines.ct_chest.candidates" if gen else "dense_structures",
    }
    result["froc"] = _froc(scans)
    result["froc_fp_reduction"] = _froc(fpr_scans)
    result["generator_sensitivity"] = {
        key: {val: f"{h}/{t}" for val, (h, t) in sorted(cells.items())}
        for key, cells in gen_hits.items()
    }
    # The excluded real nodule(s), scored where the reference places them.
    real = np.asarray([e.center_mm for e in d.exclusions], dtype=np.float64).reshape(-1, 3)
    if real.size:
        result["real_nodule_probability"] = [
            round(float(v), 4) for v in score_points(net, bg.hu, bg, real, cfg.input, dev)
        ]
    return result


def _froc(scans: list[dict[str, Any]]) -> dict[str, Any]:
    """LUNA16 FROC/CPM via ``trainer.froc`` (see that module for the protocol)."""
    try:
        import trainer.froc as froc
    except ImportError:
        return {"error": "trainer.froc is not installed; FROC not computed"}
    return _luna16_froc(froc, scans)


def _luna16_froc(froc: Any, scans: list[dict[str, Any]]) -> dict[str, Any]:
    refs = [
        froc.ReferenceNodule(scan["scan_id"], n.center_mm, n.diameter_mm)
        for scan in scans
        for n in scan["nodules"]
    ]
    cands = [
        froc.Candidate(scan["scan_id"], tuple(float(v) for v in c), float(p))
        for scan in scans
        for c, p in zip(scan["candidates"], scan["scores"], strict=True)
    ]
    res = froc.luna16_froc(
        refs,
        cands,
        [scan["scan_id"] for scan in scans],
        max_candidates=MAX_CANDIDATES_PER_SCAN,
        bootstrap=1000,
        seed=0,
    )
    out: dict[str, Any] = res.to_dict()
    # Sensitivity of the candidate generator alone (all candidates kept).
    out["max_sensitivity"] = round(float(res.sensitivity.max()) if res.sensitivity.size else 0.0, 6)
    return out


# --------------------------------------------------------------------------- CLI


def register(app: typer.Typer) -> None:
    """Add ``cad-train train`` to ``app``."""

    @app.command("train")
    def train_cmd(
        model: Annotated[str, typer.Argument(
            help=f"Model to train: {', '.join(MODELS)}, ct-lesion.")],
        config: Annotated[Path, typer.Argument(help="YAML training config.")],
        out: Annotated[
            Path | None, typer.Option(help="Run directory (default runs/<model>).")
        ] = None,
        resume: Annotated[bool, typer.Option(help="Resume from out/last.pt.")] = False,
        device: Annotated[str, typer.Option(help="auto, cpu or cuda[:N].")] = "auto",
        evaluate: Annotated[
            bool, typer.Option(help="Evaluate on the held-out insertion set.")
        ] = True,
        evaluate_only: Annotated[
            bool,
            typer.Option(help="Only re-run the held-out evaluation of out/final.pt."),
        ] = False,
    ) -> None:
        """Train MODEL with CONFIG; writes checkpoints, metrics and a model card."""
        if model == "ct-lesion":  # the lesion detector has its own trainer
            from trainer import ct_lesion

            try:
                lcfg = ct_lesion.load_config(config)
                final = ct_lesion.train_ct_lesion(lcfg, out or Path("runs") / model,
                                                  config_dir=config.parent)
            except (ValueError, FileNotFoundError) as exc:
                _console.print(f"[red]error:[/red] {exc}")
                raise typer.Exit(2) from None
            _console.print(f"final checkpoint: {final}")
            return
        try:
            cfg = load_train_config(config)
            if cfg.model != model:
                raise ValueError(f"{config}: config is for {cfg.model!r}, not {model!r}")
            run_dir = out or Path("runs") / model
            if evaluate_only:
                final = reevaluate(cfg, run_dir, device=device, config_dir=config.parent)
                _console.print(f"re-evaluated: {final}")
                return
            final = train(
                cfg,
                run_dir,
                resume=resume,
                device=device,
                config_dir=config.parent,
                evaluate_heldout=evaluate,
            )
        except (ValueError, FileNotFoundError) as exc:
            _console.print(f"[red]error:[/red] {exc}")
            raise typer.Exit(2) from None
        _console.print(f"final checkpoint: {final}")
