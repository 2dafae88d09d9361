# mypy: disallow-untyped-calls=False
"""Train, evaluate and export the ``ct-lesion`` detector (DeepLesion-style).

``cad-train train ct-lesion trainer/configs/ct-lesion.yaml`` and
``cad-train evaluate ct-lesion --run runs/ct-lesion``.

Data and splits
---------------
* **DeepLesion rows** (``DL_info.csv``): the official ``Train_Val_Test``
  column decides: ``train`` rows are trained on, ``val`` rows choose the
  RECIST segmentation parameter and the pipeline's operating threshold,
  ``test`` rows are only ever evaluated.  (In ``deeplesion-samples`` all 23
  rows are ``val`` (14) or ``test`` (9): none is trained on.)
* **DeepLesion slices without rows** (``Images_png`` with a box table, e.g.
  the 24 liver key slices of ``deeplesion-samples`` with
  ``Images_png_boxes_liver.csv``): trained on (boxes only, type liver), when
  the config lists the table.  Their patients are not those of the rows.
* **Synthetic lesions** inserted into real CT backgrounds
  (:mod:`trainer.ct_lesion_synth`), generated once into a fixed pool.

Training: CenterNet losses (penalty-reduced focal loss on the Gaussian centre
heatmap, L1 on log size and offset, cross-entropy on the type where known),
Adam, random horizontal flips and HU jitter; real slices are shown with their
neighbour channels filled from the key slice (they have no neighbours) and a
share of synthetic ones likewise (``neighbour_dropout``), so the network
works with and without 3-D context.  One torch thread by default.

Evaluation (:func:`evaluate_run`): the detector on every key slice of the
evaluated rows, sensitivity at 0.5-16 FPs/image with IoU >= 0.5 and with
IoBB >= 0.5 (:func:`trainer.froc.deeplesion_sensitivity`), per-type
sensitivity at 4 FPs/image, and the RECIST long/short axis error in mm of the
lesions hit (mask from the detected box) and from the reference boxes.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import time
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "LesionTrainConfig",
    "evaluate_command",
    "evaluate_run",
    "export_run",
    "load_config",
    "train_ct_lesion",
]

MODEL_NAME = "ct-lesion"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LesionDataConfig(_Strict):
    """Where the training material is (paths relative to the config file or data root)."""

    deeplesion_root: str = "deeplesion-samples"
    dl_info: str = "key_slices_flat/DL_info_subset.csv"
    #: Optional ``File_name,...,bb_xmin,bb_ymin,bb_xmax,bb_ymax`` table of Images_png boxes.
    box_table: str | None = "Images_png_boxes_liver.csv"
    #: Coarse type of the box-table lesions (4 = liver).
    box_table_type: int = 4
    backgrounds: list[str] = Field(default_factory=lambda: ["lidc-idri-0001", "lidc-idri-0002"])
    synthetic_pool: int = Field(1600, ge=0)
    max_lesions_per_slice: int = Field(3, ge=1)
    #: Per background, patient z ranges (mm, LPS) left out of every sample drawn from it
    #: (e.g. around a reader-marked nodule LUNA16 does not count, so it is never taught
    #: as background).
    background_exclude_z_mm: dict[str, list[tuple[float, float]]] = Field(default_factory=dict)


class LesionOptimConfig(_Strict):
    """Optimiser and schedule."""

    steps: int = Field(2000, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    real_fraction: float = Field(0.25, ge=0, le=1)
    #: Start from the weights of this run directory's ``final.pt`` (fine-tuning).
    init_from: str | None = None
    neighbour_dropout: float = Field(0.5, ge=0, le=1)
    threads: int = Field(1, ge=1)
    time_budget_min: float = Field(30.0, gt=0)
    #: Of the non-real samples: share that are background slices with real training
    #: lesions pasted into their liver (:mod:`trainer.ct_lesion_paste`).
    paste_fraction: float = Field(0.0, ge=0, le=1)
    #: Of the non-real samples: share that are unaltered background slices (negatives).
    negative_fraction: float = Field(0.0, ge=0, le=1)
    #: Probability that a real training slice gets further real lesions pasted in.
    real_paste_prob: float = Field(0.0, ge=0, le=1)
    #: Rotation, scale, shift, HU gain/offset and noise on every sample
    #: (:func:`trainer.ct_lesion_paste.augment`); off reproduces bundle 1.0.0's recipe.
    augment: bool = False
    #: Training progress (0-1) at which the negatives are re-weighted by the detector's
    #: own highest score on them (hard-negative mining).
    hard_negative_at: list[float] = Field(default_factory=list)


class LesionBundleConfig(_Strict):
    """Bundle written by ``--export``."""

    name: str = MODEL_NAME
    version: str = "1.0.0"


class LesionTrainConfig(_Strict):
    """``trainer/configs/ct-lesion.yaml``."""

    model: str = MODEL_NAME
    seed: int = 20261201
    data: LesionDataConfig = LesionDataConfig()
    optim: LesionOptimConfig = LesionOptimConfig()
    architecture: dict[str, Any] = Field(default_factory=lambda: {
        "builder": "lesion-centernet", "in_channels": 3, "channels": [16, 32, 48, 64],
        "neck": 32, "n_types": 8})
    bundle: LesionBundleConfig = LesionBundleConfig()


def load_config(path: Path) -> LesionTrainConfig:
    """Read a ct-lesion config; ``ValueError`` names the file and the bad keys."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as exc:
        raise ValueError(f"{path}: cannot read config: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    try:
        cfg = LesionTrainConfig.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in exc.errors())
        raise ValueError(f"{path}: invalid ct-lesion config: {problems}") from None
    if cfg.model != MODEL_NAME:
        raise ValueError(f"{path}: model is {cfg.model!r}, not {MODEL_NAME!r}")
    return cfg


def _data_root() -> Path:
    import os

    return Path(os.environ.get("CAD_NODE_TEST_DATA", "../shared/data"))


def _resolve(entry: str, base: Path | None) -> Path:
    p = Path(entry)
    for cand in ([p] if p.is_absolute() else
                 [*(([base / p]) if base else []), _data_root() / p]):
        if cand.exists():
            return cand
    raise FileNotFoundError(f"{entry}: not found (relative to the config or "
                            f"CAD_NODE_TEST_DATA={_data_root()})")


# --------------------------------------------------------------------------- real data
class RealSlice:
    """A DeepLesion key slice with its lesion boxes (source pixels)."""

    def __init__(self, name: str, hu: npt.NDArray[np.int16], spacing_xy: tuple[float, float],
                 boxes: npt.NDArray[np.float64], types: npt.NDArray[np.int64],
                 neighbours: dict[float, npt.NDArray[np.int16]], split: str,
                 records: list[Any]) -> None:
        self.name, self.hu, self.spacing_xy = name, hu, spacing_xy
        self.boxes, self.types, self.neighbours = boxes, types, neighbours
        self.split, self.records = split, records


