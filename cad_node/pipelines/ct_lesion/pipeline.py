# mypy: disallow-untyped-calls=False
"""The ``ct-lesion`` pipeline: universal lesion detection on CT of any body part.

Stages (each reported through ``progress``):

1. input checks (CT, axial, at least :data:`MIN_SLICES` slices, slice
   interval at most :data:`MAX_SLICE_INTERVAL_MM`) -> FAILED with a reason;
2. 2-D detection on every slice from its 2.5-D input (:mod:`.slices`: the
   slice and its +-2 mm neighbours, or the 9 slices from -8 to +8 mm for a
   bundle built with ``in_channels: 9``, in the DeepLesion window) with the
   ``ct-lesion`` bundle (:mod:`.network`), NMS within each slice;
3. NMS across slices (:func:`.detect.group_across_slices`): one lesion, one
   3-D finding;
4. lesions at or above the bundle's operating threshold (at most
   :data:`MAX_FINDINGS`, most probable first): a 2-D mask on each member
   slice from its box (:func:`.recist.lesion_mask`), RECIST long and short
   axes (:func:`.recist.recist_axes`) on the key slice, i.e. the member slice
   with the longest long axis (DeepLesion's key slice is the slice of the
   largest diameter); the type (8 DeepLesion coarse types) as the finding
   site.

Beside ``ct-chest`` (:meth:`CtLesionPipeline.reconcile`): when ``ct-chest``
completed on the same series, ct-lesion drops its findings whose centre lies
inside ct-chest's lung masks or within the radius of a ct-chest finding.
The lung parenchyma is ct-chest's domain (nodule detector with Lung-RADS and
Brock); outside it (mediastinum, liver, abdomen, bone, soft tissue) ct-lesion
reports.  So no finding is reported twice, and a lung lesion is still found
by ct-lesion when ct-chest did not run (e.g. a CT of the abdomen).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk  # noqa: N813

from cad_node.imaging import LoadedSeries
from cad_node.imaging.volume import index_to_lps, lps_to_index
from cad_node.pipelines import ProgressCallback, register_pipeline
from cad_node.pipelines._ct_input import axial_problem, ct_problem, failed_result
from cad_node.pipelines._stages import StageClock
from cad_node.pipelines.ct_lesion.detect import (
    Detection2D,
    Lesion3D,
    decode,
    group_across_slices,
    nms,
)
from cad_node.pipelines.ct_lesion.network import LESION_TYPE_NAMES, OUTPUT_STRIDE
from cad_node.pipelines.ct_lesion.recist import RecistAxes, lesion_mask, recist_axes
from cad_node.pipelines.ct_lesion.slices import volume_inputs
from cad_node.results.findings import (
    AnalysisResult,
    AnalysisStatus,
    Finding,
    FindingSite,
    FindingType,
    ImageMask,
    ModelIdentity,
    Region2D,
)

__all__ = [
    "BUNDLE_NAME",
    "MAX_FINDINGS",
    "PIPELINE_NAME",
    "TYPE_SITES",
    "CtLesionPipeline",
    "CtLesionRun",
    "detect_inputs",
    "reconcile_with",
]

log = logging.getLogger(__name__)

PIPELINE_NAME = "ct-lesion"
#: The detector bundle (``models/ct-lesion/<version>``).
BUNDLE_NAME = "ct-lesion"
#: Pipeline whose findings ct-lesion defers to inside the lungs.
CHEST_PIPELINE = "ct-chest"
#: At most this many findings are reported.
MAX_FINDINGS = 10
#: Lesions measured beyond the reported ones, as a reserve for :meth:`CtLesionPipeline.reconcile`
#: (reported findings ct-chest covers are replaced by the next-ranked ones).
RESERVE_FACTOR = 3
#: Fewest slices of a usable series (the 2.5-D input needs neighbours).
MIN_SLICES = 3
#: Largest slice interval analysed (the routing rule asks thickness <= 5 mm).
MAX_SLICE_INTERVAL_MM = 5.5
#: Slices per forward pass.
BATCH = 8
#: Slices whose inputs are built at once (bounds memory on long series).
CHUNK = 64
#: DeepLesion coarse type (1-based) -> finding site.
TYPE_SITES: dict[int, FindingSite] = {
    1: FindingSite.BONE, 2: FindingSite.ABDOMEN, 3: FindingSite.MEDIASTINUM,
    4: FindingSite.LIVER, 5: FindingSite.LUNG, 6: FindingSite.KIDNEY,
    7: FindingSite.SOFT_TISSUE, 8: FindingSite.PELVIS,
}


def detect_inputs(net: Any, inputs: npt.NDArray[np.float32], slice_indices: Sequence[int],
                  min_score: float = 0.01) -> list[Detection2D]:
    """Run the detector on ``(n, slices, H, W)`` inputs; NMS within each slice; network pixels."""
    import torch

    out: list[Detection2D] = []
    with torch.no_grad():
        for i0 in range(0, len(inputs), BATCH):
            maps = net(torch.from_numpy(np.ascontiguousarray(inputs[i0:i0 + BATCH])))
            m = {k: v.numpy() for k, v in maps.items()}
            for j in range(m["heatmap"].shape[0]):
                z = int(slice_indices[i0 + j])
                dets = [Detection2D(z, box, score, types) for box, score, types in decode(
                    m["heatmap"][j], m["size"][j], m["offset"][j], m["type_logits"][j],
                    stride=OUTPUT_STRIDE, min_score=min_score)]
                out.extend(nms(dets))
    return out


def reconcile_with(result: AnalysisResult, chest: AnalysisResult,
                   image: sitk.Image | None = None) -> AnalysisResult:
    """Drop ct-lesion findings that ct-chest covers (module docstring).

    Parameters
    ----------
    result : AnalysisResult
        The ct-lesion result.
    chest : AnalysisResult
        A ct-chest result of the same series.
    image : SimpleITK.Image, optional
        The series volume (maps centres to mask voxels); without it only the
        distance rule applies.
    """
    if (chest.pipeline != CHEST_PIPELINE or chest.status is not AnalysisStatus.COMPLETED
            or chest.series_instance_uid != result.series_instance_uid
            or result.status is not AnalysisStatus.COMPLETED):
        return result
    lungs = [m for site, m in chest.organ_masks.items()
             if site in (FindingSite.LEFT_LUNG, FindingSite.RIGHT_LUNG, FindingSite.LUNG)]
    kept: list[Finding] = []
    dropped: list[str] = []
    for f in result.findings:
        c = np.asarray(f.center_mm, dtype=float) if f.center_mm is not None else None
        covered = False
        if c is not None:
            for cf in chest.findings:
                if cf.center_mm is None:
                    continue
                r = max(cf.long_axis_mm or 0.0, f.long_axis_mm or 0.0) / 2.0
                if np.linalg.norm(c - np.asarray(cf.center_mm)) <= max(r, 5.0):
                    covered = True
            if not covered and image is not None and lungs:
                idx = np.round(lps_to_index(image, c[None])[0]).astype(int)
                for m in lungs:
                    a = m.array
                    if all(0 <= idx[i] < a.shape[i] for i in range(3)) and bool(a[tuple(idx)]):
                        covered = True
        if covered:
            dropped.append(f.tracking_id)
        else:
            kept.append(f)
    if not dropped:
        return result
    notes = [*result.notes, f"{len(dropped)} finding(s) inside the lungs or at a ct-chest "
             f"finding left to ct-chest ({', '.join(dropped)})"]
    renamed = [f.model_copy(update={"tracking_id": f"Lesion {i}"})
               for i, f in enumerate(kept, start=1)]
    return result.model_copy(update={"findings": renamed, "notes": notes})


@dataclass
class CtLesionRun:
    """A run's result plus intermediate products (tests, benchmarks)."""

    result: AnalysisResult
    detections: list[Detection2D] = field(default_factory=list)
    lesions: list[Lesion3D] = field(default_factory=list)
    timings_s: dict[str, float] = field(default_factory=dict)


