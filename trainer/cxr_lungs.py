"""``cad-train train cxr-lungs`` and ``cad-train evaluate cxr-lungs``.

Training
--------
A MONAI residual U-Net (:data:`cad_node.models.network.UNET2D_ARCHITECTURE`)
learns three sigmoid channels (patient's right lung, left lung, heart) from a
prepared folder (:mod:`trainer.cxr_data`).  The inputs are made by
:func:`cad_node.pipelines.cxr.lungs.network_input`, the node's own function.
Augmentation is MONAI's (random affine: rotation, zoom, translation; Gaussian
noise and smoothing); never a horizontal flip, which would swap the sides.
With ``augment.site: true`` (1.1.0) it imitates other sites' films instead,
on the letter-boxed grey image *before* the histogram equalisation (so that
it changes what the equalisation sees): a stronger affine with shear, grid
distortion, a frame (the film shrunk into a black, white or grey border of
random, uneven width: framed, paediatric and collimated images), an uneven
exposure (MONAI bias field), bright thin lines and patches (tubes, leads,
electrodes), blur, sharpening and noise; then :func:`~cad_node.pipelines.cxr.lungs.normalise`,
the node's own function.  A global monotone grey-level change (gamma,
contrast) is not used: the equalisation undoes it exactly.
``train.init_from`` warm-starts from an existing bundle's weights.
Loss: masked BCE + soft Dice per channel (channels a source does not annotate
do not count).  The split is FIXED in the YAML config: the ``validation``
cases are never used for training, early stopping or any choice; the final
epoch's weights are exported as they are.

Evaluation
----------
The exported bundle is loaded the way the node loads it and run through
:func:`cad_node.pipelines.cxr.lungs.segment` (post-processing included) at the
prepared resolution.  Per structure: Dice, Jaccard and the mean symmetric
contour distance (mm, from the prepared pixel spacing), each as the mean over
cases with a case-bootstrap 95% interval.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import numpy.typing as npt
import typer
import yaml
from pydantic import BaseModel, ConfigDict, Field
from rich.console import Console
from scipy import ndimage

from cad_node.models.network import UNET2D_ARCHITECTURE
from cad_node.pipelines.cxr.lungs import LABELS, NET_SIZE, network_input, normalise, segment
from trainer.cxr_data import PreparedSet, load_prepared

if TYPE_CHECKING:
    import torch

__all__ = [
    "CXR_MODELS",
    "CxrLungsConfig",
    "bootstrap_ci",
    "contour_distance_mm",
    "evaluate_bundle",
    "load_cxr_config",
    "train_cxr_lungs",
]

#: Models this module trains.
CXR_MODELS = ("cxr-lungs",)
_console = Console(stderr=True)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _BundleCfg(_Strict):
    name: str = "cxr-lungs"
    version: str = "1.0.0"


class _DataCfg(_Strict):
    #: Prepared folder (``cad-train prepare ...``), relative to the working directory.
    prepared: str
    #: Human-readable description of the source, written to the model card.
    description: str = ""
    terms: str = ""


class _SplitCfg(_Strict):
    #: Held-out cases: never trained or tuned on.
    validation: list[str] = Field(min_length=1)


class _TrainCfg(_Strict):
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(8, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    threads: int = Field(2, ge=1, le=64)
    #: Store the exported weights as float16 (half the size; evaluated as shipped).
    half_weights: bool = True
    #: Bundle folder (``models/cxr-lungs/<version>``) whose weights start the run.
    init_from: str | None = None
    #: Wall-time budget of the training loop.  With it the one-cycle schedule
    #: (warm-up, then cosine to 0) runs on the larger of the step fraction and
    #: the elapsed-time fraction, so a run slowed by a loaded machine still
    #: anneals fully and ends at the budget (the card gives the epochs done).
    max_minutes: float | None = Field(None, gt=0)


class _AugmentCfg(_Strict):
    rotate_deg: float = 10.0
    scale: float = 0.12
    translate_px: float = 16.0
    noise_std: float = 0.05
    prob: float = 0.8
    #: Other-site augmentation before the equalisation (module docstring); the
    #: fields below apply only with it.
    site: bool = False
    shear: float = Field(0.08, ge=0, le=0.5)
    distort_prob: float = Field(0.3, ge=0, le=1)
    #: Probability of a frame, and the range of the film's side inside it.
    frame_prob: float = Field(0.3, ge=0, le=1)
    frame_side: tuple[float, float] = (0.6, 0.95)
    bias_field_prob: float = Field(0.4, ge=0, le=1)
    lines_prob: float = Field(0.3, ge=0, le=1)
    #: 1.2.0: synthetic findings inside the labelled lung fields, labels unchanged
    #: (:mod:`trainer.cxr_pathology`).  All default to off, so the 1.0.0 and 1.1.0
    #: configs reproduce (they also draw from their own random stream).
    #: Probability that a sample gets pleural fluid or consolidation in one lung
    #: (in both with probability ``pathology_both``).
    pathology_prob: float = Field(0.0, ge=0, le=1)
    pathology_both: float = Field(0.25, ge=0, le=1)
    #: Of those, the share drawn as consolidation/masses (the rest is fluid) ...
    consolidation_share: float = Field(0.4, ge=0, le=1)
    #: ... and the share of fluid that fills the whole hemithorax.
    whole_hemithorax_share: float = Field(0.15, ge=0, le=1)
    #: Largest fluid height, as a fraction of the lung field's height.
    effusion_max_fraction: float = Field(0.8, gt=0, le=1)
    #: Large soft-tissue overlays crossing the lung borders (breasts, obesity).
    soft_tissue_prob: float = Field(0.0, ge=0, le=1)
    #: Tubes, lines, wires over the apices, ECG electrodes and leads.
    devices_prob: float = Field(0.0, ge=0, le=1)
    #: Portable AP look: haze, compressed contrast, gamma, blur, heavy noise.
    portable_prob: float = Field(0.0, ge=0, le=1)
    portable_noise_std: float = Field(0.03, ge=0, le=0.5)


class CxrLungsConfig(_Strict):
    """``trainer/configs/cxr-lungs.yaml``."""

    model: str
    seed: int = 0
    bundle: _BundleCfg = _BundleCfg()
    data: _DataCfg
    split: _SplitCfg
    size: int = NET_SIZE
    architecture: dict[str, Any] = Field(default_factory=lambda: dict(UNET2D_ARCHITECTURE))
    train: _TrainCfg = _TrainCfg()
    augment: _AugmentCfg = _AugmentCfg()
    bootstrap: int = Field(2000, ge=100)


def load_cxr_config(path: Path) -> CxrLungsConfig:
    """Read and validate a ``cxr-lungs`` YAML config (errors name the file and key)."""
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot read config: {exc}") from None
    try:
        cfg = CxrLungsConfig.model_validate(raw)
    except Exception as exc:  # pydantic.ValidationError names the keys
        raise ValueError(f"{path}: {exc}") from None
    if cfg.model not in CXR_MODELS:
        raise ValueError(f"{path}: model {cfg.model!r} is not one of {CXR_MODELS}")
    return cfg


def _split(cfg: CxrLungsConfig, data: PreparedSet) -> tuple[list[str], list[str]]:
    cases = data.cases
    missing = sorted(set(cfg.split.validation) - set(cases))
    if missing:
        raise ValueError(f"validation case(s) not in {data.root}: {missing[:5]}")
    val = [c for c in cases if c in set(cfg.split.validation)]
    train = [c for c in cases if c not in set(cfg.split.validation)]
    return train, val


def _training_arrays(
    data: PreparedSet, cases: Sequence[str], size: int, *, grey: bool = False
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """Network inputs ``(n, s, s)``, targets ``(n, 3, s, s)`` and channel weights ``(n, 3)``.

    With ``grey`` the inputs are the letter-boxed grey images in ``[0, 1]``,
    not yet normalised (the site augmentation works on them).
    """
    from cad_node.pipelines.cxr.lungs import letterbox

    xs, ys, ws = [], [], []
    for case in cases:
        c = data.load(case)
        image = c.image.astype(np.float32) / 255.0
        xs.append(letterbox(image, size) if grey else network_input(image, size))
        ys.append(np.stack([letterbox(c.masks[k].astype(np.float32), size) >= 0.5
                            for k in LABELS]).astype(np.float32))
        ws.append(np.asarray([1.0 if k in c.structures else 0.0 for k in LABELS], np.float32))
    return np.stack(xs), np.stack(ys), np.stack(ws)


def _augmenter(cfg: _AugmentCfg, seed: int) -> Any:
    from monai.transforms.compose import Compose
    from monai.transforms.intensity.dictionary import RandGaussianNoised, RandGaussianSmoothd
    from monai.transforms.spatial.dictionary import RandAffined

    t = Compose([
        RandAffined(
            keys=["image", "label"],
            prob=cfg.prob,
            rotate_range=np.deg2rad(cfg.rotate_deg),
            scale_range=(cfg.scale, cfg.scale),
            translate_range=(cfg.translate_px, cfg.translate_px),
            mode=("bilinear", "nearest"),
            padding_mode="border",
        ),
        RandGaussianSmoothd(keys=["image"], prob=0.2, sigma_x=(0.3, 1.0), sigma_y=(0.3, 1.0)),
        RandGaussianNoised(keys=["image"], prob=0.3, std=cfg.noise_std),
    ])
    t.set_random_state(seed=seed)
    return t


class SiteAugmenter:
    """Other-site augmentation of one letter-boxed grey image and its masks.

    Called with ``image`` ``(s, s)`` in ``[0, 1]`` and ``label`` ``(3, s, s)``;
    returns the normalised network input and the transformed masks (module
    docstring: what it imitates).  Deterministic for a given ``seed``; never
    flips (the sides would swap).
    """

    def __init__(self, cfg: _AugmentCfg, seed: int) -> None:
        from monai.transforms.compose import Compose
        from monai.transforms.intensity.dictionary import (
            RandBiasFieldd,
            RandCoarseDropoutd,
            RandGaussianNoised,
            RandGaussianSharpend,
            RandGaussianSmoothd,
        )
        from monai.transforms.spatial.dictionary import RandAffined, RandGridDistortiond

        self.cfg = cfg
        self.rng = np.random.default_rng(seed)
        self.geometric = Compose([
            RandAffined(keys=["image", "label"], prob=cfg.prob,
                        rotate_range=np.deg2rad(cfg.rotate_deg),
                        scale_range=(cfg.scale, cfg.scale), shear_range=(cfg.shear, cfg.shear),
                        translate_range=(cfg.translate_px, cfg.translate_px),
                        mode=("bilinear", "nearest"), padding_mode="zeros"),
            # ``mode`` per key (MONAI repeats it per key at run time; its stub says str)
            RandGridDistortiond(keys=["image", "label"], prob=cfg.distort_prob, num_cells=5,
                                distort_limit=(-0.08, 0.08),
                                mode=("bilinear", "nearest")),  # type: ignore[arg-type]
        ])
        self.grey = Compose([
            RandBiasFieldd(keys=["image"], prob=cfg.bias_field_prob, coeff_range=(0.0, 0.4)),
            RandCoarseDropoutd(keys=["image"], prob=cfg.lines_prob, holes=1, max_holes=6,
                               spatial_size=(2, 8), max_spatial_size=(4, 60),
                               fill_value=(0.8, 1.0)),
            RandGaussianSmoothd(keys=["image"], prob=0.2, sigma_x=(0.3, 1.2),
                                sigma_y=(0.3, 1.2)),
            RandGaussianSharpend(keys=["image"], prob=0.1),
            RandGaussianNoised(keys=["image"], prob=0.3, std=cfg.noise_std),
        ])
        self.geometric.set_random_state(seed=seed)
        self.grey.set_random_state(seed=seed + 1)
        #: The 1.2.0 findings' own stream: the 1.1.0 stream above is untouched.
        self.findings_rng = np.random.default_rng(seed + 2)

    def findings(self, image: npt.NDArray[np.float32], label: npt.NDArray[np.float32]
                 ) -> npt.NDArray[np.float32]:
        """Synthetic fluid, consolidation and soft tissue on the film; labels unchanged."""
        from trainer import cxr_pathology as cp

        cfg, rng = self.cfg, self.findings_rng
        if cfg.pathology_prob == 0 and cfg.soft_tissue_prob == 0:
            return image
        grey = cp.soft_tissue_grey(image, label[2] > 0.5)
        if cfg.pathology_prob > 0 and rng.random() < cfg.pathology_prob:
            sides = [0, 1] if rng.random() < cfg.pathology_both else [int(rng.integers(0, 2))]
            for side in sides:
                lung = label[side] > 0.5
                if rng.random() < cfg.consolidation_share:
                    image = cp.add_consolidation(image, lung, grey, rng)
                else:
                    image = cp.add_effusion(
                        image, lung, grey, rng, lateral_right=side == 1,
                        max_fraction=cfg.effusion_max_fraction,
                        whole=bool(rng.random() < cfg.whole_hemithorax_share))
        if cfg.soft_tissue_prob > 0 and rng.random() < cfg.soft_tissue_prob:
            image = cp.add_soft_tissue(image, grey, rng)
        return image

    def appearance(self, image: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """Devices, then the portable AP look (both on the framed film)."""
        from trainer import cxr_pathology as cp

        cfg, rng = self.cfg, self.findings_rng
        if cfg.devices_prob > 0 and rng.random() < cfg.devices_prob:
            image = cp.add_devices(image, rng)
        if cfg.portable_prob > 0 and rng.random() < cfg.portable_prob:
            image = cp.portable_look(image, rng, noise_std=cfg.portable_noise_std)
        return image

    def frame(self, image: npt.NDArray[np.float32], label: npt.NDArray[np.float32]
              ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Shrink the film into a border of one random grey (black, white or between)."""
        import torch

        s = image.shape[-1]
        lo, hi = self.cfg.frame_side
        rows, cols = (max(8, round(s * float(self.rng.uniform(lo, hi)))) for _ in range(2))
        value = float(self.rng.choice([0.0, 1.0, float(self.rng.uniform(0.0, 1.0))]))
        img = torch.nn.functional.interpolate(torch.from_numpy(image)[None, None],
                                              size=(rows, cols), mode="area")[0, 0].numpy()
        lab = torch.nn.functional.interpolate(torch.from_numpy(label)[None],
                                              size=(rows, cols), mode="nearest")[0].numpy()
        r0, c0 = int(self.rng.integers(0, s - rows + 1)), int(self.rng.integers(0, s - cols + 1))
        out_img = np.full((s, s), value, np.float32)
        out_lab = np.zeros((label.shape[0], s, s), np.float32)
        out_img[r0:r0 + rows, c0:c0 + cols] = img
        out_lab[:, r0:r0 + rows, c0:c0 + cols] = lab
        return out_img, out_lab

    def __call__(self, image: npt.NDArray[np.float32], label: npt.NDArray[np.float32]
                 ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        d = self.geometric({"image": image[None].astype(np.float32),
                            "label": label.astype(np.float32)})
        img = np.asarray(d["image"], np.float32)[0]
        lab = (np.asarray(d["label"], np.float32) > 0.5).astype(np.float32)
        img = self.findings(img, lab)
        if self.rng.random() < self.cfg.frame_prob:
            img, lab = self.frame(img, lab)
        img = self.appearance(img)
        img = np.asarray(self.grey({"image": img[None]})["image"], np.float32)[0]
        return normalise(np.ascontiguousarray(img)), lab


def budget_lr(peak: float, progress: float, warmup: float = 0.1) -> float:
    """One-cycle learning rate at ``progress`` in [0, 1]: linear warm-up, cosine to 0."""
    p = min(max(progress, 0.0), 1.0)
    if p < warmup:
        return peak * (0.04 + 0.96 * p / warmup)
    return float(peak * 0.5 * (1.0 + np.cos(np.pi * (p - warmup) / (1.0 - warmup))))


def _warm_start(net: torch.nn.Module, bundle_dir: Path) -> None:
    """Load a bundle's (verified) weights into ``net`` (same architecture)."""
    from cad_node.models.bundle import load_bundle

    bundle = load_bundle(bundle_dir.parent.name, models_dir=bundle_dir.parent.parent,
                         version=bundle_dir.name)
    net.load_state_dict(bundle.build_network("cpu").state_dict(), strict=True)


def _loss(logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    import torch

    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="none")
    bce = bce.mean(dim=(2, 3))
    p = torch.sigmoid(logits)
    inter = (p * target).sum(dim=(2, 3))
    dice = 1 - (2 * inter + 1) / (p.sum(dim=(2, 3)) + target.sum(dim=(2, 3)) + 1)
    w = weight.clamp(min=0)
    return ((bce + dice) * w).sum() / w.sum().clamp(min=1)


def train_cxr_lungs(cfg: CxrLungsConfig, out: Path, *, models_dir: Path, force: bool = False
                    ) -> Path:
    """Train, export the bundle to ``models_dir`` and evaluate it on the validation split.

    Returns
    -------
    Path
        The bundle directory.
    """
    import torch

    from cad_node.models.network import build_network, count_parameters
    from trainer.export import write_bundle

    torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    data = load_prepared(Path(cfg.data.prepared))
    train_cases, val_cases = _split(cfg, data)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    x, y, w = _training_arrays(data, train_cases, cfg.size, grey=cfg.augment.site)
    _console.print(f"{len(train_cases)} training, {len(val_cases)} validation cases; "
                   f"inputs {x.shape} in {time.monotonic() - t0:.1f} s")
    net = build_network(cfg.architecture)
    if cfg.train.init_from is not None:
        _warm_start(net, Path(cfg.train.init_from))
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr,
                            weight_decay=cfg.train.weight_decay)
    steps_per_epoch = int(np.ceil(len(train_cases) / cfg.train.batch_size))
    total_steps = cfg.train.epochs * steps_per_epoch
    budget_s = None if cfg.train.max_minutes is None else 60.0 * cfg.train.max_minutes
    sched = None if budget_s is not None else torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=cfg.train.lr, total_steps=total_steps, pct_start=0.1)
    t_loop, step = time.monotonic(), 0
    aug = _augmenter(cfg.augment, cfg.seed)
    site = SiteAugmenter(cfg.augment, cfg.seed) if cfg.augment.site else None
    history: list[dict[str, float]] = []
    stopped: str | None = None
    for epoch in range(cfg.train.epochs):
        net.train()
        order = rng.permutation(len(train_cases))
        losses = []
        te = time.monotonic()
        for start in range(0, len(order), cfg.train.batch_size):
            idx = order[start:start + cfg.train.batch_size]
            xb, yb = [], []
            for i in idx:
                if site is not None:
                    xi, yi = site(x[i], y[i])
                    xb.append(torch.from_numpy(xi[None]))
                    yb.append(torch.from_numpy(yi))
                    continue
                d = aug({"image": torch.from_numpy(x[i][None]),
                         "label": torch.from_numpy(y[i])})
                xb.append(torch.as_tensor(d["image"]))
                yb.append(torch.as_tensor(d["label"]))
            xt = torch.stack(xb).float()
            yt = (torch.stack(yb) > 0.5).float()
            loss = _loss(net(xt), yt, torch.from_numpy(w[idx]))
            opt.zero_grad()
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            step += 1
            losses.append(loss.item())
            if sched is not None:
                sched.step()
                continue
            assert budget_s is not None
            progress = max(step / total_steps, (time.monotonic() - t_loop) / budget_s)
            for group in opt.param_groups:
                group["lr"] = budget_lr(cfg.train.lr, progress)
            if progress >= 1.0:
                break
        history.append({"epoch": epoch + 1, "loss": float(np.mean(losses)),
                        "seconds": time.monotonic() - te})
        _console.print(f"epoch {epoch + 1}/{cfg.train.epochs} loss {np.mean(losses):.4f} "
                       f"({time.monotonic() - te:.1f} s)")
        torch.save(net.state_dict(), out / "last.pt")
        if step < total_steps and budget_s is not None and (
                time.monotonic() - t_loop) >= budget_s:
            stopped = (f"wall-time budget of {cfg.train.max_minutes:g} min "
                       f"(train.max_minutes) reached after {step} of {total_steps} steps on a "
                       "shared 2-core machine; the learning rate had annealed to 0 on the "
                       "time-based schedule")
            break
    wall = time.monotonic() - t0
    (out / "history.json").write_text(json.dumps(history, indent=1))
    state = net.state_dict()
    if cfg.train.half_weights:
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    provenance = {
        "trainer": "trainer.cxr_lungs", "seed": cfg.seed, "epochs": cfg.train.epochs,
        "wall_time_s": round(wall, 1), "threads": cfg.train.threads,
        "torch": torch.__version__, "python": platform.python_version(),
        "train_cases": len(train_cases), "validation_cases": val_cases,
        "final_training_loss": history[-1]["loss"],
        "parameters": count_parameters(net),
        "init_from": cfg.train.init_from,
        "augment": cfg.augment.model_dump(mode="json"),
    }
    if stopped is not None:
        provenance.update(epochs_done=len(history), stopped=stopped)
    input_spec = {"kind": "radiograph", "size": cfg.size, "normalisation": "histeq",
                  "labels": list(LABELS)}
    training_data = {
        "description": cfg.data.description, "terms": cfg.data.terms,
        "prepared": cfg.data.prepared, "train_cases": len(train_cases),
        "validation_cases": len(val_cases),
    }
    bundle_dir = write_bundle(
        models_dir, name=cfg.bundle.name, version=cfg.bundle.version, state_dict=state,
        task="chest radiograph lung and heart segmentation", architecture=cfg.architecture,
        input_spec=input_spec, training_data=training_data,
        output_spec={"kind": "logit", "positive_class": "structure", "threshold": 0.5},
        provenance=provenance, license_text=LICENSE, intended_use=INTENDED_USE, force=force)
    metrics = evaluate_bundle(bundle_dir, data, val_cases, bootstrap=cfg.bootstrap,
                              seed=cfg.seed)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return _finalise(bundle_dir, cfg, state, input_spec, training_data, provenance, metrics,
                     models_dir)


