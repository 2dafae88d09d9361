"""``cad-train prepare jsrt|montgomery|shenzhen|png-masks``: chest radiographs with lung masks.

Every layout is turned into one prepared folder::

    OUT/cases.csv          case, image, mask, rows, cols, pixel_spacing_mm, structures, source
    OUT/images/<case>.png  8-bit grey, bright = attenuating
    OUT/masks/<case>.png   8-bit, bit-packed labels: 1 = right lung, 2 = left lung, 4 = heart

"Right" and "left" are the patient's: on a frontal (PA/AP) film the right
lung lies on the image's left.  ``structures`` lists the labels the source
actually annotates (Shenzhen has no heart); the trainer masks the loss of the
others.  ``pixel_spacing_mm`` is blank when the source does not state it.

Layouts read (the folder names the public releases use):

``jsrt``
    JSRT images with SCR masks as in ``../shared/data/jsrt-scr``:
    ``images/<case>.png`` and ``masks/{left_lung,right_lung,heart}/<case>.png``;
    0.175 mm pixels at 2048 columns, scaled to the stored size.
``montgomery``
    ``CXR_png/<name>.png`` and ``ManualMask/{leftMask,rightMask}/<name>.png``
    (0.0875 mm pixels at 4020 columns).  The two masks are assigned to the
    patient's sides by their centroids (the patient's right lung is the one
    on the image's left), never by the folder names alone.
``shenzhen``
    ``CXR_png/<name>.png`` (or ``images/``) and ``mask/<name>_mask.png``: one
    mask of both lungs, split into its two largest components; no heart, and
    no pixel spacing.
``png-masks``
    ``images/<name>.png`` and ``masks/<name>.png``.  A mask with values
    ``{0, 1, 2, 3}`` is a label map (1 right lung, 2 left lung, 3 heart); a
    two-valued mask (``0``/``255`` or ``0``/``1``) is both lungs, split as for
    Shenzhen.

A case whose image or mask is missing or unreadable is reported by name and
skipped; the command then exits with status 1.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import numpy.typing as npt
import typer
from PIL import Image
from scipy import ndimage

__all__ = [
    "BIT",
    "LAYOUTS",
    "PreparedCase",
    "PreparedSet",
    "load_prepared",
    "prepare",
    "register",
]

#: Bit of each structure in a prepared mask.
BIT: dict[str, int] = {"right_lung": 1, "left_lung": 2, "heart": 4}
#: Layouts ``cad-train prepare`` knows.
LAYOUTS: tuple[str, ...] = ("jsrt", "montgomery", "shenzhen", "png-masks")
#: JSRT: 2048 columns at 0.175 mm (Shiraishi 2000).
_JSRT_MM_AT_2048 = 0.175 * 2048
#: Montgomery County set: 0.0875 mm pixels at 4020 columns (Jaeger 2014).
_MONTGOMERY_MM_AT_4020 = 0.0875 * 4020
_CASE_ID = re.compile(r"[^A-Za-z0-9_.-]")
_FIELDS = ("case", "image", "mask", "rows", "cols", "pixel_spacing_mm", "structures", "source")


class PrepareError(ValueError):
    """A source case cannot be prepared (the message names the file)."""


@dataclass(frozen=True)
class _Source:
    case: str
    image: Path
    masks: dict[str, Path]  # structure or "lungs"/"labels" -> file
    mm_extent: float | None  # field width in mm (spacing x columns), when known


@dataclass(frozen=True)
class PreparedCase:
    """One prepared radiograph and its reference masks."""

    case: str
    image: npt.NDArray[np.uint8]
    masks: dict[str, npt.NDArray[np.bool_]]
    pixel_spacing_mm: float | None
    structures: tuple[str, ...]


@dataclass(frozen=True)
class PreparedSet:
    """A prepared folder's index."""

    root: Path
    rows: list[dict[str, str]]

    @property
    def cases(self) -> list[str]:
        """Case identifiers, in file order."""
        return [r["case"] for r in self.rows]

    def load(self, case: str) -> PreparedCase:
        """Read one case (image and masks).

        Raises
        ------
        KeyError
            ``case`` is not in the folder's index.
        """
        for r in self.rows:
            if r["case"] == case:
                image = np.asarray(Image.open(self.root / r["image"]).convert("L"), np.uint8)
                packed = np.asarray(Image.open(self.root / r["mask"]), np.uint8)
                masks = {k: (packed & bit) > 0 for k, bit in BIT.items()}
                spacing = float(r["pixel_spacing_mm"]) if r["pixel_spacing_mm"] else None
                structures = tuple(s for s in r["structures"].split(";") if s)
                return PreparedCase(case, image, masks, spacing, structures)
        raise KeyError(f"{self.root}: no prepared case {case!r}")


