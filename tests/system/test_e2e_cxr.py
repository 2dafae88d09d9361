"""End to end for chest radiographs: dcmtk storescu -> cad-node serve -> Orthanc.

* the real SIIM CR (JPEG baseline) is routed by the ``chest-xr`` rule and its
  SEG, SR, SC, GSPS and Parametric Map arrive in the source study, each
  passing the conformance gate with dciodvfy (0 errors); part 2 (issue #12):
  the SR holds the image-level abnormal probability and decision, the boxes
  (planar ROIs, also drawn on the SC key images and in the GSPS), the SC
  heatmap overlay and the Parametric Map arrive, the heatmap is zero outside
  the SEG's lungs; with no ``cxr-tb`` bundle the SR says TB screening is not
  installed and has no TB number, and once a test bundle is installed a
  second study's SR carries the TB probability;
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
from tests.conftest import REPO_ROOT, STORESCU, require_data, require_program
from tests.system.conftest import OrthancServer
from tests.system.test_e2e import _DONE, Node, _results_in_pacs, _study_uid

pytestmark = pytest.mark.slow

OBJECTS = ("sr", "seg", "sc", "gsps", "pm")
#: Bundles of the repository the node uses (a models folder of links, so a
#: test can install the test ``cxr-tb`` bundle beside them).
REPO_BUNDLES = ("cxr-lungs", "cxr-abnormal")


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cxr-models")
    for name in REPO_BUNDLES:
        if (REPO_ROOT / "models" / name).is_dir():
            (out / name).symlink_to(REPO_ROOT / "models" / name)
    return out


@pytest.fixture(scope="module")
def cxr_node(orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory,
             models_dir: Path) -> Iterator[Node]:
    n = Node(tmp_path_factory.mktemp("cxr-node"), orthanc.dicom_port)
    cfg = yaml.safe_load(n.config.read_text())
    cfg["routing"] = {"rules": [chest_xr_rule().model_dump(mode="json")]}
    cfg["destinations"][0]["objects"] = list(OBJECTS)
    cfg["models"] = {"dir": str(models_dir)}
    n.config.write_text(yaml.safe_dump(cfg))
    n.start()
    try:
        yield n
    finally:
        n.stop()


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
    assert series_modalities == {"SEG", "SR", "OT", "PR"}, series_modalities
    datasets = _fetch(orthanc, results, tmp_path)
    kinds = sorted(str(d.Modality) for d in datasets)
    assert kinds.count("SEG") == 1 and kinds.count("SR") == 1 and len(datasets) >= 5, kinds
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
    _check_part2(datasets, seg, sr)


def _items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    out = []
    for item in ds.get("ContentSequence", []):
        out.append(item)
        out += _items(item)
    return out


def _whole_image_group(sr: pydicom.Dataset, meaning: str) -> dict[str, object] | None:
    """NUMs and the decision of the TID 1501 group ``"<meaning> (whole image)"``."""
    for group in _items(sr):
        children = list(group.get("ContentSequence", []))
        ids = [c.TextValue for c in children if c.ValueType == "TEXT"
               and c.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier"]
        if ids != [f"{meaning} (whole image)"]:
            continue
        nums = {c.ConceptNameCodeSequence[0].CodeMeaning:
                float(c.MeasuredValueSequence[0].NumericValue)
                for c in children if c.ValueType == "NUM"}
        decision = [c.ConceptCodeSequence[0].CodeMeaning for c in children
                    if c.ValueType == "CODE"
                    and c.ConceptNameCodeSequence[0].CodeMeaning == meaning]
        return {"nums": nums, "decision": decision}
    return None


def _check_part2(datasets: list[pydicom.Dataset], seg: pydicom.Dataset,
                 sr: pydicom.Dataset) -> None:
    """Issue #12 on the real CR: probability, decision, boxes, heatmap SC, PM, no TB."""
    import numpy as np

    group = _whole_image_group(sr, "Abnormal")
    assert group is not None, "no image-level abnormal group in the SR"
    nums = group["nums"]
    assert isinstance(nums, dict) and {"Certainty of Finding", "Operating threshold"} <= set(nums)
    p, t = nums["Certainty of Finding"], nums["Operating threshold"]
    assert 0.0 <= p <= 1.0 and 0.0 < t < 1.0
    assert group["decision"] == (["Present"] if p >= t else ["Absent"])
    texts = [str(i.TextValue) for i in _items(sr) if i.ValueType == "TEXT"]
    assert any("TB screening not installed" in x for x in texts), texts
    assert _whole_image_group(sr, "Tuberculosis") is None
    assert p >= t, f"the real CR is below the operating point (p={p}, t={t}): no boxes/heatmap"
    # boxes: planar ROIs (SCOORD POLYLINE, 5 points) with a probability, type Abnormal/Nodule
    boxes = [i for i in _items(sr) if i.ValueType == "SCOORD" and len(i.GraphicData) == 10]
    assert boxes, "no box in the SR"
    sc = [d for d in datasets if d.Modality == "OT" and "SourceImageSequence" in d
          and "Parametric" not in str(d.SOPClassUID.name)]
    described = " ".join(str(d.get("DerivationDescription", "")) for d in sc)
    assert "attribution heatmap" in described and ("Abnormal 1" in described
                                                   or "Nodule 1" in described), described
    gsps = next(d for d in datasets if d.Modality == "PR")
    layers = [str(g.GraphicLayerDescription) for g in gsps.GraphicLayerSequence]
    assert any("Abnormal 1" in x or "Nodule 1" in x for x in layers), layers
    pm = next(d for d in datasets if str(d.SOPClassUID) == "1.2.840.10008.5.1.4.1.1.30")
    heat = np.asarray(pm.pixel_array, dtype=np.float32).reshape(int(pm.Rows), int(pm.Columns))
    lungs = seg.pixel_array[0].astype(bool) | seg.pixel_array[1].astype(bool)
    assert heat.max() == pytest.approx(1.0) and heat.min() >= 0.0
    assert float(heat[~lungs].max()) == 0.0  # the heatmap lies inside the lungs


