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

In ``F.json`` a finding type or site may be given as ``[code, meaning]`` (what
``model_dump_json`` writes), as the SNOMED code, or as the enum name
(``"NODULE"``, ``"LEFT_LUNG"``).  A missing sidecar means "no masks".  A mask
key that names no finding, or an array without its UID list, is a
:class:`ValueError` naming the key.
"""

from __future__ import annotations

import json
import zipfile
import zlib
from pathlib import Path
from typing import TypeVar

import numpy as np

from cad_node.results.findings import AnalysisResult, FindingSite, FindingType, ImageMask

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


_E = TypeVar("_E", FindingType, FindingSite)


def _coded(enum_cls: type[_E], value: object) -> _E | object:
    """JSON value of a coded enum -> member: ``[code, meaning]``, a code or a member name.

    ``AnalysisResult.model_dump_json()`` writes the tuple values of
    :class:`FindingType`/:class:`FindingSite` as JSON arrays, which pydantic
    does not map back onto the enum; we do.  Unknown values pass through so
    pydantic reports them with the field name.
    """
    for member in enum_cls:
        if isinstance(value, list | tuple) and tuple(value) == member.value:
            return member
        if isinstance(value, str) and value in (member.name, member.code):
            return member
    return value


def load_result(json_path: Path) -> AnalysisResult:
    """Read ``F.json`` and its optional ``F.masks.npz`` sidecar.

    Raises
    ------
    ValueError
        Invalid JSON/result, or an inconsistent sidecar (message names the file and key).
    """
    try:
        raw = json.loads(json_path.read_text())
        for finding in raw.get("findings", []) if isinstance(raw, dict) else []:
            if isinstance(finding, dict):
                if finding.get("finding_type") is not None:
                    finding["finding_type"] = _coded(FindingType, finding["finding_type"])
                if finding.get("site") is not None:
                    finding["site"] = _coded(FindingSite, finding["site"])
        result = AnalysisResult.model_validate(raw)
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
