# mypy: disallow-untyped-calls=False
"""``cad-train prepare lidc|deeplesion ROOT OUT``: cache training data with its labels.

LIDC-IDRI (:func:`prepare_lidc`)
--------------------------------
``ROOT`` is the TCIA download (``LIDC-IDRI-XXXX/<study>/<series>/*.dcm`` with
the reader XML beside the DICOM files) or any folder below it.  For every CT
series that has an LIDC XML:

1. the XML is parsed (:mod:`trainer.lidc`) and checked against the series'
   SeriesInstanceUID; ROIs are mapped to slices by SOP Instance UID, or by z
   position when the UID is not in the series;
2. the volume is loaded in LPS geometry (:func:`cad_node.imaging.volume.load_series`);
3. every reader's >= 3 mm marks are rasterised (per-reader masks), clustered
   across readers and turned into LUNA16 consensus labels (>= 3 mm, >= 3 of 4
   readers; everything else is an irrelevant finding);
4. the volume (clamped to -1024..3071 HU) and a consensus label volume
   (voxels inside at least half of a reference nodule's reader masks carry
   the nodule's number) are resampled to
   ``spacing`` mm and written to ``cases/<case>.npz`` with the per-reader
   masks in the original grid (cropped, with their offsets);
5. ``cases/<case>.json`` (written last) records the labels.

``OUT/index.csv``, ``OUT/annotations.csv`` (LUNA16 format: seriesuid, coordX,
coordY, coordZ, diameter_mm) and ``OUT/annotations_excluded.csv`` are rebuilt
from all case JSON files at the end of every run.  A case whose JSON exists
is skipped, so an interrupted run resumes where it stopped; every file is
written to a temporary name and renamed (atomic).  A failing case (corrupt
XML, XML of another series, broken series) is reported with its path and the
other cases go on; the command then exits with status 1.

Case names come from the patient folder (``LIDC-IDRI-0001``; ``_2``, ``_3``
... for further CT series of a patient), never from UIDs.

DeepLesion (:func:`prepare_deeplesion`)
---------------------------------------
``ROOT`` holds ``Images_png/`` and ``DL_info.csv``.  For every key slice the
2.5D stack (key slice and ``context`` neighbours each side, HU int16) and the
boxes / RECIST points of all its lesions go to ``slices/<file>.npz``;
``OUT/index.csv`` lists them with spacing, window, lesion type, noisy flag and
split.  Missing slices and bad rows are reported by row; the others go on.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import numpy.typing as npt
import typer

from trainer import deeplesion as dl
from trainer import lidc

__all__ = [
    "CaseResult",
    "LidcSeries",
    "PreparedLidcCase",
    "discover_lidc",
    "load_lidc_case",
    "prepare_deeplesion",
    "prepare_lidc",
    "register",
]

#: Default isotropic output spacing of cached LIDC volumes (mm).
DEFAULT_SPACING_MM = 1.0
#: Fraction of a reference nodule's reader masks a voxel must be in to get its label.
CONSENSUS_AGREEMENT = 0.5
#: Cached volumes are clamped to the 12-bit CT range (air .. dense bone), HU.
HU_AIR, HU_MAX = -1024, 3071
#: Folder names usable as case names.
_SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


# --------------------------------------------------------------------------- atomic files


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _atomic_write_text(path: Path, text: str) -> None:
    _atomic_write_bytes(path, text.encode("utf-8"))


def _atomic_savez(path: Path, compress: bool, **arrays: Any) -> None:
    """Write an ``.npz`` (readable by :func:`numpy.load`) atomically.

    Compression uses deflate level 1: on a 133-slice LIDC case it is ~6x faster
    than ``np.savez_compressed``'s default level for a 2 % larger file.
    """
    import zipfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
        with zipfile.ZipFile(tmp, "w", method, compresslevel=1 if compress else None) as z:
            for name, arr in arrays.items():
                with z.open(f"{name}.npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asanyarray(arr), allow_pickle=False)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return out.getvalue()


def _progress() -> Any:
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=False)


# --------------------------------------------------------------------------- LIDC


@dataclass(frozen=True)
class LidcSeries:
    """A series folder to prepare."""

    case_id: str
    patient: str
    series_dir: Path


@dataclass
class CaseResult:
    """Outcome of one case."""

    case_id: str
    status: str  # "done" | "skipped" | "failed"
    message: str = ""
    seconds: float = 0.0


def _patient_of(series_dir: Path, root: Path) -> str:
    rel = series_dir.relative_to(root) if series_dir != root else Path()
    for part in (root.name, *rel.parts):
        if re.match(r"^LIDC-IDRI-\d{4}$", part):
            return part
    # TCIA layout: <patient>/<study>/<series>
    parts = rel.parts
    name = parts[0] if len(parts) >= 3 else (series_dir.parent.parent.name or series_dir.name)
    return name


def discover_lidc(root: Path) -> list[LidcSeries]:
    """Series folders under ``root`` holding DICOM files and at least one XML file.

    Sorted by path; case names are the patient folder names (see module doc).
    """
    root = root.resolve()
    found: list[Path] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:  # a symlink loop or a second link to the same folder
            dirnames.clear()
            continue
        visited.add(real)
        dirnames.sort()
        if any(f.lower().endswith(".dcm") for f in filenames) and any(
            f.lower().endswith(".xml") for f in filenames
        ):
            found.append(Path(dirpath))
    found.sort()
    per_patient: dict[str, int] = {}
    out: list[LidcSeries] = []
    for d in found:
        patient = _patient_of(d, root)
        if not _SAFE_NAME.match(patient):
            patient = f"case{len(out):05d}"
        k = per_patient.get(patient, 0) + 1
        per_patient[patient] = k
        out.append(LidcSeries(patient if k == 1 else f"{patient}_{k}", patient, d))
    return out


class _NotApplicableError(Exception):
    """A series that is not an annotated CT (skipped, not failed)."""


def _select_xml(series_dir: Path, series_uid: str) -> lidc.LidcAnnotation:
    xmls = sorted(series_dir.glob("*.xml"))
    mismatches: list[str] = []
    not_ct: list[str] = []
    for x in xmls:
        try:
            return lidc.parse_lidc_xml(x, series_instance_uid=series_uid)
        except lidc.LidcSeriesMismatchError as exc:
            mismatches.append(str(exc))
        except lidc.LidcNotCtReadingError as exc:
            not_ct.append(str(exc))
        # any other LidcParseError (corrupt XML) propagates: it names the file
    if not_ct and not mismatches:
        raise _NotApplicableError("; ".join(not_ct))
    raise lidc.LidcSeriesMismatchError(
        "; ".join(mismatches) or f"{series_dir}: no LIDC XML for series {series_uid}"
    )


def _resample(image: Any, spacing: tuple[float, float, float], *, labels: bool) -> Any:
    import SimpleITK as sitk  # noqa: N813

    in_spacing = np.asarray(image.GetSpacing(), dtype=float)
    in_size = np.asarray(image.GetSize(), dtype=float)
    out_spacing = np.asarray(spacing, dtype=float)
    out_size = [max(1, round(float(v))) for v in in_size * in_spacing / out_spacing]
    f = sitk.ResampleImageFilter()
    f.SetOutputSpacing([float(v) for v in out_spacing])
    f.SetSize(out_size)
    f.SetOutputOrigin(image.GetOrigin())
    f.SetOutputDirection(image.GetDirection())
    f.SetInterpolator(sitk.sitkNearestNeighbor if labels else sitk.sitkLinear)
    f.SetDefaultPixelValue(0 if labels else -1024)
    return f.Execute(image)


def _resample_labels(label: np.ndarray, image: Any, grid: Any) -> np.ndarray:
    """Nearest-neighbour resampling of a sparse label volume onto ``grid``.

    Only the labels' bounding box (plus a voxel) is resampled: the rest of the
    output is background, so the result equals resampling the whole volume.
    """
    import SimpleITK as sitk  # noqa: N813

    gx, gy, gz = grid.GetSize()
    out = np.zeros((gz, gy, gx), dtype=np.uint8)
    nz = np.argwhere(label)
    if len(nz) == 0:
        return out
    lo = np.maximum(nz.min(axis=0) - 1, 0)
    hi = np.minimum(nz.max(axis=0) + 2, label.shape)
    crop = sitk.GetImageFromArray(np.ascontiguousarray(label[lo[0]:hi[0], lo[1]:hi[1],
                                                             lo[2]:hi[2]]))
    crop.SetSpacing(image.GetSpacing())
    crop.SetDirection(image.GetDirection())
    crop.SetOrigin(image.TransformIndexToPhysicalPoint([int(lo[2]), int(lo[1]), int(lo[0])]))
    corners = [
        grid.TransformPhysicalPointToContinuousIndex(
            image.TransformContinuousIndexToPhysicalPoint([float(x), float(y), float(z)]))
        for z in (lo[0] - 0.5, hi[0] - 0.5) for y in (lo[1] - 0.5, hi[1] - 0.5)
        for x in (lo[2] - 0.5, hi[2] - 0.5)
    ]
    c = np.asarray(corners)
    size = np.asarray(grid.GetSize())
    glo = np.clip(np.floor(c.min(axis=0)).astype(int), 0, size)
    ghi = np.clip(np.ceil(c.max(axis=0)).astype(int) + 1, 0, size)
    if np.any(ghi <= glo):
        return out
    f = sitk.ResampleImageFilter()
    f.SetOutputSpacing(grid.GetSpacing())
    f.SetOutputDirection(grid.GetDirection())
    f.SetOutputOrigin(grid.TransformIndexToPhysicalPoint([int(v) for v in glo]))
    f.SetSize([int(v) for v in ghi - glo])
    f.SetInterpolator(sitk.sitkNearestNeighbor)
    f.SetDefaultPixelValue(0)
    part = sitk.GetArrayFromImage(f.Execute(crop))
    out[glo[2]:ghi[2], glo[1]:ghi[1], glo[0]:ghi[0]] = part
    return out


def _prepare_lidc_case(series: LidcSeries, out: Path, spacing: tuple[float, float, float],
                       compress: bool) -> dict[str, Any]:
    import pydicom
    import SimpleITK as sitk  # noqa: N813

    from cad_node.imaging.volume import load_series

    files = sorted(series.series_dir.glob("*.dcm"))
    try:
        first = pydicom.dcmread(files[0], stop_before_pixels=True)
        series_uid = str(first.SeriesInstanceUID)
    except Exception as exc:  # pydicom raises many types on bad files
        raise ValueError(f"{files[0]}: unreadable DICOM header ({exc})") from exc
    # check the XML before decoding any pixel data
    annotation = _select_xml(series.series_dir, series_uid)
    loaded = load_series(files)
    if loaded.modality != "CT":
        raise _NotApplicableError(f"{series.series_dir}: modality {loaded.modality}, not CT")
    if loaded.series_instance_uid != series_uid:
        raise ValueError(f"{series.series_dir}: more than one series in the folder")
    for ds in loaded.datasets:
        lidc.check_axial_orientation(ds.get("ImageOrientationPatient"),
                                     f"{series.series_dir} (SOP Instance {ds.SOPInstanceUID})")
    z_of_sop = {uid: k for k, uid in enumerate(loaded.sop_instance_uids)}
    positions = {
        uid: (float(ds.ImagePositionPatient[0]), float(ds.ImagePositionPatient[1]),
              float(ds.ImagePositionPatient[2]))
        for uid, ds in zip(loaded.sop_instance_uids, loaded.datasets, strict=True)
    }
    annotation, remapped = lidc.remap_rois_by_z(annotation, positions)
    ds0 = loaded.datasets[0]
    pixel_spacing = (float(ds0.PixelSpacing[0]), float(ds0.PixelSpacing[1]))
    rows, cols = int(ds0.Rows), int(ds0.Columns)
    nz = len(loaded.sop_instance_uids)

    clusters = lidc.cluster_nodules(annotation, positions, pixel_spacing, rows=rows, cols=cols)
    findings = lidc.luna16_consensus(annotation, clusters, positions, pixel_spacing)

    # per-reader masks in the original grid, cropped
    arrays: dict[str, npt.NDArray[Any]] = {}
    marks: list[dict[str, Any]] = []
    mark_of: dict[int, int] = {}
    skipped_rois = 0
    for nodule in annotation.nodules:
        planes: dict[int, np.ndarray] = {}
        for sop, m in lidc.rasterize_nodule(nodule, rows, cols).items():
            if sop not in z_of_sop:
                skipped_rois += 1
                continue
            k = z_of_sop[sop]
            planes[k] = planes[k] | m if k in planes else m
        planes = {k: m for k, m in planes.items() if m.any()}
        if not planes:
            continue
        ks = sorted(planes)
        union = np.logical_or.reduce([planes[k] for k in ks])
        ys, xs = np.nonzero(union)
        lo = np.array([ks[0], ys.min(), xs.min()], dtype=np.int32)
        hi = np.array([ks[-1] + 1, ys.max() + 1, xs.max() + 1], dtype=np.int32)
        crop = np.zeros(tuple(hi - lo), dtype=bool)
        for k in ks:
            crop[k - lo[0]] = planes[k][lo[1]:hi[1], lo[2]:hi[2]]
        i = len(marks)
        mark_of[id(nodule)] = i
        arrays[f"mark{i}_mask"] = crop
        arrays[f"mark{i}_offset"] = lo
        marks.append({"mark": i, "reader": nodule.reader_index, "nodule_id": nodule.nodule_id,
                      "characteristics": nodule.characteristics,
                      "n_voxels": int(crop.sum())})

    # consensus label volume (reference nodules only), original grid
    label = np.zeros((nz, rows, cols), dtype=np.uint8)
    cluster_rows: list[dict[str, Any]] = []
    ref_no = 0
    finding_of_cluster = [f for f in findings if f.source == "cluster"]
    for c, f in zip(clusters, finding_of_cluster, strict=True):
        member_marks = [mark_of[id(m)] for m in c.members if id(m) in mark_of]
        entry: dict[str, Any] = {
            "kind": f.kind, "center_mm": list(c.center_mm), "diameter_mm": c.diameter_mm,
            "n_readers": c.n_readers, "marks": member_marks,
            "readers": sorted({m.reader_index for m in c.members}),
            "nodule_ids": [m.nodule_id for m in c.members],
            "characteristics": [m.characteristics for m in c.members],
        }
        if f.kind == "nodule" and member_marks:
            ref_no += 1
            votes = np.zeros((nz, rows, cols), dtype=np.uint8)
            for i in member_marks:
                lo = arrays[f"mark{i}_offset"]
                m = arrays[f"mark{i}_mask"]
                votes[lo[0]:lo[0] + m.shape[0], lo[1]:lo[1] + m.shape[1],
                      lo[2]:lo[2] + m.shape[2]] += m
            label[(votes >= max(1, CONSENSUS_AGREEMENT * len(member_marks))) & (label == 0)] = (
                min(ref_no, 255))
            entry["label"] = ref_no
        cluster_rows.append(entry)

    # Outside-the-FOV padding (e.g. -2000) and anything below air become air.
    image = sitk.Clamp(loaded.image, lowerBound=HU_AIR, upperBound=HU_MAX)
    res_img = _resample(image, spacing, labels=False)
    lab_out = _resample_labels(label, image, res_img)
    vol_out = sitk.GetArrayFromImage(res_img)
    if vol_out.dtype != np.int16:
        vol_out = np.clip(np.rint(vol_out), -32768, 32767).astype(np.int16)
    arrays.update(
        volume_hu=vol_out,
        consensus_label=lab_out,
        spacing_zyx=np.asarray(spacing[::-1], dtype=float),
        origin_xyz=np.asarray(res_img.GetOrigin(), dtype=float),
        direction=np.asarray(res_img.GetDirection(), dtype=float),
        original_spacing_zyx=np.asarray(image.GetSpacing()[::-1], dtype=float),
        original_origin_xyz=np.asarray(image.GetOrigin(), dtype=float),
    )
    npz = out / "cases" / f"{series.case_id}.npz"
    _atomic_savez(npz, compress, **arrays)
    irrelevant = [
        {"center_mm": list(f.center_mm), "diameter_mm": f.diameter_mm, "source": f.source,
         "n_readers": f.n_readers}
        for f in findings if f.kind == "irrelevant"
    ]
    return {
        "case_id": series.case_id,
        "patient": series.patient,
        "series_dir": str(series.series_dir),
        "xml": annotation.path.name,
        "series_instance_uid": loaded.series_instance_uid,
        "study_instance_uid": loaded.study_instance_uid,
        "n_sessions": len(annotation.sessions),
        "n_slices": nz,
        "original_spacing_zyx": list(arrays["original_spacing_zyx"]),
        "spacing_zyx": list(arrays["spacing_zyx"]),
        "shape_zyx": list(vol_out.shape),
        "origin_xyz": list(arrays["origin_xyz"]),
        "clusters": cluster_rows,
        "irrelevant": irrelevant,
        "marks": marks,
        "rois_outside_series": skipped_rois,
        "rois_mapped_by_z": remapped,
        "npz": npz.name,
    }


def _write_lidc_tables(out: Path) -> tuple[int, int]:
    index_rows: list[list[object]] = []
    ann_rows: list[list[object]] = []
    excl_rows: list[list[object]] = []
    for j in sorted((out / "cases").glob("*.json")):
        case = json.loads(j.read_text())
        uid = case["series_instance_uid"]
        nod = [c for c in case["clusters"] if c["kind"] == "nodule"]
        index_rows.append([case["case_id"], case["patient"], uid, case["study_instance_uid"],
                           case["n_slices"], *case["shape_zyx"],
                           *(round(v, 6) for v in case["original_spacing_zyx"]),
                           *(round(v, 6) for v in case["spacing_zyx"]),
                           len(nod), len(case["clusters"]) - len(nod) + len(case["irrelevant"]),
                           f"cases/{case['npz']}"])
        for c in nod:
            ann_rows.append([uid, *(round(v, 4) for v in c["center_mm"]),
                             round(c["diameter_mm"], 4)])
        for c in case["clusters"]:
            if c["kind"] != "nodule":
                excl_rows.append([uid, *(round(v, 4) for v in c["center_mm"]),
                                  round(c["diameter_mm"], 4)])
        for f in case["irrelevant"]:
            excl_rows.append([uid, *(round(v, 4) for v in f["center_mm"]),
                              round(f["diameter_mm"], 4)])
    _atomic_write_text(out / "index.csv", _csv_text(
        ["case_id", "patient", "series_instance_uid", "study_instance_uid", "n_slices",
         "shape_z", "shape_y", "shape_x", "orig_spacing_z", "orig_spacing_y", "orig_spacing_x",
         "spacing_z", "spacing_y", "spacing_x", "n_nodules", "n_irrelevant", "volume"],
        index_rows))
    header = ["seriesuid", "coordX", "coordY", "coordZ", "diameter_mm"]
    _atomic_write_text(out / "annotations.csv", _csv_text(header, ann_rows))
    _atomic_write_text(out / "annotations_excluded.csv", _csv_text(header, excl_rows))
    return len(index_rows), len(ann_rows)


def prepare_lidc(
    root: Path,
    out: Path,
    *,
    spacing: float | tuple[float, float, float] = DEFAULT_SPACING_MM,
    compress: bool = True,
    force: bool = False,
    progress: bool = True,
    on_case: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    """Prepare every annotated CT series under ``root`` (see module docstring).

    Parameters
    ----------
    root, out : Path
    spacing : float or (float, float, float)
        Output voxel spacing (x, y, z) in mm.
    compress : bool
        ``np.savez_compressed`` (smaller, slower) instead of ``np.savez``.
    force : bool
        Redo cases that are already done.
    progress : bool
        Show a rich progress bar.
    on_case : callable, optional
        Called with each case's result.

    Returns
    -------
    list of CaseResult
    """
    sp = (float(spacing),) * 3 if isinstance(spacing, int | float) else tuple(spacing)
    sp3 = (float(sp[0]), float(sp[1]), float(sp[2]))
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    out.mkdir(parents=True, exist_ok=True)
    (out / "cases").mkdir(exist_ok=True)
    series = discover_lidc(root)
    results: list[CaseResult] = []
    bar = _progress() if progress else None
    task = bar.add_task("prepare lidc", total=len(series)) if bar else None
    if bar:
        bar.start()
    try:
        for s in series:
            done = out / "cases" / f"{s.case_id}.json"
            t0 = time.perf_counter()
            if done.exists() and not force:
                r = CaseResult(s.case_id, "skipped", "already prepared")
            else:
                try:
                    info = _prepare_lidc_case(s, out, sp3, compress)
                    _atomic_write_text(done, json.dumps(info, indent=1))
                    n_nod = sum(c["kind"] == "nodule" for c in info["clusters"])
                    r = CaseResult(s.case_id, "done", f"{n_nod} nodule(s)",
                                   time.perf_counter() - t0)
                except _NotApplicableError as exc:
                    r = CaseResult(s.case_id, "skipped", str(exc), time.perf_counter() - t0)
                except Exception as exc:  # one bad case must not stop the others
                    r = CaseResult(s.case_id, "failed", f"{s.series_dir}: {exc}",
                                   time.perf_counter() - t0)
            results.append(r)
            if on_case:
                on_case(r)
            if bar:
                bar.advance(task)
    finally:
        if bar:
            bar.stop()
    _write_lidc_tables(out)
    failures = [[r.case_id, r.message] for r in results if r.status == "failed"]
    _atomic_write_text(out / "errors.csv", _csv_text(["case_id", "error"], failures))
    return results


@dataclass
class PreparedLidcCase:
    """A case written by :func:`prepare_lidc`, loaded back.

    Attributes
    ----------
    case_id : str
    volume_hu : ndarray of int16, shape (z, y, x)
        Resampled to :attr:`spacing_zyx`.
    consensus_label : ndarray of uint8, shape (z, y, x)
        0 background, k for reference nodule k (``clusters[i]["label"]``).
    spacing_zyx : (float, float, float)
    origin_xyz : (float, float, float)
        LPS position of voxel [0, 0, 0].
    info : dict
        The case JSON (clusters with reader marks and characteristics,
        irrelevant findings, UIDs).
    """

    case_id: str
    volume_hu: npt.NDArray[np.int16]
    consensus_label: npt.NDArray[np.uint8]
    spacing_zyx: tuple[float, float, float]
    origin_xyz: tuple[float, float, float]
    info: dict[str, Any]

    @property
    def nodules(self) -> list[dict[str, Any]]:
        """LUNA16 reference nodules (``center_mm`` LPS, ``diameter_mm``, readers ...)."""
        return [c for c in self.info["clusters"] if c["kind"] == "nodule"]

    @property
    def irrelevant(self) -> list[dict[str, Any]]:
        """Irrelevant findings (clusters below consensus, < 3 mm marks, non-nodules)."""
        below = [c for c in self.info["clusters"] if c["kind"] != "nodule"]
        return below + list(self.info["irrelevant"])


def load_lidc_case(out: Path, case_id: str) -> PreparedLidcCase:
    """Load ``out/cases/<case_id>.{json,npz}`` written by :func:`prepare_lidc`.

    Raises
    ------
    FileNotFoundError
        The case was not prepared (or did not finish).
    ValueError
        ``case_id`` is not a plain case name.
    """
    if not _SAFE_NAME.match(case_id):
        raise ValueError(f"not a case name: {case_id!r}")
    info = json.loads((out / "cases" / f"{case_id}.json").read_text(encoding="utf-8"))
    with np.load(out / "cases" / f"{case_id}.npz") as data:
        sp = data["spacing_zyx"]
        o = data["origin_xyz"]
        return PreparedLidcCase(
            case_id, data["volume_hu"], data["consensus_label"],
            (float(sp[0]), float(sp[1]), float(sp[2])), (float(o[0]), float(o[1]), float(o[2])),
            info)


# --------------------------------------------------------------------------- DeepLesion


def prepare_deeplesion(
    root: Path,
    out: Path,
    *,
    csv_path: Path | None = None,
    context: int = 1,
    compress: bool = True,
    force: bool = False,
    progress: bool = True,
) -> tuple[list[CaseResult], list[str]]:
    """Cache DeepLesion key slices as 2.5D HU stacks with their labels.

    Returns
    -------
    results : list of CaseResult
        One per key slice.
    problems : list of str
        Rows of ``DL_info.csv`` that could not be read.
    """
    csv_path = csv_path or root / "DL_info.csv"
    records, problems = dl.read_dl_info(csv_path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "slices").mkdir(exist_ok=True)
    results: list[CaseResult] = []
    index: list[list[object]] = []
    groups = list(dl.records_by_image(records).items())
    bar = _progress() if progress else None
    task = bar.add_task("prepare deeplesion", total=len(groups)) if bar else None
    if bar:
        bar.start()
    try:
        for _, recs in groups:
            first = recs[0]
            stem = f"{first.series_dir_name}_{first.key_slice_index:03d}"
            npz = out / "slices" / f"{stem}.npz"
            t0 = time.perf_counter()
            status = "skipped"
            try:
                if force or not npz.exists():
                    sample = dl.load_sample(root, first, context=context)
                    _atomic_savez(
                        npz, compress,
                        image_hu=sample.image_hu,
                        present=np.asarray(sample.present, dtype=bool),
                        boxes=np.asarray([r.bbox for r in recs], dtype=float),
                        recist=np.stack([r.recist for r in recs]),
                        lesion_type=np.asarray([r.lesion_type for r in recs], dtype=np.int16),
                        spacing_mm=np.asarray(first.spacing_mm, dtype=float),
                        window=np.asarray(first.window, dtype=float),
                    )
                    status = "done"
                results.append(CaseResult(stem, status, "", time.perf_counter() - t0))
                for r in recs:
                    index.append([r.file_name, r.row_number, f"slices/{npz.name}",
                                  *(round(v, 3) for v in r.bbox), *r.diameters_px,
                                  *r.spacing_mm, *r.window, r.lesion_type, r.lesion_type_name,
                                  int(r.possibly_noisy), r.split, *r.slice_range])
            except dl.DeepLesionError as exc:
                results.append(CaseResult(stem, "failed", str(exc), time.perf_counter() - t0))
            if bar:
                bar.advance(task)
    finally:
        if bar:
            bar.stop()
    _atomic_write_text(out / "index.csv", _csv_text(
        ["file_name", "csv_row", "npz", "x1", "y1", "x2", "y2", "long_px", "short_px",
         "spacing_x", "spacing_y", "spacing_z", "window_lo", "window_hi", "lesion_type",
         "lesion_type_name", "possibly_noisy", "split", "slice_first", "slice_last"], index))
    failures = [[r.case_id, r.message] for r in results if r.status == "failed"]
    failures += [["DL_info.csv", p] for p in problems]
    _atomic_write_text(out / "errors.csv", _csv_text(["case", "error"], failures))
    return results, problems


# --------------------------------------------------------------------------- CLI


def _report(results: Sequence[CaseResult], problems: Sequence[str] = ()) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    done = sum(r.status == "done" for r in results)
    skipped = sum(r.status == "skipped" for r in results)
    failed = [r for r in results if r.status == "failed"]
    for r in failed:
        console.print(f"[red]failed[/red] {r.case_id}: {r.message}", highlight=False)
    for p in problems:
        console.print(f"[yellow]skipped row[/yellow] {p}", highlight=False)
    console.print(f"{done} prepared, {skipped} already done, {len(failed)} failed, "
                  f"{len(problems)} bad CSV rows")
    return 1 if failed or problems else 0


def register(app: typer.Typer) -> None:
    """Add ``cad-train prepare lidc|deeplesion``."""
    prepare_app = typer.Typer(help="Prepare training data (LIDC-IDRI, DeepLesion).",
                              no_args_is_help=True)

    @prepare_app.command("lidc")
    def lidc_cmd(
        root: Annotated[Path, typer.Argument(help="TCIA LIDC-IDRI folder (or one patient).")],
        out: Annotated[Path, typer.Argument(help="Output folder (created).")],
        spacing: Annotated[float, typer.Option(help="Output isotropic spacing, mm.")] = (
            DEFAULT_SPACING_MM),
        compress: Annotated[bool, typer.Option(help="Compress the cached volumes.")] = True,
        force: Annotated[bool, typer.Option(help="Redo cases already prepared.")] = False,
    ) -> None:
        """Parse the reader XML, build per-reader masks and LUNA16 consensus labels,
        cache resampled volumes and an index (resumable)."""
        if not root.is_dir():
            raise typer.BadParameter(f"{root} is not a folder", param_hint="ROOT")
        results = prepare_lidc(root, out, spacing=spacing, compress=compress, force=force)
        if not results:
            typer.echo(f"no DICOM series with an XML file under {root}", err=True)
            raise typer.Exit(1)
        raise typer.Exit(_report(results))

    @prepare_app.command("deeplesion")
    def deeplesion_cmd(
        root: Annotated[Path, typer.Argument(help="Folder with Images_png/ and DL_info.csv.")],
        out: Annotated[Path, typer.Argument(help="Output folder (created).")],
        csv_file: Annotated[Path | None, typer.Option("--csv", help="DL_info.csv path.")] = None,
        context: Annotated[int, typer.Option(help="Neighbour slices on each side.")] = 1,
        compress: Annotated[bool, typer.Option(help="Compress the cached slices.")] = True,
        force: Annotated[bool, typer.Option(help="Redo slices already prepared.")] = False,
    ) -> None:
        """Cache 2.5D key-slice stacks (HU) with boxes, RECIST points and metadata."""
        try:
            results, problems = prepare_deeplesion(root, out, csv_path=csv_file,
                                                   context=context, compress=compress,
                                                   force=force)
        except dl.DeepLesionError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        raise typer.Exit(_report(results, problems))

    from trainer.cxr_data import register_prepare as register_cxr_prepare

    register_cxr_prepare(prepare_app)  # jsrt, montgomery, shenzhen, png-masks
    app.add_typer(prepare_app, name="prepare")