def load_dl_rows(root: Path, dl_info: Path) -> list[RealSlice]:
    """Key slices of DL_info rows, grouped by image, with whatever neighbours exist."""
    from trainer.deeplesion import find_slice, read_dl_info, read_png_hu, records_by_image

    records, problems = read_dl_info(dl_info)
    if problems:
        raise ValueError("; ".join(problems))
    out: list[RealSlice] = []
    for name, recs in sorted(records_by_image(records).items()):
        r = recs[0]
        key_path = find_slice(root, r, r.key_slice_index)
        if key_path is None:
            raise FileNotFoundError(f"{r.where()}: key slice not found under {root}")
        hu = read_png_hu(key_path)
        neighbours: dict[float, npt.NDArray[np.int16]] = {}
        for off in (-1, 1):
            idx = r.key_slice_index + off
            if not r.slice_range[0] <= idx <= r.slice_range[1]:
                continue
            p = find_slice(root, r, idx)
            if p is not None:
                neighbours[off * r.spacing_mm[2]] = read_png_hu(p)
        out.append(RealSlice(name, hu, (r.spacing_mm[0], r.spacing_mm[1]),
                             np.array([x.bbox for x in recs], dtype=float),
                             np.array([x.lesion_type for x in recs], dtype=np.int64),
                             neighbours, r.split, recs))
    return out


def load_box_table(root: Path, table: Path, lesion_type: int) -> list[RealSlice]:
    """Images_png key slices listed in a derived box table that exist under ``root``.

    The table has no pixel spacing; slices are taken at DeepLesion's typical
    0.8 mm (stated in the model card).
    """
    from trainer.deeplesion import read_png_hu

    by_file: dict[str, list[tuple[float, float, float, float]]] = {}
    with table.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            try:
                series = f"{int(row['Patient_index']):06d}_{int(row['Study_index']):02d}_" \
                         f"{int(row['Series_ID']):02d}"
                sl = int(row["Key_slice_index"])
                box = tuple(float(row[c]) for c in ("bb_xmin", "bb_ymin", "bb_xmax", "bb_ymax"))
            except (KeyError, ValueError):
                continue
            by_file.setdefault(f"{series}/{sl:03d}.png", []).append(box)  # type: ignore[arg-type]
    out: list[RealSlice] = []
    for rel, boxes in sorted(by_file.items()):
        series, fname = rel.split("/")
        p = root / "Images_png" / series / fname
        if not p.is_file():
            continue
        out.append(RealSlice(rel, read_png_hu(p), (0.8, 0.8), np.array(boxes, dtype=float),
                             np.full(len(boxes), lesion_type, dtype=np.int64), {}, "train", []))
    return out


# --------------------------------------------------------------------------- targets & loss
def make_targets(boxes_net: npt.NDArray[np.float64], types: npt.NDArray[np.int64],
                 out_hw: tuple[int, int], stride: int) -> dict[str, npt.NDArray[Any]]:
    """CenterNet targets for one image (boxes in network pixels, types 1..8 or -1)."""
    h, w = out_hw
    heat = np.zeros((1, h, w), dtype=np.float32)
    size = np.zeros((2, h, w), dtype=np.float32)
    offset = np.zeros((2, h, w), dtype=np.float32)
    mask = np.zeros((h, w), dtype=np.float32)
    tmap = np.full((h, w), -1, dtype=np.int64)
    yy, xx = np.mgrid[0:h, 0:w]
    for (x1, y1, x2, y2), t in zip(boxes_net, types, strict=True):
        bw, bh = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
        cx, cy = (x1 + x2) / 2 / stride, (y1 + y2) / 2 / stride
        ix, iy = int(np.clip(np.floor(cx), 0, w - 1)), int(np.clip(np.floor(cy), 0, h - 1))
        sigma = max(min(bw, bh) / stride / 6.0, 0.7)
        g = np.exp(-((xx - ix) ** 2 + (yy - iy) ** 2) / (2 * sigma ** 2)).astype(np.float32)
        heat[0] = np.maximum(heat[0], g)
        heat[0, iy, ix] = 1.0
        size[:, iy, ix] = (math.log(bw), math.log(bh))
        offset[:, iy, ix] = (cx - ix, cy - iy)
        mask[iy, ix] = 1.0
        tmap[iy, ix] = int(t) - 1 if 1 <= int(t) <= 8 else -1
    return {"heatmap": heat, "size": size, "offset": offset, "mask": mask, "type": tmap}


def centernet_loss(out: dict[str, Any], tgt: dict[str, Any]) -> tuple[Any, dict[str, float]]:
    """Focal heatmap loss + L1 size/offset + type cross-entropy (torch tensors)."""
    import torch
    import torch.nn.functional as F  # noqa: N812

    p = torch.sigmoid(out["heatmap"]).clamp(1e-4, 1 - 1e-4)
    gt = tgt["heatmap"]
    pos = gt.eq(1).float()
    neg = 1 - pos
    pos_loss = (torch.log(p) * (1 - p) ** 2 * pos).sum()
    neg_loss = (torch.log(1 - p) * p ** 2 * (1 - gt) ** 4 * neg).sum()
    n_pos = pos.sum().clamp(min=1.0)
    focal = -(pos_loss + neg_loss) / n_pos
    m = tgt["mask"].unsqueeze(1)
    size_l = (F.l1_loss(out["size"], tgt["size"], reduction="none") * m).sum() / n_pos
    off_l = (F.l1_loss(out["offset"], tgt["offset"], reduction="none") * m).sum() / n_pos
    tl = tgt["type"]
    if (tl >= 0).any():
        type_l = F.cross_entropy(out["type_logits"], tl, ignore_index=-1)
    else:
        type_l = out["type_logits"].sum() * 0.0
    total = focal + size_l + off_l + 0.5 * type_l
    return total, {"focal": float(focal.detach()), "size": float(size_l.detach()),
                   "offset": float(off_l.detach()),
                   "type": float(type_l.detach())}


# --------------------------------------------------------------------------- training
def _backgrounds(cfg: LesionTrainConfig, base: Path | None) -> list[Any]:
    import SimpleITK as sitk  # noqa: N813

    from trainer.ct_lesion_synth import Background
    from trainer.data import load_ct

    out = []
    for entry in cfg.data.backgrounds:
        img = load_ct(_resolve(entry, base))
        sp = img.GetSpacing()
        bg = Background.from_volume(entry, sitk.GetArrayFromImage(img), (sp[2], sp[1], sp[0]))
        z = np.array([img.TransformIndexToPhysicalPoint((0, 0, k))[2]
                      for k in range(img.GetSize()[2])])
        usable = np.ones(len(z), dtype=bool)
        usable[0] = usable[-1] = False  # the 2.5-D stack needs both neighbours
        for lo, hi in cfg.data.background_exclude_z_mm.get(entry, []):
            usable &= ~((z >= lo) & (z <= hi))
        bg.usable = np.nonzero(usable)[0]
        out.append(bg)
    return out


def synthetic_pool(cfg: LesionTrainConfig, base: Path | None,
                   log: Any = print, bgs: list[Any] | None = None,
                   ) -> list[tuple[npt.NDArray[np.float16], npt.NDArray[Any],
                                   npt.NDArray[np.int64]]]:
    """The fixed pool of synthetic samples ``(hu (3,H,W), boxes, types)``."""
    from trainer.ct_lesion_synth import insert_lesions

    rng = np.random.default_rng(cfg.seed)
    bgs = _backgrounds(cfg, base) if bgs is None else bgs
    pool = []
    t0 = time.monotonic()
    for i in range(cfg.data.synthetic_pool):
        bg = bgs[i % len(bgs)]
        k = int(bg.usable[int(rng.integers(len(bg.usable)))])
        s = insert_lesions(bg, k, rng, cfg.data.max_lesions_per_slice, _n_slices(cfg))
        pool.append((s.hu.astype(np.float16), s.boxes, s.types))
        if (i + 1) % 200 == 0:
            log(f"synthetic pool {i + 1}/{cfg.data.synthetic_pool} "
                f"({time.monotonic() - t0:.0f} s)")
    return pool


