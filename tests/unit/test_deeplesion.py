"""DeepLesion reader on the real sample PNGs and DL_info rows."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import require_data
from trainer.deeplesion import (
    REQUIRED_COLUMNS,
    DeepLesionError,
    load_sample,
    read_dl_info,
    read_png_hu,
)


@pytest.fixture(scope="module")
def samples() -> Path:
    return require_data("deeplesion-samples")


@pytest.fixture(scope="module")
def rows(samples: Path):
    records, problems = read_dl_info(samples / "key_slices_flat" / "DL_info_subset.csv")
    assert problems == []
    return records


def _raw_rows(samples: Path) -> list[dict[str, str]]:
    with (samples / "key_slices_flat" / "DL_info_subset.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def test_fields_parsed_as_in_the_csv(rows, samples: Path) -> None:
    assert len(rows) == 23
    first = rows[0]
    # First data row of DL_info_subset.csv, copied by hand:
    # 002648_01_01_061.png, 2648, 1, 1, 61,
    # "135.339, 246.541, 136.92, 263.405, 129.542, 252.865, 141.137, 251.778",
    # "124.542, 241.541, 146.137, 268.405", "16.9386, 11.6453", ..., 4, 0, "55, 67",
    # "0.898438, 0.898438, 5", "512, 512", "-175, 275", F, 55, 2
    assert first.file_name == "002648_01_01_061.png"
    assert first.series_dir_name == "002648_01_01" and first.key_slice_index == 61
    np.testing.assert_allclose(first.recist, [[135.339, 246.541], [136.92, 263.405],
                                              [129.542, 252.865], [141.137, 251.778]])
    assert first.bbox == (124.542, 241.541, 146.137, 268.405)
    assert first.diameters_px == (16.9386, 11.6453)
    assert first.slice_range == (55, 67)
    assert first.spacing_mm == (0.898438, 0.898438, 5.0)
    assert first.window == (-175.0, 275.0)
    assert first.lesion_type == 4 and first.lesion_type_name == "liver"
    assert not first.possibly_noisy
    assert (first.gender, first.age, first.split) == ("F", 55.0, "val")
    assert first.row_number == 2
    assert first.diameters_mm[0] == pytest.approx(16.9386 * 0.898438)


def test_recist_and_boxes_agree(rows) -> None:
    for r in rows:
        (x1, y1), (x2, y2), (x3, y3), (x4, y4) = r.recist
        # RECIST long / short axis lengths are the CSV's pixel diameters
        assert math.dist((x1, y1), (x2, y2)) == pytest.approx(r.diameters_px[0], abs=1e-3)
        assert math.dist((x3, y3), (x4, y4)) == pytest.approx(r.diameters_px[1], abs=1e-3)
        # DeepLesion boxes are the RECIST extent padded by 5 pixels
        xs, ys = r.recist[:, 0], r.recist[:, 1]
        assert r.bbox == pytest.approx((xs.min() - 5, ys.min() - 5, xs.max() + 5, ys.max() + 5),
                                       abs=1e-3)


def test_hu_range_and_lesion_pixels(rows, samples: Path) -> None:
    for r in rows:
        s = load_sample(samples, r, context=0)
        hu = s.key_hu
        assert hu.shape == r.image_size
        # CT range: air near -1000 (DeepLesion pads outside the FOV lower), bone < 3072
        assert -3100 <= int(hu.min()) <= -900, r.file_name
        assert 200 <= int(hu.max()) <= 3071, r.file_name
        # Air outside the body in the top-left corner, soft tissue in the RECIST cross:
        # rows are y, columns are x.
        centre = r.recist.mean(axis=0)
        cy, cx = round(centre[1]), round(centre[0])
        patch = hu[cy - 1:cy + 2, cx - 1:cx + 2].astype(float)
        assert -150 < patch.mean() < 250, (r.file_name, patch.mean())
        # Liver lesions sit in soft tissue: the box is not air
        x1, y1, x2, y2 = (round(v) for v in r.bbox)
        assert hu[y1:y2 + 1, x1:x2 + 1].mean() > -200


def test_images_png_layout_and_2p5d_context(samples: Path, rows, tmp_path: Path) -> None:
    # Build the official Images_png layout from the real key slices (symlinks, no copies).
    root = tmp_path / "dl"
    for src in (samples / "key_slices_flat").glob("*.png"):
        pt, st, se, sl = src.stem.split("_")
        d = root / "Images_png" / f"{pt}_{st}_{se}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{sl}.png").symlink_to(src)
    by_name = {r.file_name: r for r in rows}
    # 003657_01_01 has key slices 049, 050 and 069: 049's upper neighbour 050 is present,
    # its lower neighbour 048 is not (replaced by the key slice itself).
    s = load_sample(root, by_name["003657_01_01_049.png"], context=1)
    assert s.present == (False, True, True)
    assert s.image_hu.shape == (3, 512, 512)
    assert np.array_equal(s.image_hu[0], s.image_hu[1])
    assert np.array_equal(s.image_hu[2], read_png_hu(samples / "key_slices_flat" /
                                                     "003657_01_01_050.png"))
    assert not np.array_equal(s.image_hu[1], s.image_hu[2])
    # a missing key slice is an error naming the CSV row
    (root / "Images_png" / "002648_01_01" / "061.png").unlink()
    with pytest.raises(DeepLesionError, match=r"row 2 \(002648_01_01_061\.png\).*not found"):
        load_sample(root, by_name["002648_01_01_061.png"])


def test_real_images_png_folder_hu(samples: Path) -> None:
    pngs = sorted((samples / "Images_png").glob("*/*.png"))
    assert len(pngs) == 24
    for p in pngs[:6]:
        hu = read_png_hu(p)
        assert hu.dtype == np.int16
        raw = np.asarray(Image.open(p)).astype(np.int64)
        assert np.array_equal(hu.astype(np.int64), raw - 32768)
        assert -3100 <= hu.min() and hu.max() <= 3071


def test_wrong_bit_depth_png(tmp_path: Path) -> None:
    p = tmp_path / "8bit.png"
    Image.fromarray(np.zeros((4, 4), dtype=np.uint8)).save(p)
    with pytest.raises(DeepLesionError, match=r"8bit\.png.*not 16-bit"):
        read_png_hu(p)
    q = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(q)
    with pytest.raises(DeepLesionError, match=r"rgb\.png"):
        read_png_hu(q)


def test_missing_columns_and_bad_rows(samples: Path, tmp_path: Path) -> None:
    raw = _raw_rows(samples)
    cols = [c for c in REQUIRED_COLUMNS if c != "Bounding_boxes"]
    bad = tmp_path / "no_boxes.csv"
    with bad.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(raw[:2])
    with pytest.raises(DeepLesionError, match=r"no_boxes\.csv.*Bounding_boxes"):
        read_dl_info(bad)
    # one broken row among good ones: the others go on
    partly = tmp_path / "DL_info.csv"
    broken = dict(raw[1])
    broken["Measurement_coordinates"] = "1, 2, 3"
    with partly.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(REQUIRED_COLUMNS), extrasaction="ignore")
        w.writeheader()
        w.writerows([raw[0], broken, raw[2]])
    records, problems = read_dl_info(partly)
    assert [r.row_number for r in records] == [2, 4]
    assert len(problems) == 1 and "row 3" in problems[0]
    assert "Measurement_coordinates" in problems[0]


def test_non_utf8_csv_is_a_named_error(tmp_path: Path) -> None:
    # A Latin-1 export or a binary file given as DL_info.csv used to escape as a
    # bare UnicodeDecodeError (no file named; the prepare CLI crashed).
    header = ",".join(REQUIRED_COLUMNS)
    for name, data in (
        ("latin1.csv", (header + "\ncaf\xe9.png,1\n").encode("latin-1")),
        ("binary.csv", b"\x89PNG\r\n\x1a\n\x00\x00"),
    ):
        path = tmp_path / name
        path.write_bytes(data)
        with pytest.raises(DeepLesionError, match=rf"{name}: not a UTF-8 CSV"):
            read_dl_info(path)
