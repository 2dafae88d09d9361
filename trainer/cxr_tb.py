"""``cad-train train cxr-tb CONFIG``: the tuberculosis head on lung-masked radiographs.

Data layouts (``data.layout`` in the config; the folder names of the public
releases):

``montgomery`` / ``shenzhen``
    NLM's two TB sets (Jaeger 2014): ``CXR_png/<name>.png`` and
    ``ClinicalReadings/<name>.txt``.  The reading starts with the patient's
    sex and age (Montgomery: ``Patient's Sex: M`` / ``Patient's Age: 047Y``
    lines; Shenzhen: one ``male 35yrs`` line), then the radiologist's reading:
    ``normal``, or the abnormality (e.g. ``STB,ATB in the right upper
    field``).  Label: 0 when the reading is "normal", else 1 (TB).  The file
    names end in ``_0`` (normal) / ``_1`` (abnormal); a reading that
    contradicts its name is an error naming the file.
``tbx11k``
    TBX11K (Liu 2020): ``imgs/<folder>/<file>.png`` and a COCO file
    (``data.annotations``, e.g. ``annotations/json/TBX11K_train.json``):
    label 1 for an image with any TB box (active or latent), 0 otherwise; the
    boxes are read and counted (the head itself is image-level).
``png-labels``
    ``images/<name>.png``, ``labels.csv`` (``image,label``) and optionally
    ``masks/<name>.png`` (non-zero = lung; 1 right, 2 left).

Lungs: from ``masks/`` where the layout has them, else segmented by the
installed ``cxr-lungs`` bundle (:func:`cad_node.pipelines.cxr.lungs.segment`),
as the node will at inference.  Every image becomes :func:`tb_input` at the
config's ``size``.

Protocol: a stratified split fixed by ``seed`` into train / validation /
test.  Training uses the train part only; the operating threshold is the
highest one keeping ``sensitivity`` of the validation TB cases above it
(never the test part); the test part alone gives the reported AUC (bootstrap
95% interval) and the sensitivity/specificity at that threshold.  The bundle
(``models/cxr-tb/<version>``) carries the threshold, its rule and the figures.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import yaml
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from cad_node.pipelines.cxr.tb import TB_BUNDLE, tb_input

__all__ = [
    "TbCase",
    "TbTrainConfig",
    "load_tb_config",
    "read_cases",
    "read_clinical_readings",
    "read_png_labels",
    "read_tbx11k",
    "reading_label",
    "train_cxr_tb",
]

LAYOUTS = ("montgomery", "shenzhen", "tbx11k", "png-labels")
#: Demographic lines of the NLM clinical readings (not part of the reading itself).
_DEMOGRAPHIC = re.compile(r"^(patient'?s\s+(sex|age)\b.*|(male|female|[mf])\b[\s,]*\d+\s*\w*)$",
                          re.IGNORECASE)
_SUFFIX = re.compile(r"_([01])$")
LICENSE = ("Weights: derived from the training set named in the manifest, under its terms; "
           "code Apache-2.0")
INTENDED_USE = ("Research and engineering use only. Not for diagnostic use. Gives a "
                "tuberculosis probability of a frontal chest radiograph from its lungs; it "
                "does not replace a radiologist or a microbiological test.")


class TrainingError(ValueError):
    """A case that cannot be read (the message names the file)."""


@dataclass(frozen=True)
class TbCase:
    """One labelled radiograph."""

    name: str
    image: Path
    #: 1 = tuberculosis, 0 = not.
    label: int
    mask: Path | None = None
    reading: str = ""
    #: TBX11K boxes ``(x, y, w, h)`` in pixels.
    boxes: tuple[tuple[float, float, float, float], ...] = field(default_factory=tuple)


def reading_label(text: str, path: Path) -> tuple[int, str]:
    """Label and finding text of an NLM clinical reading (see the module docstring).

    Raises
    ------
    TrainingError
        The file has no reading after the demographic lines.
    """
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    finding = " ".join(ln for ln in lines if not _DEMOGRAPHIC.match(ln)).strip()
    if not finding:
        raise TrainingError(f"{path}: no reading after the patient's sex and age")
    words = re.sub(r"[^a-z ]", " ", finding.lower()).split()
    return (0 if words == ["normal"] else 1), finding


def read_clinical_readings(root: Path) -> list[TbCase]:
    """Montgomery or Shenzhen: ``CXR_png/*.png`` with ``ClinicalReadings/*.txt``.

    Raises
    ------
    FileNotFoundError
        A folder of the layout is missing.
    TrainingError
        A reading is missing, empty or contradicts its file name.
    """
    images, readings = root / "CXR_png", root / "ClinicalReadings"
    for folder in (images, readings):
        if not folder.is_dir():
            raise FileNotFoundError(f"{folder} is not a folder")
    cases = []
    for img in sorted(p for p in images.iterdir() if p.suffix.lower() == ".png"):
        txt = readings / f"{img.stem}.txt"
        if not txt.is_file():
            raise TrainingError(f"{txt}: clinical reading missing for {img.name}")
        label, finding = reading_label(txt.read_text(encoding="utf-8", errors="replace"), txt)
        m = _SUFFIX.search(img.stem)
        if m is not None and int(m.group(1)) != label:
            raise TrainingError(f"{txt}: reading {finding!r} contradicts the file name's "
                                f"label _{m.group(1)}")
        cases.append(TbCase(img.stem, img, label, None, finding))
    return cases


def read_tbx11k(root: Path, annotations: Path) -> list[TbCase]:
    """TBX11K: the images a COCO file lists, label 1 where it has a TB box.

    Raises
    ------
    TrainingError
        The COCO file is unreadable, or lists an image that is not under ``imgs/``.
    """
    try:
        coco = json.loads(annotations.read_text(encoding="utf-8"))
        images = {int(im["id"]): str(im["file_name"]) for im in coco["images"]}
        boxes: dict[int, list[tuple[float, float, float, float]]] = {}
        for ann in coco.get("annotations", []):
            x, y, w, h = (float(v) for v in ann["bbox"])
            boxes.setdefault(int(ann["image_id"]), []).append((x, y, w, h))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrainingError(f"{annotations}: not a readable COCO file: {exc}") from None
    base = root / "imgs"
    cases = []
    for image_id, name in sorted(images.items()):
        path = base / name
        if not path.is_file():
            found = sorted(base.glob(f"*/{Path(name).name}"))
            if not found:
                raise TrainingError(f"{annotations}: image {name!r} not found under {base}")
            path = found[0]
        b = tuple(boxes.get(image_id, []))
        cases.append(TbCase(path.stem, path, int(bool(b)), None, "", b))
    return cases


