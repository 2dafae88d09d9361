"""The stage clock and the CT input checks shared by ct-chest and ct-lesion."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import SimpleITK as sitk  # noqa: N813
from pydicom.dataset import Dataset

from cad_node.imaging import LoadedSeries
from cad_node.pipelines._ct_input import axial_problem, ct_problem, failed_result
from cad_node.pipelines._stages import StageClock
from cad_node.results.findings import AnalysisStatus


def test_clock_reports_to_the_callback_and_times_each_stage() -> None:
    seen: list[tuple[str, float]] = []
    clock = StageClock(lambda s, f: seen.append((s, f)))
    clock.report("a", 0.0)
    time.sleep(0.02)
    clock.lap("a")
    clock.report("b", 1.0)
    clock.lap("b")
    assert seen == [("a", 0.0), ("b", 1.0)]
    assert list(clock.timings_s) == ["a", "b"] == list(clock.cpu_s)
    assert clock.timings_s["a"] >= 0.02 > clock.timings_s["b"]


def test_clock_without_callback_and_fraction_out_of_range() -> None:
    clock = StageClock(None)
    clock.report("x", 0.5)
    with pytest.raises(ValueError, match=r"fraction 1\.5 of stage 'x'"):
        clock.report("x", 1.5)


def _series(modality: str = "CT", sop: str = "1.2.840.10008.5.1.4.1.1.2",
            direction: tuple[float, ...] = (1, 0, 0, 0, 1, 0, 0, 0, 1)) -> LoadedSeries:
    img = sitk.GetImageFromArray(np.zeros((3, 4, 4), dtype=np.int16))
    img.SetDirection(direction)
    ds = Dataset()
    ds.SOPClassUID = sop
    return LoadedSeries(image=img, sop_instance_uids=("1.2.3.1", "1.2.3.2", "1.2.3.3"),
                        datasets=(ds, ds, ds), study_instance_uid="1.2.3",
                        series_instance_uid="1.2.3.4", modality=modality)


def test_ct_checks_name_the_problem() -> None:
    assert ct_problem(_series(), "ct-lesion") is None
    assert ct_problem(_series(modality="MR"), "ct-lesion") == "modality MR: ct-lesion needs CT"
    assert ct_problem(_series(sop="1.2.840.10008.5.1.4.1.1.4"), "ct-chest") == (
        "SOP Class 1.2.840.10008.5.1.4.1.1.4 is not a CT image")
    assert axial_problem(_series()) is None
    coronal = (1, 0, 0, 0, 0, 1, 0, -1, 0)
    assert axial_problem(_series(direction=coronal)) == (
        "not an axial series (slice normal is not head-foot)")


def test_failed_result_keeps_the_model_and_logs_the_uids(
        caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.stages")
    with caplog.at_level(logging.WARNING, logger="test.stages"):
        r = failed_result("ct-lesion", _series(), "too thin", None, log)
    assert r.status is AnalysisStatus.FAILED and r.failure_reason == "too thin"
    assert r.series_instance_uid == "1.2.3.4" and r.pipeline == "ct-lesion"
    assert "study 1.2.3 series 1.2.3.4: too thin" in caplog.text
