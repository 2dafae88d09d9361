"""Abnormal-vs-normal probability and lesion boxes of a frontal chest radiograph (issue #12).

The ``cxr-abnormal`` bundle (:class:`~cad_node.pipelines.cxr.abnormal_net.AbnormalNet`)
scores patches at several scales on a 16x16 grid plus the whole image.  This
module loads it (never downloads anything), runs it and turns its outputs
into an :class:`AbnormalityResult`:

* ``probability``: the image probability (the bundle's ``image_rule``);
* ``threshold``, ``operating_rule``, ``normal_recall``: the operating point
  fixed by the trainer on a validation split (sensitivity 99%) and the share
  of normals below it measured there;
* ``abnormal``: ``probability >= threshold``;
* ``boxes``: the top patches merged into boxes (:func:`merge_patches`),
  restricted to patches centred in the lungs and clipped to the lungs'
  bounding box, in the coordinates of the image passed in (analysis image;
  :func:`analyse_radiograph` maps them to the stored pixels).

Contract of :meth:`AbnormalModel.analyse`
-----------------------------------------
* ``image``: 2-D float in ``[0, 1]``, bright = attenuating, standard display
  orientation (what :mod:`cad_node.imaging.radiograph` delivers);
* ``lungs``: boolean mask of both lungs on the same grid, or ``None``;
* boxes are reported only for an abnormal decision: the top box, and up to
  ``max_boxes - 1`` more whose probability reaches the bundle's
  ``box_threshold``;
* raises ``ValueError`` for an image that is not 2-D or a mask of another shape.

For attribution (captum), :attr:`AbnormalModel.net` is the ``torch.nn.Module``
whose ``forward(x, lung_grid)`` returns the image logit, and
:meth:`AbnormalModel.preprocess` / :meth:`AbnormalModel.lung_grid` build its
two inputs; :meth:`AbnormalModel.input_to_image` maps network-input pixels
back to the image.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from cad_node.pipelines.cxr.abnormal_net import GRID, INPUT_SIZE, patch_boxes
from cad_node.pipelines.cxr.lungs import letterbox, network_input
from cad_node.results.findings import FindingType, ModelIdentity

if TYPE_CHECKING:
    import torch

    from cad_node.imaging.radiograph import Radiograph
    from cad_node.models.bundle import ModelBundle
    from cad_node.pipelines.cxr.abnormal_net import AbnormalNet

__all__ = [
    "ABNORMAL_BUNDLE",
    "AbnormalBox",
    "AbnormalModel",
    "AbnormalityResult",
    "analyse_radiograph",
    "box_iou",
    "boxes_from_patches",
    "load_abnormal_model",
    "lung_bounding_box",
    "merge_patches",
]

#: Name of the bundle (``models/cxr-abnormal/<version>``).
ABNORMAL_BUNDLE = "cxr-abnormal"
#: Patches overlapping the top patch of a cluster by at least this IoU are merged into its box.
MERGE_IOU = 0.3
#: A grid cell counts as lung when at least this share of it is lung.
LUNG_CELL_FRACTION = 0.25
#: Most boxes reported per image.
MAX_BOXES = 3
_MODELS: dict[tuple[str, str], AbnormalModel] = {}
_LOCK = threading.Lock()


@dataclass(frozen=True)
class AbnormalBox:
    """One localised finding: a box ``(x0, y0, x1, y1)`` in image pixels (column, row).

    Coordinates are image-relative as SR SCOORD (the top-left corner of the
    top-left pixel is ``(0, 0)``), ``x1 > x0`` and ``y1 > y0``.
    """

    x0: float
    y0: float
    x1: float
    y1: float
    probability: float
    finding_type: FindingType

    @property
    def centre(self) -> tuple[float, float]:
        """``(x, y)`` centre."""
        return (0.5 * (self.x0 + self.x1), 0.5 * (self.y0 + self.y1))


@dataclass(frozen=True)
class AbnormalityResult:
    """The image-level result of the ``cxr-abnormal`` model on one radiograph."""

    #: Image probability of "abnormal" in [0, 1].
    probability: float
    #: The bundle's operating threshold (sensitivity 99% on its validation split).
    threshold: float
    #: One sentence: how the threshold was chosen.
    operating_rule: str
    #: Share of validation normals below the threshold (measured by the trainer).
    normal_recall: float | None
    #: ``probability >= threshold``.
    abnormal: bool
    #: Boxes (only for an abnormal decision), most probable first.
    boxes: tuple[AbnormalBox, ...]
    #: How the image probability is formed: ``max``, ``whole`` or ``fusion``.
    image_rule: str
    model: ModelIdentity

    @property
    def decision(self) -> str:
        """``"abnormal"`` or ``"normal"`` (at the operating point)."""
        return "abnormal" if self.abnormal else "normal"


def box_iou(box: npt.ArrayLike, boxes: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """IoU of one continuous box ``(x0, y0, x1, y1)`` with each row of ``boxes``."""
    b = np.asarray(box, float)
    g = np.asarray(boxes, float).reshape(-1, 4)
    iw = np.clip(np.minimum(g[:, 2], b[2]) - np.maximum(g[:, 0], b[0]), 0, None)
    ih = np.clip(np.minimum(g[:, 3], b[3]) - np.maximum(g[:, 1], b[1]), 0, None)
    inter = iw * ih
    union = (b[2] - b[0]) * (b[3] - b[1]) + (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]) - inter
    return np.asarray(np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0))


def merge_patches(boxes: npt.ArrayLike, probabilities: npt.ArrayLike, *,
                  min_probability: float = 0.0, merge_iou: float = MERGE_IOU,
                  max_boxes: int = 10) -> list[tuple[tuple[float, float, float, float], float]]:
    """Merge scored patches into boxes, most probable first.

    Greedy: the most probable remaining patch seeds a cluster of the remaining
    patches whose IoU with it is at least ``merge_iou`` (the seed included);
    the box is the probability-weighted mean of the cluster's corners and its
    probability the seed's.  Then every remaining patch whose centre lies
    inside that box is dropped, and the next seed is taken.  Patches below
    ``min_probability`` are never used.

    Parameters
    ----------
    boxes : array (n, 4)
        ``(x0, y0, x1, y1)`` per patch.
    probabilities : array (n,)
    """
    b = np.asarray(boxes, float).reshape(-1, 4)
    p = np.asarray(probabilities, float).reshape(-1)
    if len(b) != len(p):
        raise ValueError(f"{len(b)} boxes but {len(p)} probabilities")
    alive = p >= min_probability
    out: list[tuple[tuple[float, float, float, float], float]] = []
    centres = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)
    while alive.any() and len(out) < max_boxes:
        idx = np.flatnonzero(alive)
        seed = int(idx[np.argmax(p[idx])])
        member = idx[box_iou(b[seed], b[idx]) >= merge_iou]
        member = np.union1d(member, [seed])
        w = p[member] / max(float(p[member].sum()), 1e-12)
        merged = (w[:, None] * b[member]).sum(axis=0)
        box = (float(merged[0]), float(merged[1]), float(merged[2]), float(merged[3]))
        out.append((box, float(p[seed])))
        inside = ((centres[:, 0] >= box[0]) & (centres[:, 0] <= box[2])
                  & (centres[:, 1] >= box[1]) & (centres[:, 1] <= box[3]))
        alive &= ~inside
        alive[member] = False
    return out


def lung_bounding_box(lungs: npt.NDArray[np.bool_] | None
                      ) -> tuple[float, float, float, float] | None:
    """``(x0, y0, x1, y1)`` pixel-edge bounding box of a mask (``None`` if absent or empty)."""
    if lungs is None or not lungs.any():
        return None
    r, c = np.nonzero(lungs)
    return (float(c.min()), float(r.min()), float(c.max() + 1), float(r.max() + 1))


def boxes_from_patches(patch_probabilities: npt.NDArray[np.float64],
                       grid: npt.NDArray[np.bool_] | None,
                       input_boxes: npt.NDArray[np.float64], shape: tuple[int, int],
                       lung_box: tuple[float, float, float, float] | None,
                       finding_type: FindingType, *, min_probability: float = 0.0,
                       max_boxes: int = 10) -> list[AbnormalBox]:
    """Merge the lung patches of one image into boxes in image pixels.

    Parameters
    ----------
    patch_probabilities : array (s, 16, 16)
    grid : array (16, 16) of bool or None
        Lung cells; patches centred elsewhere are not used (none: all used).
    input_boxes : array (s, 16, 16, 4)
        :func:`~cad_node.pipelines.cxr.abnormal_net.patch_boxes` (network-input pixels).
    shape : (rows, cols)
        The image's shape; the letter-box scale is ``max(shape) / 256``.
    lung_box : (x0, y0, x1, y1) or None
        Boxes are clipped to it (and to the image); a box left under one
        pixel wide or high is dropped.
    """
    rows, cols = shape
    keep = np.ones(patch_probabilities.shape[1:], bool) if grid is None else grid
    if not keep.any():
        keep = np.ones_like(keep)
    scale = max(rows, cols) / INPUT_SIZE
    boxes = (input_boxes[:, keep] * scale).reshape(-1, 4)
    p = patch_probabilities[:, keep].reshape(-1)
    x_lo, y_lo, x_hi, y_hi = 0.0, 0.0, float(cols), float(rows)
    if lung_box is not None:
        x_lo, y_lo = max(x_lo, lung_box[0]), max(y_lo, lung_box[1])
        x_hi, y_hi = min(x_hi, lung_box[2]), min(y_hi, lung_box[3])
    out = []
    for (x0, y0, x1, y1), prob in merge_patches(boxes, p, min_probability=min_probability,
                                                max_boxes=max_boxes):
        x0, x1 = max(x0, x_lo), min(x1, x_hi)
        y0, y1 = max(y0, y_lo), min(y1, y_hi)
        if x1 - x0 < 1 or y1 - y0 < 1:
            continue
        out.append(AbnormalBox(x0, y0, x1, y1, prob, finding_type))
    return out


def _sigmoid(x: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    out: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-x))
    return out


class AbnormalModel:
    """A loaded ``cxr-abnormal`` bundle: network, operating point, preprocessing.

    Obtain one with :func:`load_abnormal_model`.

    Raises
    ------
    ValueError
        The bundle lacks its operating point (``metrics.operating_point``).
    """

    def __init__(self, bundle: ModelBundle, net: AbnormalNet) -> None:
        op = bundle.manifest.metrics.get("operating_point")
        threshold = bundle.manifest.output.operating_threshold
        if not isinstance(op, dict) or threshold is None:
            raise ValueError(f"{bundle.path}: manifest has no operating point "
                             "(output.operating_threshold and metrics.operating_point)")
        self.bundle = bundle
        self.net = net
        self.threshold = float(threshold)
        self.operating_rule = str(bundle.manifest.output.operating_rule or "")
        nr = op.get("normal_recall_validation")
        self.normal_recall = None if nr is None else float(nr)
        self.box_threshold = float(op.get("box_threshold", self.threshold))
        self.finding_type = (FindingType.NODULE
                             if bundle.manifest.output.positive_class == "nodule"
                             else FindingType.ABNORMAL)
        self._boxes = patch_boxes(net.scales).numpy().astype(np.float64)

    @property
    def identity(self) -> ModelIdentity:
        """The bundle's model identity (Device UID etc.)."""
        return self.bundle.identity

    # -- inputs of the network -------------------------------------------------
    @staticmethod
    def preprocess(image: npt.NDArray[np.floating]) -> torch.Tensor:
        """The network input ``(1, 1, 256, 256)`` of a ``[0, 1]`` radiograph."""
        import torch

        return torch.from_numpy(network_input(image, INPUT_SIZE))[None, None]

    @staticmethod
    def lung_grid(lungs: npt.NDArray[np.bool_] | None, shape: tuple[int, int]
                  ) -> torch.Tensor | None:
        """``(1, 16, 16)`` booleans: cell at least a quarter lung (``None``: no mask)."""
        import torch

        if lungs is None:
            return None
        if lungs.shape != shape:
            raise ValueError(f"lung mask shape {lungs.shape} is not the image's {shape}")
        frac = letterbox(lungs.astype(np.float32), GRID)
        return torch.from_numpy(frac >= LUNG_CELL_FRACTION)[None]

    @staticmethod
    def input_to_image(shape: tuple[int, int]) -> float:
        """Image pixels per network-input pixel (the letter-box scale)."""
        return max(shape) / INPUT_SIZE

    # -- inference -------------------------------------------------------------
    def scores(self, image: npt.NDArray[np.floating], lungs: npt.NDArray[np.bool_] | None
               ) -> dict[str, Any]:
        """Raw outputs: image probabilities per rule, patch probabilities ``(s, 16, 16)``, grid."""
        import torch

        if image.ndim != 2:
            raise ValueError(f"expected a 2-D image, got shape {image.shape}")
        shape = (int(image.shape[0]), int(image.shape[1]))
        x = self.preprocess(image)
        grid = self.lung_grid(lungs, shape)
        with torch.inference_mode():
            f8, f16 = self.net.encode(x)
            patches, whole = self.net.heads(f8, f16)
            logits = self.net.image_logits(patches, whole, grid)
        probs = {k: float(torch.sigmoid(v[0])) for k, v in logits.items()}
        return {"image": probs, "patches": _sigmoid(patches[0].double().numpy()),
                "grid": None if grid is None else grid[0].numpy(), "shape": shape}

    def candidates(self, raw: dict[str, Any],
                   lung_box: tuple[float, float, float, float] | None, *,
                   min_probability: float = 0.0, max_boxes: int = 10
                   ) -> list[AbnormalBox]:
        """Merged boxes (image pixels) from :meth:`scores` output, clipped to ``lung_box``.

        Only patches centred on lung cells (``raw["grid"]``) are merged;
        ``lung_box`` is :func:`lung_bounding_box` of the lung mask (``None``:
        the whole image).
        """
        return boxes_from_patches(raw["patches"], raw["grid"], self._boxes,
                                  raw["shape"], lung_box, self.finding_type,
                                  min_probability=min_probability, max_boxes=max_boxes)

    def analyse(self, image: npt.NDArray[np.floating], lungs: npt.NDArray[np.bool_] | None,
                *, max_boxes: int = MAX_BOXES) -> AbnormalityResult:
        """Probability, decision and boxes of one radiograph (see the module contract)."""
        raw = self.scores(image, lungs)
        rule = self.net.image_rule
        prob = raw["image"][rule]
        abnormal = prob >= self.threshold
        boxes: list[AbnormalBox] = []
        if abnormal:
            cands = self.candidates(raw, lung_bounding_box(lungs), max_boxes=max_boxes)
            boxes = cands[:1] + [b for b in cands[1:] if b.probability >= self.box_threshold]
        return AbnormalityResult(
            probability=prob, threshold=self.threshold, operating_rule=self.operating_rule,
            normal_recall=self.normal_recall, abnormal=abnormal, boxes=tuple(boxes),
            image_rule=rule, model=self.identity)