def test_tb_probability_once_a_bundle_is_installed(
    cxr_node: Node, cr_file: Path, orthanc: OrthancServer, tmp_path: Path, models_dir: Path
) -> None:
    from tests.tb_bundle import make_tb_bundle

    make_tb_bundle(tmp_path / "tb", models_dir, cases=32, epochs=2)
    ds = pydicom.dcmread(cr_file)
    twin = copy.deepcopy(ds)
    twin.StudyInstanceUID = generate_uid(entropy_srcs=["tb-study", ds.StudyInstanceUID])
    twin.SeriesInstanceUID = generate_uid(entropy_srcs=["tb-series", ds.SeriesInstanceUID])
    twin.SOPInstanceUID = generate_uid(entropy_srcs=["tb-sop", ds.SOPInstanceUID])
    twin.file_meta.MediaStorageSOPInstanceUID = twin.SOPInstanceUID
    path = tmp_path / "tb_twin.dcm"
    twin.save_as(path, enforce_file_format=True)
    _send(cxr_node, [path])
    job = cxr_node.wait_job(str(twin.StudyInstanceUID), _DONE, timeout=600)
    assert job.state is JobState.SENT, job.error
    results = _results_in_pacs(orthanc, str(twin.StudyInstanceUID), {str(twin.SOPInstanceUID)})
    datasets = _fetch(orthanc, results, tmp_path)
    sr = next(d for d in datasets if d.Modality == "SR")
    group = _whole_image_group(sr, "Tuberculosis")
    assert group is not None, "no TB group in the SR"
    nums = group["nums"]
    assert isinstance(nums, dict) and 0.0 <= nums["Certainty of Finding"] <= 1.0
    texts = [str(i.TextValue) for i in _items(sr) if i.ValueType == "TEXT"]
    assert not any("TB screening not installed" in x for x in texts)
    assert any(x.startswith("Tuberculosis probability") for x in texts), texts
    from cad_node.results import validate

    report = validate(sr, [twin], others=datasets, use_dciodvfy=True)
    assert report.ok, report.errors


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