def read_png_labels(root: Path) -> list[TbCase]:
    """``images/``, ``labels.csv`` and optional ``masks/`` (see the module docstring)."""
    table = root / "labels.csv"
    if not table.is_file():
        raise FileNotFoundError(f"{table} is missing")
    cases = []
    with table.open(newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            try:
                name, label = row["image"], int(row["label"])
            except (KeyError, ValueError, TypeError):
                raise TrainingError(f"{table}: rows need image,label (0/1): {row}") from None
            if label not in (0, 1):
                raise TrainingError(f"{table}: label of {name} is {label}, not 0 or 1")
            img = root / "images" / Path(name).name
            mask = root / "masks" / Path(name).name
            cases.append(TbCase(Path(name).stem, img, label, mask if mask.is_file() else None))
    return cases


class _DataCfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layout: Literal["montgomery", "shenzhen", "tbx11k", "png-labels"]
    root: str
    annotations: str | None = None


class _BundleCfg(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = TB_BUNDLE
    version: str = "1.0.0"


class TbTrainConfig(BaseModel):
    """``cad-train train cxr-tb`` configuration (YAML)."""

    model_config = ConfigDict(extra="forbid")
    model: Literal["cxr-tb"] = "cxr-tb"
    data: _DataCfg
    bundle: _BundleCfg = _BundleCfg()
    size: int = Field(256, ge=32, le=1024)
    architecture: dict[str, Any] = Field(default_factory=lambda: {
        "builder": "cxr-tb", "channels": [16, 32, 64, 96], "hidden": 64, "dropout": 0.2})
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(1e-3, gt=0)
    validation_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5)
    sensitivity: float = Field(0.90, gt=0, le=1)
    seed: int = 7
    threads: int = Field(1, ge=1)
    bootstrap: int = Field(1000, ge=10)
    #: Where the ``cxr-lungs`` bundle is (default: the node's models directory).
    lungs_models_dir: str | None = None


def load_tb_config(path: Path) -> TbTrainConfig:
    """Read and validate a config; a bad key is a ValueError naming the file and key."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        cfg = TbTrainConfig.model_validate(raw)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not YAML: {exc}") from None
    except ValidationError as exc:
        keys = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                         for e in exc.errors())
        raise ValueError(f"{path}: {keys}") from None
    root = Path(cfg.data.root)
    if not root.is_absolute():
        cfg.data.root = str((path.parent / root).resolve())
    if cfg.data.annotations and not Path(cfg.data.annotations).is_absolute():
        cfg.data.annotations = str((path.parent / cfg.data.annotations).resolve())
    return cfg


def read_cases(cfg: TbTrainConfig) -> list[TbCase]:
    """The cases of the config's layout."""
    root = Path(cfg.data.root)
    if cfg.data.layout in ("montgomery", "shenzhen"):
        return read_clinical_readings(root)
    if cfg.data.layout == "tbx11k":
        if not cfg.data.annotations:
            raise ValueError("data.annotations (the COCO json) is required for tbx11k")
        return read_tbx11k(root, Path(cfg.data.annotations))
    return read_png_labels(root)


def _grey01(path: Path) -> npt.NDArray[np.float32]:
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("I;16") if im.mode.startswith("I") else im.convert("L"))
    except OSError as exc:
        raise TrainingError(f"{path}: unreadable image: {exc}") from None
    a = arr.astype(np.float32)
    top = float(a.max())
    return a / top if top > 0 else a


