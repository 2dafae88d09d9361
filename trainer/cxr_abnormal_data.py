"""Data of ``cad-train train cxr-abnormal``: config, images, patch scales and labels, feature cache.

Sources (read in place, never copied):

* NIH ChestX-ray14 "starter" (``Data_Entry_subset.csv``: "No Finding" = normal,
  anything else = abnormal; ``BBox_subset_1024.csv``: official boxes, in
  1024-pixel coordinates, scaled by ``nih_box_scale`` to the stored images);
* JSRT (``cases.csv``: nodule cases abnormal, with the nodule centre in the
  stored 512-pixel coordinates and its size in mm; normals normal).

Patch scales (:func:`derive_scales`): k-means (deterministic) on
``(log h, log w)`` of the official ChestX-ray14 box list (``box_statistics``,
all 984 boxes, shapes only) and of the JSRT nodules as squares of
``jsrt_context`` x the nodule diameter, all in 256-pixel network-input units;
rounded to even 8-pixel cells and de-duplicated.

Patch labels (:func:`patch_labels`, per image ``(scales, 16, 16)``: 1, 0 or
-1 = ignored), in network-input pixels:

* normal image: every patch centred on a lung cell is 0;
* JSRT nodule (centre ``c``, diameter ``d``): 1 when ``c`` lies in the central
  half of the patch and the patch's longer side is at most
  ``4 max(d, 12)``; 0 when the patch does not touch the nodule's disc
  (bounding square); otherwise ignored;
* NIH image with an official box: 1 when IoU(patch, box) >= 0.3, else ignored
  (other findings of a multi-label image are not boxed);
* NIH abnormal image without a box: all ignored (its image label trains the
  maximum patch: multiple-instance learning).

Features (:func:`build_cache`): the frozen ``cxr-lungs`` encoder's ``f8`` and
``f16`` maps (float16) and its predicted lungs (the 16x16 lung grid and the
lungs' bounding box), computed once per image and cached in the run folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import yaml
from pydantic import BaseModel, ConfigDict, Field

from cad_node.pipelines.cxr.abnormal_net import GRID, INPUT_SIZE, kernel_cells, patch_boxes

__all__ = [
    "AbnormalConfig",
    "FeatureCache",
    "Item",
    "build_cache",
    "derive_scales",
    "kmeans_log_boxes",
    "load_abnormal_config",
    "load_items",
    "make_folds",
    "patch_labels",
]

#: Patches with at least this IoU with an official NIH box are positive.
NIH_POSITIVE_IOU = 0.3


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _BundleCfg(_Strict):
    name: str = "cxr-abnormal"
    version: str = "1.0.0"


class _DataCfg(_Strict):
    nih_images: str
    nih_entries: str
    nih_boxes: str | None = None
    #: Factor from the box file's coordinates to the stored images (1024 -> 512: 0.5).
    nih_box_scale: float = Field(0.5, gt=0)
    #: The full official box list (shapes only, for the patch scales).
    box_statistics: str | None = None
    box_statistics_scale: float = Field(0.25, gt=0)  # 1024 -> 256 input pixels
    jsrt: str | None = None
    #: JSRT stored pixel size, mm.
    jsrt_pixel_mm: float = Field(0.7, gt=0)
    description: str = ""
    terms: str = ""


class _FoldsCfg(_Strict):
    k: int = Field(5, ge=3)
    #: The fold the shipped model's operating point is fixed on (never trained on).
    validation_fold: int = Field(4, ge=0)
    #: Image names per fold (NIH "Image Index", JSRT file names).
    assignment: list[list[str]]


class _ScalesCfg(_Strict):
    count: int = Field(14, ge=1, le=32)
    jsrt_context: float = Field(2.0, gt=0)
    seed: int = 0


class _TrainCfg(_Strict):
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-3, ge=0)
    threads: int = Field(2, ge=1, le=64)
    #: Negative patches per positive patch (hardest first: online hard-example mining).
    neg_per_pos: int = Field(3, ge=1)
    width: int = Field(16, ge=4)
    #: Principal components of f16 kept for the patch descriptors.
    projection: int = Field(64, ge=4)
    dropout: float = Field(0.2, ge=0, lt=1)
    #: Whether patch descriptors include the projected f16 (AbnormalNet.patch_context).
    patch_context: bool = True


class AbnormalConfig(_Strict):
    """``trainer/configs/cxr-abnormal.yaml``."""

    model: str
    seed: int = 0
    bundle: _BundleCfg = _BundleCfg()
    #: The ``cxr-lungs`` bundle folder whose encoder is reused (frozen).
    lungs_bundle: str
    data: _DataCfg
    folds: _FoldsCfg
    scales: _ScalesCfg = _ScalesCfg()
    train: _TrainCfg = _TrainCfg()
    bootstrap: int = Field(2000, ge=100)


def _expand(path: str, base: Path) -> Path:
    p = Path(os.path.expandvars(path))
    return p if p.is_absolute() else base / p


def load_abnormal_config(path: Path, base: Path | None = None) -> AbnormalConfig:
    """Read and validate the YAML config; relative data paths are resolved against ``base``.

    ``base`` defaults to the working directory.  ``$CAD_NODE_TEST_DATA`` and other
    environment variables in paths are expanded.

    Raises
    ------
    ValueError
        Unreadable file, unknown key or bad value (the message names the file and key).
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read config: {exc}") from None
    try:
        cfg = AbnormalConfig.model_validate(raw)
    except Exception as exc:  # pydantic.ValidationError names the keys
        raise ValueError(f"{path}: {exc}") from None
    if cfg.model != "cxr-abnormal":
        raise ValueError(f"{path}: model {cfg.model!r} is not 'cxr-abnormal'")
    if len(cfg.folds.assignment) != cfg.folds.k:
        raise ValueError(f"{path}: folds.assignment has {len(cfg.folds.assignment)} folds, "
                         f"folds.k is {cfg.folds.k}")
    if not 0 <= cfg.folds.validation_fold < cfg.folds.k:
        raise ValueError(f"{path}: folds.validation_fold must be in [0, {cfg.folds.k})")
    b = base or Path.cwd()
    d = cfg.data
    for key in ("nih_images", "nih_entries", "nih_boxes", "box_statistics", "jsrt"):
        v = getattr(d, key)
        if v is not None:
            setattr(d, key, str(_expand(v, b)))
    cfg.lungs_bundle = str(_expand(cfg.lungs_bundle, b))
    return cfg