class _FailedError(Exception):
    pass


@register_pipeline(PIPELINE_NAME)
class CtLesionPipeline:
    """Universal lesion detection on CT (module docstring).

    Parameters
    ----------
    models_dir : Path, optional
        Where the ``ct-lesion`` bundle is (default: the repository's ``models/``).
    threads : int
        Torch intra-op threads on CPU.  One by default: on the shared 2-core
        host the 133-slice CT took 3.4 s on one thread and 22 s on two
        (threads competing with the other processes; bench/ct_lesion.py).
    """

    name = PIPELINE_NAME

    def __init__(self, models_dir: Path | None = None, threads: int = 1) -> None:
        self.models_dir = models_dir
        self.threads = threads
        #: Series UID -> (lesions ranked after the reported ones, threshold), measured
        #: only when :meth:`reconcile` needs them.
        self._reserve: dict[str, tuple[list[Lesion3D], float]] = {}

    def run(self, series: LoadedSeries, *, device: str = "cpu",
               progress: ProgressCallback | None = None) -> AnalysisResult:
        """Analyse one CT series.

        Returns
        -------
        AnalysisResult
            COMPLETED with the lesions at the operating threshold (possibly
            none), or FAILED with the reason for unusable input or a missing
            model bundle; never raises for bad input.
        """
        return self.run_detailed(series, device=device, progress=progress).result

    def reconcile(self, result: AnalysisResult, others: Sequence[AnalysisResult],
                  series: LoadedSeries | None = None) -> AnalysisResult:
        """Apply :func:`reconcile_with` against every ct-chest result in ``others``.

        The findings dropped are replaced by the next-ranked lesions of the
        same run (at or above the operating threshold, kept in reserve by
        :meth:`run_detailed`) that the rule keeps, up to :data:`MAX_FINDINGS`.
        """
        pending = self._reserve.pop(result.series_instance_uid, None)
        reserve: list[Finding] = []
        if pending is not None and series is not None and any(
                o.pipeline == CHEST_PIPELINE for o in others):
            rest, threshold = pending
            reserve = self._findings(series, rest, threshold,
                                     limit=RESERVE_FACTOR * MAX_FINDINGS)[0]
        if reserve and result.status is AnalysisStatus.COMPLETED:
            result = result.model_copy(update={"findings": [*result.findings, *reserve]})
        for other in others:
            result = reconcile_with(result, other, series.image if series is not None else None)
        if len(result.findings) > MAX_FINDINGS or reserve:
            kept = [f.model_copy(update={"tracking_id": f"Lesion {i}"})
                    for i, f in enumerate(result.findings[:MAX_FINDINGS], start=1)]
            result = result.model_copy(update={
                "findings": kept,
                "measurements": {**result.measurements, "lesion_count": float(len(kept))}})
        return result

    def _check(self, series: LoadedSeries) -> None:
        problem = ct_problem(series, self.name)
        if problem is not None:
            raise _FailedError(problem)
        if series.shape[0] < MIN_SLICES:
            raise _FailedError(f"{series.shape[0]} slice(s): ct-lesion needs at least "
                               f"{MIN_SLICES}")
        problem = axial_problem(series)
        if problem is not None:
            raise _FailedError(problem)
        dz = series.image.GetSpacing()[2]
        if dz > MAX_SLICE_INTERVAL_MM:
            raise _FailedError(f"slice interval {dz:.1f} mm exceeds {MAX_SLICE_INTERVAL_MM} mm")

    def _fail(self, series: LoadedSeries, reason: str,
              model: ModelIdentity | None) -> AnalysisResult:
        return failed_result(self.name, series, reason, model, log)

    def run_detailed(self, series: LoadedSeries, *, device: str = "cpu",
                        progress: ProgressCallback | None = None) -> CtLesionRun:
        """Like :meth:`run`, also returning the detections, lesions and stage timings."""
        import torch

        from cad_node.models import load_bundle

        clock = StageClock(progress)
        report, lap = clock.report, clock.lap
        report("checking input", 0.0)
        try:
            bundle = load_bundle(BUNDLE_NAME, self.models_dir)
        except (FileNotFoundError, ValueError) as exc:
            return CtLesionRun(self._fail(series, f"model bundle {BUNDLE_NAME!r}: {exc}", None))
        identity = bundle.identity
        try:
            self._check(series)
        except _FailedError as exc:
            return CtLesionRun(self._fail(series, str(exc), identity))
        previous = torch.get_num_threads()
        if device == "cpu":
            torch.set_num_threads(self.threads)
        try:
            net = bundle.build_network(device)
            # 3 or 9 neighbouring slices, as the bundle was trained (slices.slice_offsets_mm)
            n_slices = int(bundle.manifest.architecture.get("in_channels", 3))
            hu = sitk.GetArrayViewFromImage(series.image)
            sx, sy, sz = series.image.GetSpacing()
            lap("load model")
            report("detecting", 0.1)
            out_spec = bundle.manifest.output
            threshold = float(out_spec.operating_threshold
                              if out_spec.operating_threshold is not None else out_spec.threshold)
            # boxes below half the operating threshold only ever extend a lesion's span
            min_score = max(0.01, 0.5 * threshold)
            dets: list[Detection2D] = []
            grid = None
            nz = hu.shape[0]
            for z0 in range(0, nz, CHUNK):
                idx = list(range(z0, min(nz, z0 + CHUNK)))
                x, grid = volume_inputs(hu, (sz, sy, sx), idx, grid, n_slices)
                rows, cols = hu.shape[1:]
                for d in detect_inputs(net, x, idx, min_score):
                    b = grid.to_source([d.box])[0]
                    # clipped to the image; a box left with less than a pixel is dropped
                    x1, x2 = float(np.clip(b[0], 0, cols - 1)), float(np.clip(b[2], 0, cols - 1))
                    y1, y2 = float(np.clip(b[1], 0, rows - 1)), float(np.clip(b[3], 0, rows - 1))
                    if x2 - x1 >= 1.0 and y2 - y1 >= 1.0:
                        dets.append(Detection2D(d.slice_index, (x1, y1, x2, y2), d.score,
                                                d.type_probabilities))
                report("detecting", 0.1 + 0.7 * min(1.0, (z0 + CHUNK) / nz))
            lap("detection")
        finally:
            if device == "cpu":
                torch.set_num_threads(previous)
        lesions = group_across_slices(dets)
        report("measuring", 0.85)
        findings, used = self._findings(series, lesions, threshold)
        self._reserve[series.series_instance_uid] = (list(lesions[used:]), threshold)
        lap("measurement")
        notes = [f"operating threshold {threshold:g} (ct-lesion bundle)",
                 f"{len(dets)} slice detections grouped into {len(lesions)} 3-D candidates; "
                 f"{len(findings)} at or above the operating threshold"]
        result = AnalysisResult(
            pipeline=self.name, status=AnalysisStatus.COMPLETED,
            series_instance_uid=series.series_instance_uid, findings=findings,
            measurements={"lesion_count": float(len(findings)),
                          "operating_threshold": threshold},
            notes=notes, model=identity)
        report("done", 1.0)
        return CtLesionRun(result, dets, lesions, clock.timings_s)

    def _findings(self, series: LoadedSeries, lesions: Sequence[Lesion3D],
                  threshold: float, limit: int = MAX_FINDINGS) -> tuple[list[Finding], int]:
        """Measured findings of the best lesions at or above ``threshold`` (at most
        ``limit``) and the number of lesions consumed."""
        hu = sitk.GetArrayViewFromImage(series.image)
        sx, sy, _ = series.image.GetSpacing()
        uids = series.sop_instance_uids
        rows, cols = hu.shape[1:]
        out: list[Finding] = []
        used = 0
        for les in lesions:
            if les.score < threshold or len(out) >= limit:
                break
            used += 1
            members = sorted(les.members, key=lambda d: d.slice_index)
            masks = [lesion_mask(hu[d.slice_index], d.box, (sx, sy)).mask for d in members]
            axes: list[RecistAxes | None] = []
            for m in masks:
                try:
                    axes.append(recist_axes(m, (sx, sy)))
                except ValueError:
                    axes.append(None)
            valid = [i for i, a in enumerate(axes) if a is not None]
            if not valid:
                continue
            measured = {i: a for i, a in enumerate(axes) if a is not None}
            k = max(measured, key=lambda i: measured[i].long_mm)
            ax = measured[k]
            key = members[k]
            ys, xs = np.nonzero(masks[k])
            centre = index_to_lps(series.image, (key.slice_index, ys.mean(), xs.mean()))
            tp = les.type_probabilities
            type_code = int(np.argmax(tp)) + 1
            mask3 = np.zeros((len(members), rows, cols), dtype=bool)
            for i, m in enumerate(masks):
                mask3[i] = m
            x1, y1, x2, y2 = key.box
            rank = len(out) + 1
            out.append(Finding(
                tracking_id=f"Lesion {rank}",
                finding_type=FindingType.LESION,
                site=TYPE_SITES[type_code],
                center_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
                region=Region2D(
                    sop_instance_uid=uids[key.slice_index], kind="box",
                    # SCOORD convention: pixel (0, 0) spans [0, 1) x [0, 1)
                    points=[(max(float(x1) + 0.5, 0.0), max(float(y1) + 0.5, 0.0)),
                            (min(float(x2) + 0.5, float(cols)),
                             min(float(y2) + 0.5, float(rows)))]),
                recist_axes_px=[(p[0] + 0.5, p[1] + 0.5)
                                for p in (*ax.long_points, *ax.short_points)],
                long_axis_mm=round(ax.long_mm, 1),
                short_axis_mm=round(max(min(ax.short_mm, ax.long_mm), 0.1), 1),
                mean_hu=round(float(np.asarray(hu[key.slice_index])[masks[k]].mean()), 1),
                probability=round(min(max(les.score, 0.0), 1.0), 4),
                mask=ImageMask(mask3, tuple(uids[d.slice_index] for d in members)),
            ))
            log.debug("lesion %d: type %s p %.3f", rank, LESION_TYPE_NAMES[type_code - 1],
                      les.score)
        return out, used
