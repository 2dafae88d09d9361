"""ct-lesion end to end: storescu -> cad-node serve -> Orthanc, beside ct-chest and alone.

The node runs the routing rules shipped in ``config/cad-node.yaml`` (chest-ct
for chest or unlabelled CTs) plus its opt-in ct-lesion rule (every axial CT up
to 5 mm).

1. The real LIDC-IDRI-0001 chest CT: ct-chest and ct-lesion both analyse it;
   their SR/SEG/SC land in the source study, every object at 0 dciodvfy
   errors, and no ct-lesion finding is a ct-chest finding.
2. A non-chest CT made from it (the 45 most inferior slices: upper abdomen,
   relabelled BodyPartExamined ABDOMEN with new UIDs): ct-lesion alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from cad_node.config import load_config
from cad_node.jobs.states import JobState
from cad_node.jobs.store import Job
from tests.conftest import dciodvfy
from tests.system.conftest import OrthancServer
from tests.system.test_e2e import _DONE, Node, _results_in_pacs, _study_uid

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
#: The opt-in rule of config/cad-node.yaml (commented out there).
CT_LESION_RULE = {
    "name": "ct-lesion", "pipeline": "ct-lesion", "series": "best",
    "match": {"modality": ["CT"], "image_type": ["ORIGINAL"], "orientation": "axial",
              "slice_thickness_mm": [0.0, 5.0], "min_instances": 3},
}


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    """An Orthanc of this module's own.

    The session's Orthanc must not hold this module's ct-lesion results of the
    real CT: test_e2e later checks that study's result set exactly.
    """
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-lesion"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def lesion_node(orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("lesion-node"), orthanc.dicom_port)
    shipped = yaml.safe_load((REPO / "config" / "cad-node.yaml").read_text())
    cfg = yaml.safe_load(n.config.read_text())
    # the shipped rules plus the opt-in ct-lesion rule commented out in cad-node.yaml
    cfg["routing"] = {"rules": [*shipped["routing"]["rules"], CT_LESION_RULE]}
    cfg["jobs"]["soft_time_limit_s"] = 600
    cfg["jobs"]["hard_time_limit_s"] = 660
    cfg["jobs"]["visibility_timeout_s"] = 700
    n.config.write_text(yaml.safe_dump(cfg))
    n.settings = load_config(n.config)
    with n.running():
        yield n


def _fetch(orthanc: OrthancServer, study_uid: str, sources: set[str], tmp: Path
           ) -> list[tuple[Path, pydicom.Dataset]]:
    out = []
    for r in _results_in_pacs(orthanc, study_uid, sources):
        path = tmp / f"{r['ID']}.dcm"
        path.write_bytes(orthanc.instance_file(r["ID"]))
        out.append((path, pydicom.dcmread(path)))
    return out


def _kind(ds: pydicom.Dataset) -> str:
    """sr / seg / sc from the SOP Class (PS3.4 B.5)."""
    uid = str(ds.SOPClassUID)
    if uid.startswith("1.2.840.10008.5.1.4.1.1.88."):
        return "sr"
    if uid == "1.2.840.10008.5.1.4.1.1.66.4":
        return "seg"
    if uid.startswith("1.2.840.10008.5.1.4.1.1.7"):
        return "sc"
    return uid


def _walk(items: Any) -> Any:
    for it in items:
        yield it
        yield from _walk(getattr(it, "ContentSequence", []) or [])


def _chest_nodules(sr: pydicom.Dataset) -> list[tuple[np.ndarray, float]]:
    """(centre LPS, long axis mm) of every ct-chest measurement group."""
    out = []
    for g in _walk(sr.ContentSequence):
        if g.ValueType != "CONTAINER" or g.ConceptNameCodeSequence[0].CodeValue != "125007":
            continue
        centre, long_mm = None, 0.0
        for it in g.ContentSequence:
            if it.ValueType == "SCOORD3D":
                centre = np.asarray(it.GraphicData[:3], dtype=float)
            if it.ValueType == "NUM" and it.ConceptNameCodeSequence[0].CodeValue == "103339001":
                long_mm = float(it.MeasuredValueSequence[0].NumericValue)
        if centre is not None:
            out.append((centre, long_mm))
    return out


def _lesion_centres(sr: pydicom.Dataset, by_uid: dict[str, pydicom.Dataset]) -> list[np.ndarray]:
    """LPS centre of the Image Region (key-slice box) of every ct-lesion group."""
    out = []
    for g in _walk(sr.ContentSequence):
        if g.ValueType != "CONTAINER" or g.ConceptNameCodeSequence[0].CodeValue != "125007":
            continue
        for it in g.ContentSequence:
            if it.ValueType == "SCOORD":
                img = by_uid[str(it.ContentSequence[0].ReferencedSOPSequence[0]
                                 .ReferencedSOPInstanceUID)]
                xy = np.asarray(it.GraphicData, dtype=float).reshape(-1, 2)[:-1].mean(0)
                iop = np.asarray(img.ImageOrientationPatient, dtype=float)
                dr, dc = (float(v) for v in img.PixelSpacing)
                p = (np.asarray(img.ImagePositionPatient, dtype=float)
                     + iop[:3] * (xy[0] - 0.5) * dc + iop[3:] * (xy[1] - 0.5) * dr)
                out.append(p)
    return out


def test_real_ct_ct_lesion_beside_ct_chest(
    lesion_node: Node, lidc_dir: Path, orthanc: OrthancServer, tmp_path: Path
) -> None:
    files = sorted(lidc_dir.glob("*.dcm"))
    sources = [pydicom.dcmread(f) for f in files]
    uids = {str(d.SOPInstanceUID) for d in sources}
    lesion_node.send(files)
    job: Job = lesion_node.wait_job(_study_uid(files), _DONE, timeout=900)
    assert job.state is JobState.SENT, job.error
    got = _fetch(orthanc, job.study_instance_uid, uids, tmp_path)
    by_algo: dict[str, set[str]] = {}
    for path, ds in got:
        errors, _ = dciodvfy(path)
        assert not errors, (ds.SeriesDescription, errors)
        assert ds.StudyInstanceUID == job.study_instance_uid
        algo = "ct-lesion" if "ct-lesion" in ds.SeriesDescription else "ct-chest"
        by_algo.setdefault(algo, set()).add(_kind(ds))
    assert by_algo.get("ct-lesion") == {"sr", "seg", "sc"}, by_algo
    assert by_algo.get("ct-chest") == {"sr", "seg", "sc"}, by_algo
    srs = [ds for _, ds in got if ds.Modality == "SR"]
    lesion_sr = next(ds for ds in srs if "ct-lesion" in ds.SeriesDescription)
    chest_sr = next(ds for ds in srs if "ct-lesion" not in ds.SeriesDescription)
    by_uid = {str(d.SOPInstanceUID): d for d in sources}
    nodules = _chest_nodules(chest_sr)
    lesions = _lesion_centres(lesion_sr, by_uid)
    assert lesions, "ct-lesion reported no finding on the real CT"
    for c in lesions:
        for n, long_mm in nodules:
            assert np.linalg.norm(c - n) > max(long_mm / 2, 5.0) - 2.0, (c, n, long_mm)


def _abdomen_series(lidc_dir: Path, out: Path, n: int = 45) -> list[Path]:
    """The ``n`` most inferior slices as a new ABDOMEN study (new UIDs)."""
    files = sorted(lidc_dir.glob("*.dcm"))
    heads = sorted((float(pydicom.dcmread(f, stop_before_pixels=True)
                           .ImagePositionPatient[2]), f) for f in files)[:n]
    study = generate_uid(entropy_srcs=["cad-node test abdomen study"])
    series = generate_uid(entropy_srcs=["cad-node test abdomen series"])
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, (_, f) in enumerate(heads):
        ds = pydicom.dcmread(f)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["cad-node test abdomen", str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.BodyPartExamined = "ABDOMEN"
        ds.StudyDescription = "CT ABDOMEN (test: inferior slices of LIDC-IDRI-0001)"
        ds.PatientID = "ABDOMEN-TEST"
        p = out / f"{i:03d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def test_non_chest_ct_is_analysed_by_ct_lesion_alone(
    lesion_node: Node, lidc_dir: Path, orthanc: OrthancServer, tmp_path: Path
) -> None:
    files = _abdomen_series(lidc_dir, tmp_path / "abdomen")
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    lesion_node.send(files)
    job = lesion_node.wait_job(_study_uid(files), _DONE, timeout=600)
    assert job.state is JobState.SENT, job.error
    got = _fetch(orthanc, job.study_instance_uid, uids, tmp_path)
    assert got
    descriptions = {str(ds.SeriesDescription) for _, ds in got}
    assert all("ct-lesion" in d for d in descriptions), descriptions
    assert "sr" in {_kind(ds) for _, ds in got}
    for path, ds in got:
        errors, _ = dciodvfy(path)
        assert not errors, (ds.SeriesDescription, errors)
