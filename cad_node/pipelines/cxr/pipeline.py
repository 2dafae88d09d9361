"""The ``cxr`` pipeline: frontal chest radiograph -> lungs, heart, areas, cardiothoracic ratio.

Stages (each reported through ``progress``):

1. input (:meth:`CxrPipeline.load_input`, :func:`cad_node.imaging.radiograph.load_radiograph`):
   CR/DX for presentation, frontal, chest, >= 256 pixels; anything else is a
   :class:`~cad_node.imaging.radiograph.RadiographRefusedError` whose reason the
   result states (FAILED, never "no findings");
2. segmentation (:func:`~.lungs.segment`, the ``cxr-lungs`` bundle) on the
   analysis image (standard orientation), masks mapped back to the stored
   pixels;
3. measurements (:mod:`.measure`): lung areas (cm², only with a mm scale), the
   CTR on PA films ("not assessable" on AP or without a stated view), and a
   "Cardiomegaly" finding (the heart outline) when CTR > 0.50 on PA.
4. part 2 (:mod:`.triage`, issue #12), each from its optional bundle: the
   abnormal probability and decision at the operating point with the boxes of
   an abnormal image (``cxr-abnormal``), the lung-restricted attribution
   heatmap, and the TB probability (``cxr-tb``; without it the report says TB
   screening is not installed and gives no number).

Contract of :meth:`CxrPipeline.run`
-----------------------------------
* ``series`` is what :meth:`CxrPipeline.load_input` returned: a
  :class:`~cad_node.imaging.radiograph.Radiograph` or the refusal;
* returns an :class:`AnalysisResult` with the model identity (so a refusal
  still yields its SR and summary page); FAILED with the reason for a refused
  input, a missing ``cxr-lungs`` bundle, or masks without two lungs;
* COMPLETED results carry ``organ_masks`` (right lung, left lung, heart; one
  frame on the radiograph's SOP Instance UID) and ``radiograph``
  (:class:`ChestRadiographMeasurements`, coordinates on the stored image);
* never raises for bad input.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from cad_node.imaging.radiograph import Radiograph, RadiographRefusedError, load_radiograph
from cad_node.models.bundle import RadiographInputSpec
from cad_node.pipelines import ProgressCallback, register_pipeline
from cad_node.pipelines.cxr.lungs import NET_SIZE, segment
from cad_node.pipelines.cxr.measure import (
    CARDIOMEGALY_CTR,
    HorizontalExtent,
    heart_extent,
    outline,
    thorax_extent,
)
from cad_node.results.findings import (
    AnalysisResult,
    AnalysisStatus,
    ChestRadiographMeasurements,
    Finding,
    FindingSite,
    FindingType,
    ImageMask,
    ModelIdentity,
    Point2D,
    Region2D,
)

if TYPE_CHECKING:
    import torch

    from cad_node.models.bundle import ModelBundle

__all__ = ["LUNGS_BUNDLE", "PIPELINE_NAME", "CxrPipeline", "RefusedInput"]

log = logging.getLogger(__name__)

PIPELINE_NAME = "cxr"
#: Name of the lung/heart segmentation bundle (``models/cxr-lungs/<version>``).
LUNGS_BUNDLE = "cxr-lungs"
#: Right/left lung area ratios outside this range get a note (NIH check, docs/cxr.md).
PLAUSIBLE_RIGHT_LEFT = (0.5, 2.5)
#: A chest film narrower than this (mm) means the header's pixel spacing is suspect.
MIN_PLAUSIBLE_FIELD_MM = 250.0
#: A lung mask smaller than this fraction of the image is not a lung.
MIN_LUNG_FRACTION = 0.01
_NETWORKS: dict[tuple[str, str], torch.nn.Module] = {}
_LOCK = threading.Lock()


class RefusedInput:
    """What :meth:`CxrPipeline.load_input` returns for an input it will not analyse."""

    def __init__(self, reason: str, series_instance_uid: str, sop_instance_uids: tuple[str, ...]
                 ) -> None:
        self.reason = reason
        self.series_instance_uid = series_instance_uid
        self.sop_instance_uids = sop_instance_uids


def _sources(series: Any) -> list[Any]:
    """Paths or datasets of a SeriesInfo, LoadedSeries-like object or a plain list."""
    if hasattr(series, "sources"):
        return list(series.sources)
    return list(series)


def _to_stored(radiograph: Radiograph, points: Sequence[tuple[float, float]]
               ) -> list[tuple[float, float]]:
    return [(radiograph.column_to_stored(x), radiograph.row_to_stored(y)) for x, y in points]


@register_pipeline(PIPELINE_NAME)
class CxrPipeline:
    """Frontal chest radiographs: lungs and heart, areas, cardiothoracic ratio.

    Parameters
    ----------
    models_dir : Path, optional
        Where bundles live (default: :func:`cad_node.models.bundle.default_models_dir`).
    """

    name = PIPELINE_NAME

    def __init__(self, models_dir: Path | None = None) -> None:
        self.models_dir = models_dir

    # -- input ---------------------------------------------------------------
    @staticmethod
    def load_input(series: Any) -> Radiograph | RefusedInput:
        """Read the radiograph of a routed series; a refusal is returned, not raised."""
        import pydicom

        sources = _sources(series)
        try:
            return load_radiograph(sources)
        except RadiographRefusedError as exc:
            first = sources[0] if sources else None
            ds = first if isinstance(first, pydicom.Dataset) else (
                pydicom.dcmread(os.fspath(first), stop_before_pixels=True) if first else None)
            uid = str(ds.SeriesInstanceUID) if ds is not None else "0.0"
            sop = (str(ds.SOPInstanceUID),) if ds is not None else ()
            return RefusedInput(str(exc), uid, sop)

    # -- model ---------------------------------------------------------------
    def _bundle(self) -> ModelBundle:
        from cad_node.models.bundle import load_bundle

        return load_bundle(LUNGS_BUNDLE, self.models_dir)

    def network(self, bundle: ModelBundle, device: str = "cpu") -> torch.nn.Module:
        """The bundle's network, built once per process and bundle version."""
        key = (str(bundle.path), device)
        with _LOCK:
            net = _NETWORKS.get(key)
            if net is None:
                net = bundle.build_network(device)
                _NETWORKS[key] = net
        return net

    # -- run -----------------------------------------------------------------
    def run(
        self,
        series: Radiograph | RefusedInput | Any,
        *,
        device: str = "cpu",
        progress: ProgressCallback | None = None,
    ) -> AnalysisResult:
        """Analyse one radiograph (see the module contract)."""

        def report(stage: str, fraction: float) -> None:
            if progress is not None:
                progress(stage, fraction)

        if not isinstance(series, Radiograph | RefusedInput):
            series = self.load_input(series)
        try:
            bundle = self._bundle()
        except (FileNotFoundError, ValueError) as exc:
            identity = ModelIdentity(name=LUNGS_BUNDLE, version="0.0.0", device_uid="2.25.0")
            return self._failed(series, f"model bundle {LUNGS_BUNDLE!r} unusable: {exc}",
                                identity)
        identity = bundle.identity
        if isinstance(series, RefusedInput):
            return self._failed(series, series.reason, identity)
        report("segmenting lungs and heart", 0.1)
        net = self.network(bundle, device)
        spec = bundle.manifest.input
        size = spec.size if isinstance(spec, RadiographInputSpec) else NET_SIZE
        masks = segment(net, series.pixels, size=size)
        report("measuring", 0.8)
        result = self._measure(series, masks.right_lung, masks.left_lung, masks.heart, identity)
        if result.status is not AnalysisStatus.COMPLETED:
            return result
        # part 2 (issue #12): abnormal probability and boxes (cxr-abnormal), attribution
        # heatmap, TB probability (cxr-tb): pipelines/cxr/triage.py
        from cad_node.pipelines.cxr.triage import add_part2

        return add_part2(result, series, masks.right_lung, masks.left_lung, self.models_dir,
                         device, report)

    @staticmethod
    def _failed(series: Radiograph | RefusedInput, reason: str, identity: ModelIdentity
                ) -> AnalysisResult:
        uid = series.series_instance_uid
        return AnalysisResult(pipeline=PIPELINE_NAME, status=AnalysisStatus.FAILED,
                              failure_reason=reason, series_instance_uid=uid, model=identity)

    def _measure(
        self,
        rg: Radiograph,
        right: npt.NDArray[np.bool_],
        left: npt.NDArray[np.bool_],
        heart: npt.NDArray[np.bool_],
        identity: ModelIdentity,
    ) -> AnalysisResult:
        n_pixels = right.size
        notes = list(rg.notes)
        small = [name for name, m in (("right lung", right), ("left lung", left))
                 if m.sum() < MIN_LUNG_FRACTION * n_pixels]
        if small:
            return self._failed(rg, f"no {' or '.join(small)} found on the image: not a "
                                "frontal chest radiograph the model can read", identity)
        ratio = float(right.sum()) / float(left.sum())
        if not PLAUSIBLE_RIGHT_LEFT[0] <= ratio <= PLAUSIBLE_RIGHT_LEFT[1]:
            notes.append(f"right/left lung area ratio {ratio:.2f} is outside "
                         f"{PLAUSIBLE_RIGHT_LEFT[0]}-{PLAUSIBLE_RIGHT_LEFT[1]}: a lung may be "
                         "partly missed (effusion, collapse, unusual film); check the outlines "
                         "and the cardiothoracic ratio")
        geometry = rg.geometry
        if geometry.spacing_mm is not None:
            field_mm = geometry.spacing_mm[1] * right.shape[1]
            if field_mm < MIN_PLAUSIBLE_FIELD_MM:
                notes.append(
                    f"the pixel spacing gives a {field_mm:.0f} mm wide image, implausibly small "
                    "for a chest film (was the image resized without updating Pixel Spacing?): "
                    "mm and cm2 values follow the header and may be wrong")
        # Heart side check: on a standard frontal film most of the heart lies
        # on the image's right (the patient's left).
        cols = np.arange(right.shape[1])
        mid = 0.5 * (float(np.mean(cols[right.any(axis=0)]))
                     + float(np.mean(cols[left.any(axis=0)])))
        if heart.any():
            heart_cols = np.nonzero(heart)[1]
            if float(np.mean(heart_cols > mid)) < 0.5:
                notes.append("most of the heart lies on the patient's right: dextrocardia, or a "
                             "mirrored image with a wrong Patient Orientation; check the sides")
        h_ext = heart_extent(heart)
        t_ext = thorax_extent(right, left)
        ctr: float | None = None
        why: str | None = None
        if h_ext is None or t_ext is None:
            why = "not assessable: heart or thorax borders not found"
        elif rg.view.view_position != "PA":
            why = ("not assessable on an AP view (the CTR is defined on PA films)"
                   if rg.view.view_position == "AP" else
                   "not assessable: View Position not stated (the CTR is defined on PA films)")
        else:
            ctr = h_ext.width_px / t_ext.width_px

        def line(ext: HorizontalExtent | None) -> tuple[Point2D, Point2D] | None:
            if ext is None:
                return None
            a, b = _to_stored(rg, ext.points)
            return (a, b) if a[0] <= b[0] else (b, a)

        def stored_outline(m: npt.NDArray[np.bool_]) -> list[tuple[float, float]] | None:
            poly = outline(m)
            return None if poly is None else _to_stored(rg, poly)

        meas = ChestRadiographMeasurements(
            sop_instance_uid=rg.sop_instance_uid,
            right_lung_outline=stored_outline(right),
            left_lung_outline=stored_outline(left),
            heart_outline=stored_outline(heart),
            right_lung_area_cm2=geometry.area_cm2(int(right.sum())),
            left_lung_area_cm2=geometry.area_cm2(int(left.sum())),
            heart_line=line(h_ext),
            thorax_line=line(t_ext),
            heart_width_px=float(h_ext.width_px) if h_ext else None,
            thorax_width_px=float(t_ext.width_px) if t_ext else None,
            heart_width_mm=geometry.width_mm(h_ext.width_px) if h_ext else None,
            thorax_width_mm=geometry.width_mm(t_ext.width_px) if t_ext else None,
            ctr=ctr,
            ctr_not_assessable=why,
            geometry_note=geometry.note,
        )
        measurements: dict[str, float] = {}
        qualitative: dict[str, str] = {}
        if meas.right_lung_area_cm2 is not None and meas.left_lung_area_cm2 is not None:
            measurements["right_lung_area_cm2"] = round(meas.right_lung_area_cm2, 1)
            measurements["left_lung_area_cm2"] = round(meas.left_lung_area_cm2, 1)
        if ctr is not None:
            measurements["cardiothoracic_ratio"] = round(ctr, 3)
        else:
            qualitative["cardiothoracic_ratio"] = str(why)
        findings: list[Finding] = []
        if ctr is not None and ctr > CARDIOMEGALY_CTR and meas.heart_outline is not None:
            qualitative["cardiomegaly"] = (
                f"suspected (CTR {ctr:.2f} > {CARDIOMEGALY_CTR:.2f} on PA)")
            findings.append(Finding(
                tracking_id="Cardiomegaly",
                finding_type=FindingType.CARDIOMEGALY,
                site=FindingSite.HEART,
                region=Region2D(sop_instance_uid=rg.sop_instance_uid, kind="polygon",
                                points=meas.heart_outline),
            ))
        uid = (rg.sop_instance_uid,)
        organ_masks = {
            FindingSite.RIGHT_LUNG: ImageMask(np.asarray(rg.to_stored(right), bool)[None], uid),
            FindingSite.LEFT_LUNG: ImageMask(np.asarray(rg.to_stored(left), bool)[None], uid),
        }
        if heart.any():
            organ_masks[FindingSite.HEART] = ImageMask(
                np.asarray(rg.to_stored(heart), bool)[None], uid)
        return AnalysisResult(
            pipeline=PIPELINE_NAME,
            status=AnalysisStatus.COMPLETED,
            series_instance_uid=rg.series_instance_uid,
            findings=findings,
            organ_masks=organ_masks,
            measurements=measurements,
            qualitative=qualitative,
            notes=notes,
            model=identity,
            radiograph=meas,
        )
