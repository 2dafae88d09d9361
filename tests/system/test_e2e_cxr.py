"""End to end for chest radiographs: dcmtk storescu -> cad-node serve -> Orthanc.

The node runs the routing rules shipped in ``config/cad-node.yaml``
(``[chest-ct, chest-xr]``: built-in rules by name).

* the real SIIM CR (JPEG baseline) is routed by the ``chest-xr`` rule and its
  SEG, SR, SC, GSPS and Parametric Map arrive in the source study, each
  passing the conformance gate with dciodvfy (0 errors); part 2 (issue #12):
  the SR holds the image-level abnormal probability and decision, the boxes
  (planar ROIs, also drawn on the SC key images and in the GSPS), the SC
  heatmap overlay and the Parametric Map arrive, the heatmap is zero outside
  the SEG's lungs; with no ``cxr-tb`` bundle the SR says TB screening is not
  installed and has no TB number, and once a test bundle is installed a
  second study's SR carries the TB probability;
* four copies of it relabelled as what the pipeline must refuse (a lateral,
  DX "For Processing", a knee, and the image area-downsampled to 64x64), each
  its own study, sent in one storescu run: every one is routed (chest-xr takes
  every CR/DX), and the PACS receives, in the source study, the failure SR
  stating the reason ("No algorithms succeeded", never "no findings") and the
  summary page, both at 0 dciodvfy errors, and no SEG; the job (status page)
  carries the same reason.
"""

from __future__ import annotations

import copy
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cad_node.imaging.radiograph import DX_FOR_PROCESSING_SOP_CLASS
from cad_node.jobs.states import JobState
from cad_node.jobs.store import Job
from tests.conftest import REPO_ROOT, STORESCU, require_data, require_program
from tests.system.conftest import OrthancServer
from tests.system.test_e2e import _DONE, Node, _results_in_pacs, _study_uid

pytestmark = pytest.mark.slow

OBJECTS = ("sr", "seg", "sc", "gsps", "pm")
#: Bundles of the repository the node uses (a models folder of links, so a
#: test can install the test ``cxr-tb`` bundle beside them).
REPO_BUNDLES = ("cxr-lungs", "cxr-abnormal")
REPO = Path(__file__).resolve().parents[2]


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
    shipped = yaml.safe_load((REPO / "config" / "cad-node.yaml").read_text())
    cfg["routing"] = {"rules": shipped["routing"]["rules"]}  # [chest-ct, chest-xr]
    cfg["destinations"][0]["objects"] = list(OBJECTS)
    cfg["models"] = {"dir": str(models_dir)}
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


def _sr_texts(items: pydicom.Sequence) -> list[str]:
    """TEXT values and code meanings of an SR content tree, depth first."""
    out: list[str] = []
    for it in items:
        value = it.get("TextValue")
        if value is not None:
            out.append(value if isinstance(value, str) else "\\".join(map(str, value)))
        for code in it.get("ConceptCodeSequence", []):
            out.append(str(code.CodeMeaning))
        out += _sr_texts(it.get("ContentSequence", []))
    return out


def _relabelled(ds: pydicom.Dataset, case: str) -> pydicom.Dataset:
    """A copy of the real CR in a study of its own, with new UIDs."""
    twin = copy.deepcopy(ds)
    for keyword, tag in (("StudyInstanceUID", "study"), ("SeriesInstanceUID", "series"),
                         ("SOPInstanceUID", "sop")):
        setattr(twin, keyword, generate_uid(entropy_srcs=[f"refuse-{case}-{tag}",
                                                          str(ds.get(keyword))]))
    twin.file_meta.MediaStorageSOPInstanceUID = twin.SOPInstanceUID
    twin.AccessionNumber = f"REFUSE{len(case)}"
    twin.StudyDescription = f"CR chest (test: real SIIM CR relabelled: {case})"
    return twin


def _lateral(ds: pydicom.Dataset) -> pydicom.Dataset:
    twin = _relabelled(ds, "lateral")
    twin.ViewPosition = "LL"
    return twin


def _dx_for_processing(ds: pydicom.Dataset) -> pydicom.Dataset:
    twin = _relabelled(ds, "dx-for-processing")
    twin.SOPClassUID = DX_FOR_PROCESSING_SOP_CLASS
    twin.file_meta.MediaStorageSOPClassUID = DX_FOR_PROCESSING_SOP_CLASS
    twin.Modality = "DX"
    twin.PresentationIntentType = "FOR PROCESSING"
    return twin


