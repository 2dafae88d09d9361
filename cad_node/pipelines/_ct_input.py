# mypy: disallow-untyped-calls=False
"""Input checks and the FAILED result shared by the CT pipelines (``ct-chest``, ``ct-lesion``).

Each check returns the reason a series cannot be analysed, or ``None``; the
pipeline turns a reason into :func:`failed_result` (the pipeline contract:
bad input is a FAILED result, never an exception).
"""

from __future__ import annotations

import logging

import numpy as np

from cad_node.imaging import LoadedSeries
from cad_node.results.findings import AnalysisResult, AnalysisStatus, ModelIdentity

__all__ = ["CT_SOP_CLASSES", "axial_problem", "ct_problem", "failed_result"]

#: CT Image Storage and Enhanced CT Image Storage SOP classes (PS3.4 B.5).
CT_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"})
#: Smallest |cosine| between the slice normal and the head-foot axis of an axial series.
AXIAL_MIN_COSINE = 0.9


def ct_problem(series: LoadedSeries, pipeline: str) -> str | None:
    """Why ``series`` is not a CT image series (Modality, SOP Class UID), or ``None``.

    Parameters
    ----------
    series : LoadedSeries
        The loaded series; only its modality and first header are read.
    pipeline : str
        The pipeline's name, for the message.
    """
    if series.modality.upper() != "CT":
        return f"modality {series.modality or '(missing)'}: {pipeline} needs CT"
    sop = str(series.datasets[0].get("SOPClassUID", ""))
    if sop and sop not in CT_SOP_CLASSES:
        return f"SOP Class {sop} is not a CT image"
    return None


def axial_problem(series: LoadedSeries) -> str | None:
    """Why ``series`` is not axial (its slice normal is not head-foot), or ``None``."""
    d = np.asarray(series.image.GetDirection()).reshape(3, 3)
    if abs(d[2, 2]) < AXIAL_MIN_COSINE:
        return "not an axial series (slice normal is not head-foot)"
    return None


def failed_result(pipeline: str, series: LoadedSeries, reason: str,
                  model: ModelIdentity | None, logger: logging.Logger) -> AnalysisResult:
    """A FAILED result for ``series`` with ``reason``, logged with the study and series UIDs.

    The model identity is kept on a failure so that the failure itself can be
    reported to the PACS (an SR stating it, IHE AIR), never as "no findings".
    """
    logger.warning("%s failed for study %s series %s: %s", pipeline,
                   series.study_instance_uid, series.series_instance_uid, reason)
    return AnalysisResult(pipeline=pipeline, status=AnalysisStatus.FAILED,
                          failure_reason=reason,
                          series_instance_uid=series.series_instance_uid or "unknown",
                          model=model)