@dataclass(frozen=True)
class Item:
    """One training/evaluation image."""

    name: str
    source: str  # "nih" | "jsrt"
    path: Path
    label: int  # 1 = abnormal
    #: Official boxes ``(x0, y0, x1, y1)`` in stored pixels (NIH).
    boxes: tuple[tuple[float, float, float, float], ...] = ()
    #: JSRT nodule ``(x, y, diameter)`` in stored pixels.
    nodule: tuple[float, float, float] | None = None


def _open(path: Path, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path.open(newline="", encoding="utf-8")


def load_items(cfg: AbnormalConfig) -> list[Item]:
    """Every image the config's folds name, with labels and annotations.

    Raises
    ------
    FileNotFoundError
        A data file is missing.
    ValueError
        A fold names an image not in the data, or a row is malformed (file and line named).
    """
    d = cfg.data
    items: dict[str, Item] = {}
    boxes: dict[str, list[tuple[float, float, float, float]]] = {}
    if d.nih_boxes:
        with _open(Path(d.nih_boxes), "NIH box file") as fh:
            for line, box_row in enumerate(csv.reader(fh), start=1):
                if line == 1:
                    continue
                try:
                    x, y, w, h = (float(v) * d.nih_box_scale for v in box_row[2:6])
                except (ValueError, IndexError):
                    raise ValueError(f"{d.nih_boxes}:{line}: malformed box row") from None
                boxes.setdefault(box_row[0], []).append((x, y, x + w, y + h))
    with _open(Path(d.nih_entries), "NIH Data_Entry file") as fh:
        for line, row in enumerate(csv.DictReader(fh), start=2):
            try:
                name, labels = row["Image Index"], row["Finding Labels"]
            except KeyError as exc:
                raise ValueError(f"{d.nih_entries}:{line}: missing column {exc}") from None
            items[name] = Item(name, "nih", Path(d.nih_images) / name,
                               0 if labels == "No Finding" else 1,
                               boxes=tuple(boxes.get(name, ())))
    if d.jsrt:
        root = Path(d.jsrt)
        with _open(root / "cases.csv", "JSRT cases.csv") as fh:
            for line, row in enumerate(csv.DictReader(fh), start=2):
                try:
                    name, label = row["image"], row["label"]
                    nodule = None
                    if label == "nodule":
                        nodule = (float(row["x"]), float(row["y"]),
                                  float(row["size_mm"]) / d.jsrt_pixel_mm)
                except (KeyError, ValueError) as exc:
                    raise ValueError(f"{root / 'cases.csv'}:{line}: malformed row: {exc}"
                                     ) from None
                items[name] = Item(name, "jsrt", root / "images" / name,
                                   1 if label == "nodule" else 0, nodule=nodule)
    out = []
    for fold in cfg.folds.assignment:
        for name in fold:
            if name not in items:
                raise ValueError(f"folds.assignment names {name!r}, not in the data")
            out.append(items[name])
    return out


def make_folds(names: list[str], labels: list[int], groups: list[str], k: int, seed: int
               ) -> list[list[str]]:
    """Stratified (by group and label) fold assignment, as written into the config once."""
    rng = np.random.default_rng(seed)
    folds: list[list[str]] = [[] for _ in range(k)]
    n = 0
    for g in sorted(set(groups)):
        for lab in (0, 1):
            idx = [i for i in range(len(names)) if groups[i] == g and labels[i] == lab]
            for j in rng.permutation(len(idx)):
                folds[n % k].append(names[idx[int(j)]])
                n += 1
    return [sorted(f) for f in folds]


def kmeans_log_boxes(hw: npt.NDArray[np.float64], k: int, seed: int = 0, iters: int = 100
                     ) -> npt.NDArray[np.float64]:
    """k-means (k-means++ seeding, fixed seed) of ``(h, w)`` sizes in log space; centres sorted."""
    x = np.log(np.asarray(hw, float))
    k = min(k, len(x))
    rng = np.random.default_rng(seed)
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d2 = np.min(((x[:, None] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(x[rng.choice(len(x), p=d2 / d2.sum())] if d2.sum() > 0 else x[0])
    c = np.asarray(centres)
    for _ in range(iters):
        lab = np.argmin(((x[:, None] - c[None]) ** 2).sum(-1), axis=1)
        new = np.asarray([x[lab == j].mean(0) if (lab == j).any() else c[j] for j in range(k)])
        if np.allclose(new, c):
            break
        c = new
    out = np.exp(c)
    return np.asarray(out[np.lexsort((out[:, 1], out[:, 0]))])


def derive_scales(cfg: AbnormalConfig, items: list[Item]) -> list[tuple[float, float]]:
    """Patch scales ``(h, w)`` in network-input pixels (module docstring)."""
    d = cfg.data
    hw: list[tuple[float, float]] = []
    if d.box_statistics:
        with _open(Path(d.box_statistics), "box statistics file") as fh:
            for line, row in enumerate(csv.reader(fh), start=1):
                if line == 1 or len(row) < 6:
                    continue
                try:
                    w, h = float(row[4]) * d.box_statistics_scale, float(row[5]) * (
                        d.box_statistics_scale)
                except ValueError:
                    raise ValueError(f"{d.box_statistics}:{line}: malformed box row") from None
                if w > 0 and h > 0:
                    hw.append((h, w))
    for it in items:
        if it.nodule is not None:
            side = cfg.scales.jsrt_context * it.nodule[2] * INPUT_SIZE / 512.0
            hw.append((side, side))
    if not hw:
        raise ValueError("no boxes or nodules to derive patch scales from")
    centres = kmeans_log_boxes(np.asarray(hw), cfg.scales.count, cfg.scales.seed)
    seen: set[tuple[int, int]] = set()
    scales: list[tuple[float, float]] = []
    for h, w in centres:
        key = (kernel_cells(h), kernel_cells(w))
        if key not in seen:
            seen.add(key)
            scales.append((float(key[0] * 8), float(key[1] * 8)))
    return scales


def patch_labels(item: Item, scales: list[tuple[float, float]], grid: npt.NDArray[np.bool_],
                 shape: tuple[int, int]) -> npt.NDArray[np.int8]:
    """Labels ``(scales, 16, 16)`` in {1, 0, -1} of one image (module docstring)."""
    boxes = patch_boxes(scales).numpy().astype(np.float64)  # (s, 16, 16, 4) input px
    f = INPUT_SIZE / max(shape)  # stored px -> input px
    lab = np.full(boxes.shape[:3], -1, np.int8)
    if item.label == 0:
        lab[:] = 0
    elif item.nodule is not None:
        cx, cy, d = (v * f for v in item.nodule)
        pw, ph = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
        pcx, pcy = (boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2
        central = (np.abs(cx - pcx) <= pw / 4) & (np.abs(cy - pcy) <= ph / 4)
        small = np.maximum(pw, ph) <= 4 * max(d, 12.0)
        apart = ((cx + d / 2 < boxes[..., 0]) | (cx - d / 2 > boxes[..., 2])
                 | (cy + d / 2 < boxes[..., 1]) | (cy - d / 2 > boxes[..., 3]))
        lab[apart] = 0
        lab[central & small] = 1
    else:
        for bx in item.boxes:
            b = np.asarray(bx) * f
            iw = np.clip(np.minimum(boxes[..., 2], b[2]) - np.maximum(boxes[..., 0], b[0]), 0, None)
            ih = np.clip(np.minimum(boxes[..., 3], b[3]) - np.maximum(boxes[..., 1], b[1]), 0, None)
            inter = iw * ih
            union = ((boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
                     + (b[2] - b[0]) * (b[3] - b[1]) - inter)
            lab[inter / union >= NIH_POSITIVE_IOU] = 1
    lab[:, ~grid] = -1
    return lab


@dataclass
class FeatureCache:
    """Frozen-encoder features and predicted lungs of every item (same order)."""

    f8: npt.NDArray[np.float16]
    f16: npt.NDArray[np.float16]
    grid: npt.NDArray[np.bool_]
    lung_box: npt.NDArray[np.float64]
    shape: npt.NDArray[np.int64]
    names: list[str]


def _read_grey(path: Path) -> npt.NDArray[np.float32]:
    from PIL import Image

    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), np.float32) / 255.0


def _cache_key(lungs_bundle: Path, items: list[Item]) -> str:
    h = hashlib.sha256()
    h.update((lungs_bundle / "manifest.json").read_bytes())
    for it in items:
        h.update(f"{it.name}|{it.path}".encode())
    return h.hexdigest()[:16]


def build_cache(items: list[Item], lungs_bundle: Path, encoder_net: Any, out: Path,
                log: Any = None) -> FeatureCache:
    """Compute (or reuse ``out/features-<key>.npz``) the features of ``items``.

    ``encoder_net`` is an :class:`~cad_node.pipelines.cxr.abnormal_net.AbnormalNet`
    whose encoder holds the ``cxr-lungs`` weights.
    """
    import torch

    from cad_node.models.bundle import load_bundle
    from cad_node.pipelines.cxr.abnormal import AbnormalModel, lung_bounding_box
    from cad_node.pipelines.cxr.lungs import segment

    key = _cache_key(lungs_bundle, items)
    path = out / f"features-{key}.npz"
    if path.is_file():
        z = np.load(path)
        return FeatureCache(z["f8"], z["f16"], z["grid"], z["lung_box"], z["shape"],
                            json.loads(str(z["names"])))
    bundle = load_bundle(lungs_bundle.parent.name, models_dir=lungs_bundle.parent.parent,
                         version=lungs_bundle.name)
    lungs_net = bundle.build_network("cpu")
    size = int(getattr(bundle.manifest.input, "size", INPUT_SIZE))
    f8s, f16s, grids, lboxes, shapes = [], [], [], [], []
    t0 = time.monotonic()
    for n, it in enumerate(items):
        img = _read_grey(it.path)
        masks = segment(lungs_net, img, size=size)
        lungs = masks.right_lung | masks.left_lung
        with torch.inference_mode():
            f8, f16 = encoder_net.encode(AbnormalModel.preprocess(img))
        f8s.append(f8[0].half().numpy())
        f16s.append(f16[0].half().numpy())
        g = AbnormalModel.lung_grid(lungs, (img.shape[0], img.shape[1]))
        grids.append(np.zeros((GRID, GRID), bool) if g is None else g[0].numpy())
        lb = lung_bounding_box(lungs)
        lboxes.append(lb if lb is not None else (0.0, 0.0, float(img.shape[1]),
                                                 float(img.shape[0])))
        shapes.append(img.shape)
        if log is not None and (n + 1) % 100 == 0:
            log(f"features {n + 1}/{len(items)} ({time.monotonic() - t0:.0f} s)")
    cache = FeatureCache(np.stack(f8s), np.stack(f16s), np.stack(grids),
                         np.asarray(lboxes, float), np.asarray(shapes, np.int64),
                         [it.name for it in items])
    out.mkdir(parents=True, exist_ok=True)
    np.savez(path, f8=cache.f8, f16=cache.f16, grid=cache.grid, lung_box=cache.lung_box,
             shape=cache.shape, names=json.dumps(cache.names))
    return cache


def nodule_in_box(nodule: tuple[float, float, float], box: tuple[float, float, float, float]
                  ) -> bool:
    """JSRT hit rule: the box contains the nodule centre (edges included)."""
    x, y, _ = nodule
    return box[0] <= x <= box[2] and box[1] <= y <= box[3]


def _finite(v: float) -> float | None:
    return None if not math.isfinite(v) else v