def _inputs(cfg: TbTrainConfig, cases: Sequence[TbCase]) -> npt.NDArray[np.float32]:
    """``(n, 2, size, size)`` network inputs (lungs from masks/ or the cxr-lungs bundle)."""
    seg_net = None
    out = np.zeros((len(cases), 2, cfg.size, cfg.size), np.float32)
    for k, case in enumerate(cases):
        image = _grey01(case.image)
        if case.mask is not None:
            with Image.open(case.mask) as im:
                lungs = np.asarray(im.convert("L")) > 0
            if lungs.shape != image.shape:
                raise TrainingError(f"{case.mask}: mask {lungs.shape} != image {image.shape}")
        else:
            from cad_node.models.bundle import load_bundle
            from cad_node.pipelines.cxr.lungs import segment

            if seg_net is None:
                models = Path(cfg.lungs_models_dir) if cfg.lungs_models_dir else None
                seg_net = load_bundle("cxr-lungs", models).build_network("cpu")
            masks = segment(seg_net, image)
            lungs = masks.right_lung | masks.left_lung
        out[k] = tb_input(image, lungs, cfg.size)
    return out


def _split(labels: npt.NDArray[np.int_], cfg: TbTrainConfig
           ) -> tuple[npt.NDArray[np.int_], npt.NDArray[np.int_], npt.NDArray[np.int_]]:
    """Stratified train / validation / test indices, fixed by the seed."""
    rng = np.random.default_rng(cfg.seed)
    parts: list[list[int]] = [[], [], []]
    for cls in (0, 1):
        idx = rng.permutation(np.flatnonzero(labels == cls))
        n_val = max(1, round(cfg.validation_fraction * len(idx)))
        n_test = max(1, round(cfg.test_fraction * len(idx)))
        parts[1] += idx[:n_val].tolist()
        parts[2] += idx[n_val:n_val + n_test].tolist()
        parts[0] += idx[n_val + n_test:].tolist()
    if min(len(p) for p in parts) == 0:
        raise ValueError("too few cases of each label for a train/validation/test split")
    return tuple(np.sort(np.asarray(p, int)) for p in parts)  # type: ignore[return-value]


