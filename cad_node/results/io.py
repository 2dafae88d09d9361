"""JSON form of an :class:`AnalysisResult` with a mask sidecar.

``F.json`` is ``AnalysisResult.model_dump_json()`` (masks are excluded from
the pydantic model's JSON).  Masks live in a sidecar next to it,
``F.masks.npz`` (same stem, numpy ``savez_compressed``, no pickles), with
two arrays per mask:

* ``finding:<tracking id>`` — the ``(n, rows, columns)`` bool or float32
  array, and ``finding:<tracking id>:uids`` — the ``n`` SOP Instance UIDs
  (unicode array), frame ``k`` belonging to UID ``k``;
* ``organ:<FindingSite name>`` (e.g. ``organ:LEFT_LUNG``) and
  ``organ:<FindingSite name>:uids`` for organ masks.

In ``F.json`` a finding type or site may be given as the enum name (what
``model_dump_json`` writes, e.g. ``"NODULE"``, ``"LEFT_LUNG"``), the SNOMED
code, or ``[code, meaning]``.  A missing sidecar means "no masks".  A mask
key that names no finding, or an array without its UID list, is a
:class:`ValueError` naming the key.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path

import numpy as np

from cad_node.results.findings import AnalysisResult, FindingSite, ImageMask

__all__ = ["load_result", "mask_sidecar_path", "save_result"]

_UIDS = ":uids"


def mask_sidecar_path(json_path: Path) -> Path:
    """``F.json`` -> ``F.masks.npz``."""
    return json_path.with_name(json_path.stem + ".masks.npz")


def save_result(result: AnalysisResult, json_path: Path) -> None:
    """Write ``result`` as JSON, plus the mask sidecar when it has masks."""
    json_path.write_text(result.model_dump_json(indent=2))
    arrays: dict[str, np.ndarray] = {}
    for f in result.findings:
        if f.mask is not None:
            arrays[f"finding:{f.tracking_id}"] = f.mask.array
            arrays[f"finding:{f.tracking_id}{_UIDS}"] = np.asarray(
                f.mask.sop_instance_uids, dtype=str
            )
    for site, mask in result.organ_masks.items():
        arrays[f"organ:{site.name}"] = mask.array
        arrays[f"organ:{site.name}{_UIDS}"] = np.asarray(mask.sop_instance_uids, dtype=str)
    sidecar = mask_sidecar_path(json_path)
    if arrays:
        np.savez_compressed(sidecar, **arrays)  # type: ignore[arg-type]
    elif sidecar.exists():
        sidecar.unlink()


def load_result(json_path: Path) -> AnalysisResult:
    """Read ``F.json`` and its optional ``F.masks.npz`` sidecar.

    Raises
    ------
    ValueError
        Invalid JSON/result, or an inconsistent sidecar (message names the file and key).
    """
    try:
        # Coded values (name, SNOMED code or [code, meaning]) are parsed by the
        # model itself (cad_node.results.findings._coded_parser).
        result = AnalysisResult.model_validate(json.loads(json_path.read_text()))
    except ValueError as exc:
        raise ValueError(f"{json_path}: not a valid AnalysisResult: {exc}") from None
    sidecar = mask_sidecar_path(json_path)
    if not sidecar.exists():
        return result
    findings = {f.tracking_id: f for f in result.findings}
    new_findings = dict(findings)
    organs: dict[FindingSite, ImageMask] = {}
    try:
        npz = np.load(sidecar, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{sidecar}: not a readable mask sidecar (.npz): {exc}") from None
    with npz:
        keys = [k for k in npz.files if not k.endswith(_UIDS)]
        for key in keys:
            if key + _UIDS not in npz.files:
                raise ValueError(f"{sidecar}: mask {key!r} has no {key + _UIDS!r} UID list")
            try:
                mask = ImageMask(npz[key], tuple(str(u) for u in npz[key + _UIDS]))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{sidecar}: mask {key!r}: {exc}") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
                raise ValueError(f"{sidecar}: mask {key!r} cannot be read: {exc}") from None
            kind, _, name = key.partition(":")
            if kind == "finding" and name in findings:
                new_findings[name] = findings[name].model_copy(update={"mask": mask})
            elif kind == "organ" and name in FindingSite.__members__:
                organs[FindingSite[name]] = mask
            else:
                raise ValueError(f"{sidecar}: key {key!r} names no finding or organ of {json_path}")
    return result.model_copy(
        update={
            "findings": [new_findings[f.tracking_id] for f in result.findings],
            "organ_masks": organs,
        }
    )
