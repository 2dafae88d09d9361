"""Two pipelines on one series: the reconciling one runs last and sees the other's result."""

from __future__ import annotations

from typing import Any

from cad_node.jobs.runner import _reconciles, run_pipeline
from cad_node.pipelines import available_pipelines, get_pipeline, register_pipeline
from cad_node.results.findings import AnalysisResult, AnalysisStatus

SEEN: list[list[str]] = []


class _First:
    name = "test-first"

    def run(self, series: Any, *, device: str = "cpu", progress: Any = None) -> AnalysisResult:
        return AnalysisResult(pipeline=self.name, status=AnalysisStatus.COMPLETED,
                              series_instance_uid="1.2.3")


class _Second(_First):
    name = "test-second"

    def reconcile(self, result: AnalysisResult, others: list[AnalysisResult],
                  series: Any) -> AnalysisResult:
        SEEN.append([o.pipeline for o in others])
        return result.model_copy(update={"notes": ["reconciled"]})


if "test-first" not in available_pipelines():
    register_pipeline("test-first")(_First)
    register_pipeline("test-second")(_Second)


def test_reconciling_pipelines_sort_last() -> None:
    assert not _reconciles("test-first") and _reconciles("test-second")
    assert _reconciles("ct-lesion") and not _reconciles("ct-chest")
    assert not _reconciles("no-such-pipeline")
    order = sorted(["test-second", "ct-lesion", "test-first", "ct-chest"], key=_reconciles)
    assert order == ["test-first", "ct-chest", "test-second", "ct-lesion"]


def test_reconcile_gets_the_earlier_results_of_the_series() -> None:
    first = run_pipeline("test-first", None, device="cpu")
    alone = run_pipeline("test-second", None, device="cpu")
    assert alone.notes == [] and not SEEN  # nothing earlier: not called
    both = run_pipeline("test-second", None, device="cpu", earlier=[first])
    assert both.notes == ["reconciled"] and SEEN == [["test-first"]]
    assert get_pipeline("ct-lesion").name == "ct-lesion"