#: Licence of the shipped weights.
LICENSE = ("Weights: a derived work of the JSRT database and the SCR masks, research and "
           "education use only, no redistribution beyond those terms; code Apache-2.0")
#: Intended use of every ``cxr-lungs`` bundle.
INTENDED_USE = ("Research and engineering use only. Not for diagnostic use. Segments the "
                "lungs and heart on frontal chest radiographs to place other findings and "
                "to measure the cardiothoracic ratio; it does not replace a radiologist.")


def _finalise(bundle_dir: Path, cfg: CxrLungsConfig, state: dict[str, Any],
              input_spec: dict[str, Any], training_data: dict[str, Any],
              provenance: dict[str, Any], metrics: dict[str, Any], models_dir: Path) -> Path:
    """Rewrite the bundle with the measured metrics and the model card (same weights)."""
    from trainer.export import write_bundle

    return write_bundle(
        models_dir, name=cfg.bundle.name, version=cfg.bundle.version, state_dict=state,
        task="chest radiograph lung and heart segmentation", architecture=cfg.architecture,
        input_spec=input_spec, training_data=training_data, metrics=metrics,
        output_spec={"kind": "logit", "positive_class": "structure", "threshold": 0.5},
        model_card=render_card(cfg, metrics, provenance), provenance=provenance,
        license_text=LICENSE, intended_use=INTENDED_USE, force=True)


