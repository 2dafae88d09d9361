"""``cad-train evaluate`` on hand-made CSV files: report, plot and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from trainer.cli import app


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_evaluate_luna16_cli(tmp_path: Path) -> None:
    ann = _write(tmp_path / "annotations.csv",
                 "seriesuid,coordX,coordY,coordZ,diameter_mm\nA,0,0,0,10\nB,0,0,0,10\n")
    excl = _write(tmp_path / "excluded.csv",
                  "seriesuid,coordX,coordY,coordZ,diameter_mm\nA,50,0,0,-1\n")
    # Same case as test_froc.test_interpolation_between_operating_points, plus one mark on
    # an irrelevant finding (ignored): sensitivities .5625 .625 .75 1 1 1 1, CPM 5.9375/7.
    cands = _write(tmp_path / "cands.csv",
                   "seriesuid,coordX,coordY,coordZ,probability\n"
                   "A,0,0,1,0.9\nA,1000,0,0,0.5\nB,1,0,0,0.5\nB,2000,0,0,0.5\nA,51,0,0,0.99\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["evaluate", "luna16", str(ann), str(cands), str(out),
                                   "--excluded", str(excl), "--bootstrap", "50", "--name", "t"])
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["cpm"] == pytest.approx(5.9375 / 7, abs=1e-6)
    assert metrics["n_irrelevant_hits"] == 1
    assert metrics["sensitivity_at"] == pytest.approx([0.5625, 0.625, 0.75, 1, 1, 1, 1])
    report = (out / "report.md").read_text()
    assert "CPM: 0.848" in report and "froc.png" in report and "95% CI" in report
    assert (out / "froc.png").read_bytes()[:4] == b"\x89PNG"
    bad = _write(tmp_path / "bad.csv", "seriesuid,coordX,coordY,probability\nA,0,0,0.5\n")
    res = CliRunner().invoke(app, ["evaluate", "luna16", str(ann), str(bad), str(out)])
    assert res.exit_code == 2 and "bad.csv" in res.output and "coordZ" in res.output


def test_evaluate_deeplesion_and_dice_cli(tmp_path: Path) -> None:
    from trainer.deeplesion import REQUIRED_COLUMNS

    header = ",".join(REQUIRED_COLUMNS)

    def row(name: str, box: str) -> str:
        pt, st, se, sl = name[:-4].split("_")
        # RECIST points inside the box (content irrelevant here), test split (3)
        return (f'{name},{int(pt)},{int(st)},{int(se)},{int(sl)},"1, 1, 2, 2, 1, 2, 2, 1",'
                f'"{box}","1.4, 1.4","0.5, 0.5, 0.5",4,0,"1, 9","0.8, 0.8, 5","512, 512",'
                '"-175, 275",F,50,3')

    gt = _write(tmp_path / "DL_info.csv", "\n".join([
        header, row("000001_01_01_005.png", "10, 10, 19, 19"),
        row("000002_01_01_005.png", "0, 0, 9, 9"), row("000002_01_01_005.png", "50, 50, 59, 59"),
    ]) + "\n")
    # Same detections as test_froc.test_deeplesion_sensitivity_iou_and_iobb
    dets = _write(tmp_path / "dets.csv", "File_name,x1,y1,x2,y2,score\n"
                  "000001_01_01_005.png,10,10,19,19,0.9\n000001_01_01_005.png,10,10,19,19,0.8\n"
                  "000001_01_01_005.png,100,100,109,109,0.7\n"
                  "000002_01_01_005.png,45,45,59,59,0.5\n000002_01_01_005.png,0,0,9,4,0.45\n"
                  "000002_01_01_005.png,50,50,54,54,0.4\n")
    out = tmp_path / "dl"
    res = CliRunner().invoke(app, ["evaluate", "deeplesion", str(gt), str(dets), str(out)])
    assert res.exit_code == 0, res.output
    m = json.loads((out / "metrics.json").read_text())
    assert [x["overlap"] for x in m] == ["iou", "iobb"]
    assert m[0]["sensitivity_at"] == pytest.approx([1 / 3] + [2 / 3] * 5, abs=1e-6)
    assert m[1]["sensitivity_at"] == pytest.approx([1 / 3] + [1.0] * 5, abs=1e-6)
    assert "IOBB >= 0.5" in (out / "report.md").read_text()

    a = np.zeros((3, 4, 4), dtype=bool)
    b = np.zeros((3, 4, 4), dtype=bool)
    a[0, :2, :2] = True  # 4 voxels
    b[0, :2, :3] = True  # 6 voxels, 4 shared -> Dice 8/10
    np.save(tmp_path / "a.npy", a)
    np.savez(tmp_path / "b.npz", mask=b)
    res = CliRunner().invoke(app, ["evaluate", "dice", str(tmp_path / "a.npy"),
                                   str(tmp_path / "b.npz")])
    assert res.exit_code == 0 and res.output.strip() == "0.800000"


def test_evaluate_non_utf8_inputs_exit_2_naming_the_file(tmp_path: Path) -> None:
    ann = _write(tmp_path / "annotations.csv",
                 "seriesuid,coordX,coordY,coordZ,diameter_mm\nA,0,0,0,10\n")
    latin = tmp_path / "cands.csv"
    latin.write_bytes("seriesuid,coordX,coordY,coordZ,probability\nA\xe9,0,0,0,0.5\n"
                      .encode("latin-1"))
    good = _write(tmp_path / "good.csv",
                  "seriesuid,coordX,coordY,coordZ,probability\nA,0,0,0,0.5\n")
    series = tmp_path / "series.csv"
    series.write_bytes(b"\xff\xfe\x00A")
    for args, name in (([str(ann), str(latin), str(tmp_path / "o1")], "cands.csv"),
                       ([str(ann), str(good), str(tmp_path / "o2"), "--series", str(series)],
                        "series.csv")):
        res = CliRunner().invoke(app, ["evaluate", "luna16", *args, "--bootstrap", "0"])
        assert res.exit_code == 2, res.output
        assert name in res.output and "not a UTF-8 CSV" in res.output


def test_evaluate_rejects_non_finite_values_naming_the_row(tmp_path: Path) -> None:
    # float() accepts "nan"/"inf"; a NaN probability silently broke the ranking.
    ann = _write(tmp_path / "annotations.csv",
                 "seriesuid,coordX,coordY,coordZ,diameter_mm\nA,0,0,0,10\n")
    for text, message in (
        ("A,0,0,0,0.5\nA,1,0,0,nan\n", "row 3: probability is 'nan', not finite"),
        ("A,0,inf,0,0.5\n", "row 2: coordY is 'inf', not finite"),
        ("A,0,0,x,0.5\n", "row 2: coordZ is not a number"),
    ):
        cands = _write(tmp_path / "c.csv", "seriesuid,coordX,coordY,coordZ,probability\n" + text)
        res = CliRunner().invoke(app, ["evaluate", "luna16", str(ann), str(cands),
                                       str(tmp_path / "o"), "--bootstrap", "0"])
        assert res.exit_code == 2 and "c.csv" in res.output and message in res.output, res.output
