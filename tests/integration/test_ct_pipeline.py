"""The ct-chest pipeline on the real LIDC-IDRI-0001 CT (one run per session) and on bad input."""

from __future__ import annotations

import copy
import csv
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from scipy.spatial.distance import pdist

from cad_node.imaging import SeriesError, index_to_lps, load_series
from cad_node.pipelines import available_pipelines, get_pipeline
from cad_node.results.findings import AnalysisStatus, FindingSite
from tests.conftest import require_data

LIDC_SERIES = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"


@pytest.fixture(scope="module")
def reference() -> tuple[np.ndarray, float]:
    path = require_data("lidc-idri-0001", "luna16_style_annotations.csv")
    with path.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["seriesuid"] == LIDC_SERIES]
    assert len(rows) == 1
    r = rows[0]
    centre = np.array([float(r["coordX"]), float(r["coordY"]), float(r["coordZ"])])
    return centre, float(r["diameter_mm"])


@pytest.fixture(scope="module")
def readers_long_axis_mm(lidc_dir: Path, lidc_series, reference) -> float:
    """Mean over the LIDC readers of the nodule's longest axial diameter (069.xml edge maps)."""
    centre, _ = reference
    root = ET.parse(lidc_dir / "069.xml").getroot()
    ns = {"n": root.tag.split("}")[0].strip("{")}
    pixel = float(lidc_series.datasets[0].PixelSpacing[0])
    per_reader = []
    for nodule in root.iter(f"{{{ns['n']}}}unblindedReadNodule"):
        rois = nodule.findall("n:roi", ns)
        zs = [float(r.find("n:imageZposition", ns).text) for r in rois]
        if not zs or abs(np.mean(zs) - centre[2]) > 15:
            continue
        longest = 0.0
        for roi in rois:
            pts = np.array([[float(e.find("n:xCoord", ns).text), float(e.find("n:yCoord", ns).text)]
                            for e in roi.findall("n:edgeMap", ns)]) * pixel
            if len(pts) > 2:
                longest = max(longest, float(pdist(pts).max()))
        if longest > 0:
            per_reader.append(longest)
    assert len(per_reader) >= 3
    return float(np.mean(per_reader))


def test_registry() -> None:
    assert "ct-chest" in available_pipelines()
    assert get_pipeline("ct-chest").name == "ct-chest"
    with pytest.raises(KeyError, match="available"):
        get_pipeline("no-such-pipeline")


def test_lungs_are_plausible(ct_chest_lidc_run, lidc_series) -> None:
    run = ct_chest_lidc_run
    res = run.result
    assert res.status is AnalysisStatus.COMPLETED, res.failure_reason
    left = res.organ_masks[FindingSite.LEFT_LUNG]
    right = res.organ_masks[FindingSite.RIGHT_LUNG]
    assert left.sop_instance_uids == lidc_series.sop_instance_uids
    assert left.array.shape == lidc_series.shape
    assert not (left.array & right.array).any()
    # left lung lies at larger patient x (LPS: +x = patient left)
    xl = index_to_lps(lidc_series.image, np.argwhere(left.array).mean(0))[0]
    xr = index_to_lps(lidc_series.image, np.argwhere(right.array).mean(0))[0]
    assert xl > xr + 50
    vols = res.measurements
    assert 800 < vols["left_lung_volume_ml"] < 4000
    assert 800 < vols["right_lung_volume_ml"] < 4000
    assert 2500 < vols["left_lung_volume_ml"] + vols["right_lung_volume_ml"] < 8000
    # trachea: found, excluded from both lungs, and it is air in the top slices
    airway = run.lungs.airway
    assert airway.sum() * np.prod(lidc_series.image.GetSpacing()) / 1000 > 5.0
    assert not (airway & (left.array | right.array)).any()
    top = int(np.nonzero(airway.any(axis=(1, 2)))[0].max()) - 5  # trachea, above the carina
    assert airway[top].sum() > 100
    assert np.percentile(lidc_series.array[top][airway[top]], 25) < -900
    assert not (left.array[top] | right.array[top])[airway[top]].any()


