"""Result objects the node emits: one module per IOD, plus the conformance gate.

Public API
----------
:func:`build_results` turns one :class:`~cad_node.results.findings.AnalysisResult`
and the received source instances into the DICOM objects an output profile
asks for; :func:`~cad_node.results.validate.validate` is the conformance gate
every object passes before it may be sent.

Contract of :func:`build_results`
---------------------------------
* ``source`` are the received instances of the analysed series, in any order;
  they may include pixel data (the SC key images need it) and instances of
  other series (ignored).  Masks are mapped to them by SOP Instance UID.
* Every output UID is derived from the Study UID, the input fingerprint, the
  model identity and the object kind (:mod:`cad_node.results.uids`); Content,
  Series and Instance Creation Date/Time are the source study's date/time
  (:func:`cad_node.results._common.deterministic_datetime`), so the same input
  and model give byte-identical objects.
* All objects are in the source study, each kind in its own new series.
* A Parametric Map (``pm``) is built only for a completed result with an
  attribution heatmap (chest X-ray).
* ``AnalysisStatus.FAILED``: only the SR (stating the failure, no measurement
  groups) and the SC summary page (stating the failure) are built; SEG, key
  images, GSPS and KOS are skipped because there is nothing to show.
* Only findings at or above the pipeline's operating threshold are carried
  (:mod:`cad_node.results.operating_point`); the SR and the summary page say
  how many candidates were below it, and ``below_operating_point=True`` adds
  those to the SR (labelled) and the summary page, never to SEG/SC/GSPS/KOS.
* A completed analysis without findings gives an SR saying "no findings"
  (DCM 111241) and a summary page saying so; SEG only if organ masks exist.
* Builders raise :class:`ValueError` / :class:`TypeError` naming the problem
  (e.g. an ambiguous duplicated slice); nothing is half-built.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pydicom import Dataset

from cad_node.config import DEFAULT_OBJECT_KINDS, ObjectKind, ResultsConfig
from cad_node.results._common import BuildContext, SourceSeries
from cad_node.results.findings import AnalysisResult, AnalysisStatus
from cad_node.results.operating_point import split_at_operating_point
from cad_node.results.uids import input_fingerprint as compute_fingerprint
from cad_node.results.validate import ValidationReport, validate

__all__ = [
    "DEFAULT_OBJECTS",
    "OBJECT_KINDS",
    "ResultObject",
    "ValidationReport",
    "build_results",
    "validate",
]

#: Every object kind the node can emit: all of :class:`cad_node.config.ObjectKind`.
OBJECT_KINDS: tuple[ObjectKind, ...] = tuple(ObjectKind)
#: Default output profile (:data:`cad_node.config.DEFAULT_OBJECT_KINDS`).
DEFAULT_OBJECTS: tuple[ObjectKind, ...] = DEFAULT_OBJECT_KINDS


@dataclasses.dataclass(frozen=True)
class ResultObject:
    """One built DICOM object.

    Attributes
    ----------
    kind : ObjectKind
        The object's kind (``str(kind)`` is ``"sr"``, ``"seg"``, ...).
    dataset : pydicom.Dataset
        The object (a highdicom SOP instance), ready to write or send.
    index : int
        1-based number within its kind (SC: key images first, summary last).
    role : str
        Short description, e.g. ``"key image Nodule 1"``, ``"summary page"``.
    """

    kind: ObjectKind
    dataset: Dataset
    index: int = 1
    role: str = ""

    @property
    def filename(self) -> str:
        """A safe file name made only of kind and index (never of a UID)."""
        return f"{self.kind}_{self.index:03d}.dcm"


def build_results(
    result: AnalysisResult,
    source: Sequence[Dataset],
    *,
    settings: ResultsConfig,
    objects: Sequence[ObjectKind] = DEFAULT_OBJECT_KINDS,
    input_fingerprint: str | None = None,
    below_operating_point: bool = False,
) -> list[ResultObject]:
    """Build the DICOM objects an output profile asks for.

    Parameters
    ----------
    result : AnalysisResult
        The pipeline's result; ``result.model`` is required.
    source : sequence of pydicom.Dataset
        Received instances of the analysed series (any order).
    settings : ResultsConfig
        Manufacturer, institution, disclaimer.
    objects : sequence of ObjectKind
        Kinds to build (``DestinationConfig.objects``), default SR+SEG+SC.
        Strings are converted where they enter (configuration, CLI options).
    input_fingerprint : str, optional
        Fingerprint of the input set; default sha256 of the sorted SOP
        Instance UIDs of the analysed series.
    below_operating_point : bool
        Add the candidates below the pipeline's operating threshold to the SR
        (labelled "below operating point") and the summary page.  By default
        every object carries only the findings at the operating point
        (:mod:`cad_node.results.operating_point`).  The variant gets its own
        UIDs (its SR and summary page say something else).

    Returns
    -------
    list of ResultObject
        In the order SEG, SR, SC, GSPS, KOS, PM (SEG first: the SR references it).

    Raises
    ------
    ValueError
        Unknown object kind, missing model identity, inconsistent source.
    """
    # No conversion here (StrEnum members equal their spelling); only a check.
    unknown = [k for k in objects if k not in OBJECT_KINDS]
    if unknown:
        raise ValueError(
            f"unknown result object kind(s) {unknown}; known: {[str(k) for k in ObjectKind]}"
        )
    wanted = set(objects)
    result, operating_point = split_at_operating_point(result, below_operating_point)
    if below_operating_point:
        base = input_fingerprint or compute_fingerprint(
            SourceSeries.from_datasets(source, result.series_instance_uid).by_uid
        )
        input_fingerprint = f"{base}:below-operating-point"
    ctx = BuildContext.create(result, source, settings, input_fingerprint, operating_point)
    completed = result.status is AnalysisStatus.COMPLETED
    out: list[ResultObject] = []

    seg = None
    has_masks = bool(result.organ_masks) or any(f.mask is not None for f in result.findings)
    if ObjectKind.SEG in wanted and completed and has_masks:
        from cad_node.results.seg import build_seg

        seg = build_seg(ctx)
        out.append(ResultObject(ObjectKind.SEG, seg.dataset, 1, "segmentation"))
    if ObjectKind.SR in wanted:
        from cad_node.results.sr import build_sr

        sr = build_sr(ctx, seg)
        out.append(ResultObject(ObjectKind.SR, sr, 1, "TID 1500 measurement report"))
    key_images: list[ResultObject] = []
    if ObjectKind.SC in wanted:
        from cad_node.results.sc import build_key_images, build_summary_page

        if completed:
            for i, (tid, ds) in enumerate(build_key_images(ctx), start=1):
                key_images.append(ResultObject(ObjectKind.SC, ds, i, f"key image {tid}"))
        out.extend(key_images)
        out.append(
            ResultObject(
                ObjectKind.SC,
                build_summary_page(ctx, len(key_images) + 1),
                len(key_images) + 1,
                "summary page",
            )
        )
    drawable = bool(result.findings) or result.radiograph is not None
    if ObjectKind.GSPS in wanted and completed and drawable:
        from cad_node.results.gsps import build_gsps

        out.append(ResultObject(ObjectKind.GSPS, build_gsps(ctx), 1, "presentation state"))
    if ObjectKind.KOS in wanted and completed and result.findings:
        from cad_node.results.kos import build_kos

        out.append(ResultObject(ObjectKind.KOS, build_kos(ctx), 1, "key object selection"))
    if ObjectKind.PM in wanted and completed and result.attribution is not None:
        from cad_node.results.pm import build_pm

        out.append(ResultObject(ObjectKind.PM, build_pm(ctx), 1, "attribution heatmap"))
    return out
