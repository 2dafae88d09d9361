"""The conformance gate every result object passes before it may be sent.

:func:`validate` checks, in this order, and collects every problem it finds:

1. **Re-read**: the object is encoded as a PS3.10 file and read back with
   pydicom, then parsed by highdicom's ``from_dataset`` of its SOP class
   (SEG, Comprehensive 3D SR, KOS, Parametric Map; GSPS: every graphic annotation names
   its image and layer); SC pixel data must decode.
2. **IHE AIR items**: same Study Instance UID as the source, a series of its
   own (not a source series), a Contributing Equipment item for the
   algorithm with Manufacturer, Manufacturer's Model Name, Software Versions
   and Device UID; for SR: VerificationFlag UNVERIFIED, a device observer, a
   Procedure Reported.
3. **References**: every Referenced SOP Instance UID anywhere in the object
   resolves to a received source instance, to another object built in the
   same run (``others``) or to itself.
4. **dciodvfy** (dicom3tools, called by its absolute path :data:`DCIODVFY`)
   when ``use_dciodvfy``: any ``Error`` line fails the object; ``Warning``
   lines are reported only.  With ``use_dciodvfy`` and dciodvfy missing or
   not runnable the object *fails* (fail closed: an unchecked object is
   never sent); ``ValidationReport.dciodvfy_ran`` says whether it ran.

The verdict is :class:`ValidationReport` (``ok`` / ``errors`` / ``warnings``).
The caller (the jobs engine) quarantines objects that are not ``ok`` and logs
the errors; this module never writes anywhere except a private temporary file
for dciodvfy.
"""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import tempfile
from collections.abc import Iterable, Iterator, Sequence

import highdicom as hd
import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import UID

from cad_node.results._common import PURPOSE_PROCESSING_ALGORITHM

__all__ = ["DCIODVFY", "ValidationReport", "validate"]

#: dicom3tools validator, called by absolute path.
DCIODVFY = "/usr/bin/dciodvfy"
#: Seconds dciodvfy may take on one object.
DCIODVFY_TIMEOUT_S = 120

#: SOP Class UIDs (PS3.4 B.5).
SEG_STORAGE = UID("1.2.840.10008.5.1.4.1.1.66.4")
COMPREHENSIVE_3D_SR_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.34")
GSPS_STORAGE = UID("1.2.840.10008.5.1.4.1.1.11.1")
KOS_STORAGE = UID("1.2.840.10008.5.1.4.1.1.88.59")
PARAMETRIC_MAP_STORAGE = UID("1.2.840.10008.5.1.4.1.1.30")
SC_STORAGE_UIDS = frozenset(
    {
        UID("1.2.840.10008.5.1.4.1.1.7"),  # Secondary Capture Image Storage
        UID("1.2.840.10008.5.1.4.1.1.7.4"),  # Multi-frame True Color SC
    }
)

#: VerificationFlag (0040,A493) enumerated value, PS3.3 C.17.2.
UNVERIFIED = "UNVERIFIED"
#: TID 1500 row 4 concept name: (121058, DCM, "Procedure reported").
PROCEDURE_REPORTED = codes.DCM.ProcedureReported
#: TID 1004 row 1 concept name: (121012, DCM, "Device Observer UID").
DEVICE_OBSERVER_UID = codes.DCM.DeviceObserverUID
#: TID 1411 row 7 concept name: (121191, DCM, "Referenced Segment").
REFERENCED_SEGMENT = codes.DCM.ReferencedSegment


@dataclasses.dataclass(frozen=True)
class ValidationReport:
    """Verdict of :func:`validate`.

    Attributes
    ----------
    ok : bool
        True when no error was found; only then may the object be sent.
    errors : tuple of str
        Reasons the object fails (one line each, for the quarantine log).
    warnings : tuple of str
        dciodvfy warnings and other non-fatal remarks.
    dciodvfy_ran : bool
        Whether dciodvfy was run.
    """

    ok: bool
    errors: tuple[str, ...]
    warnings: tuple[str, ...] = ()
    dciodvfy_ran: bool = False


def _encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def _walk_refs(ds: Dataset) -> Iterator[str]:
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk_refs(item)
        elif elem.keyword == "ReferencedSOPInstanceUID":
            values = elem.value if isinstance(elem.value, list | tuple) else [elem.value]
            for v in values:
                if v:
                    yield str(v)


