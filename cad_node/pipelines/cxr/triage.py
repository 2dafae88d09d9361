"""Chest X-ray part 2 in the ``cxr`` pipeline: abnormal probability, boxes, heatmap, TB.

:func:`add_part2` runs after part 1 (lungs, heart, CTR) on a COMPLETED
result and adds, each from its optional bundle:

* **abnormality** (``cxr-abnormal``, :mod:`.abnormal`): the image probability
  and the decision at the bundle's operating point
  (:class:`~cad_node.results.findings.ImageClassification`, reported in the
  SR as a TID 1501 group), and for an abnormal image its boxes as findings
  ("Abnormal", or "Nodule" for a nodule detector) with their probability, on
  the stored pixels, each with the lung it lies in;
* **attribution** (:mod:`.attribution`): the lung-restricted heatmap of the
  abnormality model, on the stored pixels, for the images
  :data:`ATTRIBUTION_FOR` selects (SC overlay and Parametric Map);
* **tuberculosis** (``cxr-tb``, :mod:`.tb`): the TB probability and decision;
  without the bundle a note says TB screening is not installed and no number
  is reported.

A missing or unusable optional bundle never fails the analysis: the report
says which part is absent and why, and carries no number for it.  Stage
times go into the result's notes only through the log (``log.info``), never
into the objects (they would break byte-identical re-runs).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from cad_node.imaging.radiograph import Radiograph
from cad_node.pipelines.cxr.attribution import (
    AttributionMethod,
    Baseline,
    from_letterbox,
    lung_heatmap,
)
from cad_node.results.findings import (
    AnalysisResult,
    Finding,
    FindingSite,
    ImageClassification,
    ImageMask,
    Region2D,
)

__all__ = ["ATTRIBUTED_LOGIT", "ATTRIBUTION_BASELINE", "ATTRIBUTION_FOR", "ATTRIBUTION_METHOD",
           "add_part2"]

log = logging.getLogger(__name__)

#: Which images get a heatmap: ``"abnormal"`` (above the operating point) or
#: ``"all"``.  Measured choice, see docs/benchmarks.md ("cxr attribution").
ATTRIBUTION_FOR: Literal["abnormal", "all"] = "abnormal"
#: What the heatmap explains, how, from which baseline: layer Integrated Gradients
#: (:data:`.attribution.LAYER_IG_STEPS` steps) of the top finding's own patch logit
#: (:class:`.abnormal_net.TopPatchLogit`, at the encoder's stride-8 layer ``f8``),
#: from zero activations.  Chosen among five variants on the odd-numbered JSRT
#: nodule cases only, by the share of cases whose heatmap maximum lies in the top
#: box (72 / 77 there, against 16 / 77 for Integrated Gradients of the input towards
#: the max-patch logit); on the even-numbered half, the maximum lies inside the top
#: box in 39 / 39 cases and inside the box of all 6 hits (docs/benchmarks.md,
#: "Chest X-ray attribution").  ``ATTRIBUTED_LOGIT`` is ``top-patch``, or an image
#: rule of :class:`.abnormal_net.ImageLogit` (``max``, ``fusion``, ``whole``).
ATTRIBUTION_METHOD = AttributionMethod.LAYER_INTEGRATED_GRADIENTS
ATTRIBUTION_BASELINE = Baseline.ZERO
ATTRIBUTED_LOGIT = "top-patch"


#: How the report names each explained logit.
_EXPLAINED = {"max": "max-patch score", "fusion": "image score", "whole": "whole-image score",
              "top-patch": "top finding's patch score"}


def _site(rg: Radiograph, right: npt.NDArray[np.bool_], left: npt.NDArray[np.bool_],
          x0: float, y0: float, x1: float, y1: float) -> FindingSite:
    """The lung holding most of a stored-pixel box (either lung on a tie: "Lung")."""
    right_s, left_s = rg.to_stored(right), rg.to_stored(left)
    r0, r1, c0, c1 = int(y0), int(np.ceil(y1)), int(x0), int(np.ceil(x1))
    in_right = int(np.asarray(right_s[r0:r1, c0:c1]).sum())
    in_left = int(np.asarray(left_s[r0:r1, c0:c1]).sum())
    if in_right > in_left:
        return FindingSite.RIGHT_LUNG
    return FindingSite.LEFT_LUNG if in_left > in_right else FindingSite.LUNG


def _abnormality(
    rg: Radiograph, right: npt.NDArray[np.bool_], left: npt.NDArray[np.bool_],
    models_dir: Path | None, device: str, update: dict[str, Any],
) -> tuple[ImageClassification | None, list[Finding], ImageMask | None, str | None]:
    """The abnormality part; ``update`` holds the result's notes, measurements, qualitative."""
    lungs = right | left
    notes: list[str] = update["notes"]
    from cad_node.pipelines.cxr.abnormal import (
        ABNORMAL_BUNDLE,
        analyse_radiograph,
        load_abnormal_model,
    )

    try:
        model = load_abnormal_model(models_dir, device)
    except FileNotFoundError:
        notes.append(f"abnormality model not installed (no {ABNORMAL_BUNDLE} bundle): no "
                     "abnormal probability is reported")
        return None, [], None, None
    except ValueError as exc:
        log.warning("cxr: %s bundle unusable for study %s: %s", ABNORMAL_BUNDLE,
                    rg.study_instance_uid, exc)
        notes.append(f"abnormality model {ABNORMAL_BUNDLE!r} unusable: {exc}")
        return None, [], None, None
    res = analyse_radiograph(model, rg, lungs)
    rule = res.operating_rule
    if res.normal_recall is not None:
        rule += f"; normal recall there {res.normal_recall:.2f}"
    classification = ImageClassification(
        finding_type=model.finding_type, probability=res.probability,
        threshold=res.threshold, operating_rule=rule or None, model=res.model)
    update["measurements"]["abnormal_probability"] = round(res.probability, 4)
    update["measurements"]["abnormal_threshold"] = round(res.threshold, 4)
    recall = ("" if res.normal_recall is None else
              f"; {res.normal_recall:.0%} of validation normals fall below it")
    update["qualitative"]["abnormal_decision"] = (
        f"{res.decision} (probability {res.probability:.3f} "
        f"{'>=' if res.abnormal else '<'} operating threshold {res.threshold:.3f}: "
        f"{res.operating_rule}{recall})")
    findings = []
    for k, box in enumerate(res.boxes, start=1):
        findings.append(Finding(
            tracking_id=f"{box.finding_type.meaning} {k}",
            finding_type=box.finding_type,
            site=_site(rg, right, left, box.x0, box.y0, box.x1, box.y1),
            probability=round(box.probability, 4),
            region=Region2D(sop_instance_uid=rg.sop_instance_uid, kind="box",
                            points=[(box.x0, box.y0), (box.x1, box.y1)]),
        ))
    if ATTRIBUTION_FOR == "abnormal" and not res.abnormal:
        notes.append("attribution heatmap not computed: the image is below the abnormality "
                     "operating point (heatmaps are made for abnormal images only)")
        return classification, findings, None, None
    shape = (int(rg.pixels.shape[0]), int(rg.pixels.shape[1]))
    x = model.preprocess(rg.pixels)
    grid = model.lung_grid(lungs, shape)

    def to_image(a: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return from_letterbox(a, shape)

    from cad_node.pipelines.cxr.abnormal_net import ImageLogit, TopPatchLogit

    explained = (TopPatchLogit.of(model.net, x, grid) if ATTRIBUTED_LOGIT == "top-patch"
                 else ImageLogit(model.net, ATTRIBUTED_LOGIT))
    att = lung_heatmap(explained, x, lungs, to_image,
                       ATTRIBUTION_METHOD, extra=() if grid is None else (grid,),
                       baseline=ATTRIBUTION_BASELINE)
    log.info("cxr attribution (%s) took %.2f s", att.method, att.seconds)
    if att.peak is None:
        notes.append("attribution heatmap not made: the attribution found no evidence for "
                     "'abnormal' inside the lungs")
        return classification, findings, None, None
    stored = np.asarray(rg.to_stored(att.heatmap), dtype=np.float32)
    method = (f"{ATTRIBUTION_METHOD.display_name} (captum) of {res.model.name} "
              f"{res.model.version} ({_EXPLAINED[ATTRIBUTED_LOGIT]}), smoothed, restricted "
              "to the lungs")
    return classification, findings, ImageMask(stored[None], (rg.sop_instance_uid,)), method


def _tuberculosis(rg: Radiograph, lungs: npt.NDArray[np.bool_], models_dir: Path | None,
                  device: str, notes: list[str]) -> ImageClassification | None:
    from cad_node.pipelines.cxr.tb import TB_BUNDLE, load_tb_model, not_installed_statement

    try:
        model = load_tb_model(models_dir, device)
    except (FileNotFoundError, ValueError) as exc:
        notes.append(f"{TB_BUNDLE} bundle unusable ({exc}): no tuberculosis probability is "
                     "reported")
        return None
    if model is None:
        notes.append(not_installed_statement())
        return None
    return model.classify(rg.pixels, lungs)


def add_part2(
    result: AnalysisResult,
    rg: Radiograph,
    right: npt.NDArray[np.bool_],
    left: npt.NDArray[np.bool_],
    models_dir: Path | None,
    device: str = "cpu",
    report: Callable[[str, float], None] | None = None,
) -> AnalysisResult:
    """``result`` (COMPLETED, from part 1) with the part-2 results added (module docstring).

    ``right`` / ``left`` are the lung masks on the analysis image (``rg.pixels``).
    """
    right, left = np.asarray(right, bool), np.asarray(left, bool)
    lungs = right | left
    notes = list(result.notes)
    update: dict[str, Any] = {"notes": notes, "measurements": dict(result.measurements),
                              "qualitative": dict(result.qualitative)}
    classifications: list[ImageClassification] = []
    start = time.perf_counter()
    if report is not None:
        report("scoring abnormality", 0.85)
    abnormal, boxes, heat, method = _abnormality(rg, right, left, models_dir, device, update)
    if abnormal is not None:
        classifications.append(abnormal)
    if report is not None:
        report("tuberculosis screening", 0.95)
    tb = _tuberculosis(rg, lungs, models_dir, device, notes)
    if tb is not None:
        classifications.append(tb)
    log.info("cxr part 2 took %.2f s", time.perf_counter() - start)
    return result.model_copy(update={
        "findings": [*result.findings, *boxes],
        "classifications": classifications,
        "attribution": heat,
        "attribution_method": method,
        **update,
    })