def auc(scores: npt.NDArray[np.float64], labels: npt.NDArray[np.int_]) -> float:
    """Mann-Whitney AUC (ties count one half)."""
    from trainer.cxr_abnormal import auc as mann_whitney

    return mann_whitney(scores, labels)


def threshold_at(scores: npt.NDArray[np.float64], labels: npt.NDArray[np.int_],
                 sensitivity: float) -> float:
    """Highest threshold keeping at least ``sensitivity`` of the positives at or above it."""
    pos = np.sort(scores[labels == 1])[::-1]
    if len(pos) == 0:
        raise ValueError("no positive case to set the operating threshold on")
    keep = int(np.ceil(sensitivity * len(pos)))
    return float(pos[max(keep, 1) - 1])


def _predict(net: Any, x: npt.NDArray[np.float32], batch: int = 64) -> npt.NDArray[np.float64]:
    import torch

    net.eval()
    out = []
    with torch.inference_mode():
        for s in range(0, len(x), batch):
            out.append(torch.sigmoid(net(torch.from_numpy(x[s:s + batch]))).numpy())
    return np.concatenate(out).astype(np.float64)


def _bootstrap_auc(scores: npt.NDArray[np.float64], labels: npt.NDArray[np.int_],
                   samples: int, seed: int) -> tuple[float, float]:
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    vals = [auc(scores[i], labels[i]) for i in (
        np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        for _ in range(samples))]
    return float(np.quantile(vals, 0.025)), float(np.quantile(vals, 0.975))


