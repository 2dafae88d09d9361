"""Synthetic phantom suite: known nodules in a lung-like volume with noise and vessels.

The phantom (``trainer.synthetic``) is written as a real CT DICOM series in a
shuffled file order, loaded, analysed once per module, and checked for
sensitivity, position error and size error.  The SEG built from the result is
read back and must align with the source slices by SOP Instance UID.  The
offline CLI runs on the same folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from cad_node.cli import app
from cad_node.config import ResultsConfig
from cad_node.imaging import index_to_lps, load_series
from cad_node.pipelines.ct_chest.pipeline import CtChestPipeline
from cad_node.results import build_results
from cad_node.results.findings import AnalysisStatus, FindingSite, NoduleType
from trainer.synthetic import NoduleSpec, make_phantom, random_nodule_specs, write_dicom_series

SHAPE = (100, 192, 192)
SPACING = (2.0, 1.5, 1.5)


@pytest.fixture(scope="module")
def phantom_case(tmp_path_factory: pytest.TempPathFactory):
    specs = random_nodule_specs(SHAPE, SPACING, 6, seed=11, diameter_range_mm=(5.0, 20.0))
    specs += [
        NoduleSpec(diameter_mm=10.0, center_vox=(55, 96, 40), juxtapleural=True),
        NoduleSpec(diameter_mm=12.0, center_vox=(45, 90, 150), juxtapleural=True,
                   axes=(1.0, 1.3, 0.8)),
    ]
    ph = make_phantom(SHAPE, SPACING, nodules=specs, seed=5)
    folder = tmp_path_factory.mktemp("phantom")
    files = write_dicom_series(ph.volume_hu, ph.spacing, ph.origin, folder, seed=5,
                               patient_age=67, patient_sex="F", shuffle_names=True)
    series = load_series(files)
    run = CtChestPipeline(use_scorer=False).run_detailed(series)
    return ph, folder, series, run


def _match(ph, result):
    """For each truth nodule: (truth, nearest finding or None, distance)."""
    out = []
    for n in ph.nodules:
        if not result.findings:
            out.append((n, None, np.inf))
            continue
        d = [np.linalg.norm(np.array(f.center_mm) - n.center_mm) for f in result.findings]
        i = int(np.argmin(d))
        out.append((n, result.findings[i] if d[i] < n.diameter_mm / 2 else None, d[i]))
    return out


def test_lungs_match_truth(phantom_case) -> None:
    ph, _, _, run = phantom_case
    assert run.result.status is AnalysisStatus.COMPLETED, run.result.failure_reason
    left = run.result.organ_masks[FindingSite.LEFT_LUNG].array
    right = run.result.organ_masks[FindingSite.RIGHT_LUNG].array
    for mask, label in ((left, 2), (right, 1)):  # phantom: 1 = right (low x), 2 = left
        truth = ph.lung_labels == label
        dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
        assert dice > 0.95
    # the phantom's trachea and main bronchi (air outside the lung labels) are excluded
    airway = (ph.volume_hu < -900) & (ph.lung_labels == 0)
    body = np.zeros_like(airway)
    body[:, 20:-20, 20:-20] = True  # away from the outside air at the border
    assert (airway & body).sum() > 100
    assert ((left | right) & airway & body).sum() < 0.02 * (airway & body).sum()


def test_sensitivity_position_and_size(phantom_case) -> None:
    ph, _, _, run = phantom_case
    res = run.result
    threshold = res.measurements["operating_threshold"]
    matches = _match(ph, res)
    assert {n.kind for n in ph.nodules} == {"solid", "part-solid", "ground-glass"}
    found = [(n, f, d) for n, f, d in matches if f is not None and f.probability >= threshold]
    assert len(found) >= 0.8 * len(matches), [(n.kind, n.diameter_mm, d)
                                               for n, f, d in matches]
    errors = [d for _, _, d in found]
    assert np.mean(errors) < 2.0
    size_err = [abs((6 * f.volume_mm3 / np.pi) ** (1 / 3) - n.diameter_mm) / n.diameter_mm
                for n, f, _ in found]
    assert np.median(size_err) < 0.15
    assert max(size_err) < 0.35
    for n, f, _ in found:
        if n.kind == "solid":
            assert f.nodule_type is NoduleType.SOLID
        if n.kind == "ground-glass":
            assert f.nodule_type is NoduleType.GROUND_GLASS
    # age and sex came from the DICOM header: Brock did not miss them
    assert not any("patient age missing" in note for note in res.notes)
    assert not any("patient sex missing" in note for note in res.notes)


def test_masks_round_trip_through_seg(phantom_case) -> None:
    _, folder, series, run = phantom_case
    res = run.result
    source = [pydicom.dcmread(p) for p in sorted(folder.iterdir())]
    seg_obj = next(o for o in build_results(res, source, settings=ResultsConfig(),
                                            objects=["seg"]) if o.kind == "seg")
    seg = hd.seg.Segmentation.from_dataset(seg_obj.dataset)
    uids = list(series.sop_instance_uids)
    pixels = seg.get_pixels_by_source_instance(uids)  # (n, rows, cols, segments)
    descs = {d.SegmentNumber: d for d in seg.SegmentSequence}
    left_num = next(k for k, d in descs.items() if d.SegmentLabel == FindingSite.LEFT_LUNG.meaning)
    col = sorted(descs).index(left_num)
    assert np.array_equal(pixels[..., col] > 0,
                          res.organ_masks[FindingSite.LEFT_LUNG].array)
    # The first finding's voxels, read back from the SEG, lie on the phantom's
    # truth nodule (its generator's mask and centre, not the pipeline's).
    ph = phantom_case[0]
    f = res.findings[0]
    (truth,) = [n for n, g, _ in _match(ph, res) if g is f]
    number = next(k for k, d in descs.items() if d.SegmentLabel == f.tracking_id)
    # (slices, rows, cols), the phantom's (z, y, x)
    voxels = pixels[..., sorted(descs).index(number)] > 0
    np.testing.assert_allclose(index_to_lps(series.image, [0, 0, 0]), ph.origin, atol=1e-3)
    assert voxels.shape == truth.mask.shape and voxels.any()
    centroid = index_to_lps(series.image, np.argwhere(voxels).mean(axis=0))
    assert np.linalg.norm(centroid - np.asarray(truth.center_mm)) < truth.diameter_mm / 4
    inside = (voxels & truth.mask).sum() / voxels.sum()
    assert inside > 0.5, f"only {inside:.0%} of the SEG voxels lie in the truth nodule"


def test_cli_analyze_writes_results(phantom_case, tmp_path: Path) -> None:
    _, folder, series, _ = phantom_case
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["analyze", str(folder), "--out", str(out),
                                      "--objects", "sr,seg"])
    assert result.exit_code == 0, result.output
    assert "Nodule 1" in result.output and "lung_rads:" in result.output
    summary = json.loads((out / "summary.json").read_text())
    # the default routing runs ct-chest only (ct-lesion is opt-in)
    assert sorted(a["pipeline"] for a in summary["analyses"]) == ["ct-chest"]
    (entry,) = [a for a in summary["analyses"] if a["pipeline"] == "ct-chest"]
    assert entry["status"] == "completed"
    assert entry["series_instance_uid"] == series.series_instance_uid
    assert entry["findings"] and entry["qualitative"]["lung_rads"]
    kinds = {o["kind"] for o in entry["objects"] if o["verdict"] == "ok"}
    assert kinds == {"sr", "seg"}
    assert (out / "analysis_001" / "findings.json").is_file()


def test_cli_analyze_refuses_unusable_folders(tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(app, ["analyze", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "not a folder" in r.output
    (tmp_path / "notes.txt").write_text("not dicom")
    r = runner.invoke(app, ["analyze", str(tmp_path)])
    assert r.exit_code == 2 and "no DICOM series" in r.output


def test_cnn_scorer_bundle_is_used_and_combined(phantom_case, tmp_path: Path) -> None:
    """With a scorer bundle installed the pipeline uses it: identity, threshold, combination.

    The bundle is a real one written by the trainer's exporter, with untrained
    (seeded) weights: this checks the plumbing, not accuracy.
    """
    import torch  # a hard dependency of cad-node (pyproject): never skipped

    from cad_node.models import load_bundle
    from cad_node.models.network import DEFAULT_ARCHITECTURE, build_network
    from cad_node.models.scorer import CandidateScorer
    from cad_node.pipelines.ct_chest.candidates import candidate_features, classical_probability
    from cad_node.pipelines.ct_chest.pipeline import SCORER_BUNDLE
    from trainer.export import write_bundle

    torch.manual_seed(0)
    net = build_network(DEFAULT_ARCHITECTURE)
    write_bundle(tmp_path, name=SCORER_BUNDLE, version="0.0.1", state_dict=net.state_dict(),
                 task="test bundle", architecture=DEFAULT_ARCHITECTURE,
                 input_spec={"spacing_mm": [1.5, 1.5, 1.5], "patch_size": [24, 24, 24],
                             "hu_window": [-1000.0, 400.0], "batch_size": 64},
                 output_spec={"threshold": 0.42},
                 training_data={"description": "none (untrained test weights)"})
    _, _, series, _ = phantom_case
    run = CtChestPipeline(models_dir=tmp_path).run_detailed(series)
    res = run.result
    bundle = load_bundle(SCORER_BUNDLE, tmp_path)
    assert res.model == bundle.identity
    from cad_node.pipelines.ct_chest.pipeline import CLASSICAL_OPERATING_THRESHOLD

    assert res.measurements["operating_threshold"] == pytest.approx(
        np.sqrt(0.42 * CLASSICAL_OPERATING_THRESHOLD))
    assert any("classical x CNN" in n for n in res.notes)
    cands = run.candidates
    centres = np.array([c.center_mm for c in cands])
    cnn = CandidateScorer(bundle).score(series.image, centres)
    lungs = run.lungs.lungs
    classical = classical_probability(candidate_features(series.image, lungs, cands),
                                      np.array([c.scale_mm for c in cands]))
    assert np.allclose(run.probabilities, np.sqrt(classical * cnn), atol=1e-6)


def test_context_fusion_bundle_and_run_variants(phantom_case, tmp_path: Path) -> None:
    """A bundle with a context fusion scores by it; run_variants reproduces both ways.

    Untrained (seeded) weights and a hand-set fusion: this checks the plumbing
    (pipeline, bundle record, variants sharing the stages), not accuracy.
    """
    import torch

    from cad_node.models import load_bundle
    from cad_node.models.network import DEFAULT_ARCHITECTURE, build_network
    from cad_node.models.scorer import CandidateScorer
    from cad_node.pipelines.ct_chest.candidates import candidate_features, classical_probability
    from cad_node.pipelines.ct_chest.features import ContextFusion, context_features
    from cad_node.pipelines.ct_chest.pipeline import SCORER_BUNDLE
    from trainer.export import write_bundle

    torch.manual_seed(0)
    net = build_network(DEFAULT_ARCHITECTURE)
    fusion = ContextFusion(("vesselness", "mediastinum_mm", "vessel_branches"),
                           (1.5, -1.0, 0.5, -0.3), 0.2)
    spec = {"spacing_mm": [1.5, 1.5, 1.5], "patch_size": [24, 24, 24],
            "hu_window": [-1000.0, 400.0], "batch_size": 64}
    for version, out in (("0.0.1", {"threshold": 0.42}),
                         ("0.0.2", {"threshold": 0.42, "context_fusion": fusion.to_mapping()})):
        write_bundle(tmp_path, name=SCORER_BUNDLE, version=version, state_dict=net.state_dict(),
                     task="test bundle", architecture=DEFAULT_ARCHITECTURE, input_spec=spec,
                     output_spec=out, training_data={"description": "untrained test weights"})
    plain, fused = load_bundle(SCORER_BUNDLE, tmp_path, "0.0.1"), load_bundle(SCORER_BUNDLE,
                                                                             tmp_path)
    assert fused.version == "0.0.2" and plain.identity.device_uid != fused.identity.device_uid
    _, _, series, _ = phantom_case
    pipe = CtChestPipeline(models_dir=tmp_path)
    run = pipe.run_detailed(series)
    assert run.result.model == fused.identity
    cands, lungs = run.candidates, run.lungs.lungs
    centres = np.array([c.center_mm for c in cands])
    classical = classical_probability(candidate_features(series.image, lungs, cands),
                                      np.array([c.scale_mm for c in cands]))
    expected = fusion.probability(CandidateScorer(fused).logits(series.image, centres),
                                  context_features(series.image, lungs, cands))
    assert np.allclose(run.probabilities, np.sqrt(classical * expected), atol=1e-6)
    # the variants share every stage: the fusion gives the fused bundle's findings, None
    # the plain sigmoid's
    with_fusion, without = pipe.run_variants(series, [fusion, None])
    assert [(f.center_mm, f.probability) for f in with_fusion.findings] == [
        (f.center_mm, f.probability) for f in run.result.findings]
    cnn = CandidateScorer(plain).score(series.image, centres)
    sigmoid_probs = sorted(round(float(v), 4) for v in np.sqrt(classical * cnn))
    assert all(f.probability <= sigmoid_probs[-1] + 1e-4 for f in without.findings)
    assert [f.probability for f in without.findings] != [f.probability for f in
                                                         with_fusion.findings]


def test_cli_analyze_unknown_pipeline_is_a_clear_failure(phantom_case, tmp_path: Path) -> None:
    _, folder, _, _ = phantom_case
    cfg = tmp_path / "node.yaml"
    cfg.write_text("routing:\n  rules:\n    - {name: r, pipeline: no-such-pipeline, "
                   "match: {modality: [CT]}}\n")
    r = CliRunner().invoke(app, ["analyze", str(folder), "--config", str(cfg)])
    assert r.exit_code == 1
    assert "no pipeline named 'no-such-pipeline'" in r.output
