"""``cad-train train/evaluate ct-lesion`` on a CI-sized config: splits, metrics, bundle, card."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from cad_node.models import load_bundle
from tests.conftest import require_data
from trainer.cli import app

REPO = Path(__file__).resolve().parents[2]


def test_tiny_train_evaluate_export(tmp_path: Path) -> None:
    require_data("deeplesion-samples", "key_slices_flat", "DL_info_subset.csv")
    require_data("lidc-idri-0001")
    run = tmp_path / "run"
    cli = CliRunner()
    res = cli.invoke(app, ["train", "ct-lesion", str(REPO / "trainer/configs/ct-lesion-tiny.yaml"),
                           "--out", str(run)])
    assert res.exit_code == 0, res.output
    log = json.loads((run / "train_log.json").read_text())
    # the official split column decides: no DL_info row of deeplesion-samples is 'train'
    assert log["counts"]["dl_info_rows_by_split"] == {"train": 0, "val": 14, "test": 9}
    assert log["counts"]["real_train_slices"] == 24
    models = tmp_path / "models"
    res = cli.invoke(app, ["evaluate", "ct-lesion", "--run", str(run), "--export", str(models)])
    assert res.exit_code == 0, res.output
    assert "test: 9 lesions on 9 images" in res.output and "IOBB>=0.5" in res.output
    m = json.loads((run / "metrics.json").read_text())
    for split, n in (("val", 14), ("test", 9)):
        assert m[split]["n_lesions"] == n
        for crit in ("iou", "iobb"):
            assert m[split][crit]["fp_rates"] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0]
        assert m[split]["recist_from_reference_box"]["n"] == n
    b = load_bundle("ct-lesion", models, "0.0.1")
    assert b.manifest.output.operating_threshold is not None
    card = b.model_card_path.read_text()
    assert "Not for diagnostic use" in card and "| test | IOU >= 0.5 | 9 |" in card
    net = b.build_network()
    assert sum(p.numel() for p in net.parameters()) > 100_000


def test_bad_config_names_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: ct-lesion\noptim:\n  steps: 0\n")
    res = CliRunner().invoke(app, ["train", "ct-lesion", str(bad)])
    assert res.exit_code == 2 and "optim.steps" in res.output
