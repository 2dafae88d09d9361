"""train (ci-tiny) -> export -> load_bundle -> CandidateScorer -> tamper refused.

Runs the real ``cad-train`` CLI on the real LIDC-IDRI-0001 background with
synthetic insertions (about a minute on 2 CPU threads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cad_node.models import load_bundle
from cad_node.models.scorer import CandidateScorer
from tests.conftest import free_port, skip_or_fail
from trainer.cli import app
from trainer.insertion import ExclusionZone, LungBackground, insert_nodules
from trainer.train import (
    dense_structure_points,
    label_points,
    load_ct,
    load_train_config,
    lung_mask_of,
    train,
)

REPO = Path(__file__).resolve().parents[2]
CI_CONFIG = REPO / "trainer" / "configs" / "ci-tiny.yaml"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(lidc_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("run")
    result = CliRunner().invoke(
        app, ["train", "ct-nodule-scorer", str(CI_CONFIG), "--out", str(run), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    return run


@pytest.fixture(scope="module")
def exported(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models")
    result = CliRunner().invoke(
        app, ["export", str(trained / "final.pt"), "--models-dir", str(models)]
    )
    assert result.exit_code == 0, result.output
    return models


def test_training_writes_checkpoints_metrics_and_card(trained: Path) -> None:
    for name in ("last.pt", "final.pt", "metrics.json", "MODEL_CARD.md", "data.npz"):
        assert (trained / name).is_file(), name
    metrics = json.loads((trained / "metrics.json").read_text())
    froc = metrics["froc"]
    assert len(froc["sensitivity_at"]) == 7
    assert froc["cpm"] == pytest.approx(np.mean(froc["sensitivity_at"]), abs=1e-5)
    assert metrics["heldout_nodules"] >= 4
    card = (trained / "MODEL_CARD.md").read_text()
    assert "Not for diagnostic use" in card
    assert "full LIDC-IDRI" in card
    assert "Excluded" in card and "56.208" in card


def test_export_load_score_and_tamper(exported: Path, lidc_dir: Path) -> None:
    bundle = load_bundle("ct-nodule-scorer-ci", models_dir=exported)
    ident = bundle.identity
    assert ident.version == "0.0.1"
    assert ident.device_uid.startswith("2.25.")
    assert "not for diagnostic use" in bundle.manifest.intended_use.lower()
    assert bundle.manifest.training_data["inserted_nodules"] > 0

    # Held-out slab, a seed the trainer never used: inserted nodules vs vessels.
    cfg = load_train_config(CI_CONFIG)
    image = load_ct(lidc_dir)
    bg = LungBackground.from_image(image, lung_mask_of(image))
    rng = np.random.default_rng(987654)
    excl = [ExclusionZone(e.center_mm, e.radius_mm) for e in cfg.data.exclusions]
    hu, truth = insert_nodules(
        bg, 10, rng, z_range_mm=cfg.data.heldout_z_mm, exclusions=excl,
        diameter_range_mm=(6.0, 25.0),
    )
    assert len(truth) >= 6
    vessels = dense_structure_points(bg, hu, 500, rng, cfg.data.heldout_z_mm, min_pleura_mm=3.0)
    vessels = vessels[label_points(vessels, truth, excl, 6.0) == 0]
    assert len(vessels) >= 20
    scorer = CandidateScorer(bundle, device="cpu")
    img = bg.to_image(hu)
    p_nod = scorer.score(img, np.array([n.center_mm for n in truth]))
    p_ves = scorer.score(img, vessels)
    auc = float((p_nod[:, None] > p_ves[None, :]).mean())
    # Can fail: an untrained network gives about 0.5.
    assert auc > 0.7, (auc, p_nod, p_ves)
    assert np.median(p_nod) > np.median(p_ves)

    weights = bundle.weights_path
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_bundle("ct-nodule-scorer-ci", models_dir=exported)


def test_interrupted_and_resumed_run_matches_uninterrupted(trained: Path, tmp_path: Path) -> None:
    cfg = load_train_config(CI_CONFIG)
    run = tmp_path / "resume"
    run.mkdir()
    # Same cached patches as the uninterrupted run of the fixture.
    for name in ("data.npz", "data_counts.json"):
        (run / name).write_bytes((trained / name).read_bytes())
    half = cfg.optim.epochs // 2
    last = train(cfg, run, device="cpu", evaluate_heldout=False, stop_after_epochs=half)
    assert last.name == "last.pt" and not (run / "final.pt").exists()
    assert torch.load(last, weights_only=False)["epoch"] == half - 1
    final = train(cfg, run, resume=True, device="cpu", evaluate_heldout=False)
    resumed = torch.load(final, weights_only=True)
    full = torch.load(trained / "final.pt", weights_only=True)
    assert len(resumed["history"]) == cfg.optim.epochs
    for key, value in full["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=1e-4, atol=1e-5)


def test_ddp_two_cpu_processes_with_gloo(trained: Path, tmp_path: Path) -> None:
    """The torchrun/DDP code path, exercised with 2 CPU processes (gloo)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    cad_train = Path(sys.executable).parent / "cad-train"
    if not torchrun.is_file() or not cad_train.is_file():
        skip_or_fail(f"torchrun / cad-train console scripts are not installed in {torchrun.parent}")
    run = tmp_path / "ddp"
    run.mkdir()
    for name in ("data.npz", "data_counts.json"):
        (run / name).write_bytes((trained / name).read_bytes())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run(
        [
            str(torchrun), "--nnodes=1", "--nproc-per-node=2", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", str(cad_train), "train", "ct-nodule-scorer",
            str(CI_CONFIG), "--out", str(run), "--device", "cpu", "--no-evaluate",
        ],
        capture_output=True, text=True, timeout=300, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = torch.load(run / "final.pt", weights_only=True)
    assert ck["provenance"]["world_size"] == 2
    losses = [h["loss"] for h in ck["history"]]
    assert len(losses) == load_train_config(CI_CONFIG).optim.epochs
    assert losses[-1] < losses[0]


def test_training_mixes_in_prepared_lidc_cases(lidc_dir: Path, tmp_path: Path) -> None:
    """Real annotated data path: `cad-train prepare lidc` output as extra training data."""
    from trainer.prepare import prepare_lidc

    prepared = tmp_path / "lidc"
    results = prepare_lidc(lidc_dir.parent.parent.parent, prepared, progress=False)
    assert [r.status for r in results] == ["done"]
    cfg = load_train_config(CI_CONFIG)
    mixed = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(
                update={"train_rounds": 1, "nodules_per_round": 4, "negatives_per_round": 20,
                        "lidc_prepared": str(prepared), "lidc_positive_copies": 3,
                        "lidc_negatives_per_case": 30}
            ),
            "optim": cfg.optim.model_copy(update={"epochs": 1}),
        }
    )
    run = tmp_path / "run"
    final = train(mixed, run, device="cpu", evaluate_heldout=False)
    ck = torch.load(final, weights_only=True)
    lidc = ck["training_data"]["lidc"]
    # LIDC-IDRI-0001 has one consensus nodule (>= 3 of 4 readers, >= 3 mm).
    assert lidc["cases"] == 1 and lidc["nodules"] == 1
    assert lidc["positive_patches"] >= 3
    assert 0 < lidc["negative_patches"] <= 30
    counts = json.loads((run / "data_counts.json").read_text())
    with np.load(run / "data.npz") as npz:
        y = npz["y"]
    assert y.sum() == counts["positive_patches"] + lidc["positive_patches"]
    card = (run / "MODEL_CARD.md").read_text()
    assert "Real annotated scans" in card and "1 scans, 1 LUNA16 consensus nodules" in card
