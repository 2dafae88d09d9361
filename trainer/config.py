"""Training configuration of ``cad-train train`` (``trainer/configs/*.yaml``).

One typed module: every key is a pydantic field, unknown keys are refused,
and :func:`load_train_config` names the file and the bad key.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = [
    "MODELS",
    "AugmentConfig",
    "BundleConfig",
    "ContextConfig",
    "DataConfig",
    "ExclusionConfig",
    "InputConfig",
    "OperatingRuleConfig",
    "OptimConfig",
    "RealNegativeConfig",
    "TrainConfig",
    "load_train_config",
    "resolve_ct_dir",
]

#: Models ``cad-train train`` knows how to train.
MODELS = ("ct-nodule-scorer",)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ExclusionConfig(_Strict):
    """A sphere kept out of training (e.g. a real nodule)."""

    center_mm: tuple[float, float, float]
    radius_mm: float = Field(gt=0)
    note: str = ""


class RealNegativeConfig(_Strict):
    """A real CT used for negatives only."""

    #: Series directory (resolved like ``data.ct``).
    ct: str
    #: Exclude every reader mark of the LIDC XML found in the directory.
    lidc_xml: bool = True
    #: Extra regions kept out (e.g. a finding not in the XML).
    exclusions: list[ExclusionConfig] = Field(default_factory=list)
    #: Generator candidates taken as negatives (strongest first).
    negatives: int = Field(200, ge=1)
    #: Jittered copies of each (the scan is seen once, the synthetic rounds many times).
    copies: int = Field(2, ge=1)
    #: Only candidates whose centre z (patient, mm) lies in this range become
    #: negatives (``None``: the whole scan).  The rest of the scan stays unseen,
    #: so the scan can still serve as a test there.
    z_mm: tuple[float, float] | None = None
    #: Rounds of synthetic nodules inserted into this scan (within ``z_mm``, clear
    #: of every reader mark), each cut like a ``data.train_rounds`` round of the
    #: background (:func:`trainer.data.insertion_round`): the scan's appearance then
    #: comes with positives too, not only as negatives.  0 (the default): negatives only.
    insertion_rounds: int = Field(0, ge=0)


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
    #: Extra held-out rounds of small nodules (``heldout_small_diameter_mm``),
    #: for the candidate generator's sensitivity by size band only (their own
    #: seed: the held-out FROC set above does not change).
    heldout_small_rounds: int = Field(0, ge=0)
    heldout_small_nodules_per_round: int = Field(10, ge=1)
    heldout_small_diameter_mm: tuple[float, float] = (3.0, 10.0)
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
    #: Real CTs used for negatives only (scans without a LUNA16 nodule, e.g.
    #: LIDC-IDRI-0002).  Every reader mark of the scan's LIDC XML (nodules,
    #: small nodules, non-nodules, irrelevant findings) is neither positive nor
    #: negative.
    real_negatives: list[RealNegativeConfig] = Field(default_factory=list)
    #: Vessel-bifurcation hard negatives: generator candidates of the
    #: background whose Frangi vesselness (at the candidate's scale) is at
    #: least this are added this many extra (jittered) times (0: off).
    tubular_vesselness: float = Field(0.5, ge=0, le=1)
    tubular_copies: int = Field(0, ge=0)


class InputConfig(_Strict):
    """Patch geometry (copied into the bundle's input spec)."""

    spacing_mm: tuple[float, float, float] = (1.25, 1.25, 1.25)
    patch_size: tuple[int, int, int] = (32, 32, 32)
    hu_window: tuple[float, float] = (-1000.0, 400.0)
    batch_size: int = 64
    #: Training slice thickness (mm) written into the bundle: the pipeline smooths
    #: thinner-slice scans along z to it (cad_node.pipelines.ct_chest.harmonise).
    #: None (the default): no harmonisation, as for bundles up to 1.0.2.
    harmonise_slice_thickness_mm: float | None = Field(None, gt=0, le=20)
    #: Test-time flips written into the bundle: 8 averages the scorer's logits over the
    #: patch's 8 axis flips, in the trainer's evaluation as in the pipeline
    #: (cad_node.models.scorer.flip_averaged_logits).  None (the default): one pass.
    tta_flips: Literal[8] | None = None


class AugmentConfig(_Strict):
    """MONAI augmentation probabilities and ranges."""

    flip_prob: float = Field(0.5, ge=0, le=1)
    rot90_prob: float = Field(0.5, ge=0, le=1)
    intensity_shift: float = Field(0.03, ge=0)
    intensity_scale: float = Field(0.05, ge=0)
    intensity_prob: float = Field(0.5, ge=0, le=1)
    #: Scanner-appearance augmentation (all off by default, so older configs
    #: train exactly as before).  Values are in the windowed [0, 1] units of
    #: the patches: 0.01 is 14 HU with the default (-1000, 400) window.
    #: Gaussian noise (image noise of another dose/scanner).
    noise_prob: float = Field(0.0, ge=0, le=1)
    noise_std: float = Field(0.01, ge=0)
    #: Gaussian blur (a softer reconstruction kernel), sigma range in voxels.
    blur_prob: float = Field(0.0, ge=0, le=1)
    blur_sigma: tuple[float, float] = (0.3, 1.0)
    #: Unsharp masking (a sharper kernel).
    sharpen_prob: float = Field(0.0, ge=0, le=1)
    #: Resampling: zoom in/out by this factor range (other voxel sizes).
    zoom_prob: float = Field(0.0, ge=0, le=1)
    zoom_range: tuple[float, float] = (0.85, 1.15)


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
    #: Start from these weights (a bundle's ``weights.pt`` or a state dict;
    #: relative paths from the repository root): fine-tuning.
    init_weights: str | None = None


class BundleConfig(_Strict):
    """Identity of the bundle this training produces."""

    name: str
    version: str
    task: str = "ct-nodule-candidate-scoring"
    threshold: float = Field(0.5, ge=0, le=1)


def _default_architecture() -> dict[str, Any]:
    from cad_node.models.network import DEFAULT_ARCHITECTURE

    return dict(DEFAULT_ARCHITECTURE)


class OperatingRuleConfig(_Strict):
    """The rule that chooses the pipeline's operating threshold (:mod:`trainer.operating_point`)."""

    #: At most this many false positives per held-out synthetic scan.
    fp_per_scan: float = Field(1.0, gt=0)
    #: At most this many findings outside the irrelevant-finding regions of
    #: each real negative scan (``data.real_negatives``).
    max_per_negative_scan: int = Field(2, ge=0)
    #: The threshold is never below this.
    min_threshold: float = Field(0.5, ge=0, le=1)
    #: Real negative scans of the rule (default: ``data.real_negatives``); set
    #: it to apply the rule to scans the weights were not trained on (``[]``: none).
    negative_scans: list[RealNegativeConfig] | None = None
    #: Count the background CT itself (``data.ct``, unmodified) as a real
    #: negative scan of the rule: its findings other than the ``data.exclusions``
    #: reference nodule(s) are false positives, at most ``max_per_negative_scan``.
    cap_background: bool = False
    #: Real scans measured at the chosen threshold and reported as tests; the
    #: rule never sees them.  A scan that also gave training negatives
    #: (``data.real_negatives`` with ``z_mm``) is reported per slab.
    test_scans: list[RealNegativeConfig] = Field(default_factory=list)


class ContextConfig(_Strict):
    """Late fusion of the CNN logit with context features (:mod:`trainer.context`)."""

    #: Fresh insertion rounds (training slab, own seed) the fusion is fitted on.
    rounds: int = Field(4, ge=1)
    #: Features of the bundle's fusion (names of
    #: ``cad_node.pipelines.ct_chest.features.CONTEXT_FEATURES``).
    features: list[str] = Field(
        default_factory=lambda: ["vesselness", "mediastinum_mm", "vessel_branches"])
    #: L2 penalty of the feature weights.
    l2: float = Field(1e-2, ge=0)
    #: Also fit and measure one fusion per feature (and none): the ablation.
    ablation: bool = True


class TrainConfig(_Strict):
    """A training configuration (``trainer/configs/*.yaml``)."""

    model: str
    seed: int = 20240601
    bundle: BundleConfig
    data: DataConfig
    input: InputConfig = InputConfig()
    architecture: dict[str, Any] = Field(default_factory=lambda: _default_architecture())
    optim: OptimConfig = OptimConfig()
    #: Choose the pipeline's operating threshold by this rule after training
    #: (written into the bundle); ``None``: the bundle has none.
    operating_point: OperatingRuleConfig | None = None
    #: Fuse the CNN logit with context features after training (``None``: no fusion).
    context: ContextConfig | None = None


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
