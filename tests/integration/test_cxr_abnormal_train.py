"""cad-train train cxr-abnormal -> bundle -> load -> infer, on a tiny generated set (issue #12).

The radiographs are generated here (grey noise; "abnormal" images get a bright
disc); the encoder is the repository's shipped ``cxr-lungs`` bundle.  Nothing
in ``shared/data`` is needed.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
LUNGS = REPO / "models" / "cxr-lungs" / "1.0.0"


def _image(rng: np.random.Generator, disc: tuple[int, int, int] | None) -> np.ndarray:
    img = rng.normal(100, 20, (256, 256))
    yy, xx = np.mgrid[:256, :256]
    img += 60 * np.exp(-(((xx - 128) / 70.0) ** 2 + ((yy - 128) / 90.0) ** 2))
    if disc is not None:
        x, y, r = disc
        img[(xx - x) ** 2 + (yy - y) ** 2 <= r * r] += 80
    return np.clip(img, 0, 255).astype(np.uint8)


def _write_set(root: Path) -> dict[str, list[str]]:
    rng = np.random.default_rng(0)
    (root / "nih").mkdir(parents=True)
    (root / "jsrt" / "images").mkdir(parents=True)
    folds: list[list[str]] = [[] for _ in range(5)]
    with (root / "entries.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "Finding Labels"])
        for i in range(10):
            name = f"n{i}.png"
            abnormal = i % 2 == 1
            Image.fromarray(_image(rng, (90, 100, 14) if abnormal else None)).save(
                root / "nih" / name)
            w.writerow([name, "Mass" if abnormal else "No Finding"])
            folds[i // 2].append(name)
    with (root / "boxes.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", "Finding Label", "Bbox [x,y,w,h]"])
        w.writerow(["n1.png", "Mass", 76, 86, 28, 28])
    with (root / "jsrt" / "cases.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image", "label", "size_mm", "x", "y"])
        for i in range(10):
            name = f"j{i}.png"
            nodule = i % 2 == 1
            Image.fromarray(_image(rng, (170, 110, 10) if nodule else None)).save(
                root / "jsrt" / "images" / name)
            w.writerow([name, "nodule" if nodule else "normal", 14 if nodule else "",
                        170 if nodule else "", 110 if nodule else ""])
            folds[i // 2].append(name)
    return {"assignment": folds}


@pytest.mark.skipif(not LUNGS.is_dir(), reason="models/cxr-lungs/1.0.0 not in the checkout")
def test_train_export_load_infer(tmp_path: Path) -> None:
    from cad_node.pipelines.cxr.abnormal import load_abnormal_model
    from trainer.cli import app
    from trainer.cxr_abnormal_train import train_command

    torch.set_num_threads(1)
    folds = _write_set(tmp_path / "data")
    d = tmp_path / "data"
    cfg = {
        "model": "cxr-abnormal", "seed": 3, "lungs_bundle": str(LUNGS),
        "bundle": {"name": "cxr-abnormal", "version": "0.0.1"},
        "data": {"nih_images": str(d / "nih"), "nih_entries": str(d / "entries.csv"),
                 "nih_boxes": str(d / "boxes.csv"), "nih_box_scale": 1.0,
                 "jsrt": str(d / "jsrt"), "jsrt_pixel_mm": 1.0,
                 "description": "generated", "terms": "none"},
        "folds": {"k": 5, "validation_fold": 4, **folds},
        "scales": {"count": 2},
        "train": {"epochs": 2, "batch_size": 4, "threads": 1, "width": 8, "projection": 8},
        "bootstrap": 100,
    }
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump(cfg))
    models = tmp_path / "models"
    bundle_dir = train_command(config, tmp_path / "run", models)
    assert bundle_dir == models / "cxr-abnormal" / "0.0.1"
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    op = manifest["metrics"]["operating_point"]
    assert manifest["output"]["operating_threshold"] == op["threshold"]
    assert 0.0 <= op["normal_recall_validation"] <= 1.0
    # 99% sensitivity on a validation fold with 2 abnormals: both at or above the threshold
    assert op["sensitivity_validation"] == 1.0
    cv = manifest["metrics"]["cross_validation"]
    assert cv["image_rule_chosen_on_validation"] in ("max", "whole", "fusion")
    assert cv["nih_max"]["n"] == 10
    assert len(cv["localisation"]["jsrt_froc"]["sensitivity"]) == 5
    card = (bundle_dir / "MODEL_CARD.md").read_text()
    assert "Not for diagnostic use" in card and "far less than" in card

    model = load_abnormal_model(models, version="0.0.1")
    assert model.threshold == op["threshold"]
    img = np.asarray(Image.open(d / "nih" / "n1.png"), np.float32) / 255.0
    lungs = np.zeros(img.shape, bool)
    lungs[40:220, 30:230] = True
    res = model.analyse(img, lungs)
    assert 0.0 <= res.probability <= 1.0
    assert res.abnormal == (res.probability >= res.threshold)
    assert res.model.device_uid == manifest["device_uid"]
    for b in res.boxes:  # inside the lungs' bounding box
        assert 30 <= b.x0 < b.x1 <= 230 and 40 <= b.y0 < b.y1 <= 220
    # the module captum runs on gives the same probability
    x = model.preprocess(img)
    with torch.no_grad():
        logit = model.net(x, model.lung_grid(lungs, img.shape))
    assert float(torch.sigmoid(logit)[0]) == pytest.approx(res.probability, abs=1e-6)

    out = CliRunner().invoke(app, ["evaluate", "cxr-abnormal", str(bundle_dir)])
    assert out.exit_code == 0, out.output
    assert "NIH CV" in out.output and "JSRT FROC" in out.output