def load_prepared(root: Path) -> PreparedSet:
    """Read ``root/cases.csv`` of a prepared folder.

    Raises
    ------
    FileNotFoundError
        No ``cases.csv`` (run ``cad-train prepare`` first).
    ValueError
        The index lacks a column.
    """
    index = root / "cases.csv"
    if not index.is_file():
        raise FileNotFoundError(f"{index} not found: run `cad-train prepare` first")
    with index.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = [f for f in _FIELDS if f not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{index}: missing column(s) {missing}")
        rows = list(reader)
    return PreparedSet(root, rows)


def _case_id(stem: str) -> str:
    return _CASE_ID.sub("_", stem)[:64] or "case"


def _read_grey(path: Path) -> npt.NDArray[np.float64]:
    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, np.float64)
            else:
                arr = np.asarray(im.convert("L"), np.float64)
    except (OSError, ValueError) as exc:
        raise PrepareError(f"{path}: cannot read image: {exc}") from None
    if arr.ndim != 2 or min(arr.shape) < 16:
        raise PrepareError(f"{path}: not a 2-D grey image (shape {arr.shape})")
    return arr


def _to_uint8(arr: npt.NDArray[np.float64]) -> npt.NDArray[np.uint8]:
    if arr.max() <= 255 and arr.min() >= 0:
        return arr.astype(np.uint8)
    lo, hi = (float(v) for v in np.percentile(arr, [0.5, 99.5]))
    hi = max(hi, lo + 1.0)
    scaled: npt.NDArray[np.uint8] = (np.clip((arr - lo) / (hi - lo), 0, 1) * 255 + 0.5).astype(
        np.uint8
    )
    return scaled


def _resize(arr: npt.NDArray[np.float64], shape: tuple[int, int]) -> npt.NDArray[np.float64]:
    if arr.shape == shape:
        return arr
    im = Image.fromarray(arr.astype(np.float32), mode="F")
    return np.asarray(im.resize((shape[1], shape[0]), Image.Resampling.BOX), np.float64)


def _split_lungs(both: npt.NDArray[np.bool_], path: Path) -> dict[str, npt.NDArray[np.bool_]]:
    """Two largest components; the one on the image's left is the patient's right lung."""
    labels, n = ndimage.label(both)
    if n < 2:
        raise PrepareError(f"{path}: a two-lung mask needs two components, found {n}")
    sizes = ndimage.sum_labels(both, labels, index=np.arange(1, n + 1))
    a, b = (np.argsort(sizes)[::-1][:2] + 1).tolist()
    ca = ndimage.center_of_mass(labels == a)[1]
    cb = ndimage.center_of_mass(labels == b)[1]
    right, left = (a, b) if ca < cb else (b, a)
    return {"right_lung": labels == right, "left_lung": labels == left}


def _by_side(
    first: npt.NDArray[np.bool_], second: npt.NDArray[np.bool_], path: Path
) -> dict[str, npt.NDArray[np.bool_]]:
    if not first.any() or not second.any():
        raise PrepareError(f"{path}: an empty lung mask")
    c1 = ndimage.center_of_mass(first)[1]
    c2 = ndimage.center_of_mass(second)[1]
    return {"right_lung": first, "left_lung": second} if c1 < c2 else {
        "right_lung": second, "left_lung": first}


def _pngs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder")
    return sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")


def _discover(layout: str, root: Path) -> Iterator[_Source]:
    if layout == "jsrt":
        for img in _pngs(root / "images"):
            masks = {k: root / "masks" / k / img.name for k in ("right_lung", "left_lung", "heart")}
            yield _Source(_case_id(img.stem), img, masks, _JSRT_MM_AT_2048)
    elif layout == "montgomery":
        for img in _pngs(root / "CXR_png"):
            masks = {
                "first": root / "ManualMask" / "leftMask" / img.name,
                "second": root / "ManualMask" / "rightMask" / img.name,
            }
            yield _Source(_case_id(img.stem), img, masks, _MONTGOMERY_MM_AT_4020)
    elif layout == "shenzhen":
        folder = root / "CXR_png" if (root / "CXR_png").is_dir() else root / "images"
        for img in _pngs(folder):
            yield _Source(_case_id(img.stem), img,
                          {"lungs": root / "mask" / f"{img.stem}_mask.png"}, None)
    elif layout == "png-masks":
        for img in _pngs(root / "images"):
            yield _Source(_case_id(img.stem), img, {"labels": root / "masks" / img.name}, None)
    else:
        raise ValueError(f"unknown layout {layout!r} (known: {', '.join(LAYOUTS)})")


