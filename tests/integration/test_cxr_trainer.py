"""``cad-train prepare jsrt|montgomery|shenzhen|png-masks`` on small generated folders,
and ``cad-train train cxr-lungs`` -> bundle -> ``evaluate cxr-lungs`` on a tiny set.

The generated radiographs are synthetic (two dark ovals = lungs, a bright
blob = heart); their masks are known by construction, so the prepared labels
are checked against the truth, not against the code under test.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from trainer.cli import app
from trainer.cxr_data import load_prepared


def _truth(seed: int, size: int = 96) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    dx = rng.integers(-4, 5)

    def oval(cx: float, cy: float, rx: float, ry: float) -> np.ndarray:
        return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1

    right = oval(size * 0.3 + dx, size * 0.45, size * 0.13, size * 0.3)  # image left
    left = oval(size * 0.7 + dx, size * 0.45, size * 0.12, size * 0.28)
    heart = oval(size * 0.56 + dx, size * 0.68, size * 0.14, size * 0.1) & ~right & ~left
    image = np.full((size, size), 200.0)
    image[right | left] = 70
    image[heart] = 230
    image += rng.normal(0, 5, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), {
        "right_lung": right, "left_lung": left, "heart": heart}


def _png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _make(layout: str, root: Path, n: int = 3) -> dict[str, dict[str, np.ndarray]]:
    truths = {}
    for i in range(n):
        image, m = _truth(i)
        name = f"case{i:02d}"
        if layout == "jsrt":
            _png(root / "images" / f"{name}.png", image)
            for k, v in m.items():
                _png(root / "masks" / k / f"{name}.png", (v * 255).astype(np.uint8))
        elif layout == "montgomery":
            _png(root / "CXR_png" / f"{name}.png", image)
            # Folder names are not trusted: sides come from the centroids.
            _png(root / "ManualMask" / "leftMask" / f"{name}.png",
                 (m["right_lung"] * 255).astype(np.uint8))
            _png(root / "ManualMask" / "rightMask" / f"{name}.png",
                 (m["left_lung"] * 255).astype(np.uint8))
        elif layout == "shenzhen":
            _png(root / "CXR_png" / f"{name}.png", image)
            _png(root / "mask" / f"{name}_mask.png",
                 ((m["right_lung"] | m["left_lung"]) * 255).astype(np.uint8))
        else:
            _png(root / "images" / f"{name}.png", image)
            label = np.zeros(image.shape, np.uint8)
            label[m["right_lung"]] = 1
            label[m["left_lung"]] = 2
            label[m["heart"]] = 3
            _png(root / "masks" / f"{name}.png", label)
        truths[name] = m
    return truths


@pytest.mark.parametrize("layout", ["jsrt", "montgomery", "shenzhen", "png-masks"])
def test_prepare_layouts(layout: str, tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    truths = _make(layout, src)
    run = CliRunner().invoke(app, ["prepare", layout, str(src), str(out)])
    assert run.exit_code == 0, run.output
    prepared = load_prepared(out)
    assert prepared.cases == sorted(truths)
    with_heart = layout in ("jsrt", "png-masks")
    for case, truth in truths.items():
        c = prepared.load(case)
        assert c.structures == (("right_lung", "left_lung", "heart") if with_heart
                                else ("right_lung", "left_lung"))
        for k in c.structures:
            np.testing.assert_array_equal(c.masks[k], truth[k], err_msg=f"{layout} {case} {k}")
        assert (c.pixel_spacing_mm is not None) == (layout in ("jsrt", "montgomery"))


def test_prepare_reports_a_missing_mask(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _make("shenzhen", src)
    (src / "mask" / "case01_mask.png").unlink()
    run = CliRunner().invoke(app, ["prepare", "shenzhen", str(src), str(out)])
    assert run.exit_code == 1 and "case01_mask.png: mask file is missing" in run.output
    assert load_prepared(out).cases == ["case00", "case02"]


def test_train_export_evaluate_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, prepared = tmp_path / "src", tmp_path / "prepared"
    _make("jsrt", src, n=5)
    assert CliRunner().invoke(app, ["prepare", "jsrt", str(src), str(prepared)]).exit_code == 0
    repo_cfg = yaml.safe_load(Path("trainer/configs/cxr-lungs.yaml").read_text())
    cfg = {**repo_cfg, "bundle": {"name": "cxr-lungs-ci", "version": "0.0.1"},
           "data": {"prepared": str(prepared), "description": "synthetic", "terms": "none"},
           "split": {"validation": ["case04"]}, "size": 64, "bootstrap": 100,
           "architecture": {**repo_cfg["architecture"], "channels": [4, 8, 16],
                            "strides": [2, 2], "num_res_units": 1},
           "train": {**repo_cfg["train"], "epochs": 2, "batch_size": 2}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    models = tmp_path / "models"
    monkeypatch.setenv("CAD_NODE_MODELS__DIR", str(models))
    run = CliRunner().invoke(app, ["train", "cxr-lungs", str(path), "--out",
                                   str(tmp_path / "run")])
    assert run.exit_code == 0, run.output
    bundle = models / "cxr-lungs-ci" / "0.0.1"
    card = (bundle / "MODEL_CARD.md").read_text()
    assert "Not for diagnostic use" in card and "derived work" in card
    ev = CliRunner().invoke(app, ["evaluate", "cxr-lungs", str(bundle), str(path),
                                  "--out", str(tmp_path / "m.json")])
    assert ev.exit_code == 0, ev.output
    assert "right_lung  Dice" in ev.output and "95% CI" in ev.output
