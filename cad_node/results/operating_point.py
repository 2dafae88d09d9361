"""Reporting at the operating point: which findings the result objects carry.

A pipeline returns ranked candidates with their detection certainty
(``Finding.probability``) and states its operating threshold in
``AnalysisResult.measurements["operating_threshold"]`` (the bundle's
threshold, as the pipeline applied it).  CAD systems report the findings at
the operating point and nothing else by default:

* **reported**: probability at or above the threshold, or no probability (a
  finding the pipeline did not score is never hidden);
* **below the operating point**: probability under the threshold.  They are
  counted (the summary page and the SR say how many) and, only when a
  destination's profile asks for them (``below_operating_point: true``), added
  to the SR, labelled, and listed apart on the summary page.  They never get a
  SEG segment, a key image, a GSPS outline or a KOS entry, so no viewer draws
  them like a finding.

Without a threshold every finding is reported, as before.
"""

from __future__ import annotations

import dataclasses

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from cad_node.results.findings import AnalysisResult, Finding

__all__ = [
    "BELOW_OPERATING_POINT",
    "CAD_OPERATING_POINT",
    "OPERATING_THRESHOLD_KEY",
    "PRESENTATION_OPTIONAL",
    "RENDERING_INTENT",
    "OperatingPoint",
    "split_at_operating_point",
]

#: ``AnalysisResult.measurements`` key of the pipeline's operating threshold.
OPERATING_THRESHOLD_KEY = "operating_threshold"
#: DCM 111056 "Rendering Intent" = 111151 "Presentation Optional: Rendering
#: device may present" (CID 6034, as Mammography/Chest CAD SR mark findings
#: below the operating point).
RENDERING_INTENT = codes.DCM.RenderingIntent
PRESENTATION_OPTIONAL = codes.DCM.PresentationOptionalRenderingDeviceMayPresent
#: DCM 111071 "CAD Operating Point", with a private value that says it in words.
CAD_OPERATING_POINT = codes.DCM.CADOperatingPoint
BELOW_OPERATING_POINT = Code("BELOW-OP", "99CADNODE", "Below operating point")


@dataclasses.dataclass(frozen=True)
class OperatingPoint:
    """The operating point a result was reported at.

    Attributes
    ----------
    threshold : float or None
        Detection-certainty threshold; None when the pipeline states none.
    below : tuple of Finding
        Every candidate below the threshold, in the pipeline's order.
    include_below : bool
        Whether the output profile adds them to the SR and summary page.
    """

    threshold: float | None = None
    below: tuple[Finding, ...] = ()
    include_below: bool = False

    @property
    def reported_below(self) -> tuple[Finding, ...]:
        """The sub-threshold candidates the objects carry (none unless included)."""
        return self.below if self.include_below else ()

    def describe(self) -> str:
        """E.g. ``"detection certainty >= 0.671"`` (empty without a threshold)."""
        return "" if self.threshold is None else f"detection certainty >= {self.threshold:.5g}"


def split_at_operating_point(
    result: AnalysisResult, include_below: bool = False
) -> tuple[AnalysisResult, OperatingPoint]:
    """The result with only its reported findings, and the operating point.

    Parameters
    ----------
    result : AnalysisResult
    include_below : bool
        The destination profile's ``below_operating_point`` option.

    Raises
    ------
    ValueError
        A threshold outside [0, 1].
    """
    raw = result.measurements.get(OPERATING_THRESHOLD_KEY)
    if raw is None:
        return result, OperatingPoint(include_below=include_below)
    threshold = float(raw)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(
            f"measurements[{OPERATING_THRESHOLD_KEY!r}] = {threshold} is not a probability"
        )
    below = tuple(
        f for f in result.findings if f.probability is not None and f.probability < threshold
    )
    if not below:
        return result, OperatingPoint(threshold, (), include_below)
    dropped = {f.tracking_id for f in below}
    kept = [f for f in result.findings if f.tracking_id not in dropped]
    return result.model_copy(update={"findings": kept}), OperatingPoint(
        threshold, below, include_below
    )