def _reread(data: bytes, errors: list[str]) -> Dataset | None:
    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as exc:  # pydicom raises many types on bad input
        errors.append(f"pydicom cannot re-read the object: {exc}")
        return None
    sop_class = UID(str(ds.get("SOPClassUID", "")))
    try:
        if sop_class == SEG_STORAGE:
            hd.seg.Segmentation.from_dataset(ds)
        elif sop_class == COMPREHENSIVE_3D_SR_STORAGE:
            _parse_measurement_groups(hd.sr.Comprehensive3DSR.from_dataset(ds))
        elif sop_class == GSPS_STORAGE:
            # highdicom 0.28 has no GSPS reader; check what a viewer needs.
            for ann in ds.GraphicAnnotationSequence:
                if not ann.ReferencedImageSequence or not ann.GraphicLayer:
                    raise ValueError("a graphic annotation lacks its image or layer")
        elif sop_class == KOS_STORAGE:
            hd.ko.KeyObjectSelectionDocument.from_dataset(ds)
        elif sop_class == PARAMETRIC_MAP_STORAGE:
            pm = hd.pm.ParametricMap.from_dataset(ds)
            if not np.isfinite(np.asarray(pm.pixel_array)).all():
                raise ValueError("the parametric map has non-finite values")
        elif sop_class in SC_STORAGE_UIDS:
            _ = ds.pixel_array
        else:
            errors.append(f"unexpected SOP Class UID {sop_class} for a result object")
    except Exception as exc:  # highdicom raises ValueError/AttributeError/...
        errors.append(f"highdicom cannot parse the re-read {sop_class.name or sop_class}: {exc}")
    return ds


def _parse_measurement_groups(sr: hd.sr.Comprehensive3DSR) -> None:
    """Read every TID 1410/1411 group's ROI reference and measurements back.

    What a consumer does with the report; raises (highdicom's errors) when a
    group's references contradict the template, e.g. both "Source Image for
    Segmentation" and "Source Series for Segmentation" next to a segment.
    """
    content = sr.content
    if not isinstance(content, hd.sr.MeasurementReport):
        raise ValueError("the SR content is not a TID 1500 Measurement Report")
    for planar in content.get_planar_roi_measurement_groups():
        if planar.roi is None and planar.referenced_segmentation_frame is None:
            raise ValueError("a planar measurement group's region cannot be read")
        planar.get_measurements()
    for volumetric in content.get_volumetric_roi_measurement_groups():
        if volumetric.reference_type == REFERENCED_SEGMENT:
            if volumetric.referenced_segment is None:
                raise ValueError("a measurement group's Referenced Segment cannot be read")
        elif volumetric.roi is None:
            raise ValueError("a volumetric measurement group's region cannot be read")
        volumetric.get_measurements()


def _has_code(seq: Iterable[Dataset], value: str, scheme: str) -> bool:
    return any(
        item.get("CodeValue") == value and item.get("CodingSchemeDesignator") == scheme
        for item in seq
    )


def _check_air(ds: Dataset, source: Sequence[Dataset], errors: list[str]) -> None:
    studies = {str(s.StudyInstanceUID) for s in source}
    if str(ds.get("StudyInstanceUID", "")) not in studies:
        errors.append("Study Instance UID differs from the source study")
    if str(ds.get("SeriesInstanceUID", "")) in {str(s.SeriesInstanceUID) for s in source}:
        errors.append("the object is in a source series; results need a new series")
    algo = [
        item
        for item in ds.get("ContributingEquipmentSequence", [])
        if _has_code(
            item.get("PurposeOfReferenceCodeSequence", []),
            PURPOSE_PROCESSING_ALGORITHM.value,
            PURPOSE_PROCESSING_ALGORITHM.scheme_designator,
        )
        and "DeviceUID" in item
    ]
    if not algo:
        errors.append(
            "Contributing Equipment Sequence has no algorithm item with Device UID (IHE AIR)"
        )
    for item in algo:
        for kw in ("Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceUID"):
            if not item.get(kw):
                errors.append(f"algorithm Contributing Equipment item lacks {kw} (IHE AIR)")
    if UID(str(ds.get("SOPClassUID", ""))) == COMPREHENSIVE_3D_SR_STORAGE:
        if ds.get("VerificationFlag") != UNVERIFIED:
            errors.append(f"SR VerificationFlag is {ds.get('VerificationFlag')!r}, not UNVERIFIED")
        names = _content_names(ds)
        for concept, what in (
            (PROCEDURE_REPORTED, "Procedure Reported (TID 1500 row 4)"),
            (DEVICE_OBSERVER_UID, "Device Observer UID (TID 1004 row 1)"),
        ):
            if (concept.value, concept.scheme_designator) not in names:
                errors.append(f"SR has no {what}")


