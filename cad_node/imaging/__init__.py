"""DICOM series handling: grouping, routing-rule selection and volume loading.

Contract
--------
* :func:`group_series` groups instances (paths or datasets) by Series Instance
  UID, reading headers only.
* :func:`select_series` applies a :class:`cad_node.config.RoutingRule` and
  returns the chosen series; the returned list's ``rejected`` attribute maps
  every other Series Instance UID to the reason it was not chosen.
* :func:`load_series` turns one series into a :class:`LoadedSeries` whose
  ``image`` is a SimpleITK image in patient LPS geometry (rescaled values,
  e.g. Hounsfield units for CT) and whose ``sop_instance_uids[k]`` is the
  source instance of volume slice ``k``.  Anything that would make that
  mapping or the geometry ambiguous (missing slice, duplicate position with
  different pixels, varying spacing, gantry tilt, mixed sizes, a single
  slice, a localizer) raises :class:`SeriesError` with a clear reason.
* :mod:`cad_node.imaging.geometry` is the one place that sorts slices, checks
  orientation and spacing and maps pixels to patient coordinates (3-D); the
  volume loader and every result builder use it.  2-D radiograph geometry is
  :mod:`cad_node.imaging.radiograph`'s.
"""

from cad_node.imaging.series import (
    SeriesInfo,
    SeriesSelection,
    group_series,
    select_series,
)
from cad_node.imaging.volume import (
    LoadedSeries,
    SeriesError,
    index_to_lps,
    load_series,
    lps_to_index,
)

__all__ = [
    "LoadedSeries",
    "SeriesError",
    "SeriesInfo",
    "SeriesSelection",
    "group_series",
    "index_to_lps",
    "load_series",
    "lps_to_index",
    "select_series",
]