def _binary(arr: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
    """Foreground of a 0/1 or 0/255 mask (above half its maximum)."""
    top = float(arr.max())
    return arr > 0.5 * top if top > 0 else np.zeros(arr.shape, bool)


def _read_mask(path: Path, shape: tuple[int, int]) -> npt.NDArray[np.float64]:
    if not path.is_file():
        raise PrepareError(f"{path}: mask file is missing")
    arr = _read_grey(path)
    if arr.shape != shape:
        arr = _resize(arr, shape)
    return arr


def _masks_of(src: _Source, shape: tuple[int, int]) -> tuple[dict[str, npt.NDArray[np.bool_]],
                                                                tuple[str, ...]]:
    m = src.masks
    if "labels" in m:
        arr = np.rint(_read_mask(m["labels"], shape))
        values = set(np.unique(arr).astype(int).tolist())
        if values <= {0, 1, 2, 3} and len(values) > 2:
            out = {"right_lung": arr == 1, "left_lung": arr == 2, "heart": arr == 3}
            return out, tuple(k for k in BIT if out[k].any())
        if len(values) <= 2:
            return _split_lungs(arr > 0, m["labels"]), ("right_lung", "left_lung")
        raise PrepareError(f"{m['labels']}: mask values {sorted(values)[:8]} are neither a "
                           "label map {0,1,2,3} nor a binary lung mask")
    if "lungs" in m:
        return _split_lungs(_binary(_read_mask(m["lungs"], shape)), m["lungs"]), (
            "right_lung", "left_lung")
    if "first" in m:
        first = _binary(_read_mask(m["first"], shape))
        second = _binary(_read_mask(m["second"], shape))
        return _by_side(first, second, m["first"]), ("right_lung", "left_lung")
    out = {k: _binary(_read_mask(p, shape)) for k, p in m.items()}
    return out, tuple(out)


def _write_case(src: _Source, out: Path, max_size: int) -> dict[str, str]:
    arr = _read_grey(src.image)
    rows, cols = arr.shape
    masks, structures = _masks_of(src, (rows, cols))
    scale = min(1.0, max_size / max(rows, cols))
    new_shape = (max(1, round(rows * scale)), max(1, round(cols * scale)))
    if new_shape != (rows, cols):
        arr = _resize(arr, new_shape)
        masks = {k: _resize(v.astype(np.float64), new_shape) >= 0.5 for k, v in masks.items()}
    packed = np.zeros(new_shape, np.uint8)
    for k, v in masks.items():
        packed |= (v.astype(np.uint8) * BIT[k]).astype(np.uint8)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    image_rel = f"images/{src.case}.png"
    mask_rel = f"masks/{src.case}.png"
    Image.fromarray(_to_uint8(arr)).save(out / image_rel)
    Image.fromarray(packed).save(out / mask_rel)
    spacing = "" if src.mm_extent is None else f"{src.mm_extent / new_shape[1]:.6g}"
    return {
        "case": src.case, "image": image_rel, "mask": mask_rel, "rows": str(new_shape[0]),
        "cols": str(new_shape[1]), "pixel_spacing_mm": spacing,
        "structures": ";".join(structures), "source": str(src.image),
    }


def prepare(layout: str, root: Path, out: Path, *, max_size: int = 1024
            ) -> tuple[list[dict[str, str]], list[str]]:
    """Prepare every case of ``root`` (in ``layout``) into ``out``.

    Returns
    -------
    (rows, failures)
        The index rows written to ``out/cases.csv`` and one message per case
        that could not be prepared (naming its file).

    Raises
    ------
    FileNotFoundError
        The layout's image folder is missing.
    ValueError
        Unknown layout.
    """
    rows: list[dict[str, str]] = []
    failures: list[str] = []
    seen: set[str] = set()
    for src in _discover(layout, root):
        if src.case in seen:
            failures.append(f"{src.image}: duplicate case id {src.case!r}")
            continue
        seen.add(src.case)
        try:
            rows.append(_write_case(src, out, max_size))
        except PrepareError as exc:
            failures.append(str(exc))
    out.mkdir(parents=True, exist_ok=True)
    with (out / "cases.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return rows, failures


def _command(layout: str) -> Callable[..., None]:
    def cmd(
        root: Annotated[Path, typer.Argument(help="Source folder in this layout.")],
        out: Annotated[Path, typer.Argument(help="Output folder (created).")],
        max_size: Annotated[int, typer.Option(help="Longest side of the stored images.")] = 1024,
    ) -> None:
        try:
            rows, failures = prepare(layout, root, out, max_size=max_size)
        except (FileNotFoundError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        for f in failures:
            typer.echo(f"failed: {f}", err=True)
        typer.echo(f"{len(rows)} prepared, {len(failures)} failed -> {out / 'cases.csv'}")
        if not rows:
            raise typer.Exit(1)
        raise typer.Exit(1 if failures else 0)

    cmd.__doc__ = f"Prepare a {layout} chest radiograph set (images + lung/heart masks)."
    return cmd


def register_prepare(prepare_app: typer.Typer, layouts: Sequence[str] = LAYOUTS) -> None:
    """Add ``prepare <layout>`` for every chest radiograph layout to ``prepare_app``."""
    for layout in layouts:
        prepare_app.command(layout)(_command(layout))


def register(app: typer.Typer) -> None:
    """No top-level commands; ``trainer.prepare`` calls :func:`register_prepare`."""
