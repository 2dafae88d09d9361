"""A small ``cxr-tb`` bundle trained on phantoms, for tests of the TB path (unit and e2e).

Trained by the real trainer (:func:`trainer.cxr_tb.train_cxr_tb`) on
:func:`trainer.cxr_synthetic.write_labelled_set` phantoms at 64 pixels: it
knows nothing of real tuberculosis; it only gives the node a genuine bundle.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from cad_node.pipelines.cxr.tb import TB_BUNDLE
from trainer.cxr_synthetic import write_labelled_set
from trainer.cxr_tb import load_tb_config, train_cxr_tb


def make_tb_bundle(root: Path, models_dir: Path, *, cases: int = 48, epochs: int = 6,
                   version: str = "0.0.1") -> Path:
    """Train and export the test bundle into ``models_dir``; returns its directory."""
    import torch

    torch.set_num_threads(1)
    write_labelled_set(root / "data", cases, size=64, seed=3)
    cfg_path = root / "cxr-tb.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "model": "cxr-tb", "data": {"layout": "png-labels", "root": "data"},
        "bundle": {"name": TB_BUNDLE, "version": version}, "size": 64, "epochs": epochs,
        "batch_size": 16, "learning_rate": 0.003, "bootstrap": 50,
        "architecture": {"builder": "cxr-tb", "channels": [8, 16, 16], "hidden": 16,
                         "dropout": 0.0}}))
    return train_cxr_tb(load_tb_config(cfg_path), root / "run", models_dir)
