"""NIH DeepLesion: ``DL_info.csv`` rows and 16-bit PNG slices.

Layout (as downloaded from the NIH box):

* ``Images_png/<patient>_<study>_<series>/<slice>.png``: every slice of each
  series, 16-bit grayscale, ``HU = value - 32768`` (:data:`HU_OFFSET`), slice
  numbers zero-padded to 3 digits;
* ``Key_slices_png/<patient>_<study>_<series>_<slice>.png`` (optional): the
  key slices only, flat (also accepted here when ``Images_png`` lacks a key
  slice);
* ``DL_info.csv``: one row per lesion (:data:`REQUIRED_COLUMNS`).

Coordinates in ``DL_info.csv`` are 0-based pixel coordinates ``(x=column,
y=row)`` of the key slice: ``Measurement_coordinates`` holds the RECIST long
axis end points then the short axis end points (8 numbers),
``Bounding_boxes`` ``x1, y1, x2, y2`` (the RECIST extent padded by 5 pixels),
``Lesion_diameters_Pixel_`` the long and short diameters in pixels,
``Spacing_mm_px_`` the pixel spacing (x, y) and the slice interval (z) in mm.
``Train_Val_Test`` is 1/2/3 for train/validation/test; ``Coarse_lesion_type``
1-8 (bone, abdomen, mediastinum, liver, lung, kidney, soft tissue, pelvis) on
the validation and test sets, -1 where unlabelled.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = [
    "HU_OFFSET",
    "LESION_TYPES",
    "REQUIRED_COLUMNS",
    "SPLITS",
    "DeepLesionError",
    "DeepLesionRecord",
    "DeepLesionSample",
    "find_slice",
    "load_sample",
    "read_dl_info",
    "read_png_hu",
    "records_by_image",
]

#: DeepLesion PNGs store HU + 32768 as uint16.
HU_OFFSET = 32768
#: ``Coarse_lesion_type`` codes.
LESION_TYPES = {
    -1: "unlabelled", 1: "bone", 2: "abdomen", 3: "mediastinum", 4: "liver", 5: "lung",
    6: "kidney", 7: "soft tissue", 8: "pelvis",
}
#: ``Train_Val_Test`` codes.
SPLITS = {1: "train", 2: "val", 3: "test"}
#: Columns of the original ``DL_info.csv`` this reader needs.
REQUIRED_COLUMNS = (
    "File_name", "Patient_index", "Study_index", "Series_ID", "Key_slice_index",
    "Measurement_coordinates", "Bounding_boxes", "Lesion_diameters_Pixel_",
    "Normalized_lesion_location", "Coarse_lesion_type", "Possibly_noisy", "Slice_range",
    "Spacing_mm_px_", "Image_size", "DICOM_windows", "Patient_gender", "Patient_age",
    "Train_Val_Test",
)
_FILE_NAME = re.compile(r"^(\d{6})_(\d{2})_(\d{2})_(\d{3,4})\.png$")


class DeepLesionError(ValueError):
    """Unusable DeepLesion input; the message names the file and row."""


@dataclass(frozen=True)
class DeepLesionRecord:
    """One lesion (one ``DL_info.csv`` row).

    Attributes
    ----------
    csv_path : Path
    row_number : int
        1-based line number in the CSV (the header is line 1).
    file_name : str
        ``<patient>_<study>_<series>_<slice>.png``.
    patient_index, study_index, series_id, key_slice_index : int
    recist : ndarray, shape (4, 2)
        Long-axis end points then short-axis end points, ``(x, y)`` pixels.
    bbox : (float, float, float, float)
        ``x1, y1, x2, y2`` pixels.
    diameters_px : (float, float)
        Long and short RECIST diameters, pixels.
    normalized_location : (float, float, float)
    lesion_type : int
        ``Coarse_lesion_type`` (see :data:`LESION_TYPES`).
    possibly_noisy : bool
    slice_range : (int, int)
        First and last slice of the series available in ``Images_png``.
    spacing_mm : (float, float, float)
        Pixel spacing x, y and slice interval z, mm.
    image_size : (int, int)
        As in the CSV (rows, columns; 512 x 512 for all known images).
    window : (float, float)
        DICOM window lower and upper HU bounds.
    gender : str
    age : float or None
    split : str
        ``train``, ``val`` or ``test``.
    """

    csv_path: Path
    row_number: int
    file_name: str
    patient_index: int
    study_index: int
    series_id: int
    key_slice_index: int
    recist: npt.NDArray[np.float64]
    bbox: tuple[float, float, float, float]
    diameters_px: tuple[float, float]
    normalized_location: tuple[float, float, float]
    lesion_type: int
    possibly_noisy: bool
    slice_range: tuple[int, int]
    spacing_mm: tuple[float, float, float]
    image_size: tuple[int, int]
    window: tuple[float, float]
    gender: str
    age: float | None
    split: str

    @property
    def series_dir_name(self) -> str:
        """``<patient:06d>_<study:02d>_<series:02d>`` (the ``Images_png`` folder)."""
        return f"{self.patient_index:06d}_{self.study_index:02d}_{self.series_id:02d}"

    @property
    def diameters_mm(self) -> tuple[float, float]:
        """RECIST diameters in mm (isotropic in-plane pixels)."""
        sx = self.spacing_mm[0]
        return (self.diameters_px[0] * sx, self.diameters_px[1] * sx)

    @property
    def lesion_type_name(self) -> str:
        """Name of :attr:`lesion_type`."""
        return LESION_TYPES.get(self.lesion_type, "unknown")

    def where(self) -> str:
        """``file, row N (File_name)`` for messages."""
        return f"{self.csv_path}, row {self.row_number} ({self.file_name})"


def _floats(text: str, n: int, where: str, column: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise DeepLesionError(f"{where}: {column} {text!r} is not a list of numbers") from None
    if len(values) != n:
        raise DeepLesionError(f"{where}: {column} has {len(values)} values, expected {n}")
    return values


def _int(text: str, where: str, column: str) -> int:
    try:
        f = float(text)
    except ValueError:
        raise DeepLesionError(f"{where}: {column} {text!r} is not an integer") from None
    if not f.is_integer():
        raise DeepLesionError(f"{where}: {column} {text!r} is not an integer")
    return int(f)


def _record(row: dict[str, str], csv_path: Path, line: int) -> DeepLesionRecord:
    name = (row.get("File_name") or "").strip()
    where = f"{csv_path}, row {line} ({name or 'no File_name'})"
    m = _FILE_NAME.match(name)
    if m is None:
        raise DeepLesionError(f"{where}: File_name is not <patient>_<study>_<series>_<slice>.png")
    patient = _int(row["Patient_index"], where, "Patient_index")
    study = _int(row["Study_index"], where, "Study_index")
    series = _int(row["Series_ID"], where, "Series_ID")
    key = _int(row["Key_slice_index"], where, "Key_slice_index")
    if (patient, study, series, key) != tuple(int(g) for g in m.groups()):
        raise DeepLesionError(f"{where}: File_name disagrees with the index columns")
    recist = np.asarray(_floats(row["Measurement_coordinates"], 8, where,
                                "Measurement_coordinates"), dtype=float).reshape(4, 2)
    bbox = _floats(row["Bounding_boxes"], 4, where, "Bounding_boxes")
    if bbox[2] < bbox[0] or bbox[3] < bbox[1]:
        raise DeepLesionError(f"{where}: Bounding_boxes {bbox} has x2 < x1 or y2 < y1")
    diam = _floats(row["Lesion_diameters_Pixel_"], 2, where, "Lesion_diameters_Pixel_")
    loc = _floats(row["Normalized_lesion_location"], 3, where, "Normalized_lesion_location")
    sr = _floats(row["Slice_range"], 2, where, "Slice_range")
    sp = _floats(row["Spacing_mm_px_"], 3, where, "Spacing_mm_px_")
    size = _floats(row["Image_size"], 2, where, "Image_size")
    win = _floats(row["DICOM_windows"], 2, where, "DICOM_windows")
    split_code = _int(row["Train_Val_Test"], where, "Train_Val_Test")
    if split_code not in SPLITS:
        raise DeepLesionError(f"{where}: Train_Val_Test {split_code} is not 1, 2 or 3")
    age_text = (row.get("Patient_age") or "").strip()
    try:
        age = float(age_text) if age_text else None
    except ValueError:
        age = None
    if age is not None and math.isnan(age):
        age = None
    return DeepLesionRecord(
        csv_path=csv_path, row_number=line, file_name=name, patient_index=patient,
        study_index=study, series_id=series, key_slice_index=key, recist=recist,
        bbox=(bbox[0], bbox[1], bbox[2], bbox[3]), diameters_px=(diam[0], diam[1]),
        normalized_location=(loc[0], loc[1], loc[2]),
        lesion_type=_int(row["Coarse_lesion_type"], where, "Coarse_lesion_type"),
        possibly_noisy=bool(_int(row["Possibly_noisy"], where, "Possibly_noisy")),
        slice_range=(int(sr[0]), int(sr[1])), spacing_mm=(sp[0], sp[1], sp[2]),
        image_size=(int(size[0]), int(size[1])), window=(win[0], win[1]),
        gender=(row.get("Patient_gender") or "").strip(), age=age, split=SPLITS[split_code],
    )


def read_dl_info(csv_path: str | Path) -> tuple[list[DeepLesionRecord], list[str]]:
    """Read ``DL_info.csv``.

    Parameters
    ----------
    csv_path : str or Path

    Returns
    -------
    records : list of DeepLesionRecord
        The valid rows.
    problems : list of str
        One message per invalid row (naming the file and row); those rows are
        skipped, the others go on.

    Raises
    ------
    DeepLesionError
        The file cannot be read or lacks required columns (named).
    """
    csv_path = Path(csv_path)
    try:
        handle = csv_path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise DeepLesionError(f"{csv_path}: cannot read DL_info CSV ({exc})") from exc
    records: list[DeepLesionRecord] = []
    problems: list[str] = []
    try:
        with handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in REQUIRED_COLUMNS if c not in header]
            if missing:
                raise DeepLesionError(
                    f"{csv_path}: missing DL_info column(s): {', '.join(missing)}"
                )
            reader.fieldnames = header
            for i, row in enumerate(reader):
                line = i + 2
                try:
                    records.append(_record(row, csv_path, line))
                except DeepLesionError as exc:
                    problems.append(str(exc))
                except (KeyError, TypeError, AttributeError):
                    problems.append(f"{csv_path}, row {line}: incomplete row")
    except (UnicodeDecodeError, csv.Error) as exc:
        # A binary or non-UTF-8 file (decoding is buffered, so no row number).
        raise DeepLesionError(f"{csv_path}: not a UTF-8 CSV text file ({exc})") from None
    return records, problems


def read_png_hu(path: str | Path) -> npt.NDArray[np.int16]:
    """Read a DeepLesion 16-bit PNG as HU (``value - 32768``).

    Raises
    ------
    DeepLesionError
        Unreadable file, or not a 16-bit single-channel image (named).
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as im:
            mode = im.mode
            if mode not in {"I;16", "I;16B", "I;16L", "I"}:
                raise DeepLesionError(
                    f"{path}: PNG mode {mode!r} is not 16-bit grayscale (DeepLesion slices are "
                    "uint16, HU = value - 32768)"
                )
            arr = np.asarray(im)
    except (OSError, UnidentifiedImageError) as exc:
        raise DeepLesionError(f"{path}: unreadable PNG ({exc})") from exc
    if arr.ndim != 2:
        raise DeepLesionError(f"{path}: expected one channel, got shape {arr.shape}")
    if mode == "I" and (arr.min() < 0 or arr.max() > 65535):
        raise DeepLesionError(f"{path}: values outside the uint16 range")
    return (arr.astype(np.int32) - HU_OFFSET).astype(np.int16)