def test_reference_nodule_is_found_ranked_and_measured(ct_chest_lidc_run, reference,
                                                      readers_long_axis_mm, lidc_series) -> None:
    centre, diameter = reference
    res = ct_chest_lidc_run.result
    # the candidate generator finds it
    cands = np.array([c.center_mm for c in ct_chest_lidc_run.candidates])
    assert len(cands) <= 300
    assert (np.linalg.norm(cands - centre, axis=1) < diameter / 2).any()
    dists = [np.linalg.norm(np.array(f.center_mm) - centre) for f in res.findings]
    hits = [i for i, d in enumerate(dists) if d < diameter / 2]  # LUNA16: strictly inside
    assert hits, f"reference nodule not found; distances {dists}"
    rank = hits[0]
    assert rank < 3
    threshold = res.measurements["operating_threshold"]
    others = [f for i, f in enumerate(res.findings)
              if i != rank and (f.probability or 0) >= threshold]
    assert len(others) <= 4
    f = res.findings[rank]
    assert f.volume_mm3 is not None and f.volume_mm3 > 0
    # LUNA16's diameter of this nodule is a volume-equivalent diameter (the readers'
    # contours give 22.7-24.7 mm that way, but 32-34 mm longest axial diameter):
    # compare like with like.
    equivalent = (6 * f.volume_mm3 / np.pi) ** (1 / 3)
    assert abs(equivalent - diameter) / diameter < 0.25, equivalent
    assert f.long_axis_mm >= f.short_axis_mm > 0
    assert abs(f.long_axis_mm - readers_long_axis_mm) / readers_long_axis_mm < 0.25
    assert f.site is FindingSite.LEFT_LUNG
    assert f.malignancy_probability is not None
    # its mask is aligned by UID: placed into the volume by SOP Instance UID,
    # its voxels are centred on the LUNA16 reference
    m = f.mask
    assert m is not None and m.array.any()
    slice_of = {u: k for k, u in enumerate(lidc_series.sop_instance_uids)}
    assert set(m.sop_instance_uids) <= set(slice_of)
    placed = np.zeros(lidc_series.shape, bool)
    for frame, uid in enumerate(m.sop_instance_uids):
        placed[slice_of[uid]] = m.array[frame]
    centroid = index_to_lps(lidc_series.image, np.argwhere(placed).mean(axis=0))
    assert np.linalg.norm(centroid - centre) < diameter / 4, centroid
    assert res.qualitative["lung_rads"] == "4B"
    assert any("patient age missing" in n for n in res.notes)


def test_reference_nodule_mask_covers_centre(ct_chest_lidc_run, lidc_series, reference) -> None:
    from cad_node.imaging import lps_to_index

    centre, _diameter = reference
    res = ct_chest_lidc_run.result
    f = min(res.findings, key=lambda f: np.linalg.norm(np.array(f.center_mm) - centre))
    k, y, x = np.round(lps_to_index(lidc_series.image, centre)).astype(int)
    uid = lidc_series.sop_instance_uids[k]
    frame = list(f.mask.sop_instance_uids).index(uid)
    assert f.mask.array[frame, y, x]


@pytest.fixture(scope="module")
def lidc_datasets(lidc_dir: Path) -> list[pydicom.Dataset]:
    dss = [pydicom.dcmread(p) for p in sorted(lidc_dir.glob("*.dcm"))]
    dss.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    return dss[40:80]


def _relabel(dss: list[pydicom.Dataset], **changes: object) -> list[pydicom.Dataset]:
    out = []
    uid = generate_uid()
    for d in dss:
        d = copy.deepcopy(d)
        d.SeriesInstanceUID = uid
        for k, v in changes.items():
            setattr(d, k, v)
        out.append(d)
    return out


def test_mr_is_refused(lidc_datasets) -> None:
    series = load_series(_relabel(lidc_datasets, Modality="MR"))
    res = get_pipeline("ct-chest").run(series)
    assert res.status is AnalysisStatus.FAILED
    assert "modality MR" in res.failure_reason
    assert not res.findings


def test_non_chest_ct_is_refused(lidc_datasets) -> None:
    # a water cylinder phantom: CT without lungs
    dss = _relabel(lidc_datasets)
    yy, xx = np.mgrid[:512, :512]
    body = (yy - 256) ** 2 + (xx - 256) ** 2 < 200**2
    pixels = np.where(body, 1024, 0).astype(dss[0].pixel_array.dtype)
    for d in dss:
        d.PixelData = pixels.tobytes()
    res = get_pipeline("ct-chest").run(load_series(dss))
    assert res.status is AnalysisStatus.FAILED
    assert "not a chest CT" in res.failure_reason


def test_too_short_series_is_refused(lidc_datasets) -> None:
    res = get_pipeline("ct-chest").run(load_series(_relabel(lidc_datasets[:10])))
    assert res.status is AnalysisStatus.FAILED
    assert "10 slices" in res.failure_reason


def test_localizer_single_slice_mixed_sizes_are_refused_at_loading(lidc_datasets) -> None:
    with pytest.raises(SeriesError, match="localizer"):
        load_series(_relabel(lidc_datasets[:3], ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"]))
    with pytest.raises(SeriesError, match="single-slice"):
        load_series(_relabel(lidc_datasets[:1]))
    mixed = _relabel(lidc_datasets[:5])
    arr = mixed[2].pixel_array[:256, :256].copy()
    mixed[2].PixelData, mixed[2].Rows, mixed[2].Columns = arr.tobytes(), 256, 256
    with pytest.raises(SeriesError, match="mixed image sizes"):
        load_series(mixed)
