"""The LIDC XML of a real scan is found from its data-set folder (operating-point test scans).

``trainer.operating_point`` resolves ``lidc-idri-0002`` to its data-set folder, several
levels above the DICOM files and the XML.  Before the fix its irrelevant-finding region
(the one sub-consensus nodule) was empty there, so a finding on it counted as a false
positive.  Headers only: no pixel data is decoded.
"""

from __future__ import annotations

from types import SimpleNamespace

import pydicom

from tests.conftest import require_data
from trainer.data import lidc_findings
from trainer.operating_point import irrelevant_regions


def _headers(directory):  # type: ignore[no-untyped-def]
    dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(directory.glob("*.dcm"))]
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    return SimpleNamespace(series_instance_uid=str(dss[0].SeriesInstanceUID),
                           sop_instance_uids=tuple(str(d.SOPInstanceUID) for d in dss),
                           datasets=tuple(dss))


def test_irrelevant_region_of_lidc_idri_0002_from_its_data_set_folder() -> None:
    top = require_data("lidc-idri-0002")
    xml_dirs = sorted({p.parent for p in top.rglob("*.xml")})
    assert len(xml_dirs) == 1 and xml_dirs[0] != top
    series = _headers(xml_dirs[0])
    beside = lidc_findings(xml_dirs[0], series)
    assert [(f.kind, f.center_mm) for f in lidc_findings(top, series)] == [
        (f.kind, f.center_mm) for f in beside]
    zones = irrelevant_regions(top, series)  # type: ignore[arg-type]
    # the issue: one larger nodule marked by fewer than 3 readers, no LUNA16 nodule
    assert len(zones) == 1 and zones[0].radius_mm > 10
    assert not [f for f in beside if f.kind == "nodule"]