def train_cxr_tb(cfg: TbTrainConfig, out: Path, models_dir: Path, *, force: bool = False
                 ) -> Path:
    """Train, choose the operating point, measure on the test split, export the bundle.

    Returns
    -------
    Path
        The bundle directory ``models_dir/<name>/<version>``.
    """
    import torch

    from cad_node.models.network import build_network
    from trainer.export import write_bundle

    torch.manual_seed(cfg.seed)
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    cases = read_cases(cfg)
    labels = np.asarray([c.label for c in cases], int)
    train, val, test = _split(labels, cfg)
    x = _inputs(cfg, cases)
    net = build_network(cfg.architecture)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate, weight_decay=1e-4)
    y = torch.from_numpy(labels.astype(np.float32))
    n_pos = max(int(labels[train].sum()), 1)
    pos_weight = torch.tensor((len(train) - n_pos) / n_pos)
    rng = np.random.default_rng(cfg.seed)
    history = []
    for _ in range(cfg.epochs):
        net.train()
        order = rng.permutation(train)
        total = 0.0
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
            xb = torch.from_numpy(x[idx])
            gain = torch.from_numpy(rng.uniform(0.9, 1.1, (len(idx), 1, 1, 1)).astype(np.float32))
            xb = torch.cat([xb[:, :1] * gain, xb[:, 1:]], dim=1)  # contrast jitter
            loss = torch.nn.functional.binary_cross_entropy_with_logits(
                net(xb), y[idx], pos_weight=pos_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        history.append(round(total / len(train), 5))
    p_val = _predict(net, x[val])
    threshold = threshold_at(p_val, labels[val], cfg.sensitivity)
    p_test = _predict(net, x[test])
    y_test = labels[test]
    test_auc = auc(p_test, y_test)
    lo, hi = _bootstrap_auc(p_test, y_test, cfg.bootstrap, cfg.seed)
    sens = float(np.mean(p_test[y_test == 1] >= threshold))
    spec = float(np.mean(p_test[y_test == 0] < threshold))
    metrics = {
        "split": {"train": len(train), "validation": len(val), "test": len(test), "seed": cfg.seed},
        "test_auc": round(test_auc, 4), "test_auc_ci95": [round(lo, 4), round(hi, 4)],
        "test_sensitivity_at_threshold": round(sens, 4),
        "test_specificity_at_threshold": round(spec, 4),
        "validation_auc": round(auc(p_val, labels[val]), 4),
        "training_loss_per_epoch": history,
    }
    rule = (f"highest threshold keeping {cfg.sensitivity:.0%} of the validation TB cases "
            f"(n={int(labels[val].sum())}); test sensitivity {sens:.2f}, specificity {spec:.2f}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    training_data = {
        "layout": cfg.data.layout, "root": cfg.data.root, "cases": len(cases),
        "tb_cases": int(labels.sum()),
        "boxes": sum(len(c.boxes) for c in cases),
        "terms": "as the data set's own licence states (the user brings the data set)",
    }
    provenance = {"trainer": "trainer.cxr_tb", "seed": cfg.seed, "epochs": cfg.epochs,
                  "size": cfg.size, "wall_time_s": round(time.perf_counter() - start, 1),
                  "torch": torch.__version__}
    card = _card(cfg, metrics, training_data, rule)
    return write_bundle(
        models_dir, name=cfg.bundle.name, version=cfg.bundle.version,
        state_dict=net.state_dict(), task="chest radiograph tuberculosis probability",
        architecture=cfg.architecture,
        input_spec={"kind": "radiograph", "size": cfg.size, "normalisation": "histeq",
                    "labels": ["tuberculosis"]},
        training_data=training_data, metrics=metrics,
        output_spec={"kind": "logit", "positive_class": "tuberculosis",
                     "threshold": round(threshold, 6),
                     "operating_threshold": round(threshold, 6), "operating_rule": rule},
        model_card=card, provenance=provenance, license_text=LICENSE,
        intended_use=INTENDED_USE, force=force)


def _card(cfg: TbTrainConfig, metrics: dict[str, Any], data: dict[str, Any], rule: str) -> str:
    lo, hi = metrics["test_auc_ci95"]
    return (
        f"# {cfg.bundle.name} {cfg.bundle.version}\n\n"
        "**Not for diagnostic use.** Research and engineering only.\n\n"
        "## Training data\n"
        f"Layout `{data['layout']}` at `{data['root']}`: {data['cases']} radiographs, "
        f"{data['tb_cases']} labelled TB; used under the data set's own terms.\n\n"
        "## Protocol\n"
        f"Stratified split (seed {cfg.seed}): {metrics['split']['train']} train, "
        f"{metrics['split']['validation']} validation, {metrics['split']['test']} test. "
        f"Operating point: {rule}.\n\n"
        "## Measured (test split only)\n"
        f"- AUC {metrics['test_auc']:.3f} (95% bootstrap CI {lo:.3f}-{hi:.3f})\n"
        f"- sensitivity {metrics['test_sensitivity_at_threshold']:.3f}, specificity "
        f"{metrics['test_specificity_at_threshold']:.3f} at the operating threshold\n\n"
        "## Limitations\n"
        "A small CNN on lung-masked images, trained on one public set: far below "
        "clinical-grade training data; not validated on other populations or devices.\n")


def train_command(config: Path, out: Path | None, models_dir: Path | None,
                  force: bool = True) -> Path:
    """``cad-train train cxr-tb CONFIG``."""
    from cad_node.models.bundle import default_models_dir

    cfg = load_tb_config(config)
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads))
    return train_cxr_tb(cfg, out or Path("runs") / "cxr-tb",
                        models_dir or default_models_dir(), force=force)