def _content_names(ds: Dataset) -> set[tuple[str, str]]:
    out: set[tuple[str, str]] = set()
    for item in ds.get("ContentSequence", []):
        for name in item.get("ConceptNameCodeSequence", []):
            out.add((str(name.CodeValue), str(name.CodingSchemeDesignator)))
        out |= _content_names(item)
    return out


def _run_dciodvfy(data: bytes, errors: list[str], warnings: list[str]) -> bool:
    exe = DCIODVFY  # by absolute path only: never whatever "dciodvfy" PATH finds
    if not os.path.isfile(exe):
        errors.append(
            f"dciodvfy ({exe}) is not installed but results.use_dciodvfy is true: install "
            "dicom3tools, or set results.use_dciodvfy: false to send unchecked objects"
        )
        return False
    fd, path = tempfile.mkstemp(prefix="cad-node-validate-", suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        # dciodvfy echoes attribute values in the objects' own character set
        # (e.g. ISO_IR 100 Patient's Name "M\xfcller"): never decode strictly.
        proc = subprocess.run(
            [exe, path],
            capture_output=True,
            text=True,
            errors="replace",
            timeout=DCIODVFY_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        errors.append(f"dciodvfy did not finish within {DCIODVFY_TIMEOUT_S} s")
        return True
    except OSError as exc:
        # Installed but not runnable: fail closed (an unchecked object is not sent).
        errors.append(f"dciodvfy ({exe}) could not be run: {exc}")
        return False
    finally:
        os.unlink(path)
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.startswith("Error"):
            errors.append(f"dciodvfy: {line}")
        elif line.startswith("Warning"):
            warnings.append(f"dciodvfy: {line}")
    return True


def validate(
    obj_or_dataset: object,
    source: Sequence[Dataset],
    *,
    others: Sequence[object] = (),
    use_dciodvfy: bool = True,
) -> ValidationReport:
    """Check one result object before it may leave the node.

    Parameters
    ----------
    obj_or_dataset : ResultObject or pydicom.Dataset
        The object to check.
    source : sequence of pydicom.Dataset
        The received source instances (headers suffice).
    others : sequence of ResultObject or pydicom.Dataset
        Other objects built in the same run, which references may point to
        (e.g. the SR's Referenced Segment points to the SEG).
    use_dciodvfy : bool
        Run dciodvfy (``ResultsConfig.use_dciodvfy``); when it is missing the
        object fails the gate.

    Returns
    -------
    ValidationReport
    """
    ds = getattr(obj_or_dataset, "dataset", obj_or_dataset)
    if not isinstance(ds, Dataset):
        raise TypeError(f"expected a ResultObject or pydicom Dataset, not {type(obj_or_dataset)}")
    if not source:
        raise ValueError("validate() needs the source instances to resolve references")
    errors: list[str] = []
    warnings: list[str] = []
    try:
        data = _encode(ds)
    except Exception as exc:  # encoding errors come in many types
        return ValidationReport(False, (f"the object cannot be encoded: {exc}",))
    reread = _reread(data, errors)
    if reread is not None:
        _check_air(reread, source, errors)
        known = {str(s.SOPInstanceUID) for s in source} | {str(reread.SOPInstanceUID)}
        for other in others:
            ods = getattr(other, "dataset", other)
            if isinstance(ods, Dataset) and "SOPInstanceUID" in ods:
                known.add(str(ods.SOPInstanceUID))
        missing = sorted(set(_walk_refs(reread)) - known)
        if missing:
            errors.append(
                f"{len(missing)} referenced instance(s) are neither received nor built, "
                f"e.g. {missing[0]}"
            )
    ran = _run_dciodvfy(data, errors, warnings) if use_dciodvfy else False
    return ValidationReport(not errors, tuple(errors), tuple(warnings), ran)