def _n_slices(cfg: LesionTrainConfig) -> int:
    """Slices stacked as channels (``architecture.in_channels``: 3 or 9)."""
    return int(cfg.architecture.get("in_channels", 3))


def _key_only(hu: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Every channel replaced by the key (centre) slice: a key slice without neighbours."""
    return np.repeat(hu[len(hu) // 2][None], len(hu), axis=0)


def _real_input(s: RealSlice, rng: np.random.Generator, augment: bool,
                n_slices: int = 3) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float64]]:
    from cad_node.pipelines.ct_lesion.slices import SliceGrid, body_centre, key_slice_input

    cx, cy = body_centre(s.hu)
    scale = 1.0
    if augment:
        cx += float(rng.uniform(-15, 15))
        cy += float(rng.uniform(-15, 15))
        scale = float(rng.uniform(0.9, 1.1))
    grid = SliceGrid.centred((cx, cy), s.spacing_xy, pixel_mm=1.6 * scale)
    x, _ = key_slice_input(s.hu, s.spacing_xy, None, grid, n_slices)
    return x, grid.to_network(s.boxes)


def _batch(cfg: LesionTrainConfig, pool: list[Any], real: list[RealSlice],
           rng: np.random.Generator) -> tuple[Any, dict[str, Any]]:
    import torch

    from cad_node.pipelines.ct_lesion.network import OUTPUT_STRIDE
    from cad_node.pipelines.ct_lesion.slices import INPUT_SIZE, normalise

    xs, tg = [], []
    out_hw = (INPUT_SIZE // OUTPUT_STRIDE, INPUT_SIZE // OUTPUT_STRIDE)
    for _ in range(cfg.optim.batch_size):
        if real and (not pool or rng.random() < cfg.optim.real_fraction):
            s = real[int(rng.integers(len(real)))]
            x, boxes = _real_input(s, rng, True, _n_slices(cfg))
            types = s.types
        else:
            hu, boxes, types = pool[int(rng.integers(len(pool)))]
            hu = hu.astype(np.float32)
            if rng.random() < cfg.optim.neighbour_dropout:
                hu = _key_only(hu)
            x = normalise(hu)
        x = x + np.float32(rng.uniform(-20, 20) / 4095.0)
        if rng.random() < 0.5:
            x = x[:, :, ::-1].copy()
            boxes = boxes.copy()
            boxes[:, [0, 2]] = INPUT_SIZE - 1 - boxes[:, [2, 0]]
        xs.append(x)
        tg.append(make_targets(boxes, types, out_hw, OUTPUT_STRIDE))
    batch = torch.from_numpy(np.stack(xs).astype(np.float32))
    targets = {k: torch.from_numpy(np.stack([t[k] for t in tg])) for k in tg[0]}
    return batch, targets


class _Material:
    """What the augmented recipe draws from: backgrounds, their liver masks, the lesion bank."""

    def __init__(self, cfg: LesionTrainConfig, bgs: list[Any], real: list[RealSlice],
                 log: Any) -> None:
        from trainer.ct_lesion_paste import lesion_bank, slice_on_grid
        from trainer.ct_lesion_synth import tissue_masks

        self.bgs = bgs
        self.bank = lesion_bank(real)
        #: (background index, slice index) of every usable background slice
        self.slices = [(i, int(k)) for i, bg in enumerate(bgs) for k in bg.usable]
        self.weights = np.ones(len(self.slices))
        #: background slices with liver to paste into, and the masks
        self.liver: dict[tuple[int, int], npt.NDArray[np.bool_]] = {}
        for i, k in self.slices:
            m = tissue_masks(bgs[i].planes[k])["liver"]
            if m.sum() > 200:
                self.liver[(i, k)] = m
        self.real_planes = [slice_on_grid(s.hu, s.spacing_xy) for s in real]
        self.real_liver = [tissue_masks(p)["liver"] for p, _ in self.real_planes]
        log(f"lesion bank {len(self.bank)} real training lesions; "
            f"{len(self.slices)} background slices, {len(self.liver)} with liver to paste into")

    def counts(self) -> dict[str, Any]:
        return {"real_lesion_bank": len(self.bank), "background_slices": len(self.slices),
                "background_slices_with_liver": len(self.liver),
                "backgrounds": [bg.name for bg in self.bgs]}


def _sample_v2(cfg: LesionTrainConfig, mat: _Material, pool: list[Any], real: list[RealSlice],
               rng: np.random.Generator) -> tuple[Any, Any, Any]:
    """One sample of the augmented recipe: HU stack (3, H, W), boxes (network px), types."""
    from trainer.ct_lesion_paste import augment, paste_lesions

    o = cfg.optim
    boxes: Any
    if real and rng.random() < o.real_fraction:
        j = int(rng.integers(len(real)))
        plane, grid = mat.real_planes[j]
        hu = np.repeat(plane[None], _n_slices(cfg), axis=0)
        boxes, types = grid.to_network(real[j].boxes), real[j].types
        if rng.random() < o.real_paste_prob:
            occ = np.zeros(plane.shape, dtype=bool)
            for x1, y1, x2, y2 in boxes:
                occ[max(0, int(y1) - 4):int(y2) + 5, max(0, int(x1) - 4):int(x2) + 5] = True
            hu, nb, nt = paste_lesions(hu, mat.real_liver[j], mat.bank, rng,
                                       int(rng.integers(1, 3)), occupied=occ)
            if nb:
                boxes = np.concatenate([boxes, np.asarray(nb)])
                types = np.concatenate([types, np.asarray(nt, dtype=np.int64)])
        scale = (0.8, 1.25)  # the box table gives no spacing: 0.8 mm assumed
    else:
        u = rng.random()
        scale = (0.85, 1.2)
        if u < o.negative_fraction or (u < o.negative_fraction + o.paste_fraction
                                       and not mat.liver):
            p = mat.weights / mat.weights.sum()
            i, k = mat.slices[int(rng.choice(len(mat.slices), p=p))]
            hu = mat.bgs[i].stack(k, _n_slices(cfg))
            boxes, types = np.zeros((0, 4)), np.zeros(0, dtype=np.int64)
        elif u < o.negative_fraction + o.paste_fraction:
            keys = list(mat.liver)
            i, k = keys[int(rng.integers(len(keys)))]
            hu, nb, nt = paste_lesions(mat.bgs[i].stack(k, _n_slices(cfg)), mat.liver[(i, k)],
                                       mat.bank, rng,
                                       int(rng.integers(1, cfg.data.max_lesions_per_slice + 1)))
            boxes = np.asarray(nb, dtype=float).reshape(-1, 4)
            # the chest CT's "liver" mask may be heart or muscle: the type is not taught here
            types = np.zeros(len(nt), dtype=np.int64)
        else:
            h16, boxes, types = pool[int(rng.integers(len(pool)))]
            hu = h16.astype(np.float32)
        if rng.random() < o.neighbour_dropout:
            hu = _key_only(hu)
    if o.augment:
        hu, boxes, kept = augment(np.asarray(hu, dtype=np.float32), boxes, rng,
                                  scale_range=scale)
        types = np.asarray(types)[kept]
    return hu, boxes, types


def _batch_v2(cfg: LesionTrainConfig, mat: _Material, pool: list[Any], real: list[RealSlice],
              rng: np.random.Generator) -> tuple[Any, dict[str, Any]]:
    import torch

    from cad_node.pipelines.ct_lesion.network import OUTPUT_STRIDE
    from cad_node.pipelines.ct_lesion.slices import INPUT_SIZE, normalise

    xs, tg = [], []
    out_hw = (INPUT_SIZE // OUTPUT_STRIDE, INPUT_SIZE // OUTPUT_STRIDE)
    for _ in range(cfg.optim.batch_size):
        hu, boxes, types = _sample_v2(cfg, mat, pool, real, rng)
        x = normalise(hu)
        if rng.random() < 0.5:
            x = x[:, :, ::-1].copy()
            boxes = np.asarray(boxes, dtype=float).reshape(-1, 4).copy()
            boxes[:, [0, 2]] = INPUT_SIZE - 1 - boxes[:, [2, 0]]
        xs.append(x)
        tg.append(make_targets(np.asarray(boxes, dtype=float).reshape(-1, 4),
                               np.asarray(types, dtype=np.int64), out_hw, OUTPUT_STRIDE))
    batch = torch.from_numpy(np.stack(xs).astype(np.float32))
    targets = {k: torch.from_numpy(np.stack([t[k] for t in tg])) for k in tg[0]}
    return batch, targets


def _mine_negatives(net: Any, mat: _Material, log: Any, n_slices: int = 3) -> dict[str, float]:
    """Re-weight the negatives by the detector's highest heatmap score on each slice."""
    import torch

    from cad_node.pipelines.ct_lesion.slices import normalise

    net.eval()
    best = np.zeros(len(mat.slices))
    with torch.no_grad():
        for i0 in range(0, len(mat.slices), 8):
            chunk = mat.slices[i0:i0 + 8]
            x = torch.from_numpy(np.stack([normalise(mat.bgs[i].stack(k, n_slices))
                                           for i, k in chunk]))
            heat = torch.sigmoid(net(x)["heatmap"]).amax(dim=(1, 2, 3)).numpy()
            best[i0:i0 + len(chunk)] = heat
    net.train()
    mat.weights = 0.05 + best
    summary = {"mean_max_score": float(best.mean()), "slices_above_0.3": int((best > 0.3).sum())}
    log(f"hard negatives: {summary}")
    return summary


def train_ct_lesion(cfg: LesionTrainConfig, run_dir: Path, *, config_dir: Path | None = None,
                    log: Any = print) -> Path:
    """Train; writes ``run_dir/final.pt`` (state dict + config) and ``train_log.json``."""
    import torch

    from cad_node.models.network import build_network

    torch.set_num_threads(cfg.optim.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    run_dir.mkdir(parents=True, exist_ok=True)
    root = _resolve(cfg.data.deeplesion_root, config_dir)
    rows = load_dl_rows(root, root / cfg.data.dl_info)
    real = [s for s in rows if s.split == "train"]
    if cfg.data.box_table:
        real += load_box_table(root, root / cfg.data.box_table, cfg.data.box_table_type)
    counts = {"real_train_slices": len(real),
              "real_train_lesions": int(sum(len(s.boxes) for s in real)),
              "dl_info_rows_by_split": {sp: int(sum(len(s.boxes) for s in rows if s.split == sp))
                                        for sp in ("train", "val", "test")}}
    log(f"real training slices {counts['real_train_slices']} "
        f"({counts['real_train_lesions']} lesions); DL_info rows {counts['dl_info_rows_by_split']}")
    v2 = cfg.optim.augment or cfg.optim.paste_fraction > 0 or cfg.optim.negative_fraction > 0
    bgs = _backgrounds(cfg, config_dir) if v2 or cfg.data.synthetic_pool else []
    pool = synthetic_pool(cfg, config_dir, log, bgs) if cfg.data.synthetic_pool else []
    mat = _Material(cfg, bgs, real, log) if v2 else None
    counts["synthetic_slices"] = len(pool)
    counts["synthetic_lesions"] = int(sum(len(b) for _, b, _ in pool))
    counts["synthetic_lesions_by_type"] = {
        str(t): int(sum(int((ty == t).sum()) for _, _, ty in pool)) for t in range(1, 9)}
    net = build_network(cfg.architecture)
    if cfg.optim.init_from:
        start = _resolve(cfg.optim.init_from, config_dir) / "final.pt"
        net.load_state_dict(torch.load(start, map_location="cpu", weights_only=True)["state_dict"])
        counts["init_from"] = str(cfg.optim.init_from)
        log(f"initialised from {start}")
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    budget_s = cfg.optim.time_budget_min * 60

    def set_lr(step: int) -> None:
        # warm-up then cosine decay over whichever runs out first: steps or time
        progress = min(1.0, max(step / cfg.optim.steps, (time.monotonic() - t0) / budget_s))
        factor = progress / 0.05 if progress < 0.05 else \
            0.5 * (1 + math.cos(math.pi * (progress - 0.05) / 0.95))
        for group in opt.param_groups:
            group["lr"] = cfg.optim.lr * max(factor, 0.01)
    t0 = time.monotonic()
    history: list[dict[str, float]] = []
    mining = sorted(cfg.optim.hard_negative_at) if mat is not None else []
    mined: list[dict[str, float]] = []
    net.train()
    step = 0
    for step in range(1, cfg.optim.steps + 1):
        set_lr(step)
        progress = max(step / cfg.optim.steps, (time.monotonic() - t0) / budget_s)
        if mining and progress >= mining[0] and mat is not None:
            mining.pop(0)
            mined.append({"step": step, **_mine_negatives(net, mat, log, _n_slices(cfg))})
        x, tgt = (_batch_v2(cfg, mat, pool, real, rng) if mat is not None
                  else _batch(cfg, pool, real, rng))
        loss, parts = centernet_loss(net(x), tgt)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        opt.step()
        if step % 50 == 0 or step == 1:
            history.append({"step": step, "loss": float(loss.detach()), **parts,
                            "elapsed_s": time.monotonic() - t0})
            log(f"step {step}/{cfg.optim.steps} loss {float(loss.detach()):.3f} "
                + " ".join(f"{k} {v:.3f}" for k, v in parts.items())
                + f" ({time.monotonic() - t0:.0f} s)")
        if time.monotonic() - t0 > budget_s:
            log(f"time budget reached at step {step}")
            break
    if mat is not None:
        counts.update(mat.counts())
        counts["hard_negative_mining"] = mined
    final = run_dir / "final.pt"
    torch.save({"state_dict": net.state_dict(), "config": cfg.model_dump(mode="json"),
                "steps_done": step, "counts": counts}, final)
    (run_dir / "train_log.json").write_text(json.dumps(
        {"history": history, "counts": counts, "steps_done": step,
         "train_seconds": time.monotonic() - t0}, indent=1), encoding="utf-8")
    return final


# --------------------------------------------------------------------------- evaluation
def detect_slice(net: Any, s: RealSlice, n_slices: int = 3) -> npt.NDArray[np.float64]:
    """Detections ``x1, y1, x2, y2, score, type_1..type_8`` (source px) on one key slice."""
    from cad_node.pipelines.ct_lesion.pipeline import detect_inputs
    from cad_node.pipelines.ct_lesion.slices import key_slice_input

    x, grid = key_slice_input(s.hu, s.spacing_xy, dict(s.neighbours), n_slices=n_slices)
    dets = detect_inputs(net, x[None], [0])
    rows = [[*d.box, d.score, *d.type_probabilities] for d in dets]
    return grid.to_source(np.asarray(rows, dtype=float).reshape(-1, 13))


def evaluate_slices(net: Any, slices: list[RealSlice], n_slices: int = 3) -> dict[str, Any]:
    """Sensitivities (both criteria), per-type sensitivity and RECIST errors."""
    from cad_node.pipelines.ct_lesion.network import LESION_TYPE_NAMES
    from cad_node.pipelines.ct_lesion.recist import lesion_mask, recist_axes
    from trainer.froc import box_iobb, box_iou, deeplesion_sensitivity

    dets = [detect_slice(net, s, n_slices) for s in slices]
    gts = [s.boxes for s in slices]
    out: dict[str, Any] = {"n_images": len(slices), "n_lesions": int(sum(len(g) for g in gts))}
    for crit in ("iou", "iobb"):
        r = deeplesion_sensitivity([d[:, :5] for d in dets], gts, overlap=crit)
        out[crit] = r.to_dict()
        # per type at 4 FP/image: the score threshold where FP/image reaches 4
        fpi, order_scores = r.fps_per_image, np.sort(np.concatenate([d[:, 4] for d in dets]))[::-1]
        idx = int(np.searchsorted(fpi, 4.0, side="right")) - 1
        thr = float(order_scores[idx]) if idx >= 0 and len(order_scores) else math.inf
        fn = box_iou if crit == "iou" else box_iobb
        per_type: dict[str, list[int]] = {}
        for s, d in zip(slices, dets, strict=True):
            for g, t in zip(s.boxes, s.types, strict=True):
                name = LESION_TYPE_NAMES[t - 1] if 1 <= t <= 8 else "unlabelled"
                hit = any(fn(row[:4], g[None])[0] >= 0.5 for row in d if row[4] >= thr)
                per_type.setdefault(name, [0, 0])
                per_type[name][0] += int(hit)
                per_type[name][1] += 1
        out[crit]["per_type_at_4fp"] = {k: {"hit": v[0], "lesions": v[1]}
                                        for k, v in per_type.items()}
        out[crit]["score_threshold_at_4fp"] = thr
        idx = int(np.searchsorted(fpi, 0.5, side="right")) - 1
        out[crit]["score_threshold_at_0.5fp"] = (float(order_scores[idx])
                                                 if idx >= 0 and len(order_scores) else 1.0)
    # RECIST: from the reference boxes, and from the best-overlapping detection
    errs_ref, errs_det, type_ok = [], [], []
    for s, d in zip(slices, dets, strict=True):
        for rec in s.records:
            sp = s.spacing_xy
            gl = float(np.linalg.norm((rec.recist[0] - rec.recist[1]) * sp))
            gs = float(np.linalg.norm((rec.recist[2] - rec.recist[3]) * sp))
            a = recist_axes(lesion_mask(s.hu, rec.bbox, sp).mask, sp)
            errs_ref.append((a.long_mm - gl, a.short_mm - gs))
            if len(d):
                ov = np.array([box_iou(row[:4], np.array([rec.bbox]))[0] for row in d])
                j = int(np.argmax(ov))
                if ov[j] >= 0.5:
                    b = tuple(float(v) for v in d[j, :4])
                    a = recist_axes(lesion_mask(s.hu, b, sp).mask, sp)  # type: ignore[arg-type]
                    errs_det.append((a.long_mm - gl, a.short_mm - gs))
                    if rec.lesion_type >= 1:
                        type_ok.append(int(np.argmax(d[j, 5:13])) + 1 == rec.lesion_type)

    def summary(e: list[tuple[float, float]]) -> dict[str, Any]:
        if not e:
            return {"n": 0}
        a = np.asarray(e)
        return {"n": len(e), "long_mae_mm": round(float(np.abs(a[:, 0]).mean()), 2),
                "short_mae_mm": round(float(np.abs(a[:, 1]).mean()), 2),
                "long_bias_mm": round(float(a[:, 0].mean()), 2),
                "short_bias_mm": round(float(a[:, 1].mean()), 2)}

    out["recist_from_reference_box"] = summary(errs_ref)
    out["recist_from_detection_iou50"] = summary(errs_det)
    out["type_accuracy_of_hits"] = {"correct": int(sum(type_ok)), "n": len(type_ok)}
    out["detections"] = {s.name: d[:, :5].round(2).tolist() for s, d in zip(slices, dets,
                                                                            strict=True)}
    return out


def chest_ct_false_positives(models_dir: Path, series_dir: Path) -> dict[str, Any]:
    """The ``ct-lesion`` pipeline (the bundle in ``models_dir``) on a real LIDC chest CT.

    Every reported finding whose centre lies farther than ``max(10 mm, half its
    long axis + half the nodule's extent)`` from every reader-marked nodule
    (any reader's ``unblindedReadNodule`` of the series' LIDC XML) is a false
    positive: LIDC annotates lung nodules only, and a chest CT of a screening
    trial holds few other lesions, so the count is an upper bound on the false
    positives a radiologist would find.

    Returns
    -------
    dict
        ``slices``, ``reported`` (findings at the operating threshold, at most
        the pipeline's cap), ``candidates_at_threshold`` (3-D candidates at or
        above it, uncapped), ``at_reader_nodule``, ``false_positives`` and
        ``false_positives_per_slice``.
    """
    from cad_node.imaging import load_series
    from cad_node.pipelines.ct_lesion.pipeline import CtLesionPipeline
    from trainer.lidc import (
        find_lidc_xml,
        nodule_centroid_mm,
        parse_lidc_xml,
        read_series_headers,
    )

    files = sorted(series_dir.rglob("*.dcm"))
    series = load_series(files)
    heads = read_series_headers(files[0].parent)
    xml = find_lidc_xml(files[0].parent, heads.series_instance_uid)
    nodules: list[tuple[npt.NDArray[np.float64], float]] = []
    if xml is not None:
        ann = parse_lidc_xml(xml, series_instance_uid=heads.series_instance_uid)
        for nod in ann.nodules:
            c = nodule_centroid_mm(nod, heads.positions_by_sop_uid, heads.pixel_spacing,
                                   rows=heads.rows, cols=heads.cols)
            if c is not None:
                zs = [heads.positions_by_sop_uid[r.sop_instance_uid][2] for r in nod.rois
                      if r.sop_instance_uid in heads.positions_by_sop_uid]
                nodules.append((np.asarray(c), (max(zs) - min(zs)) / 2 if zs else 0.0))
    run = CtLesionPipeline(models_dir=models_dir).run_detailed(series)
    thr = float(run.result.measurements.get("operating_threshold", 1.0))
    fp = 0
    for f in run.result.findings:
        fc = np.asarray(f.center_mm, dtype=float)
        near = any(np.linalg.norm(fc - nc) <= max(10.0, (f.long_axis_mm or 0.0) / 2 + r)
                   for nc, r in nodules)
        fp += int(not near)
    n = len(series.sop_instance_uids)
    return {"series": str(series_dir.name), "slices": n, "operating_threshold": thr,
            "reported": len(run.result.findings),
            "candidates_at_threshold": int(sum(les.score >= thr for les in run.lesions)),
            "reader_nodule_marks": len(nodules),
            "at_reader_nodule": len(run.result.findings) - fp, "false_positives": fp,
            "false_positives_per_slice": round(fp / max(n, 1), 4)}


def load_run_network(run_dir: Path) -> tuple[Any, LesionTrainConfig, dict[str, Any]]:
    """The trained network of ``run_dir/final.pt`` in eval mode, its config and metadata."""
    import torch

    from cad_node.models.network import build_network

    ck = torch.load(run_dir / "final.pt", map_location="cpu", weights_only=True)
    cfg = LesionTrainConfig.model_validate(ck["config"])
    net = build_network(cfg.architecture)
    net.load_state_dict(ck["state_dict"])
    net.eval()
    return net, cfg, ck


def evaluate_run(run_dir: Path, *, config_dir: Path | None = None) -> dict[str, Any]:
    """Evaluate ``run_dir/final.pt`` on the val and test DL_info rows; writes metrics.json."""
    import torch

    torch.set_num_threads(1)
    net, cfg, ck = load_run_network(run_dir)
    root = _resolve(cfg.data.deeplesion_root, config_dir)
    rows = load_dl_rows(root, root / cfg.data.dl_info)
    with torch.no_grad():
        metrics: dict[str, Any] = {
            sp: evaluate_slices(net, [s for s in rows if s.split == sp], _n_slices(cfg))
            for sp in ("val", "test") if any(s.split == sp for s in rows)}
    metrics["counts"] = ck.get("counts", {})
    metrics["steps_done"] = ck.get("steps_done")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    return metrics


def _stages(metrics: dict[str, Any], cfg: LesionTrainConfig) -> str:
    c = metrics.get("counts", {})
    if "stage2" in c:
        return (f"stage 1, {c.get('steps_done')} steps of batch 8 on the synthetic pool and the "
                f"real slices (a quarter of each batch), AdamW lr 2e-3, warm-up + cosine; "
                f"stage 2 (fine-tuning, `trainer/configs/ct-lesion-finetune.yaml`), "
                f"{c.get('stage2_steps')} steps of batch {cfg.optim.batch_size} on the "
                f"{c['stage2'].get('real_train_slices')} real training slices only, lr "
                f"{cfg.optim.lr}.  Stage 2 was kept because it did better on the val rows "
                "(IoBB sensitivity at 4 FPs/image 0.143 against 0.000 for stage 1). "
                "One CPU thread, niced, on a shared 2-core machine.")
    return (f"{metrics.get('steps_done')} steps of batch {cfg.optim.batch_size}, AdamW lr "
            f"{cfg.optim.lr}, one CPU thread, seed {cfg.seed}.")


def _recist_line(metrics: dict[str, Any], split: str, key: str) -> str:
    """The model card's RECIST error line of ``metrics[split][key]``."""
    r = metrics.get(split, {}).get(key, {})
    if not r or not r.get("n"):
        return "n = 0"
    return (f"n = {r['n']}: long axis MAE {r['long_mae_mm']} mm (bias {r['long_bias_mm']}), "
            f"short axis MAE {r['short_mae_mm']} mm (bias {r['short_bias_mm']})")


def _per_type_at_4fp(metrics: dict[str, Any]) -> dict[str, Any]:
    """Test-split sensitivity per lesion type at 4 FP/image, per criterion."""
    return {crit: metrics.get("test", {}).get(crit, {}).get("per_type_at_4fp", {})
            for crit in ("iou", "iobb")}


def render_card(cfg: LesionTrainConfig, metrics: dict[str, Any], threshold: float,
                version: str) -> str:
    """The model card (training data, measured figures, limits)."""
    c = metrics.get("counts", {})

    def sens_line(split: str, crit: str) -> str:
        r = metrics.get(split, {}).get(crit)
        if not r:
            return f"| {split} | {crit.upper()} | 0 | - | - | - | - | - | - |"
        vals = " | ".join(f"{v:.3f}" for v in r["sensitivity_at"])
        return f"| {split} | {crit.upper()} >= 0.5 | {r['n_lesions']} | {vals} |"

    per_type = _per_type_at_4fp(metrics)
    recist = functools.partial(_recist_line, metrics)
    return f"""# ct-lesion {version}: universal lesion detector for CT (DeepLesion-style)

**Not for diagnostic use.** Research and engineering use only.  It proposes
lesion candidates on CT slices; it is not a validated medical device, and its
measured sensitivity on real data rests on very few lesions (below).

## What it is
An anchor-free CenterNet-style 2-D detector built from MONAI Convolution and
ResidualUnit blocks (~0.27 M parameters) on a 2.5-D input: the slice and the
slices 2 mm above and below (linearly interpolated; missing neighbours repeat
the key slice), HU window [-1024, 3071] scaled to [0, 1], 1.6 mm pixels on a
256 x 256 grid centred on the body.  Per box: a lesion probability and the 8
DeepLesion coarse types.  The ct-lesion pipeline groups boxes across
neighbouring slices into one 3-D finding, measures RECIST axes on a mask grown
from the box and reports lesions with probability >= {threshold:.3f} (the score
at 0.5 FPs/image on the DeepLesion *val* rows).

## Training data (exactly)
* Synthetic lesions inserted into the real CT backgrounds of LIDC-IDRI-0001
  and LIDC-IDRI-0002 (TCIA, CC BY 3.0; chest CTs reaching the upper abdomen):
  {c.get('synthetic_slices', '?')} slices holding {c.get('synthetic_lesions', '?')} lesions, by
  DeepLesion type code {c.get('synthetic_lesions_by_type', {})} (1 bone, 2 abdomen,
  3 mediastinum, 4 liver, 5 lung, 7 soft tissue; no kidney (6) or pelvis (8)
  examples: those types are never taught).  Generator: `trainer/ct_lesion_synth.py`.
* {c.get('real_train_slices', '?')} real DeepLesion key slices (NIH Clinical Center
  DeepLesion, Yan et al. 2018, released without a formal licence text; copy from
  github.com/ragram88/DeepLesionClassifiers) from `Images_png/` with the boxes of
  `Images_png_boxes_liver.csv` ({c.get('real_train_lesions', '?')} liver lesions; the
  table gives no pixel spacing: 0.8 mm assumed).  No neighbouring slices: their
  neighbour channels repeat the key slice.  Their patients differ from the rows below.
* DL_info rows (`DL_info_subset.csv`, official `Train_Val_Test` column), lesions by
  split: {c.get('dl_info_rows_by_split', {})}.  No row is `train`, so none was trained
  on.  The `val` rows chose the operating threshold and the RECIST region-growing
  parameters; the `test` rows were used for nothing but the final evaluation.
* Schedule: {_stages(metrics, cfg)}

## Measured figures (`cad-train evaluate ct-lesion`, DeepLesion protocol)
Sensitivity at 0.5, 1, 2, 4, 8, 16 FPs/image on the key slices.  All rows are
liver lesions, and only the rows' lesions are annotated, so other real lesions on
these slices count as false positives.

| split | hit | lesions | 0.5 | 1 | 2 | 4 | 8 | 16 |
|---|---|---|---|---|---|---|---|---|
{sens_line('test', 'iou')}
{sens_line('test', 'iobb')}
{sens_line('val', 'iou')}
{sens_line('val', 'iobb')}

Per-type sensitivity at 4 FPs/image (test): IoU {per_type['iou']}; IoBB {per_type['iobb']}.
Type accuracy of the test hits (IoU >= 0.5): {metrics.get('test', {}).get('type_accuracy_of_hits')}.

RECIST error (mm) against the official RECIST points of the DL_info rows:
* test, mask from the reference box: {recist('test', 'recist_from_reference_box')}
* val, mask from the reference box: {recist('val', 'recist_from_reference_box')}
* test, mask from detections with IoU >= 0.5: {recist('test', 'recist_from_detection_iou50')}

Published figures for comparison (official test split, 22,000+ training lesions):
Faster R-CNN baseline ~81 %, 3DCE 84-89 %, MULAN ~86 % at 4 FPs/image.  This
bundle's figures rest on 9 (test) and 14 (val) lesions: very wide uncertainty.

## Limits
Trained mostly on synthetic lesions in two chest CTs; kidney and pelvis types
never seen; the real training slices are liver only, and after the fine-tuning
on them the type head calls most candidates "liver" (on LIDC-IDRI-0001 all ten
reported candidates are typed liver; LIDC annotates lung nodules only, so none can
be checked): the type is not informative.  It reports up to 10 candidates above
the operating threshold on any CT; most are expected to be false positives.
With the full DeepLesion,
point `data.dl_info` of `trainer/configs/ct-lesion.yaml` at `DL_info.csv` and
`data.deeplesion_root` at the download: its `train` rows are then trained on.
"""


def _sens_table(metrics: dict[str, Any]) -> str:
    rows = ["| split | hit | lesions | 0.5 | 1 | 2 | 4 | 8 | 16 |",
            "|---|---|---|---|---|---|---|---|---|"]
    for split in ("test", "val"):
        for crit in ("iou", "iobb"):
            r = metrics.get(split, {}).get(crit)
            if r:
                vals = " | ".join(f"{v:.3f}" for v in r["sensitivity_at"])
                rows.append(f"| {split} | {crit.upper()} >= 0.5 | {r['n_lesions']} | {vals} |")
    return "\n".join(rows)


def _chest_lines(metrics: dict[str, Any]) -> str:
    out = []
    for r in metrics.get("chest_ct", []):
        use = ("held out: never seen in training" if r.get("held_out")
               else "trained on as background and negatives: an in-sample figure")
        out.append(f"* {r['series']} ({r['slices']} slices, {use}): {r['reported']} finding(s) "
                   f"reported, {r['at_reader_nodule']} at a reader-marked nodule, "
                   f"{r['false_positives']} false positive(s) = "
                   f"{r['false_positives_per_slice']:.4f} per slice; "
                   f"{r['candidates_at_threshold']} 3-D candidates at or above the threshold "
                   "before the cap of 10")
    return "\n".join(out) or "* not measured"


def render_card_v2(cfg: LesionTrainConfig, metrics: dict[str, Any], threshold: float,
                   version: str, n_params: int) -> str:
    """The model card of a bundle trained with the augmented recipe (1.1.0 on)."""
    c = metrics.get("counts", {})
    o = cfg.optim
    arch = cfg.architecture
    windows = arch.get("windows")
    excl = cfg.data.background_exclude_z_mm
    per_type = _per_type_at_4fp(metrics)
    recist = functools.partial(_recist_line, metrics)

    mined = c.get("hard_negative_mining", [])
    win_text = (f"Inside the network each slice is re-windowed into the fixed HU windows "
                f"{windows} before the first convolution (the input convention is unchanged)."
                if windows else "No re-windowing inside the network.")
    return f"""# ct-lesion {version}: universal lesion detector for CT (DeepLesion-style)

**Not for diagnostic use.** Research and engineering use only.  It proposes
lesion candidates on CT slices; it is not a validated medical device, and its
measured sensitivity on real data rests on very few lesions (below).

## What it is
An anchor-free CenterNet-style 2-D detector built from MONAI Convolution and
ResidualUnit blocks ({n_params / 1e6:.2f} M parameters, heads of {arch.get('head_width',
arch.get('neck'))} channels) on a 2.5-D input: {_n_slices(cfg)} slices 2 mm apart centred on
the key slice (linearly interpolated; missing neighbours repeat the key slice), in the
DeepLesion HU window [-1024, 3071] scaled to [0, 1], 1.6 mm pixels on a 256 x 256 grid
centred on the body.  {win_text}
Per box: a lesion probability and the 8 DeepLesion coarse types.  The ct-lesion pipeline
groups boxes across neighbouring slices into one 3-D finding, measures RECIST axes on a
mask grown from the box and reports lesions with probability >= {threshold:.3f} (the score
at 0.5 FPs/image, IoU >= 0.5, on the DeepLesion *val* rows; no other calibration).

## Training data (exactly) and its terms
* **Real DeepLesion key slices**: the {c.get('real_train_slices', '?')} `Images_png/` slices
  of `deeplesion-samples` with the boxes of `Images_png_boxes_liver.csv`
  ({c.get('real_train_lesions', '?')} liver lesions; the table gives no pixel spacing: 0.8 mm
  assumed, and the scale augmentation covers 0.8-1.25x).  No neighbouring slices: their
  neighbour channels repeat the key slice.  Their patients differ from the DL_info rows.
  {o.real_fraction:.0%} of the samples; in {o.real_paste_prob:.0%} of those 1-2 further real
  training lesions are pasted into the slice's liver.
* **Real lesion appearance in a real CT background**: the same
  {c.get('real_lesion_bank', '?')} training lesions, cut out with the pipeline's
  region-grown mask and pasted (HU relative to the surrounding tissue kept, scaled
  0.75-1.35x, flipped, rotated) into liver-like soft tissue of LIDC-IDRI-0002 slices
  ({c.get('background_slices_with_liver', '?')} slices qualify; the type is not taught on
  these, as the mask may be heart or muscle): {o.paste_fraction:.0%} of the other samples.
  Generator: `trainer/ct_lesion_paste.py`.
* **Synthetic lesions** of six types inserted into LIDC-IDRI-0002
  (`trainer/ct_lesion_synth.py`): a fixed pool of {c.get('synthetic_slices', '?')} slices
  holding {c.get('synthetic_lesions', '?')} lesions, by DeepLesion type code
  {c.get('synthetic_lesions_by_type', {})}; no kidney (6) or pelvis (8) examples.
* **Negatives**: unaltered LIDC-IDRI-0002 slices ({o.negative_fraction:.0%} of the other
  samples), re-weighted by the detector's own highest score on each
  ({len(mined)} hard-negative passes: {mined}).
  Slices within {excl} mm (patient z) of LIDC-IDRI-0002 hold a ~25 mm nodule that fewer than
  3 readers marked: they are never drawn.
* **LIDC-IDRI-0001 is not used** by this bundle (independent chest CT for the
  false-positive count below; it is the CT of the end-to-end test and the benchmark).
* **DL_info rows** (`DL_info_subset.csv`, official `Train_Val_Test`), lesions by split
  {c.get('dl_info_rows_by_split', {})}: no row is `train`, so none was trained on or pasted.
  The `val` rows chose the operating threshold and which of two runs of this recipe (with
  and without the internal HU windows) became this bundle; the `test` rows were used for
  nothing but the final evaluation.
* Augmentation of every sample: rotation +-12 deg, scale, shift +-12 px, horizontal flip,
  HU gain 0.93-1.07 and offset +-20 HU, correlated noise up to 12 HU; neighbour channels
  replaced by the key slice in {o.neighbour_dropout:.0%} of the CT-background samples.
* Schedule: {metrics.get('steps_done')} steps of batch {o.batch_size} from random
  initialisation, AdamW lr {o.lr} (warm-up + cosine over a {o.time_budget_min:g} min budget),
  one CPU thread, niced, on a shared 2-core machine, seed {cfg.seed}.
* Terms: DeepLesion, NIH Clinical Center (Yan K, Wang X, Lu L, Summers RM, J Med Imaging
  5(3):036501, 2018), released publicly without a formal licence text (the slices come from
  github.com/ragram88/DeepLesionClassifiers, which has no licence); acknowledge the NIH
  Clinical Center.  LIDC-IDRI, TCIA, CC BY 3.0 and the TCIA Data Usage Policy (cite Armato
  et al. 2011 and 2015, Clark et al. 2013).  Weights: Apache-2.0.

## Measured figures (`cad-train evaluate ct-lesion`, DeepLesion protocol)
Sensitivity at 0.5, 1, 2, 4, 8, 16 FPs/image on the key slices.  All rows are liver
lesions, and only the rows' lesions are annotated, so other real lesions on these slices
count as false positives.

{_sens_table(metrics)}

Per-type sensitivity at 4 FPs/image (test): IoU {per_type['iou']}; IoBB {per_type['iobb']}.
Type accuracy of the test hits (IoU >= 0.5): {metrics.get('test', {}).get('type_accuracy_of_hits')}.

False positives on real chest CT at the operating threshold (the ct-lesion pipeline,
findings farther than max(10 mm, half the long axis + the nodule's half extent) from every
reader-marked nodule of the LIDC XML):
{_chest_lines(metrics)}

RECIST error (mm) against the official RECIST points of the DL_info rows:
* test, mask from the reference box: {recist('test', 'recist_from_reference_box')}
* val, mask from the reference box: {recist('val', 'recist_from_reference_box')}
* test, mask from detections with IoU >= 0.5: {recist('test', 'recist_from_detection_iou50')}

Published figures for comparison (official test split, 22,000+ training lesions):
Faster R-CNN baseline ~81 %, 3DCE 84-89 %, MULAN ~86 % at 4 FPs/image.  This bundle's
figures rest on 9 (test) and 14 (val) lesions, all liver lesions: very wide uncertainty
(one lesion is 11 % of the test sensitivity).

## Limits
Trained on 24 real liver lesions and on lesions pasted or synthesised into one chest CT;
kidney and pelvis types never seen, and the real training lesions are liver only, so the
type is not informative outside the liver.  It reports up to 10 candidates above the
operating threshold on any CT.  With the full DeepLesion, point `data.dl_info` of the
config at `DL_info.csv` and `data.deeplesion_root` at the download: its `train` rows are
then trained on.
"""


def export_run(run_dir: Path, models_dir: Path, *, version: str | None = None,
               force: bool = False) -> Path:
    """Write ``models_dir/ct-lesion/<version>`` from a trained, evaluated run."""
    from trainer.export import write_bundle

    net, cfg, ck = load_run_network(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    counts = dict(ck.get("counts", {}))
    if counts.get("init_from"):  # a fine-tuning run: describe the run it started from
        parent = run_dir.parent / Path(str(counts["init_from"])).name
        if (parent / "train_log.json").is_file():
            plog = json.loads((parent / "train_log.json").read_text(encoding="utf-8"))
            counts["stage1"] = {**plog.get("counts", {}), "steps_done": plog.get("steps_done")}
            metrics["counts"] = {**counts["stage1"], "stage2": {
                k: v for k, v in counts.items() if k != "stage1"},
                "stage2_steps": ck.get("steps_done")}
            ck = {**ck, "counts": metrics["counts"]}
    threshold = float(metrics.get("val", {}).get("iou", {}).get("score_threshold_at_0.5fp", 0.5))
    threshold = min(max(threshold, 0.0), 1.0)
    version = version or cfg.bundle.version
    slim = {k: ({kk: vv for kk, vv in v.items() if kk != "detections"}
                if isinstance(v, dict) else v) for k, v in metrics.items()}
    return write_bundle(
        models_dir, name=cfg.bundle.name, version=version, state_dict=net.state_dict(),
        task="2.5-D universal lesion detection on CT slices (DeepLesion-style)",
        architecture=cfg.architecture,
        input_spec={"spacing_mm": (1.6, 1.6, 2.0), "patch_size": (_n_slices(cfg), 256, 256),
                    "hu_window": (-1024.0, 3071.0), "outside_hu": -1024.0, "batch_size": 8},
        output_spec={"kind": "logit", "positive_class": "lesion", "threshold": threshold,
                     "operating_threshold": threshold,
                     "operating_rule": "the lesion score at 0.5 FPs/image (IoU >= 0.5) on the "
                                       "DeepLesion val rows"},
        training_data={"description": (
            "24 real DeepLesion Images_png liver key slices (augmented), their lesions pasted "
            "into LIDC-IDRI-0002, synthetic lesions in LIDC-IDRI-0002, LIDC-IDRI-0002 "
            "negatives (hard-negative weighted); LIDC-IDRI-0001 not used; no DL_info row "
            "trained" if "real_lesion_bank" in ck.get("counts", {}) else
            "synthetic lesions in LIDC-IDRI-0001/0002 backgrounds + 24 real DeepLesion "
            "Images_png liver key slices; no DL_info row trained"),
            **ck.get("counts", {})},
        intended_use=("Research and engineering use only. Not for diagnostic use. Proposes "
                      "lesion candidates on CT of any body part for review; it does not "
                      "replace a radiologist."),
        metrics=slim,
        model_card=(render_card_v2(cfg, metrics, threshold, version,
                                   sum(int(p.numel()) for p in net.parameters()))
                    if "real_lesion_bank" in metrics.get("counts", {})
                    else render_card(cfg, metrics, threshold, version)),
        provenance={"trainer": "trainer/ct_lesion.py", "config": cfg.model_dump(mode="json"),
                    "steps_done": ck.get("steps_done")},
        force=force,
    )


def evaluate_command(
    run: Annotated[Path, typer.Option(help="Run directory (holds final.pt).")] = Path(
        "runs/ct-lesion"),
    export: Annotated[Path | None, typer.Option(
        help="Also write the bundle into this models directory.")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing bundle version.")] = False,
    chest_ct: Annotated[list[Path] | None, typer.Option(
        help="A real LIDC chest CT directory (DICOM + LIDC XML) to count the pipeline's false "
             "positives on; repeatable.")] = None,
    held_out: Annotated[list[str] | None, typer.Option(
        help="Name of a --chest-ct directory training never saw (stated in the card).")] = None,
) -> None:
    """Evaluate a ct-lesion run: DeepLesion sensitivities (IoU, IoBB), per type, RECIST,
    and false positives per slice on real chest CT."""
    try:
        m = evaluate_run(run)
        if chest_ct:
            import tempfile

            with tempfile.TemporaryDirectory() as tmp:
                export_run(run, Path(tmp))
                m["chest_ct"] = []
                for d in chest_ct:
                    r = chest_ct_false_positives(Path(tmp), d)
                    r["held_out"] = d.name in (held_out or [])
                    m["chest_ct"].append(r)
                    typer.echo(f"chest CT {r}")
            (run / "metrics.json").write_text(json.dumps(m, indent=1), encoding="utf-8")
        for sp in ("val", "test"):
            if sp in m:
                r = m[sp]
                typer.echo(f"{sp}: {r['n_lesions']} lesions on {r['n_images']} images")
                for crit in ("iou", "iobb"):
                    typer.echo(f"  {crit.upper()}>=0.5 " + "  ".join(
                        f"{f:g}:{v:.3f}" for f, v in zip(r[crit]["fp_rates"],
                                                         r[crit]["sensitivity_at"], strict=True)))
                typer.echo(f"  RECIST (reference box) {r['recist_from_reference_box']}")
                typer.echo(f"  RECIST (detections) {r['recist_from_detection_iou50']}")
        if export is not None:
            typer.echo(f"wrote {export_run(run, export, force=force)}")
    except (ValueError, FileNotFoundError, OSError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
