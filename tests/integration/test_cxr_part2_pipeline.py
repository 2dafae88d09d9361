"""The ``cxr`` pipeline's part 2 on the real SIIM CR: classification, boxes, heatmap, PM, TB.

The abnormality bundle here is a *wiring* bundle: the ``cxr-abnormal``
architecture with the shipped ``cxr-lungs`` encoder and untrained heads,
exported by :func:`trainer.export.write_bundle` with operating threshold 0
(every image is "abnormal"), so the test exercises the code path from the
bundle to the objects without depending on a trained model's verdict.  It
claims nothing about accuracy (the shipped bundle's figures are in its card).
The TB bundle is the phantom-trained test bundle (:mod:`tests.tb_bundle`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset

from cad_node.config import ResultsConfig
from cad_node.pipelines import load_input
from cad_node.pipelines.cxr.pipeline import CxrPipeline
from cad_node.results import build_results, validate
from cad_node.results.findings import AnalysisResult, AnalysisStatus, FindingSite, FindingType
from tests.conftest import REPO_ROOT, require_data

SETTINGS = ResultsConfig(use_dciodvfy=True)


def _wiring_models(out: Path, *, flat_patch_head: bool = False) -> Path:
    """A models folder: the shipped cxr-lungs and an untrained-heads cxr-abnormal.

    ``flat_patch_head`` zeroes the patch head's input layer, so the max-patch logit
    (the one the heatmap explains) is the same for every input.
    """
    import torch

    from cad_node.models.bundle import load_bundle
    from cad_node.models.network import build_network
    from cad_node.pipelines.cxr.abnormal_net import down_path
    from trainer.export import write_bundle

    torch.manual_seed(0)
    (out / "cxr-lungs").symlink_to(REPO_ROOT / "models" / "cxr-lungs")
    lungs = load_bundle("cxr-lungs", out)
    arch = {"builder": "cxr-abnormal", "scales": [[48.0, 48.0], [96.0, 96.0]],
            "encoder": dict(lungs.manifest.architecture), "width": 16, "projection": 64,
            "image_rule": "max", "dropout": 0.0}
    net = build_network(arch)
    net.encoder.load_state_dict(  # type: ignore[union-attr]
        torch.nn.ModuleList(down_path(lungs.build_network("cpu"))).state_dict())
    if flat_patch_head:
        with torch.no_grad():
            net.patch_in.weight.zero_()  # type: ignore[union-attr,operator]
            net.patch_in.bias.zero_()  # type: ignore[union-attr,operator]
    write_bundle(out, name="cxr-abnormal", version="0.0.1", state_dict=net.state_dict(),
                 task="wiring test", architecture=arch,
                 input_spec={"kind": "radiograph", "size": 256, "normalisation": "histeq",
                             "labels": ["abnormal"]},
                 training_data={"description": "none: untrained heads (wiring test)"},
                 metrics={"operating_point": {"normal_recall_validation": 0.0,
                                              "box_threshold": 0.0}},
                 output_spec={"kind": "logit", "positive_class": "abnormal", "threshold": 0.0,
                              "operating_threshold": 0.0,
                              "operating_rule": "threshold 0 (wiring test)"})
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _wiring_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def cr() -> Dataset:
    (path,) = sorted(require_data("cxr-dicom-siim").glob("*.dcm"))
    return pydicom.dcmread(path)


@pytest.fixture(scope="module")
def analysed(models: Path, cr: Dataset) -> AnalysisResult:
    return CxrPipeline(models).run(load_input("cxr", [cr]))


def test_part2_on_the_real_cr(analysed: AnalysisResult, cr: Dataset) -> None:
    result = analysed
    assert result.status is AnalysisStatus.COMPLETED, result.failure_reason
    (abnormal,) = result.classifications
    assert abnormal.finding_type is FindingType.ABNORMAL and abnormal.positive
    assert abnormal.model.name == "cxr-abnormal" and abnormal.threshold == 0.0
    assert result.measurements["abnormal_probability"] == round(abnormal.probability, 4)
    boxes = [f for f in result.findings if f.finding_type is FindingType.ABNORMAL]
    assert boxes and all(f.region is not None and f.region.kind == "box" for f in boxes)
    assert all(f.site in (FindingSite.RIGHT_LUNG, FindingSite.LEFT_LUNG, FindingSite.LUNG)
               for f in boxes)
    assert any("TB screening not installed" in n for n in result.notes)
    # the heatmap lies inside the lungs, on the stored pixels
    heat = result.attribution
    assert heat is not None and heat.sop_instance_uids == (str(cr.SOPInstanceUID),)
    lungs = (np.asarray(result.organ_masks[FindingSite.RIGHT_LUNG].array[0], bool)
             | np.asarray(result.organ_masks[FindingSite.LEFT_LUNG].array[0], bool))
    frame = np.asarray(heat.array[0])
    assert frame.shape == lungs.shape and float(frame.max()) == pytest.approx(1.0)
    assert float(frame[~lungs].max()) == 0.0
    assert "Integrated Gradients" in str(result.attribution_method)
    # its maximum lies inside the top finding's box (the heatmap explains that
    # finding's own patch score), on the stored pixels
    region = boxes[0].region
    assert region is not None
    (x0, y0), (x1, y1) = region.points
    r, c = np.unravel_index(int(np.argmax(frame)), frame.shape)
    assert x0 <= c <= x1 and y0 <= r <= y1, ((r, c), region.points)
    objs = build_results(result, [cr], settings=SETTINGS,
                         objects=("sr", "seg", "sc", "gsps", "pm"))
    kinds = [str(o.kind) for o in objs]
    assert kinds.count("pm") == 1 and kinds.count("gsps") == 1
    roles = [o.role for o in objs if str(o.kind) == "sc"]
    assert "key image Attribution heatmap" in roles and "key image Abnormal 1" in roles
    for o in objs:
        report = validate(o, [cr], others=objs, use_dciodvfy=True)
        assert report.ok, (o.kind, o.role, report.errors)


def test_tb_probability_with_a_bundle(models: Path, cr: Dataset, tmp_path: Path) -> None:
    from tests.tb_bundle import make_tb_bundle

    make_tb_bundle(tmp_path, models, cases=32, epochs=2, version="0.0.2")
    result = CxrPipeline(models).run(load_input("cxr", [cr]))
    assert result.status is AnalysisStatus.COMPLETED, result.failure_reason
    types = [c.finding_type for c in result.classifications]
    assert types == [FindingType.ABNORMAL, FindingType.TUBERCULOSIS], result.notes
    tb = result.classifications[1]
    assert 0.0 <= tb.probability <= 1.0 and tb.model.name == "cxr-tb"
    assert not any("TB screening not installed" in n for n in result.notes)


def test_no_positive_attribution_sends_no_heatmap(cr: Dataset, tmp_path: Path) -> None:
    """A max-patch logit that no pixel moves gives an all-zero attribution: the
    pipeline then makes no heatmap (no SC overlay, no Parametric Map) and says why,
    rather than sending an empty map."""
    models = _wiring_models(tmp_path, flat_patch_head=True)
    result = CxrPipeline(models).run(load_input("cxr", [cr]))
    assert result.status is AnalysisStatus.COMPLETED, result.failure_reason
    (abnormal,) = result.classifications
    assert abnormal.positive  # above the operating point, so attribution was attempted
    assert result.attribution is None
    assert any("found no evidence for 'abnormal' inside the lungs" in n for n in result.notes)
    objs = build_results(result, [cr], settings=SETTINGS,
                         objects=("sr", "seg", "sc", "gsps", "pm"))
    kinds = [str(o.kind) for o in objs]
    assert "pm" not in kinds and "sr" in kinds
    assert "key image Attribution heatmap" not in [o.role for o in objs]
    for o in objs:
        report = validate(o, [cr], others=objs, use_dciodvfy=True)
        assert report.ok, (o.kind, o.role, report.errors)
