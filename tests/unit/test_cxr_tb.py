"""TB head: loaders of the public layouts, and train -> export -> load -> infer on phantoms.

The generated set (:func:`trainer.cxr_synthetic.write_labelled_set`) has
upper-zone opacities on its TB-labelled phantoms; a few epochs at 64 pixels
must separate them on the held-out test split, the bundle must load through
the node's :func:`cad_node.pipelines.cxr.tb.load_tb_model`, and its
probabilities must rank unseen positives above unseen negatives.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cad_node.pipelines.cxr.tb import TB_BUNDLE, load_tb_model
from cad_node.results.findings import FindingType
from tests.tb_bundle import make_tb_bundle
from trainer.cxr_synthetic import make_radiograph
from trainer.cxr_tb import TrainingError, read_clinical_readings, read_tbx11k, reading_label

# The reading formats of the NLM sets (Jaeger 2014): Montgomery, then Shenzhen.
MONTGOMERY_NORMAL = "Patient's Sex: F\nPatient's Age: 045Y\n\nnormal\n"
MONTGOMERY_TB = "Patient's Sex: M\nPatient's Age: 052Y\n\nbilateral PTB, right upper lobe cavity\n"
SHENZHEN_NORMAL = "male 35yrs\nnormal\n"
SHENZHEN_TB = "female 37yrs\nSTB,ATB in the right upper field\n"


@pytest.mark.parametrize(("text", "label"), [
    (MONTGOMERY_NORMAL, 0), (MONTGOMERY_TB, 1), (SHENZHEN_NORMAL, 0), (SHENZHEN_TB, 1),
    ("male 40yrs\nNormal.\n", 0),
])
def test_reading_labels(text: str, label: int) -> None:
    assert reading_label(text, Path("x.txt"))[0] == label


def test_reading_without_finding_names_the_file() -> None:
    with pytest.raises(TrainingError, match=r"CHNCXR_0001_0\.txt"):
        reading_label("male 35yrs\n", Path("CHNCXR_0001_0.txt"))


def _png(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(path)


def test_shenzhen_layout_and_contradiction(tmp_path: Path) -> None:
    for name, text in (("CHNCXR_0001_0", SHENZHEN_NORMAL), ("CHNCXR_0327_1", SHENZHEN_TB)):
        _png(tmp_path / "CXR_png" / f"{name}.png")
        (tmp_path / "ClinicalReadings").mkdir(exist_ok=True)
        (tmp_path / "ClinicalReadings" / f"{name}.txt").write_text(text)
    cases = read_clinical_readings(tmp_path)
    assert [(c.name, c.label) for c in cases] == [("CHNCXR_0001_0", 0), ("CHNCXR_0327_1", 1)]
    (tmp_path / "ClinicalReadings" / "CHNCXR_0001_0.txt").write_text(SHENZHEN_TB)
    with pytest.raises(TrainingError, match="contradicts"):
        read_clinical_readings(tmp_path)


def test_tbx11k_coco(tmp_path: Path) -> None:
    _png(tmp_path / "imgs" / "tb" / "tb0003.png")
    _png(tmp_path / "imgs" / "health" / "h0001.png")
    coco = {"images": [{"id": 1, "file_name": "tb0003.png"}, {"id": 2, "file_name": "h0001.png"}],
            "annotations": [{"image_id": 1, "category_id": 1, "bbox": [10, 20, 30, 40]}],
            "categories": [{"id": 1, "name": "ActiveTuberculosis"}]}
    ann = tmp_path / "annotations" / "json" / "TBX11K_train.json"
    ann.parent.mkdir(parents=True)
    ann.write_text(json.dumps(coco))
    cases = read_tbx11k(tmp_path, ann)
    assert [(c.name, c.label, c.boxes) for c in cases] == [
        ("tb0003", 1, ((10.0, 20.0, 30.0, 40.0),)), ("h0001", 0, ())]


@pytest.fixture(scope="module")
def tb_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tb")
    return make_tb_bundle(root, root / "models")


def test_train_export_load_infer(tb_bundle: Path) -> None:
    manifest = json.loads((tb_bundle / "manifest.json").read_text())
    assert manifest["metrics"]["test_auc"] >= 0.8, manifest["metrics"]
    assert 0 < manifest["output"]["operating_threshold"] < 1
    assert "validation" in manifest["output"]["operating_rule"]
    model = load_tb_model(tb_bundle.parent.parent)
    assert model is not None and model.size == 64
    rng = np.random.default_rng(99)
    probs = {}
    for label in (0, 1):
        ph = make_radiograph(rng, 64, lesions=2 * label, upper=True)
        c = model.classify(ph.image, ph.right_lung | ph.left_lung)
        assert c.finding_type is FindingType.TUBERCULOSIS and c.model.name == TB_BUNDLE
        assert c.threshold == manifest["output"]["operating_threshold"]
        probs[label] = c.probability
    assert probs[1] > probs[0], probs


def test_no_bundle_means_none(tmp_path: Path) -> None:
    assert load_tb_model(tmp_path) is None