def _knee(ds: pydicom.Dataset) -> pydicom.Dataset:
    twin = _relabelled(ds, "knee")
    twin.BodyPartExamined = "KNEE"
    return twin


def _tiny(ds: pydicom.Dataset) -> pydicom.Dataset:
    """The real pixels area-downsampled 16x to 64x64, stored uncompressed."""
    twin = _relabelled(ds, "64x64")
    pixels = ds.pixel_array.astype(np.float64)
    f = pixels.shape[0] // 64
    small = pixels[:64 * f, :64 * f].reshape(64, f, 64, f).mean(axis=(1, 3))
    twin.PixelData = np.rint(small).astype(ds.pixel_array.dtype).tobytes()
    twin.Rows = twin.Columns = 64
    twin.PixelSpacing = [float(v) * f for v in ds.PixelSpacing]
    twin.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return twin


#: case -> (how it is made from the real CR, words of the reason the SR must state)
REFUSALS = {
    "lateral": (_lateral, "View Position LL is not a frontal (PA or AP) chest radiograph"),
    "dx-for-processing": (_dx_for_processing, "DX 'For Processing' image"),
    "knee": (_knee, "Body Part Examined KNEE is not a chest"),
    "64x64": (_tiny, "image of 64x64 pixels is too small"),
}


@pytest.fixture(scope="module")
def refused(cxr_node: Node, cr_file: Path, tmp_path_factory: pytest.TempPathFactory
            ) -> dict[str, tuple[pydicom.Dataset, Job, float]]:
    """The four refusal studies sent in one storescu run: case -> (dataset, job, seconds)."""
    out_dir = tmp_path_factory.mktemp("refusals")
    source = pydicom.dcmread(cr_file)
    made: dict[str, pydicom.Dataset] = {}
    paths = []
    for case, (make, _) in REFUSALS.items():
        made[case] = make(source)
        paths.append(out_dir / f"{case}.dcm")
        made[case].save_as(paths[-1], enforce_file_format=True)
    t0 = time.monotonic()
    _send(cxr_node, paths)
    done = {case: cxr_node.wait_job(str(ds.StudyInstanceUID), _DONE, timeout=300)
            for case, ds in made.items()}
    elapsed = time.monotonic() - t0
    return {case: (made[case], done[case], elapsed) for case in made}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusal_reaches_the_pacs_as_a_failure_sr_with_its_reason(
    case: str, refused: dict[str, tuple[pydicom.Dataset, Job, float]], cxr_node: Node,
    orthanc: OrthancServer, tmp_path: Path,
) -> None:
    from cad_node.results import validate
    from cad_node.web.app import study_timeline

    ds, job, _ = refused[case]
    reason = REFUSALS[case][1]
    assert job.state is JobState.SENT, job.error
    # the status page's data: the job's error names the reason at the "analysed" stage
    assert job.error is not None and reason in job.error and "not routed" not in job.error
    stages = {s["stage"]: s for s in study_timeline(job, cxr_node.store, cxr_node.settings)}
    assert reason in str(stages["analysed"]["error"])
    study_uid = str(ds.StudyInstanceUID)
    results = _results_in_pacs(orthanc, study_uid, {str(ds.SOPInstanceUID)})
    datasets = _fetch(orthanc, results, tmp_path)
    assert len(datasets) == 2 and sum(d.Modality == "SR" for d in datasets) == 1, (
        "a failure SR and the summary page (SC), nothing else: "
        + str(sorted(str(d.Modality) for d in datasets)))
    sr = next(d for d in datasets if d.Modality == "SR")
    summary = next(d for d in datasets if d.Modality != "SR")
    text = " | ".join(_sr_texts(sr.ContentSequence))
    assert reason in text and "No algorithms succeeded" in text, text
    assert "No findings" not in text
    assert summary.DerivationDescription == "CAD summary page"
    assert str(summary.SOPClassUID).startswith("1.2.840.10008.5.1.4.1.1.7")
    for out in datasets:
        assert out.StudyInstanceUID == study_uid
        report = validate(out, [ds], others=datasets, use_dciodvfy=True)
        assert report.ok, (case, out.Modality, report.errors)
