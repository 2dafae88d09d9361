"""Projection radiographs (CR, DX) in: pixels for display, 2-D geometry, view and side.

This module is the single place where the node reads a radiograph's
geometry and orientation (the 3-D series geometry is
:mod:`cad_node.imaging.geometry`).

Pixels (:func:`display_pixels`), in this order:

1. decoded by pydicom (every transfer syntax the SCP accepts:
   :data:`cad_node.scp.contexts.TRANSFER_SYNTAXES`; JPEG / JPEG-LS /
   JPEG 2000 / RLE through pylibjpeg or python-gdcm), 8 to 16 bits stored,
   signed or unsigned;
2. the Modality LUT (Rescale Slope/Intercept or a Modality LUT Sequence,
   PS3.3 C.11.1);
3. the VOI transform (PS3.3 C.11.2): the first VOI LUT Sequence item when
   present, else the first Window Center/Width with VOI LUT Function
   ``LINEAR`` / ``LINEAR_EXACT`` / ``SIGMOID``; with neither (or a window
   narrower than one stored value) a robust window between the 0.5th and
   99.5th percentiles;
4. MONOCHROME1 (minimum = white) is inverted, so the result always has
   MONOCHROME2 semantics: ``float32`` in ``[0, 1]``, bright = attenuating.

Geometry (:func:`radiograph_geometry`, PS3.3 C.8.11.7, 10.7.1.3):
Pixel Spacing (0028,0030) is preferred: it is calibrated to the patient
plane.  Otherwise Imager Pixel Spacing (0018,1164) divided by the Estimated
Radiographic Magnification Factor (0018,1114); without the factor, Imager
Pixel Spacing at the detector (about 10% too large on a chest film; the note
says so).  With neither there is no millimetre scale: callers report pixel
quantities only and say so.

View and orientation (:func:`radiograph_view`):
View Position (0018,5101) ``PA`` or ``AP`` is frontal; lateral and oblique
views are refused.  Patient Orientation (0020,0020) gives the patient
direction of the rows and columns: a standard frontal film has the rows
running to the patient's left (``L``) and the columns to the feet (``F``).
A mirrored (``R``) or upside-down (``H``) image is detected and the analysis
image is flipped back (``Radiograph.flip_columns`` / ``flip_rows``), so
results are mapped to the stored pixels exactly; a transposed image (rows
running head/feet) is refused.

Refusals raise :class:`RadiographRefusedError`, whose message is the reason the
failure SR and summary page state.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

__all__ = [
    "CHEST_BODY_PARTS",
    "DX_FOR_PROCESSING_SOP_CLASS",
    "FRONTAL_VIEWS",
    "MIN_RADIOGRAPH_SIZE",
    "RADIOGRAPH_MODALITIES",
    "Radiograph",
    "RadiographGeometry",
    "RadiographRefusedError",
    "RadiographView",
    "display_pixels",
    "load_radiograph",
    "radiograph_geometry",
    "radiograph_view",
]

#: Modalities analysed as projection radiographs (PS3.3 C.7.3.1.1.1).
RADIOGRAPH_MODALITIES: frozenset[str] = frozenset({"CR", "DX"})
#: Digital X-Ray Image Storage - For Processing (PS3.4 B.5): raw detector data.
DX_FOR_PROCESSING_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1.1"
#: Presentation Intent Type (0008,0068) enumerated values (PS3.3 C.8.11.1.1.1).
FOR_PROCESSING = "FOR PROCESSING"
FOR_PRESENTATION = "FOR PRESENTATION"
#: View Position (0018,5101) defined terms that are frontal projections.
FRONTAL_VIEWS: frozenset[str] = frozenset({"PA", "AP"})
#: View Position defined terms of lateral/oblique/decubitus projections.
LATERAL_VIEWS: frozenset[str] = frozenset({"LL", "RL", "LLD", "RLD", "LATERAL", "LAT",
                                           "LPO", "RPO", "LAO", "RAO", "OBL"})
#: Body Part Examined (0018,0015) values read as a chest (PS3.16 Annex L:
#: CHEST is the defined term; THORAX and LUNG are sent by real devices).
CHEST_BODY_PARTS: frozenset[str] = frozenset({"CHEST", "THORAX", "LUNG", "CHEST_LUNG"})
#: Smallest row/column count analysed: a chest film at < 256 pixels cannot
#: show the lung borders the masks and the CTR are measured on.
MIN_RADIOGRAPH_SIZE = 256
#: Photometric Interpretation (0028,0004) values accepted (PS3.3 C.7.6.3.1.2).
MONOCHROME1 = "MONOCHROME1"
MONOCHROME2 = "MONOCHROME2"
#: VOI LUT Function (0028,1056) enumerated values (PS3.3 C.11.2.1.3).
VOI_LINEAR = "LINEAR"
VOI_LINEAR_EXACT = "LINEAR_EXACT"
VOI_SIGMOID = "SIGMOID"
#: Percentiles of the robust window used without a VOI transform.
ROBUST_WINDOW_PERCENTILES = (0.5, 99.5)
#: Pixel Data (7FE0,0010): dropped from the header kept with the pixels.
_PIXEL_DATA_TAG = 0x7FE00010
_SOURCE_PRIORITY = Literal["PixelSpacing", "ImagerPixelSpacing/ERMF", "ImagerPixelSpacing"]


class RadiographRefusedError(ValueError):
    """The instance is not analysed; ``str(exc)`` is the reason reported to the user."""


@dataclass(frozen=True)
class RadiographGeometry:
    """The millimetre scale of one radiograph, or its absence.

    Attributes
    ----------
    spacing_mm : (float, float) or None
        ``(row spacing, column spacing)``: mm between the centres of adjacent
        rows and of adjacent columns, in the plane the source names.
    source : str or None
        ``"PixelSpacing"``, ``"ImagerPixelSpacing/ERMF"``,
        ``"ImagerPixelSpacing"`` or None.
    note : str
        One sentence for the report describing the scale.
    """

    spacing_mm: tuple[float, float] | None
    source: _SOURCE_PRIORITY | None
    note: str

    @property
    def has_mm(self) -> bool:
        """True when millimetre measurements can be made."""
        return self.spacing_mm is not None

    def area_cm2(self, pixels: int | float) -> float | None:
        """Area of ``pixels`` pixels in cm², or None without a scale."""
        if self.spacing_mm is None:
            return None
        return float(pixels) * self.spacing_mm[0] * self.spacing_mm[1] / 100.0

    def width_mm(self, columns: float) -> float | None:
        """Horizontal extent of ``columns`` pixels in mm, or None without a scale."""
        if self.spacing_mm is None:
            return None
        return float(columns) * self.spacing_mm[1]


@dataclass(frozen=True)
class RadiographView:
    """The projection and the patient's orientation on the stored image."""

    #: ``"PA"``, ``"AP"``, or None when View Position is absent (frontal assumed).
    view_position: Literal["PA", "AP"] | None
    #: The stored image is mirrored left-right (rows run to the patient's right).
    flip_columns: bool
    #: The stored image is upside down (columns run to the head).
    flip_rows: bool
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Radiograph:
    """One frontal radiograph ready for analysis.

    ``pixels`` is in *standard display orientation* (the patient's right on
    the image's left, head up): the stored pixels, flipped back as
    ``view`` says.  :meth:`to_stored` maps an analysis-image array back to
    the stored pixel grid, which every result object references.
    """

    pixels: npt.NDArray[np.float32]
    dataset: Dataset
    geometry: RadiographGeometry
    view: RadiographView
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def sop_instance_uid(self) -> str:
        """SOP Instance UID of the radiograph."""
        return str(self.dataset.SOPInstanceUID)

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        """One-element tuple, for the job runner's input fingerprint."""
        return (self.sop_instance_uid,)

    @property
    def study_instance_uid(self) -> str:
        """Study Instance UID."""
        return str(self.dataset.StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        """Series Instance UID."""
        return str(self.dataset.SeriesInstanceUID)

    @property
    def modality(self) -> str:
        """``CR`` or ``DX``."""
        return str(self.dataset.Modality)

    def to_stored(self, array: npt.NDArray[np.generic]) -> npt.NDArray[np.generic]:
        """Map an array on the analysis image (rows, cols, ...) to the stored pixel grid."""
        out = array
        if self.view.flip_rows:
            out = out[::-1]
        if self.view.flip_columns:
            out = out[:, ::-1]
        return np.ascontiguousarray(out)

    def column_to_stored(self, column: float) -> float:
        """Map an image-relative column (SCOORD, PS3.3 C.18.6.1.1) to the stored image."""
        return float(self.pixels.shape[1]) - column if self.view.flip_columns else column

    def row_to_stored(self, row: float) -> float:
        """Map an image-relative row coordinate to the stored image."""
        return float(self.pixels.shape[0]) - row if self.view.flip_rows else row


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        return "\\".join(str(v) for v in value).strip().upper()
    return str(value).strip().upper()


def _positive_pair(ds: Dataset, keyword: str) -> tuple[float, float] | None:
    value = ds.get(keyword)
    try:
        pair = (float(value[0]), float(value[1])) if value is not None and len(value) == 2 else None
    except (TypeError, ValueError):
        return None
    if pair is None or not all(np.isfinite(pair)) or min(pair) <= 0:
        return None
    return pair


def radiograph_geometry(ds: Dataset) -> RadiographGeometry:
    """The millimetre scale of a radiograph (module docstring: precedence)."""
    ps = _positive_pair(ds, "PixelSpacing")
    if ps is not None:
        return RadiographGeometry(ps, "PixelSpacing",
                                  f"scale from Pixel Spacing {ps[0]:g} x {ps[1]:g} mm")
    ips = _positive_pair(ds, "ImagerPixelSpacing")
    if ips is not None:
        try:
            ermf = float(ds.get("EstimatedRadiographicMagnificationFactor") or 0)
        except (TypeError, ValueError):
            ermf = 0.0
        if ermf >= 1.0 and np.isfinite(ermf):
            sp = (ips[0] / ermf, ips[1] / ermf)
            return RadiographGeometry(
                sp, "ImagerPixelSpacing/ERMF",
                f"scale from Imager Pixel Spacing {ips[0]:g} x {ips[1]:g} mm corrected by the "
                f"Estimated Radiographic Magnification Factor {ermf:g}")
        return RadiographGeometry(
            ips, "ImagerPixelSpacing",
            f"scale from Imager Pixel Spacing {ips[0]:g} x {ips[1]:g} mm at the detector: no "
            "magnification factor, so mm values are about 10% larger than in the patient")
    return RadiographGeometry(
        None, None, "no Pixel Spacing or Imager Pixel Spacing: no mm measurements are made "
        "(areas and widths are not reported in mm)")


def radiograph_view(ds: Dataset) -> RadiographView:
    """View Position and Patient Orientation of a radiograph.

    Raises
    ------
    RadiographRefusedError
        A lateral or oblique view, or an orientation the node cannot map to
        a standard frontal display.
    """
    view = _text(ds, "ViewPosition")
    notes: list[str] = []
    if view in LATERAL_VIEWS or (view and view not in FRONTAL_VIEWS):
        raise RadiographRefusedError(
            f"View Position {view} is not a frontal (PA or AP) chest radiograph; lateral and "
            "oblique views are not analysed")
    orientation = ds.get("PatientOrientation")
    values = [str(v).strip().upper() for v in orientation] if orientation else []
    flip_columns = flip_rows = False
    if len(values) == 2 and all(values):
        row_dir, col_dir = values
        # The first letter is the main direction (PS3.3 C.7.6.1.1.1).
        r, c = row_dir[0], col_dir[0]
        if r in "AP":
            raise RadiographRefusedError(
                f"Patient Orientation {row_dir}\\{col_dir}: the rows run anterior/posterior, "
                "so this is a lateral projection; it is not analysed")
        if r in "HF" or c in "LR":
            raise RadiographRefusedError(
                f"Patient Orientation {row_dir}\\{col_dir}: the image is rotated by 90 degrees; "
                "it is not analysed (send it in standard orientation)")
        if r == "R":
            flip_columns = True
            notes.append(f"Patient Orientation {row_dir}\\{col_dir}: the image is mirrored "
                         "(patient's left on the image's left); analysed flipped back")
        if c == "H":
            flip_rows = True
            notes.append(f"Patient Orientation {row_dir}\\{col_dir}: the image is upside "
                         "down; analysed flipped back")
    else:
        notes.append("Patient Orientation absent: standard display assumed (patient's right "
                     "on the image's left)")
    if not view:
        notes.append("View Position absent: frontal projection assumed; the cardiothoracic "
                     "ratio is not assessable without a stated PA view")
    vp: Literal["PA", "AP"] | None = "PA" if view == "PA" else "AP" if view == "AP" else None
    return RadiographView(vp, flip_columns, flip_rows, tuple(notes))


def _window(values: npt.NDArray[np.float64], center: float, width: float, function: str
            ) -> npt.NDArray[np.float64]:
    """PS3.3 C.11.2.1.2 / C.11.2.1.3.1 windowing to ``[0, 1]``."""
    if function == VOI_SIGMOID:
        out: npt.NDArray[np.float64] = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        return out
    if function == VOI_LINEAR_EXACT:
        exact: npt.NDArray[np.float64] = np.clip((values - center) / width + 0.5, 0.0, 1.0)
        return exact
    linear: npt.NDArray[np.float64] = np.clip(
        (values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
    return linear


def _robust(values: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    lo, hi = np.percentile(values, ROBUST_WINDOW_PERCENTILES)
    if hi <= lo:
        hi = lo + 1.0
    robust: npt.NDArray[np.float64] = np.clip((values - lo) / (hi - lo), 0.0, 1.0)
    return robust


def display_pixels(ds: Dataset) -> tuple[npt.NDArray[np.float32], str]:
    """Decoded, rescaled, VOI-transformed pixels in ``[0, 1]`` with MONOCHROME2 semantics.

    Returns
    -------
    (pixels, note)
        ``float32`` ``(rows, columns)`` and one sentence naming the VOI used.

    Raises
    ------
    RadiographRefusedError
        Not single-frame grey, or the pixel data cannot be decoded.
    """
    photometric = _text(ds, "PhotometricInterpretation")
    if photometric not in (MONOCHROME1, MONOCHROME2):
        raise RadiographRefusedError(
            f"Photometric Interpretation {photometric or '(missing)'} is not a grey radiograph "
            "(MONOCHROME1 or MONOCHROME2)")
    if int(ds.get("NumberOfFrames") or 1) != 1:
        raise RadiographRefusedError("multi-frame radiographs are not analysed")
    bits = int(ds.get("BitsStored") or 0)
    if not 1 <= bits <= 16:
        raise RadiographRefusedError(f"Bits Stored {bits} is outside 1-16")
    try:
        stored = ds.pixel_array
    except Exception as exc:  # pydicom raises several types for undecodable data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise RadiographRefusedError(f"the pixel data (transfer syntax {ts}) cannot be decoded: "
                                f"{exc}") from None
    if stored.ndim != 2:
        raise RadiographRefusedError(f"pixel data of shape {stored.shape} is not one grey frame")
    values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    note = ""
    voi_seq = ds.get("VOILUTSequence")
    out: npt.NDArray[np.float64] | None = None
    if voi_seq:
        item = voi_seq[0]
        lut_bits = int(item.LUTDescriptor[2])
        lut = np.asarray(apply_voi_lut(np.rint(values).astype(np.int64), ds, index=0),
                         np.float64)
        out = np.clip(lut / float((1 << lut_bits) - 1), 0.0, 1.0)
        note = "VOI LUT Sequence applied"
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        centers = ds.WindowCenter
        widths = ds.WindowWidth
        c = float(centers[0] if isinstance(centers, pydicom.multival.MultiValue) else centers)
        w = float(widths[0] if isinstance(widths, pydicom.multival.MultiValue) else widths)
        function = _text(ds, "VOILUTFunction") or VOI_LINEAR
        if w > 1.0 and function in (VOI_LINEAR, VOI_LINEAR_EXACT, VOI_SIGMOID):
            out = _window(values, c, w, function)
            note = f"window {c:g}/{w:g} ({function}) applied"
    if out is None:
        out = _robust(values)
        note = note or ("no VOI LUT or window: robust window "
                        f"{ROBUST_WINDOW_PERCENTILES[0]:g}-{ROBUST_WINDOW_PERCENTILES[1]:g} "
                        "percentile applied")
    if photometric == MONOCHROME1:
        out = 1.0 - out
        note += "; MONOCHROME1 inverted"
    return out.astype(np.float32), note


def _check_instance(ds: Dataset) -> None:
    modality = _text(ds, "Modality")
    if modality not in RADIOGRAPH_MODALITIES:
        raise RadiographRefusedError(f"Modality {modality or '(missing)'} is not a projection "
                                "radiograph (CR or DX)")
    intent = _text(ds, "PresentationIntentType")
    if str(ds.get("SOPClassUID", "")) == DX_FOR_PROCESSING_SOP_CLASS or intent == FOR_PROCESSING:
        raise RadiographRefusedError(
            "DX 'For Processing' image: raw detector data that needs the manufacturer's "
            "processing before display; send the 'For Presentation' image instead")
    body = _text(ds, "BodyPartExamined")
    if body and body not in CHEST_BODY_PARTS:
        raise RadiographRefusedError(f"Body Part Examined {body} is not a chest; only chest "
                                "radiographs are analysed")
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    if min(rows, cols) < MIN_RADIOGRAPH_SIZE:
        raise RadiographRefusedError(
            f"image of {cols}x{rows} pixels is too small: at least {MIN_RADIOGRAPH_SIZE} "
            "pixels per side are needed to outline the lungs")


def load_radiograph(sources: Sequence[str | os.PathLike[str] | Dataset]) -> Radiograph:
    """Read one frontal chest radiograph from a series' instances.

    Parameters
    ----------
    sources : sequence of path-like or Dataset
        The instances of one series.  Exactly one frontal image is analysed:
        the first (by Instance Number) that passes the checks.

    Raises
    ------
    RadiographRefusedError
        With the reason of the first instance when none can be analysed.
    """
    datasets = [s if isinstance(s, Dataset) else pydicom.dcmread(os.fspath(s)) for s in sources]
    if not datasets:
        raise RadiographRefusedError("the series has no instances")
    datasets.sort(key=lambda d: (int(d.get("InstanceNumber") or 0), str(d.SOPInstanceUID)))
    reasons: list[str] = []
    for ds in datasets:
        try:
            _check_instance(ds)
            view = radiograph_view(ds)
            pixels, voi_note = display_pixels(ds)
        except RadiographRefusedError as exc:
            reasons.append(str(exc))
            continue
        geometry = radiograph_geometry(ds)
        if view.flip_rows:
            pixels = pixels[::-1]
        if view.flip_columns:
            pixels = pixels[:, ::-1]
        notes = [voi_note, geometry.note, *view.notes]
        if len(datasets) > 1:
            notes.append(f"{len(datasets)} instances in the series; instance "
                         f"{ds.get('InstanceNumber', '?')} analysed")
        header = Dataset()
        for elem in ds:
            if elem.tag != _PIXEL_DATA_TAG:
                header.add(elem)
        if hasattr(ds, "file_meta"):
            header.file_meta = ds.file_meta
        return Radiograph(np.ascontiguousarray(pixels), header, geometry, view, tuple(notes))
    raise RadiographRefusedError(reasons[0])
