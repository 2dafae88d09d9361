# mypy: disallow-untyped-calls=False
"""Training data of the CT nodule scorer: backgrounds, labelling and patch cutting.

* :func:`load_ct` / :func:`lung_mask_of` / :func:`load_background`: a real CT
  and the node's own lung segmentation (training sees what inference sees).
* :func:`label_points`: candidate points labelled hit (1), clear (0) or
  ambiguous (-1) against nodules and exclusion zones.
* :func:`dense_structure_points`: generator-independent hard negatives.
* :func:`cut_patches`: the one place where patches are cut and windowed, for
  training and for the held-out evaluation alike (the same sampling as
  :class:`cad_node.models.scorer.CandidateScorer`).
* :func:`prepare_data`: insertion rounds and the optional prepared LIDC cases,
  turned into a labelled :class:`PatchSet`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813
from rich.progress import Progress
from scipy import ndimage

from cad_node.models.patches import extract_patches_array, normalize_hu
from trainer.config import InputConfig, TrainConfig, resolve_ct_dir
from trainer.insertion import (
    ExclusionZone,
    InsertedNodule,
    LungBackground,
    insert_nodules,
)

__all__ = [
    "DENSE_HU",
    "PatchSet",
    "RealNodule",
    "candidate_generator",
    "cut_patches",
    "dense_structure_points",
    "exclusions_of",
    "half_extent_mm",
    "in_z",
    "insertion_round",
    "jittered",
    "label_points",
    "load_background",
    "load_ct",
    "lung_mask_of",
    "prepare_data",
    "reader_marks",
    "real_negative_patches",
    "training_data_summary",
]

#: Smoothed HU above which an in-lung voxel counts as a dense structure (vessel).
DENSE_HU = -550.0


def _xyz(values: Sequence[Any]) -> tuple[float, float, float]:
    x, y, z = (float(v) for v in values)
    return x, y, z


def cut_patches(
    hu: npt.NDArray[np.float32],
    bg: LungBackground,
    points: npt.NDArray[np.float64],
    spec: InputConfig,
) -> npt.NDArray[np.float32]:
    """Patches of ``hu`` centred on ``points`` (LPS mm), windowed to ``[0, 1]``.

    ``hu`` is on ``bg``'s grid; the patch size, spacing and HU window are the
    bundle's input spec.  Returns ``(N, *spec.patch_size)`` float32.
    """
    patches = extract_patches_array(hu, bg.geometry, points, spec.patch_size, spec.spacing_mm)
    out: npt.NDArray[np.float32] = normalize_hu(patches, spec.hu_window)
    return out


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


def candidate_generator() -> (
    Callable[[sitk.Image, npt.NDArray[np.bool_]], npt.NDArray[np.float64]] | None
):
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
    out: npt.NDArray[np.float64] = pts[:max_points]
    return out


def in_z(points: npt.NDArray[np.float64], z_range: Sequence[float]) -> npt.NDArray[np.bool_]:
    return (points[:, 2] >= z_range[0]) & (points[:, 2] <= z_range[1])


def _dist_to(
    points: npt.NDArray[np.float64], centers: npt.NDArray[np.float64]
) -> npt.NDArray[np.float64]:
    if centers.size == 0 or points.size == 0:
        return np.full((points.shape[0], max(centers.shape[0], 1)), np.inf)
    out: npt.NDArray[np.float64] = np.linalg.norm(points[:, None, :] - centers[None, :, :], axis=2)
    return out


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


def jittered(
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


def half_extent_mm(spec: InputConfig) -> float:
    """Largest half-extent of a patch (mm)."""
    return float(max(n * s for n, s in zip(spec.patch_size, spec.spacing_mm, strict=True)) / 2)


def exclusions_of(cfg: TrainConfig) -> list[ExclusionZone]:
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
    gen = candidate_generator()
    excl = exclusions_of(cfg)
    d = cfg.data
    xs: list[npt.NDArray[np.float16]] = []
    ys: list[npt.NDArray[np.float32]] = []
    counts: dict[str, Any] = {
        "rounds": d.train_rounds,
        **_round_counts(),
        "candidate_generator": "cad_node.pipelines.ct_chest.candidates" if gen else "none",
    }
    task = progress.add_task("insert + cut patches", total=d.train_rounds) if progress else None
    for _ in range(d.train_rounds):
        x, y = insertion_round(cfg, bg, rng, d.train_z_mm, excl, counts)
        xs.append(x)
        ys.append(y)
        if progress is not None and task is not None:
            progress.advance(task)
    if d.lidc_prepared is not None:
        lx, ly, lcounts = _lidc_patches(cfg, rng, config_dir, progress)
        xs += lx
        ys += ly
        counts["lidc"] = lcounts
    if d.real_negatives:
        rx, ry, rcounts = real_negative_patches(cfg, rng, config_dir, progress)
        xs += rx
        ys += ry
        counts["real_negative_scans"] = rcounts
        counts["negative_patches"] += sum(int((y == 0).sum()) for y in ry)
        counts["positive_patches"] += sum(int((y == 1).sum()) for y in ry)
    return PatchSet(x=np.concatenate(xs), y=np.concatenate(ys), counts=counts)


def _round_counts() -> dict[str, Any]:
    """The empty tally :func:`insertion_round` adds to."""
    return {
        "inserted_nodules": 0,
        "positive_patches": 0,
        "negative_patches": 0,
        "negative_sources": {"candidate_generator": 0, "dense_structures": 0},
        "kinds": {},
        "placements": {},
    }


def insertion_round(
    cfg: TrainConfig,
    bg: LungBackground,
    rng: np.random.Generator,
    z_range: Sequence[float],
    excl: Sequence[ExclusionZone],
    counts: dict[str, Any],
) -> tuple[npt.NDArray[np.float16], npt.NDArray[np.float32]]:
    """One round: insert nodules into ``bg`` within ``z_range`` and cut labelled patches.

    Positives are the inserted nodules (jittered copies) and the generator
    candidates on them; negatives the generator candidates elsewhere and dense
    in-lung structures of the same volume, none within ``negative_margin_mm`` of
    an inserted nodule or an exclusion zone (a real nodule or reader mark, which
    is neither positive nor negative and shows in no inserted nodule's patch).

    Parameters
    ----------
    cfg : TrainConfig
        The run's config (``data`` counts and margins, ``input`` patch geometry).
    bg : LungBackground
        The real CT the nodules go into, with its lung mask.
    rng : numpy.random.Generator
        Source of randomness; the draws are in the order of the rounds before
        this function existed, so older configs give the same data.
    z_range : (float, float)
        Patient z (mm) of the nodule centres, candidates and dense points.
    excl : sequence of ExclusionZone
        Real findings to keep out (e.g. LIDC-IDRI-0001's nodule, reader marks).
    counts : dict
        The tally of :func:`_round_counts`, updated in place.

    Returns
    -------
    patches : numpy.ndarray
        ``(n, *patch_size)`` float16 patches, positives first.
    labels : numpy.ndarray
        ``(n,)`` float32, 1 for a positive and 0 for a negative.
    """
    d = cfg.data
    spec = cfg.input
    gen = candidate_generator()
    hu, truth = insert_nodules(
        bg,
        d.nodules_per_round,
        rng,
        diameter_range_mm=d.diameter_range_mm,
        z_range_mm=(float(z_range[0]), float(z_range[1])),
        # No inserted nodule's patch may show an excluded (real) nodule.
        exclusions=[
            ExclusionZone(z.center_mm, z.radius_mm + half_extent_mm(spec)) for z in excl
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
        jittered(centers, radii, d.positive_jitter_mm, rng) for _ in range(d.positive_copies)
    ]
    neg_sources: list[tuple[str, npt.NDArray[np.float64]]] = []
    tubular = np.zeros((0, 3))
    if gen is not None and d.tubular_copies > 0:
        cand, is_tube = _tubular_round(bg, hu, z_range, d.tubular_vesselness)
        lab = label_points(cand, truth, excl, d.negative_margin_mm, half_extent_mm(spec))
        pos.append(cand[lab == 1])
        neg_sources.append(("candidate_generator", cand[lab == 0]))
        tubes = cand[(lab == 0) & is_tube]
        if tubes.size:
            tubular = np.concatenate([
                jittered(tubes, np.full(len(tubes), 3.0), d.positive_jitter_mm, rng)
                for _ in range(d.tubular_copies)
            ])
    elif gen is not None:
        cand = gen(bg.to_image(hu), bg.lung)
        cand = cand[in_z(cand, z_range)]
        lab = label_points(cand, truth, excl, d.negative_margin_mm, half_extent_mm(spec))
        pos.append(cand[lab == 1])
        neg_sources.append(("candidate_generator", cand[lab == 0]))
    dense = dense_structure_points(bg, hu, 2 * d.negatives_per_round, rng, z_range)
    lab = label_points(dense, truth, excl, d.negative_margin_mm, half_extent_mm(spec))
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
    if tubular.size:
        counts["negative_sources"]["tubular_hard_negatives"] = (
            counts["negative_sources"].get("tubular_hard_negatives", 0) + len(tubular))
        negs.append(tubular)
    pos_pts = np.concatenate(pos) if pos else np.zeros((0, 3))
    neg_pts = np.concatenate(negs) if negs else np.zeros((0, 3))
    pts = np.concatenate([pos_pts, neg_pts])
    counts["positive_patches"] += len(pos_pts)
    counts["negative_patches"] += len(neg_pts)
    return (
        cut_patches(hu, bg, pts, spec).astype(np.float16),
        np.concatenate([np.ones(len(pos_pts)), np.zeros(len(neg_pts))]).astype(np.float32),
    )


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
    gen = candidate_generator()
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
            RealNodule(_xyz(n["center_mm"]), float(n["diameter_mm"]))
            for n in case.nodules
        ]
        irrelevant = [
            ExclusionZone(
                _xyz(f["center_mm"]),
                max(float(f.get("diameter_mm") or 0.0) / 2, 5.0),
            )
            for f in case.irrelevant
            if f.get("center_mm") is not None
        ]
        centers = np.asarray([n.center_mm for n in nodules], dtype=np.float64).reshape(-1, 3)
        radii = np.asarray([n.diameter_mm / 2 for n in nodules], dtype=np.float64)
        pos = [
            jittered(centers, radii, d.positive_jitter_mm, rng)
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
        xs.append(cut_patches(bg.hu, bg, pts, spec).astype(np.float16))
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


def load_background(
    cfg: TrainConfig, config_dir: Path | None, progress: Progress | None = None
) -> LungBackground:
    """The config's background CT (``data.ct``) with the node's lung mask."""
    if len(cfg.data.ct) != 1:
        raise ValueError("this trainer version uses exactly one background CT (data.ct)")
    task = progress.add_task("load CT + lungs", total=3) if progress else None

    def step() -> None:
        if progress is not None and task is not None:
            progress.advance(task)

    image = load_ct(resolve_ct_dir(cfg.data.ct[0], config_dir))
    step()
    lung = lung_mask_of(image)
    step()
    bg = LungBackground.from_image(image, lung)
    step()
    return bg


def training_data_summary(
    cfg: TrainConfig, counts: dict[str, Any], n_patches: int
) -> dict[str, Any]:
    """The ``training_data`` record of a run (copied into the bundle and its card)."""
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


def _tubular_round(
    bg: LungBackground, hu: npt.NDArray[np.float32], z_range: Sequence[float], min_v: float
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """The generator's candidates in ``z_range`` and which of them are tubular (Frangi)."""
    from cad_node.pipelines.ct_chest.candidates import (
        candidate_vesselness,
        generate_candidates,
    )

    image = bg.to_image(hu)
    cands = generate_candidates(image, bg.lung)
    if not cands:
        return np.zeros((0, 3)), np.zeros(0, dtype=bool)
    pts = np.asarray([c.center_mm for c in cands], dtype=np.float64)
    keep = in_z(pts, z_range)
    kept = [c for c, k in zip(cands, keep, strict=True) if k]
    v = candidate_vesselness(image, kept)
    return pts[keep], np.asarray(v >= min_v, dtype=bool)


def lidc_findings(series_dir: Path, series: Any) -> list[Any]:
    """The LUNA16 consensus of a series' LIDC XML (:func:`trainer.lidc.luna16_consensus`).

    Empty when the series has no XML.  The XML is looked for in ``series_dir``,
    then in its sub-directories (a data set folder such as ``lidc-idri-0002/``
    holds it beside the DICOM files, several levels down).  Reader ROIs are
    placed on the series' slices by z, then clustered across readers.
    """
    from trainer import lidc

    xml = lidc.find_lidc_xml(series_dir, series.series_instance_uid)
    for sub in ([] if xml is not None
                else sorted({p.parent for p in series_dir.rglob("*.xml")} - {series_dir})):
        xml = lidc.find_lidc_xml(sub, series.series_instance_uid)
        if xml is not None:
            break
    if xml is None:
        return []
    ann = lidc.parse_lidc_xml(xml, series_instance_uid=series.series_instance_uid)
    pos = {
        u: (float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1]),
            float(ds.ImagePositionPatient[2]))
        for u, ds in zip(series.sop_instance_uids, series.datasets, strict=True)
    }
    ann, _ = lidc.remap_rois_by_z(ann, pos)
    ds0 = series.datasets[0]
    ps = (float(ds0.PixelSpacing[0]), float(ds0.PixelSpacing[1]))
    clusters = lidc.cluster_nodules(ann, pos, ps, rows=int(ds0.Rows), cols=int(ds0.Columns))
    return list(lidc.luna16_consensus(ann, clusters, pos, ps))


