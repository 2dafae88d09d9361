"""End to end for chest radiographs: dcmtk storescu -> cad-node serve -> Orthanc.

* the real SIIM CR (JPEG baseline) is routed by the ``chest-xr`` rule and its
  SEG, SR and SC arrive in the source study, each passing the conformance
  gate with dciodvfy (0 errors);
* a DX "For Processing" copy (its own study) is refused by the pipeline: the
  PACS receives the failure SR and the summary page stating the reason, never
  "no findings".
"""

from __future__ import annotations

import copy
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import yaml
from pydicom.uid import generate_uid

from cad_node.config import chest_xr_rule
from cad_node.imaging.radiograph import DX_FOR_PROCESSING_SOP_CLASS
from cad_node.jobs.states import JobState
from tests.conftest import STORESCU, require_data, require_program
from tests.system.conftest import OrthancServer
from tests.system.test_e2e import _DONE, Node, _results_in_pacs, _study_uid

pytestmark = pytest.mark.slow

OBJECTS = ("sr", "seg", "sc")


@pytest.fixture(scope="module")
def cxr_node(orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("cxr-node"), orthanc.dicom_port)
    cfg = yaml.safe_load(n.config.read_text())
    cfg["routing"] = {"rules": [chest_xr_rule().model_dump(mode="json")]}
    cfg["destinations"][0]["objects"] = list(OBJECTS)
    n.config.write_text(yaml.safe_dump(cfg))
    with n.running():
        yield n


@pytest.fixture(scope="module")
def cr_file() -> Path:
    (path,) = sorted(require_data("cxr-dicom-siim").glob("*.dcm"))
    return path


def _send(node: Node, files: list[Path]) -> None:
    """storescu proposing JPEG baseline (``-xy``), the real CR's transfer syntax."""
    exe = require_program(STORESCU)
    proc = subprocess.run([exe, "-xy", "-aet", "MODALITY", "-aec", "CADNODE", "127.0.0.1",
                           str(node.port), *map(str, files)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _series_modality(orthanc: OrthancServer, instance: dict[str, object]) -> str:
    series = orthanc.get(f"/series/{instance['ParentSeries']}")
    return str(series["MainDicomTags"].get("Modality", ""))


def _fetch(orthanc: OrthancServer, results: list[dict[str, object]], tmp: Path
           ) -> list[pydicom.Dataset]:
    out = []
    for r in results:
        path = tmp / f"{r['ID']}.dcm"
        path.write_bytes(orthanc.instance_file(str(r["ID"])))
        out.append(pydicom.dcmread(path))
    return out


def test_real_cr_seg_sr_sc_arrive_in_source_study(
    cxr_node: Node, cr_file: Path, orthanc: OrthancServer, tmp_path: Path
) -> None:
    from cad_node.results import validate

    _send(cxr_node, [cr_file])
    study_uid = _study_uid([cr_file])
    job = cxr_node.wait_job(study_uid, _DONE, timeout=600)
    assert job.state is JobState.SENT, job.error
    source = pydicom.dcmread(cr_file)
    results = _results_in_pacs(orthanc, study_uid, {str(source.SOPInstanceUID)})
    series_modalities = {_series_modality(orthanc, r) for r in results}
    assert {"SEG", "SR"} <= series_modalities and len(series_modalities) == 3, series_modalities
    datasets = _fetch(orthanc, results, tmp_path)
    kinds = sorted(str(d.Modality) for d in datasets)
    assert kinds.count("SEG") == 1 and kinds.count("SR") == 1 and len(datasets) >= 3, kinds
    for ds in datasets:
        assert ds.StudyInstanceUID == study_uid
        report = validate(ds, [source], others=datasets, use_dciodvfy=True)
        assert report.ok, (ds.Modality, report.errors)
    seg = next(d for d in datasets if d.Modality == "SEG")
    labels = [s.SegmentLabel for s in seg.SegmentSequence]
    assert labels == ["Right lung", "Left lung", "Heart"]
    assert int(seg.NumberOfFrames) == 3  # one frame per segment on the one radiograph
    sr = next(d for d in datasets if d.Modality == "SR")
    text = str(sr)
    assert "Cardiothoracic ratio" in text and "Area" in text


def test_dx_for_processing_refused_with_failure_sr(
    cxr_node: Node, cr_file: Path, orthanc: OrthancServer, tmp_path: Path
) -> None:
    ds = pydicom.dcmread(cr_file)
    twin = copy.deepcopy(ds)
    twin.StudyInstanceUID = generate_uid(entropy_srcs=["dx-proc-study", ds.StudyInstanceUID])
    twin.SeriesInstanceUID = generate_uid(entropy_srcs=["dx-proc-series", ds.SeriesInstanceUID])
    twin.SOPInstanceUID = generate_uid(entropy_srcs=["dx-proc-sop", ds.SOPInstanceUID])
    twin.file_meta.MediaStorageSOPInstanceUID = twin.SOPInstanceUID
    twin.SOPClassUID = DX_FOR_PROCESSING_SOP_CLASS
    twin.file_meta.MediaStorageSOPClassUID = DX_FOR_PROCESSING_SOP_CLASS
    twin.Modality = "DX"
    twin.PresentationIntentType = "FOR PROCESSING"
    path = tmp_path / "dx_for_processing.dcm"
    twin.save_as(path, enforce_file_format=True)
    _send(cxr_node, [path])
    job = cxr_node.wait_job(str(twin.StudyInstanceUID), _DONE, timeout=600)
    assert job.state is JobState.SENT, job.error
    results = _results_in_pacs(orthanc, str(twin.StudyInstanceUID), {str(twin.SOPInstanceUID)})
    datasets = _fetch(orthanc, results, tmp_path)
    assert sorted(str(d.Modality) for d in datasets)[-1] == "SR"
    sr = next(d for d in datasets if d.Modality == "SR")
    assert "For Processing" in str(sr) and "No algorithms succeeded" in str(sr)
    assert not any(d.Modality == "SEG" for d in datasets)
    assert len(datasets) == 2  # SR + summary page
