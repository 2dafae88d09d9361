"""One display colour per finding, shared by every object that draws it.

The SEG segment's Recommended Display CIELab Value, the SC key image's
burned-in outline and the GSPS outline of finding ``k`` are all
:func:`finding_rgb` ``(k)`` (CIELab from sRGB via highdicom), so a radiologist
sees the same colour for the same finding in every viewer.  No colour is grey
(R = G = B), so an outline never blends into the image, and none is an organ
segment's colour.
"""

from __future__ import annotations

__all__ = ["FINDING_PALETTE", "finding_rgb"]

#: sRGB colours of findings 1, 2, ... (then repeated): saturated and distinct.
FINDING_PALETTE: tuple[tuple[int, int, int], ...] = (
    (255, 255, 0),  # yellow
    (255, 128, 0),  # orange
    (255, 0, 255),  # magenta
    (0, 255, 0),  # green
    (255, 64, 64),  # red
    (64, 160, 255),  # blue
    (160, 96, 255),  # violet
    (0, 255, 200),  # aqua green
    (255, 160, 200),  # pink
    (200, 255, 100),  # lime
)


def finding_rgb(index: int) -> tuple[int, int, int]:
    """sRGB colour of the finding at 0-based ``index`` in the reported findings."""
    if index < 0:
        raise ValueError(f"finding index must be >= 0, got {index}")
    return FINDING_PALETTE[index % len(FINDING_PALETTE)]