def find_slice(root: Path, record: DeepLesionRecord, slice_index: int) -> Path | None:
    """Path of slice ``slice_index`` of the record's series, or ``None``.

    Looks in ``Images_png/<series>/<slice:03d>.png``, then for key slices in
    ``Key_slices_png`` (flat names).  Paths are built from the integer indices,
    never from the CSV text.
    """
    series = record.series_dir_name
    for name in (f"{slice_index:03d}.png", f"{slice_index}.png"):
        p = root / "Images_png" / series / name
        if p.is_file():
            return p
    for folder in ("Key_slices_png", "key_slices_flat"):
        p = root / folder / f"{series}_{slice_index:03d}.png"
        if p.is_file():
            return p
    return None


@dataclass
class DeepLesionSample:
    """A key slice with its neighbours, in HU.

    Attributes
    ----------
    record : DeepLesionRecord
    image_hu : ndarray of int16, shape (2 * context + 1, rows, cols)
        Slices ``key - context .. key + context``; a missing neighbour is
        replaced by the nearest present slice towards the key slice.
    present : tuple of bool
        Which of those slices were on disk.
    """

    record: DeepLesionRecord
    image_hu: npt.NDArray[np.int16]
    present: tuple[bool, ...]

    @property
    def key_hu(self) -> npt.NDArray[np.int16]:
        """The key slice."""
        return np.asarray(self.image_hu[len(self.present) // 2], dtype=np.int16)


def load_sample(
    root: str | Path, record: DeepLesionRecord, *, context: int = 1
) -> DeepLesionSample:
    """Load a lesion's key slice and ``context`` neighbours on each side (2.5D input).

    Raises
    ------
    DeepLesionError
        The key slice is missing (the message names the CSV row), a PNG has
        the wrong bit depth, or slice sizes differ.
    """
    root = Path(root)
    key_path = find_slice(root, record, record.key_slice_index)
    if key_path is None:
        raise DeepLesionError(
            f"{record.where()}: key slice {record.key_slice_index:03d} of series "
            f"{record.series_dir_name} not found under {root / 'Images_png'}"
        )
    try:
        key = read_png_hu(key_path)
    except DeepLesionError as exc:
        raise DeepLesionError(f"{record.where()}: {exc}") from exc
    if sorted(key.shape) != sorted(record.image_size):
        raise DeepLesionError(
            f"{record.where()}: {key_path} is {key.shape[1]} x {key.shape[0]} pixels, the CSV "
            f"says Image_size {record.image_size[0]}, {record.image_size[1]}"
        )
    offsets = range(-context, context + 1)
    slices: dict[int, np.ndarray] = {0: key}
    for off in offsets:
        if off == 0:
            continue
        idx = record.key_slice_index + off
        if not record.slice_range[0] <= idx <= record.slice_range[1]:
            continue
        p = find_slice(root, record, idx)
        if p is None:
            continue
        try:
            img = read_png_hu(p)
        except DeepLesionError as exc:
            raise DeepLesionError(f"{record.where()}: neighbour slice: {exc}") from exc
        if img.shape != key.shape:
            raise DeepLesionError(f"{p}: shape {img.shape} differs from key slice {key.shape}")
        slices[off] = img
    stack: list[np.ndarray] = []
    present: list[bool] = []
    for off in offsets:
        present.append(off in slices)
        o = off
        while o not in slices:
            o += -1 if o > 0 else 1
        stack.append(slices[o])
    return DeepLesionSample(record, np.stack(stack), tuple(present))


def records_by_image(records: Sequence[DeepLesionRecord]) -> dict[str, list[DeepLesionRecord]]:
    """Group lesion rows by key slice file (several lesions may share a slice)."""
    out: dict[str, list[DeepLesionRecord]] = {}
    for r in records:
        out.setdefault(r.file_name, []).append(r)
    return out