def export_checkpoint_as_shipped(cfg: CxrLungsConfig, run_dir: Path, *, models_dir: Path,
                                 epochs_done: int, final_loss: float, wall_time_s: float,
                                 reason: str) -> Path:
    """Export ``run_dir/last.pt`` (a run stopped before ``cfg.train.epochs``) and evaluate it.

    The provenance and model card state how many epochs were run and why the
    run was stopped; the validation split is still never used for any choice.
    """
    import torch

    from cad_node.models.network import build_network, count_parameters
    from trainer.export import write_bundle

    state = torch.load(run_dir / "last.pt", map_location="cpu", weights_only=True)
    net = build_network(cfg.architecture)
    net.load_state_dict(state)
    if cfg.train.half_weights:
        state = {k: (v.half() if v.is_floating_point() else v) for k, v in state.items()}
    data = load_prepared(Path(cfg.data.prepared))
    train_cases, val_cases = _split(cfg, data)
    provenance = {
        "trainer": "trainer.cxr_lungs", "seed": cfg.seed, "epochs": cfg.train.epochs,
        "epochs_done": epochs_done, "stopped": reason, "wall_time_s": round(wall_time_s, 1),
        "threads": cfg.train.threads, "torch": torch.__version__,
        "python": platform.python_version(), "train_cases": len(train_cases),
        "validation_cases": val_cases, "final_training_loss": final_loss,
        "parameters": count_parameters(net),
    }
    input_spec = {"kind": "radiograph", "size": cfg.size, "normalisation": "histeq",
                  "labels": list(LABELS)}
    training_data = {
        "description": cfg.data.description, "terms": cfg.data.terms,
        "prepared": cfg.data.prepared, "train_cases": len(train_cases),
        "validation_cases": len(val_cases),
    }
    bundle_dir = write_bundle(
        models_dir, name=cfg.bundle.name, version=cfg.bundle.version, state_dict=state,
        task="chest radiograph lung and heart segmentation", architecture=cfg.architecture,
        input_spec=input_spec, training_data=training_data,
        output_spec={"kind": "logit", "positive_class": "structure", "threshold": 0.5},
        provenance=provenance, license_text=LICENSE, intended_use=INTENDED_USE, force=True)
    metrics = evaluate_bundle(bundle_dir, data, val_cases, bootstrap=cfg.bootstrap,
                              seed=cfg.seed)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return _finalise(bundle_dir, cfg, state, input_spec, training_data, provenance, metrics,
                     models_dir)