def load_abnormal_model(models_dir: Path | None = None, device: str = "cpu",
                        version: str | None = None) -> AbnormalModel:
    """Load (once per process) the newest (or ``version``) ``cxr-abnormal`` bundle.

    Raises
    ------
    FileNotFoundError
        No such bundle is installed.
    ValueError
        The bundle is invalid (weights, manifest or operating point).
    """
    from cad_node.models.bundle import load_bundle
    from cad_node.pipelines.cxr.abnormal_net import AbnormalNet

    bundle = load_bundle(ABNORMAL_BUNDLE, models_dir, version=version)
    key = (str(bundle.path), device)
    with _LOCK:
        model = _MODELS.get(key)
        if model is None:
            net = bundle.build_network(device)
            if not isinstance(net, AbnormalNet):
                raise ValueError(f"{bundle.path}: architecture is not 'cxr-abnormal'")
            model = AbnormalModel(bundle, net)
            _MODELS[key] = model
    return model


def _stored_box(rg: Radiograph, box: AbnormalBox) -> AbnormalBox:
    xs = sorted((rg.column_to_stored(box.x0), rg.column_to_stored(box.x1)))
    ys = sorted((rg.row_to_stored(box.y0), rg.row_to_stored(box.y1)))
    return AbnormalBox(xs[0], ys[0], xs[1], ys[1], box.probability, box.finding_type)


def analyse_radiograph(model: AbnormalModel, rg: Radiograph,
                       lungs: npt.NDArray[np.bool_] | None,
                       stored: Callable[[Radiograph, AbnormalBox], AbnormalBox] = _stored_box,
                       ) -> AbnormalityResult:
    """:meth:`AbnormalModel.analyse` on ``rg.pixels``; boxes mapped to the stored pixel grid.

    ``lungs`` is the union of the lung masks on the analysis image (``rg.pixels``).
    """
    res = model.analyse(rg.pixels, lungs)
    boxes: Sequence[AbnormalBox] = [stored(rg, b) for b in res.boxes]
    return AbnormalityResult(
        probability=res.probability, threshold=res.threshold,
        operating_rule=res.operating_rule, normal_recall=res.normal_recall,
        abnormal=res.abnormal, boxes=tuple(boxes), image_rule=res.image_rule,
        model=res.model)
