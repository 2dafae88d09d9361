"""Routing rules applied to real DICOM headers (LIDC CT, pydicom MR/CT, a real CR)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from cad_node.config import RoutingConfig, RoutingRule, SeriesMatch
from cad_node.jobs.routing import plan_routes
from tests.conftest import require_data, skip_or_fail

LIDC_SERIES = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"

CHEST_CT = RoutingRule(
    name="chest-ct", pipeline="ct-chest",
    match=SeriesMatch(modality=["CT"], image_type=["ORIGINAL", "PRIMARY"], orientation="axial",
                      slice_thickness_mm=[0.0, 3.0], min_instances=40),
)
CXR = RoutingRule(
    name="cxr", pipeline="cxr",
    match=SeriesMatch(modality=["CR", "DX"], view_position=["PA", "AP"]),
)


@pytest.fixture(scope="module")
def mixed_study(lidc_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The real LIDC CT plus one MR and one small CT from pydicom's test files."""
    extra = tmp_path_factory.mktemp("extra")
    for name in ("MR_small.dcm", "CT_small.dcm"):
        shutil.copy(require_data("pydicom-test-files", name), extra / name)
    return sorted(lidc_dir.glob("*.dcm")) + sorted(extra.iterdir())


def test_chest_ct_rule_picks_the_lidc_series(mixed_study: list[Path]) -> None:
    plan = plan_routes(mixed_study, RoutingConfig(rules=[CHEST_CT, CXR]))
    assert [(s.rule, s.pipeline, s.series.series_instance_uid) for s in plan.steps] == [
        ("chest-ct", "ct-chest", LIDC_SERIES)]
    assert len(plan.steps[0].paths) == 133
    mr_file = next(p for p in mixed_study if p.name == "MR_small.dcm")
    mr_uid = str(pydicom.dcmread(mr_file, stop_before_pixels=True).SeriesInstanceUID)
    assert any("Modality MR" in r for r in plan.reasons[mr_uid])


def test_thickness_range_excludes(mixed_study: list[Path]) -> None:
    thin_only = CHEST_CT.model_copy(
        update={"match": CHEST_CT.match.model_copy(update={"slice_thickness_mm": [0.0, 2.0]})})
    plan = plan_routes(mixed_study, RoutingConfig(rules=[thin_only]))
    assert plan.steps == []
    assert any("slice thickness 2.5 mm outside" in r for r in plan.reasons[LIDC_SERIES])


def test_description_regex_and_all_series(mixed_study: list[Path]) -> None:
    rule = RoutingRule(name="any-ct", pipeline="ct-chest", series="all",
                       match=SeriesMatch(modality=["CT"]))
    plan = plan_routes(mixed_study, RoutingConfig(rules=[rule]))
    assert len(plan.steps) == 2  # the LIDC series and pydicom's CT_small
    rule_re = rule.model_copy(update={
        "match": SeriesMatch(modality=["CT"], series_description=r"^no such description$")})
    assert plan_routes(mixed_study, RoutingConfig(rules=[rule_re])).steps == []


@pytest.mark.parametrize(("view", "routed"), [("PA", True), ("AP", True), ("LL", False)])
def test_cr_view_position_rule(view: str, routed: bool, tmp_path: Path) -> None:
    cxr_dir = require_data("cxr-dicom-siim")
    files = [p for p in sorted(cxr_dir.rglob("*")) if p.is_file() and p.suffix == ".dcm"]
    if not files:
        skip_or_fail(f"no CR file in {cxr_dir}")
    # The real CR header, with the View Position under test (the file's own is PA).
    ds = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert ds.Modality == "CR"
    ds.ViewPosition = view
    path = tmp_path / "cr.dcm"
    ds.save_as(path, enforce_file_format=True)
    plan = plan_routes([path], RoutingConfig(rules=[CHEST_CT, CXR]))
    reasons = plan.reasons[str(ds.SeriesInstanceUID)]
    assert plan.pipelines == (["cxr"] if routed else [])
    assert any("Modality" in r for r in reasons)  # why chest-ct did not match
    assert any("ViewPosition ['LL']" in r for r in reasons) is not routed


def test_unreadable_files_are_reported(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom")
    plan = plan_routes([junk], RoutingConfig(rules=[CHEST_CT]))
    assert plan.steps == [] and str(junk) in plan.unreadable