def contour_distance_mm(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_], spacing_mm: float
                        ) -> float:
    """Mean symmetric contour distance (mm) between two binary masks.

    The contour of a mask is its pixels with a 4-neighbour outside it; the
    value is the mean of the distances of every contour pixel of each mask to
    the other's contour.  ``inf`` when exactly one mask is empty.
    """
    if not a.any() and not b.any():
        return 0.0
    if not a.any() or not b.any():
        return float("inf")
    ca = a & ~ndimage.binary_erosion(a)
    cb = b & ~ndimage.binary_erosion(b)
    da = ndimage.distance_transform_edt(~cb, sampling=spacing_mm)
    db = ndimage.distance_transform_edt(~ca, sampling=spacing_mm)
    return float((da[ca].sum() + db[cb].sum()) / (ca.sum() + cb.sum()))


def bootstrap_ci(values: Sequence[float], *, samples: int = 2000, seed: int = 0,
                 confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of ``values`` and its case-bootstrap percentile interval."""
    v = np.asarray(values, float)
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(samples, len(v)))].mean(axis=1)
    a = (1 - confidence) / 2
    return float(v.mean()), float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def _size(bundle: Any) -> int:
    spec = bundle.manifest.input
    return int(getattr(spec, "size", NET_SIZE))


def evaluate_bundle(bundle_dir: Path, data: PreparedSet, cases: Sequence[str], *,
                    bootstrap: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Dice, Jaccard and contour distance per structure of a bundle on ``cases``."""
    import torch

    from cad_node.models.bundle import load_bundle

    bundle = load_bundle(bundle_dir.parent.name, models_dir=bundle_dir.parent.parent,
                         version=bundle_dir.name)
    net = bundle.build_network("cpu")
    per: dict[str, dict[str, list[float]]] = {k: {"dice": [], "jaccard": [], "mscd_mm": []}
                                              for k in LABELS}
    rows = []
    t0 = time.monotonic()
    for case in cases:
        c = data.load(case)
        with torch.inference_mode():
            pred = segment(net, c.image.astype(np.float32) / 255.0,
                           size=_size(bundle)).as_dict()
        row: dict[str, Any] = {"case": case}
        for k in LABELS:
            if k not in c.structures:
                continue
            p, t = pred[k], c.masks[k]
            inter = float((p & t).sum())
            s = float(p.sum() + t.sum())
            dice = 2 * inter / s if s else 1.0
            jac = inter / float((p | t).sum()) if (p | t).any() else 1.0
            per[k]["dice"].append(dice)
            per[k]["jaccard"].append(jac)
            row[f"{k}_dice"] = round(dice, 4)
            if c.pixel_spacing_mm is not None:
                d = contour_distance_mm(p, t, c.pixel_spacing_mm)
                per[k]["mscd_mm"].append(d)
                row[f"{k}_mscd_mm"] = round(d, 3)
        rows.append(row)
    out: dict[str, Any] = {
        "split": "validation (fixed in the config, never trained or tuned on)",
        "cases": len(cases), "bootstrap_samples": bootstrap, "confidence": 0.95,
        "seconds_per_case": round((time.monotonic() - t0) / max(1, len(cases)), 3),
        "structures": {},
    }
    for k in LABELS:
        entry: dict[str, Any] = {}
        for metric, values in per[k].items():
            if values:
                mean, lo, hi = bootstrap_ci(values, samples=bootstrap, seed=seed)
                entry[metric] = {"mean": round(mean, 4), "ci95": [round(lo, 4), round(hi, 4)],
                                 "min": round(float(np.min(values)), 4), "n": len(values)}
        out["structures"][k] = entry
    out["per_case"] = rows
    return out


def _m(metrics: dict[str, Any], k: str, name: str) -> str:
    e = metrics["structures"].get(k, {}).get(name)
    if not e:
        return "n/a"
    return f"{e['mean']:.3f} (95% CI {e['ci95'][0]:.3f}-{e['ci95'][1]:.3f}; min {e['min']:.3f})"


def _stopped(provenance: dict[str, Any]) -> str:
    if "epochs_done" not in provenance:
        return ""
    if "annealed to 0" in str(provenance["stopped"]):
        return (f"\nThe run ended after {provenance['epochs_done']} of "
                f"{provenance['epochs']} planned epochs: {provenance['stopped']}.\n")
    return (f"\n**The run was stopped after {provenance['epochs_done']} of "
            f"{provenance['epochs']} epochs** ({provenance['stopped']}); the weights are that "
            "epoch's, with the one-cycle learning rate not yet fully annealed.\n")


def _config_name(cfg: CxrLungsConfig) -> str:
    if cfg.bundle.version == "1.0.0":
        return "trainer/configs/cxr-lungs.yaml"
    return f"trainer/configs/cxr-lungs-{cfg.bundle.version}.yaml"


def _site_text(cfg: CxrLungsConfig) -> str:
    out = ""
    if cfg.train.init_from:
        out += f"; warm-started from the weights of `{cfg.train.init_from}`"
    a = cfg.augment
    if a.site:
        out += (f"; other-site augmentation before the histogram equalisation: shear "
                f"±{a.shear}, grid distortion (p {a.distort_prob}), a frame of random grey "
                f"around the film shrunk to {a.frame_side[0]}-{a.frame_side[1]} of the side "
                f"(p {a.frame_prob}), uneven exposure (bias field, p {a.bias_field_prob}), "
                f"bright lines and patches (p {a.lines_prob}), sharpening")
    if a.site and a.pathology_prob > 0:
        out += (f"; synthetic findings inside the labelled lung fields, labels unchanged "
                f"(`trainer/cxr_pathology.py`, p {a.pathology_prob}, both lungs "
                f"{a.pathology_both}): pleural fluid rising from the costophrenic angle with "
                f"a concave meniscus up to {a.effusion_max_fraction} of the lung height, "
                f"{a.whole_hemithorax_share} of it a whole opaque hemithorax, consolidation "
                f"and masses ({a.consolidation_share} of the findings)")
    if a.site and (a.soft_tissue_prob or a.devices_prob or a.portable_prob):
        out += (f"; soft-tissue overlays across the lung borders (p {a.soft_tissue_prob}), "
                f"tubes, lines, wires over the apices and ECG leads (p {a.devices_prob}), "
                f"the portable AP look: haze, compressed contrast, gamma, blur, noise "
                f"(p {a.portable_prob})")
    return out


def render_card(cfg: CxrLungsConfig, metrics: dict[str, Any], provenance: dict[str, Any]) -> str:
    """The bundle's MODEL_CARD.md."""
    rows = "\n".join(
        f"| {k.replace('_', ' ')} | {_m(metrics, k, 'dice')} | {_m(metrics, k, 'jaccard')} | "
        f"{_m(metrics, k, 'mscd_mm')} |" for k in LABELS)
    return f"""# {cfg.bundle.name} {cfg.bundle.version}

**Not for diagnostic use.** Research and engineering use only.

## What it does
Segments the patient's right lung, left lung and heart on a frontal (PA/AP) chest
radiograph. A MONAI residual U-Net (`unet2d`: channels
{cfg.architecture.get('channels')}, {cfg.architecture.get('num_res_units')} residual
units per level, {provenance.get('parameters')} parameters) sees the radiograph
letter-boxed to a square and resampled to {cfg.size}x{cfg.size} pixels (256 rather than
512: the CPU forward pass is about 30x cheaper, measured on this 2-core machine, and the
probabilities are resampled bilinearly to the full image before thresholding),
histogram-equalised. Three sigmoid outputs, threshold 0.5; the node keeps the largest
component of each structure and fills its holes. Weights are stored as float16.

## Training data and its terms
{cfg.data.description}

{cfg.data.terms}

**These weights are a derived work of the JSRT database and the SCR masks** and carry
their terms: research and education use, no redistribution of the data. The data
themselves are not in this bundle or the repository.

{provenance.get('train_cases')} training cases; {metrics['cases']} validation cases, fixed
in `trainer/configs/cxr-lungs.yaml` before the first training, never trained on or used for any
choice (the final epoch's weights are shipped, no early stopping).
JSRT is one site (digitised film, Japan, 1990s); performance on other sites' images is
lower and unmeasured against masks (NIH ChestX-ray14 plausibility check: see
docs/cxr.md).

## Measured on the validation split (as shipped, float16 weights, post-processing on)
Mean over {metrics['cases']} cases, case-bootstrap 95% interval ({metrics['bootstrap_samples']}
resamples), at the prepared 512-pixel resolution (0.7 mm pixels):

| structure | Dice | Jaccard | mean symmetric contour distance (mm) |
|---|---|---|---|
{rows}

Reference: the SCR second human observer reached Jaccard 0.946 (lungs) and 0.878 (heart)
(van Ginneken 2006).

## Training
`cad-train train cxr-lungs {_config_name(cfg)}`: {cfg.train.epochs} epochs, AdamW
(lr {cfg.train.lr}, one-cycle), batch {cfg.train.batch_size}, BCE + soft Dice; MONAI
augmentation (affine: rotation ±{cfg.augment.rotate_deg}°, zoom ±{cfg.augment.scale},
shift ±{cfg.augment.translate_px} px; Gaussian smoothing and noise; no flips){_site_text(cfg)}, seed
{cfg.seed}, {provenance.get('threads')} CPU threads, wall time {provenance.get('wall_time_s')} s,
torch {provenance.get('torch')}; final training loss {provenance.get('final_training_loss'):.4f}.
{_stopped(provenance)}
## Citations
Shiraishi J et al. Development of a digital image database for chest radiographs with and
without a lung nodule. AJR 2000;174:71-74. van Ginneken B, Stegmann MB, Loog M.
Segmentation of anatomical structures in chest radiographs using supervised methods. Med
Image Anal 2006;10(1):19-40.
"""


def train_command(model: str, config: Path, out: Path | None, models_dir: Path | None,
                  force: bool) -> Path:
    """``cad-train train cxr-lungs CONFIG``: train, export, evaluate."""
    from cad_node.models.bundle import default_models_dir

    cfg = load_cxr_config(config)
    if cfg.model != model:
        raise ValueError(f"{config}: config is for {cfg.model!r}, not {model!r}")
    os.environ.setdefault("OMP_NUM_THREADS", str(cfg.train.threads))
    return train_cxr_lungs(cfg, out or Path("runs") / model,
                           models_dir=models_dir or default_models_dir(), force=force)


def evaluate_command(bundle: Path, config: Path, out: Path | None) -> dict[str, Any]:
    """``cad-train evaluate cxr-lungs BUNDLE CONFIG``: metrics on the config's validation split."""
    cfg = load_cxr_config(config)
    data = load_prepared(Path(cfg.data.prepared))
    _, val = _split(cfg, data)
    metrics = evaluate_bundle(bundle, data, val, bootstrap=cfg.bootstrap, seed=cfg.seed)
    if out is not None:
        out.write_text(json.dumps(metrics, indent=1))
    return metrics


def register_evaluate(ev: typer.Typer) -> None:
    """Add ``cad-train evaluate cxr-lungs`` to the ``evaluate`` group."""

    @ev.command("cxr-lungs")
    def cxr_lungs_cmd(
        bundle: Annotated[Path, typer.Argument(help="Bundle folder models/cxr-lungs/<version>.")],
        config: Annotated[Path, typer.Argument(help="cxr-lungs YAML (its validation split).")],
        out: Annotated[Path | None, typer.Option(help="Write the metrics JSON here.")] = None,
    ) -> None:
        """Dice, Jaccard (bootstrap 95% CI) and contour distance (mm) per structure."""
        try:
            metrics = evaluate_command(bundle, config, out)
        except (ValueError, FileNotFoundError, KeyError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        for k in LABELS:
            typer.echo(f"{k:11s} Dice {_m(metrics, k, 'dice')}  Jaccard "
                       f"{_m(metrics, k, 'jaccard')}  MSCD mm {_m(metrics, k, 'mscd_mm')}")

    @ev.command("cxr-plausibility")
    def cxr_plausibility_cmd(
        bundle: Annotated[Path, typer.Argument(help="Bundle folder models/cxr-lungs/<version>.")],
        images: Annotated[Path, typer.Argument(help="Folder of PNG radiographs (no masks).")],
        entries: Annotated[Path, typer.Argument(help="Data_Entry CSV (view, pixel spacing).")],
        out: Annotated[Path | None, typer.Option(help="Write the JSON report here.")] = None,
        montage: Annotated[Path | None, typer.Option(help="PNG montage of the outliers.")] = None,
    ) -> None:
        """Two plausible lungs on every image of another site (NIH ChestX-ray14)?"""
        try:
            report = plausibility(bundle, images, entries)
        except (ValueError, FileNotFoundError, KeyError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        if out is not None:
            out.write_text(json.dumps(report, indent=1))
        bad = [c for c in report["cases"] if c["outlier"]]
        if montage is not None and bad:
            outlier_montage(bundle, images, [c["image"] for c in bad], montage)
        typer.echo(f"{report['images']} images, {report['outliers']} outliers")
        for c in bad:
            typer.echo(f"  {c['image']} ({c['view']}): {'; '.join(c['reasons'])}")


# -- plausibility on another site's images (no masks): NIH ChestX-ray14 ----------------

#: A lung whose projected area lies outside this range (cm²) is an outlier.
PLAUSIBLE_LUNG_CM2 = (40.0, 450.0)
#: Right/left lung area ratio outside this range is an outlier.
PLAUSIBLE_RIGHT_LEFT = (0.5, 2.5)


def plausibility(bundle_dir: Path, images: Path, entries: Path) -> dict[str, Any]:
    """Segment every PNG of ``images``; flag images without two plausible lungs.

    ``entries`` is a Data_Entry CSV with ``Image Index``, ``View Position`` and
    ``stored_pixel_spacing_mm`` (the NIH starter set's layout).  An image is an
    outlier when a lung is missing (two components are always kept, so
    "missing" means under 1% of the image), a lung area is outside
    :data:`PLAUSIBLE_LUNG_CM2`, the right/left ratio is outside
    :data:`PLAUSIBLE_RIGHT_LEFT`, or the lungs are on the wrong sides.
    """
    import csv

    from PIL import Image

    from cad_node.models.bundle import load_bundle

    bundle = load_bundle(bundle_dir.parent.name, models_dir=bundle_dir.parent.parent,
                         version=bundle_dir.name)
    net = bundle.build_network("cpu")
    with entries.open(newline="", encoding="utf-8") as fh:
        rows = {r["Image Index"]: r for r in csv.DictReader(fh)}
    cases: list[dict[str, Any]] = []
    t0 = time.monotonic()
    for path in sorted(images.glob("*.png")):
        row = rows.get(path.name, {})
        spacing = float(row["stored_pixel_spacing_mm"]) if row.get(
            "stored_pixel_spacing_mm") else None
        img = np.asarray(Image.open(path).convert("L"), np.float32) / 255.0
        m = segment(net, img, size=_size(bundle)).as_dict()
        n = img.size
        px = {k: int(v.sum()) for k, v in m.items()}
        cm2 = {k: (v * spacing * spacing / 100.0 if spacing else None) for k, v in px.items()}
        reasons = []
        for k in ("right_lung", "left_lung"):
            if px[k] < 0.01 * n:
                reasons.append(f"{k} missing")
            elif (area := cm2[k]) is not None and not (
                    PLAUSIBLE_LUNG_CM2[0] <= area <= PLAUSIBLE_LUNG_CM2[1]):
                reasons.append(f"{k} {area:.0f} cm2")
        if px["right_lung"] and px["left_lung"]:
            ratio = px["right_lung"] / px["left_lung"]
            if not PLAUSIBLE_RIGHT_LEFT[0] <= ratio <= PLAUSIBLE_RIGHT_LEFT[1]:
                reasons.append(f"right/left area ratio {ratio:.2f}")
            rc = float(np.nonzero(m["right_lung"])[1].mean())
            lc = float(np.nonzero(m["left_lung"])[1].mean())
            if rc >= lc:
                reasons.append("lungs on the wrong sides")
        cases.append({"image": path.name, "view": row.get("View Position", ""),
                      "labels": row.get("Finding Labels", ""),
                      "right_lung_cm2": None if cm2["right_lung"] is None else round(
                          cm2["right_lung"], 1),
                      "left_lung_cm2": None if cm2["left_lung"] is None else round(
                          cm2["left_lung"], 1),
                      "outlier": bool(reasons), "reasons": reasons})
    areas = [c[k] for c in cases for k in ("right_lung_cm2", "left_lung_cm2")
             if c[k] is not None]
    return {
        "images": len(cases), "outliers": sum(c["outlier"] for c in cases),
        "seconds_per_image": round((time.monotonic() - t0) / max(1, len(cases)), 3),
        "lung_area_cm2_percentiles": {
            str(q): round(float(np.percentile(areas, q)), 1) for q in (1, 5, 50, 95, 99)
        } if areas else {},
        "rules": {"lung_cm2": PLAUSIBLE_LUNG_CM2, "right_left": PLAUSIBLE_RIGHT_LEFT,
                  "missing": "< 1% of the image"},
        "cases": cases,
    }


def outlier_montage(bundle_dir: Path, images: Path, names: Sequence[str], out: Path,
                    tile: int = 256) -> None:
    """A PNG montage of ``names`` with predicted outlines (right green, left blue, heart red)."""
    from PIL import Image, ImageDraw

    from cad_node.models.bundle import load_bundle

    bundle = load_bundle(bundle_dir.parent.name, models_dir=bundle_dir.parent.parent,
                         version=bundle_dir.name)
    net = bundle.build_network("cpu")
    cols = min(4, max(1, len(names)))
    rows = int(np.ceil(len(names) / cols)) or 1
    sheet = Image.new("RGB", (cols * tile, rows * tile))
    colours = {"right_lung": (0, 220, 0), "left_lung": (0, 170, 255), "heart": (255, 70, 70)}
    for i, name in enumerate(names):
        img = np.asarray(Image.open(images / name).convert("L"), np.float32) / 255.0
        m = segment(net, img, size=_size(bundle)).as_dict()
        rgb = np.repeat((img * 255).astype(np.uint8)[..., None], 3, axis=2)
        for k, mask in m.items():
            ring = mask & ~ndimage.binary_erosion(mask, iterations=2)
            rgb[ring] = colours[k]
        tile_img = Image.fromarray(rgb).resize((tile, tile))
        ImageDraw.Draw(tile_img).text((4, 4), name, fill=(255, 255, 0))
        sheet.paste(tile_img, ((i % cols) * tile, (i // cols) * tile))
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
