"""``cad-train prepare deeplesion`` on the real DeepLesion sample slices."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.conftest import require_data
from trainer.deeplesion import REQUIRED_COLUMNS, read_png_hu
from trainer.prepare import prepare_deeplesion


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Official layout (Images_png/<series>/<slice>.png + DL_info.csv) from the samples."""
    samples = require_data("deeplesion-samples")
    root = tmp_path_factory.mktemp("deeplesion")
    for src in sorted((samples / "key_slices_flat").glob("*.png")):
        pt, st, se, sl = src.stem.split("_")
        d = root / "Images_png" / f"{pt}_{st}_{se}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{sl}.png").symlink_to(src)
    with (samples / "key_slices_flat" / "DL_info_subset.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    # one row whose key slice is missing on disk, one malformed row
    ghost = dict(rows[0], File_name="002648_01_01_062.png", Key_slice_index="62")
    broken = dict(rows[1], Bounding_boxes="1, 2")
    # an 8-bit PNG where a 16-bit slice belongs
    eight = dict(rows[0], File_name="002648_01_01_063.png", Key_slice_index="63")
    Image.fromarray(np.zeros((512, 512), dtype=np.uint8)).save(
        root / "Images_png" / "002648_01_01" / "063.png")
    with (root / "DL_info.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(REQUIRED_COLUMNS), extrasaction="ignore")
        w.writeheader()
        w.writerows([*rows, ghost, broken, eight])
    return root


def test_prepare_deeplesion(root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    results, problems = prepare_deeplesion(root, out, context=1, progress=False)
    # 23 real rows + ghost (row 25) + broken (row 26, rejected by the CSV reader)
    assert len(problems) == 1 and "row 26" in problems[0] and "Bounding_boxes" in problems[0]
    failed = {r.case_id: r.message for r in results if r.status == "failed"}
    assert len(failed) == 2
    assert "row 25" in failed["002648_01_01_062"]
    assert "002648_01_01_062.png" in failed["002648_01_01_062"]
    # wrong bit depth: the message names the row and the file
    assert "row 27" in failed["002648_01_01_063"]
    assert "063.png" in failed["002648_01_01_063"] and "not 16-bit" in failed["002648_01_01_063"]
    done = [r for r in results if r.status == "done"]
    assert len(done) == 23
    index = list(csv.DictReader((out / "index.csv").open()))
    assert len(index) == 23
    row = next(r for r in index if r["file_name"] == "003657_01_01_049.png")
    data = np.load(out / row["npz"])
    assert data["image_hu"].shape == (3, 512, 512)
    assert data["present"].tolist() == [False, True, True]  # 048 absent, 050 present
    key = read_png_hu(root / "Images_png" / "003657_01_01" / "049.png")
    assert np.array_equal(data["image_hu"][1], key)
    assert data["boxes"].shape == (1, 4)
    assert float(row["x1"]) == pytest.approx(data["boxes"][0, 0], abs=1e-3)
    assert row["split"] in {"train", "val", "test"} and row["lesion_type_name"] == "liver"
    # resumable: a second run skips what is done
    again, _ = prepare_deeplesion(root, out, progress=False)
    assert sum(r.status == "skipped" for r in again) == 23


def test_cli_reports_rows_and_missing_columns(root: Path, tmp_path: Path) -> None:
    from trainer.cli import app

    res = CliRunner().invoke(app, ["prepare", "deeplesion", str(root), str(tmp_path / "o")])
    assert res.exit_code == 1
    assert "row 25" in res.output and "row 26" in res.output
    bad = tmp_path / "bad.csv"
    bad.write_text("File_name,Patient_index\nx.png,1\n")
    res = CliRunner().invoke(app, ["prepare", "deeplesion", str(root), str(tmp_path / "p"),
                                   "--csv", str(bad)])
    assert res.exit_code == 2
    assert "bad.csv" in res.output and "Bounding_boxes" in res.output
