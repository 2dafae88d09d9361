"""DDP on an uneven data set: both ranks run the same number of optimizer steps.

Two CPU processes under the real ``torchrun`` with ``gloo``, on a cached patch
set of random patches whose size does not divide by the world size (the run
needs no CT: ``train`` reads ``data.npz`` when it exists).  Before the
``DistributedSampler(drop_last=True)`` sharding of :mod:`trainer.loop`, rank 0
held one sample more than rank 1 here, ran one more backward pass (its last
batch had 2 samples, rank 1's only 1 and was skipped), and the all-reduces no
longer paired up.
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
import yaml

from tests.conftest import free_port
from trainer.config import load_train_config
from trainer.loop import shard_indices, steps_per_epoch

REPO = Path(__file__).resolve().parents[2]
CI_CONFIG = REPO / "trainer" / "configs" / "ci-tiny.yaml"
#: 2 x 16 x 2 + 3: per rank 34 or 33 samples before, 33 each now.
N_PATCHES = 67


def test_shards_are_equal_and_disjoint() -> None:
    for n in (66, 67, 68, 69):
        shards = [shard_indices(n, 5, r, 2) for r in range(2)]
        assert len(shards[0]) == len(shards[1]) == n // 2
        assert not set(shards[0]) & set(shards[1])
    # one process: the whole permutation, nothing dropped
    assert sorted(shard_indices(67, 5, 0, 1)) == list(range(67))
    assert steps_per_epoch(67, 2, 16) == 3 and steps_per_epoch(67, 1, 16) == 5


@pytest.mark.slow
def test_two_ranks_run_the_same_number_of_steps_on_an_uneven_data_set(tmp_path: Path) -> None:
    torchrun = Path(sys.executable).parent / "torchrun"
    cad_train = Path(sys.executable).parent / "cad-train"
    assert torchrun.is_file() and cad_train.is_file(), "torchrun / cad-train not installed"
    cfg = load_train_config(CI_CONFIG)
    raw = yaml.safe_load(CI_CONFIG.read_text())
    raw["optim"]["epochs"] = 2
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(raw))
    run = tmp_path / "run"
    run.mkdir()
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, (N_PATCHES, *cfg.input.patch_size)).astype(np.float16)
    y = (rng.uniform(0, 1, N_PATCHES) < 0.3).astype(np.float32)
    np.savez(run / "data.npz", x=x, y=y)
    (run / "data_counts.json").write_text(json.dumps({"synthetic": "random test patches"}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    proc = subprocess.run(
        [
            str(torchrun), "--nnodes=1", "--nproc-per-node=2", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}", str(cad_train), "train", "ct-nodule-scorer",
            str(config), "--out", str(run), "--device", "cpu", "--no-evaluate",
        ],
        capture_output=True, text=True, timeout=240, env=env, check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ck = torch.load(run / "final.pt", weights_only=True)
    assert ck["provenance"]["world_size"] == 2
    steps = ck["provenance"]["optimizer_steps_per_rank"]
    # 33 samples per rank in batches of 16: 16, 16, 1 -> the 1-sample batch is
    # skipped on both ranks: 2 steps per epoch, 2 epochs.
    assert steps == [4, 4]
