"""ct-lesion on the real LIDC-IDRI-0001 CT (shipped bundle): results, RECIST SR, reconcile."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest

from cad_node.config import ResultsConfig
from cad_node.imaging import index_to_lps
from cad_node.pipelines.ct_lesion.pipeline import TYPE_SITES, CtLesionPipeline, reconcile_with
from cad_node.results import build_results, validate
from cad_node.results.findings import AnalysisStatus, Finding
from tests.conftest import dciodvfy

LONG_AXIS, SHORT_AXIS = "103339001", "103340004"


@pytest.fixture(scope="module")
def lesion_pipeline() -> CtLesionPipeline:
    return CtLesionPipeline()


@pytest.fixture(scope="module")
def lesion_run(lesion_pipeline: CtLesionPipeline, lidc_series: Any) -> Any:
    return lesion_pipeline.run_detailed(lidc_series)


@pytest.fixture(scope="module")
def forced(lesion_run: Any, lidc_series: Any) -> list[Finding]:
    """The three best 3-D candidates as findings, whatever the operating threshold."""
    return CtLesionPipeline()._findings(lidc_series, lesion_run.lesions[:3], 0.0)[0]


def test_real_ct_completes_with_one_finding_per_lesion(lesion_run: Any) -> None:
    r = lesion_run.result
    assert r.status is AnalysisStatus.COMPLETED, r.failure_reason
    assert r.model is not None and r.model.name == "ct-lesion"
    assert len(r.findings) <= 10
    assert all(f.probability is not None and f.probability >= r.measurements[
        "operating_threshold"] for f in r.findings)
    # NMS across slices: no two candidates share a slice with overlapping boxes
    for les in lesion_run.lesions[:50]:
        z = [d.slice_index for d in les.members]
        assert len(z) == len(set(z))


def test_findings_carry_type_recist_and_masks(forced: list[Finding], lidc_series: Any) -> None:
    assert forced
    uids = lidc_series.sop_instance_uids
    for f in forced:
        assert f.site in TYPE_SITES.values()
        assert f.recist_axes_px is not None and f.region is not None
        assert f.long_axis_mm is not None and f.short_axis_mm is not None
        assert f.short_axis_mm <= f.long_axis_mm
        assert f.mask is not None and f.region.sop_instance_uid in f.mask.sop_instance_uids
        assert set(f.mask.sop_instance_uids) <= set(uids)
        (x0, y0), (x1, y1) = f.recist_axes_px[:2]
        sx = lidc_series.image.GetSpacing()[0]
        assert np.hypot(x1 - x0, y1 - y0) * sx == pytest.approx(f.long_axis_mm, abs=0.2)


def _walk(items: Any) -> Any:
    for it in items:
        yield it
        yield from _walk(getattr(it, "ContentSequence", []) or [])


def test_sr_seg_sc_pass_dciodvfy_with_recist_scoords(
    lesion_run: Any, forced: list[Finding], lidc_dir: Path, tmp_path: Path
) -> None:
    result = lesion_run.result.model_copy(update={"findings": forced})
    sources = [pydicom.dcmread(p) for p in sorted(lidc_dir.glob("*.dcm"))]
    objs = build_results(result, sources, settings=ResultsConfig(), objects=["sr", "seg", "sc"])
    assert {o.kind for o in objs} == {"sr", "seg", "sc"}
    for o in objs:
        path = tmp_path / o.filename
        o.dataset.save_as(path, enforce_file_format=True)
        errors, _ = dciodvfy(path)
        assert not errors, (o.kind, errors)
        assert validate(o, sources, others=objs, use_dciodvfy=False).ok
    sr = next(o.dataset for o in objs if o.kind == "sr")
    assert "ct-lesion" in sr.SeriesDescription
    nums = [it for it in _walk(sr.ContentSequence) if it.ValueType == "NUM"]
    axes = [n for n in nums if n.ConceptNameCodeSequence[0].CodeValue in (LONG_AXIS, SHORT_AXIS)]
    assert len(axes) == 2 * len(forced)
    for n in axes:
        scoords = [c for c in n.ContentSequence if c.ValueType == "SCOORD"]
        assert len(scoords) == 1 and scoords[0].GraphicType == "POLYLINE"
        assert len(scoords[0].GraphicData) == 4 and scoords[0].RelationshipType == "INFERRED FROM"
        value = float(n.MeasuredValueSequence[0].NumericValue)
        (x0, y0, x1, y1) = (float(v) for v in scoords[0].GraphicData)
        assert np.hypot(x1 - x0, y1 - y0) * 0.703125 == pytest.approx(value, abs=0.2)
    sites = [it for it in _walk(sr.ContentSequence)
             if it.ConceptNameCodeSequence[0].CodeValue == "363698007"]
    assert len(sites) == len(forced)


def test_reconcile_leaves_lung_findings_to_ct_chest(
    forced: list[Finding], lesion_run: Any, ct_chest_lidc_run: Any, lidc_series: Any
) -> None:
    chest = ct_chest_lidc_run.result
    assert chest.status is AnalysisStatus.COMPLETED
    nodule = chest.findings[0]
    assert nodule.center_mm is not None
    dup = forced[0].model_copy(update={"center_mm": nodule.center_mm, "tracking_id": "dup"})
    # a finding in the lung parenchyma (a lung-mask voxel far from any nodule)
    lung = chest.organ_masks[next(iter(chest.organ_masks))].array
    z, y, x = np.argwhere(lung)[len(np.argwhere(lung)) // 2]
    p = index_to_lps(lidc_series.image, (z, y, x))
    in_lung = forced[0].model_copy(update={"center_mm": tuple(float(v) for v in p),
                                           "tracking_id": "lung"})
    outside = forced[0].model_copy(update={"center_mm": (0.0, 0.0, -10_000.0),
                                           "tracking_id": "outside"})
    res = lesion_run.result.model_copy(update={"findings": [dup, in_lung, outside]})
    out = reconcile_with(res, chest, lidc_series.image)
    assert [f.center_mm for f in out.findings] == [outside.center_mm]
    assert any("left to ct-chest" in n for n in out.notes)
    # only a completed ct-chest result of the same series counts
    other = chest.model_copy(update={"series_instance_uid": "1.2.3"})
    assert reconcile_with(res, other, lidc_series.image) is res


def test_reconcile_refills_from_the_next_ranked_lesions(
    lesion_pipeline: CtLesionPipeline, lesion_run: Any, ct_chest_lidc_run: Any, lidc_series: Any
) -> None:
    out = lesion_pipeline.reconcile(lesion_run.result, [ct_chest_lidc_run.result], lidc_series)
    assert len(out.findings) <= 10
    assert [f.tracking_id for f in out.findings] == [f"Lesion {i}"
                                                      for i in range(1, len(out.findings) + 1)]
    chest = ct_chest_lidc_run.result
    for f in out.findings:  # none inside ct-chest's lungs
        again = reconcile_with(out.model_copy(update={"findings": [f]}), chest, lidc_series.image)
        assert again.findings == [f]
    assert out.measurements["lesion_count"] == len(out.findings)


def test_a_nine_slice_bundle_gets_nine_slice_inputs(lidc_series: Any, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue #15 Deliver 1 "3 (or 9) neighbouring slices": the bundle's ``in_channels`` decides."""
    import torch

    import cad_node.pipelines.ct_lesion.pipeline as lesion_pipeline_module
    from cad_node.models.network import build_network
    from trainer.export import write_bundle

    arch = {"builder": "lesion-centernet", "in_channels": 9, "channels": [8, 8, 8, 8],
            "neck": 8, "n_types": 8, "windows": [[-1024.0, 3071.0], [-175.0, 275.0]]}
    torch.manual_seed(0)
    write_bundle(
        tmp_path, name="ct-lesion", version="0.0.9", state_dict=build_network(arch).state_dict(),
        task="test of the 9-slice input path (untrained)", architecture=arch,
        input_spec={"spacing_mm": (1.6, 1.6, 2.0), "patch_size": (9, 256, 256),
                    "hu_window": (-1024.0, 3071.0), "outside_hu": -1024.0, "batch_size": 8},
        training_data={"description": "none: random weights"},
        output_spec={"kind": "logit", "positive_class": "lesion", "threshold": 0.5,
                     "operating_threshold": 0.5, "operating_rule": "test"})
    shapes: list[tuple[int, ...]] = []
    real_detect = lesion_pipeline_module.detect_inputs

    def spy(net: Any, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        shapes.append(tuple(inputs.shape))
        return real_detect(net, inputs, *args, **kwargs)

    monkeypatch.setattr(lesion_pipeline_module, "detect_inputs", spy)
    n = 16  # the first 16 slices of the real CT keep the test short
    part = dataclasses.replace(lidc_series, image=lidc_series.image[:, :, :n],
                               sop_instance_uids=lidc_series.sop_instance_uids[:n],
                               datasets=lidc_series.datasets[:n])
    run = CtLesionPipeline(models_dir=tmp_path).run_detailed(part)
    assert run.result.status is AnalysisStatus.COMPLETED, run.result.failure_reason
    assert run.result.model is not None and run.result.model.version == "0.0.9"
    assert shapes and all(s[1:] == (9, 256, 256) for s in shapes)
    assert sum(s[0] for s in shapes) == n
