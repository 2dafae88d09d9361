"""Pipelines for job-machinery tests, registered when a test worker imports this module.

They stand in for a pipeline only where the thing under test is the job
machinery around it (time limits, supersession while running); the real
pipelines are tested on real data elsewhere.  Workers load them with
``python -c "import tests.unit.job_pipelines; from cad_node.cli import main; main()" worker``.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from cad_node.pipelines import register_pipeline
from cad_node.results.findings import AnalysisResult, AnalysisStatus, ModelIdentity

#: Environment variable naming the gate file of ``test-gated``.
GATE_ENV = "CAD_NODE_TEST_GATE"
#: Command line prefix that starts ``cad-node`` with these pipelines registered.
WORKER_PRELUDE = "import tests.unit.job_pipelines; from cad_node.cli import main; main()"
MODEL = ModelIdentity(name="test-model", version="1", device_uid="1.2.826.0.1.3680043.8.498.6")


@register_pipeline("test-sleep")
class SleepPipeline:
    """Sleeps in Python: the soft time limit's exception interrupts it."""

    name = "test-sleep"

    def run(self, series: Any, *, device: str = "cpu", progress: Any = None) -> AnalysisResult:
        time.sleep(120)
        raise AssertionError("the soft time limit should have ended this run")


@register_pipeline("test-stubborn")
class StubbornPipeline:
    """Swallows the soft time limit (as a careless ``except Exception`` would): only
    the hard limit, which kills the pool process, ends it."""

    name = "test-stubborn"

    def run(self, series: Any, *, device: str = "cpu", progress: Any = None) -> AnalysisResult:
        end = time.monotonic() + 120
        while time.monotonic() < end:
            try:
                time.sleep(0.05)
            except SoftTimeLimitExceeded:
                Path(os.environ[GATE_ENV]).with_suffix(".soft").touch()
        raise AssertionError("the hard time limit should have killed this run")


@register_pipeline("test-gated")
class GatedPipeline:
    """Signals that it runs (``<gate>.running``), waits for the gate file, then
    returns a completed analysis without findings."""

    name = "test-gated"

    def run(self, series: Any, *, device: str = "cpu", progress: Any = None) -> AnalysisResult:
        gate = Path(os.environ[GATE_ENV])
        gate.with_suffix(".running").touch()
        deadline = time.monotonic() + 120
        while not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        return AnalysisResult(pipeline=self.name, status=AnalysisStatus.COMPLETED,
                              series_instance_uid=series.series_instance_uid, model=MODEL)