def reader_marks(series_dir: Path, series: Any) -> list[ExclusionZone]:
    """Every reader mark of the series' LIDC XML as an exclusion zone (none without XML).

    Consensus and sub-consensus nodules with their radius, < 3 mm nodules and
    non-nodules with LUNA16's 10 mm diameter; at least 5 mm radius each.
    """
    return [
        ExclusionZone(_xyz(f.center_mm), max((f.diameter_mm if f.diameter_mm > 0 else 10.0) / 2,
                                             5.0))
        for f in lidc_findings(series_dir, series)
    ]


def real_negative_patches(
    cfg: TrainConfig,
    rng: np.random.Generator,
    config_dir: Path | None,
    progress: Progress | None = None,
) -> tuple[list[npt.NDArray[np.float16]], list[npt.NDArray[np.float32]], list[dict[str, Any]]]:
    """Patches from real scans without a LUNA16 nodule (``data.real_negatives``).

    The node's generator candidates of each scan, strongest first, except those
    within ``negative_margin_mm`` of a reader mark or an extra exclusion, are
    negatives, each taken ``copies`` times (the first at the candidate, the
    others jittered).  With ``insertion_rounds`` the scan is also a background for
    synthetic nodules (:func:`insertion_round`, within ``z_mm``), so that its
    appearance comes with positives as well as negatives.

    Returns
    -------
    patches, labels : list of numpy.ndarray
        One array per scan (negatives first, then the insertion rounds').
    summaries : list of dict
        Per scan: what was taken, for the run's training-data record.
    """
    from cad_node.imaging import load_series

    d = cfg.data
    spec = cfg.input
    gen = candidate_generator()
    if gen is None:
        raise ValueError("data.real_negatives needs cad_node.pipelines.ct_chest.candidates")
    xs: list[npt.NDArray[np.float16]] = []
    ys: list[npt.NDArray[np.float32]] = []
    out: list[dict[str, Any]] = []
    task = progress.add_task("real negative scans", total=len(d.real_negatives)) if progress \
        else None
    for rn in d.real_negatives:
        directory = resolve_ct_dir(rn.ct, config_dir)
        files = sorted(f for f in directory.rglob("*")
                       if f.is_file() and f.suffix.lower() in {".dcm", ""})
        if not files:
            raise FileNotFoundError(f"{directory}: no DICOM files")
        series = load_series(files)
        image = series.image
        bg = LungBackground.from_image(image, lung_mask_of(image))
        zones = reader_marks(files[0].parent, series) if rn.lidc_xml else []
        zones += [ExclusionZone(e.center_mm, e.radius_mm) for e in rn.exclusions]
        cand = gen(image, bg.lung)
        if rn.z_mm is not None:
            cand = cand[in_z(cand, rn.z_mm)]
        lab = label_points(cand, [], zones, d.negative_margin_mm)
        neg = cand[lab == 0][: rn.negatives]
        pts = [neg] + [jittered(neg, np.full(len(neg), 3.0), d.positive_jitter_mm, rng)
                       for _ in range(rn.copies - 1)]
        allp = np.concatenate(pts)
        xs.append(cut_patches(bg.hu, bg, allp, spec).astype(np.float16))
        ys.append(np.zeros(len(allp), dtype=np.float32))
        summary: dict[str, Any] = {
            "ct": rn.ct, "z_mm": None if rn.z_mm is None else list(rn.z_mm),
            "reader_marks_excluded": len(zones),
            "candidates": len(cand), "negatives": len(neg),
            "patches": len(allp)}
        if rn.insertion_rounds:
            z_range = rn.z_mm if rn.z_mm is not None else (-np.inf, np.inf)
            tally = _round_counts()
            for _ in range(rn.insertion_rounds):
                x, y = insertion_round(cfg, bg, rng, z_range, zones, tally)
                xs.append(x)
                ys.append(y)
            # Kept apart from the scan's own negatives ("patches" above).
            summary["insertion"] = {"rounds": rn.insertion_rounds, **tally}
        out.append(summary)
        if progress is not None and task is not None:
            progress.advance(task)
    return xs, ys, out
