"""A failed analysis is reported to the PACS as a failure, never as "no findings".

The CT pipeline refuses a CT without lungs (a water cylinder); the job's analyse
stage must still build a conformant TID 1500 SR that states the failure, plus the
summary page, and record the reason in the job table.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom

from cad_node.config import (
    JobsConfig,
    NodeConfig,
    RoutingConfig,
    RoutingRule,
    SeriesMatch,
    Settings,
)
from cad_node.jobs.runner import MANIFEST_NAME, JobRunner
from cad_node.jobs.states import JobState
from trainer.synthetic import write_dicom_series

# dcm code for "Analysis failed"-type summary, as the results builder writes it
# (DCM 111245 "Failed analyses", PS3.16 CID 6042).
FAILED_ANALYSES_CODE = "111245"


def _water_cylinder_series(out: Path) -> list[Path]:
    nz, ny, nx = 48, 96, 96
    yy, xx = np.mgrid[:ny, :nx]
    body = (yy - ny / 2) ** 2 + (xx - nx / 2) ** 2 < (0.45 * nx) ** 2
    slab = np.where(body, 0, -1000).astype(np.int16)  # water in air, no lungs
    volume = np.repeat(slab[None], nz, axis=0)
    return write_dicom_series(volume, (2.5, 3.5, 3.5), (-168.0, -168.0, -60.0), out, seed=7)


def _codes(ds: pydicom.Dataset) -> set[str]:
    found: set[str] = set()
    for item in ds.get("ContentSequence", []):
        for key in ("ConceptNameCodeSequence", "ConceptCodeSequence"):
            for code in item.get(key, []):
                found.add(str(code.CodeValue))
        found |= _codes(item)
    return found


def test_refused_ct_yields_a_failure_sr_and_a_recorded_reason(tmp_path: Path) -> None:
    files = _water_cylinder_series(tmp_path / "in")
    settings = Settings(
        node=NodeConfig(storage_dir=str(tmp_path / "var")),
        jobs=JobsConfig(),
        routing=RoutingConfig(rules=[RoutingRule(
            name="chest-ct", pipeline="ct-chest",
            match=SeriesMatch(modality=["CT"], orientation="axial"))]),
    )
    runner = JobRunner(settings, device="cpu")
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in files]
    job, _ = runner.store.record_study_complete(
        study_id="1", study_instance_uid=str(headers[0].StudyInstanceUID), generation=1,
        fingerprint="water", instances=[
            {"series_instance_uid": str(h.SeriesInstanceUID),
             "sop_instance_uid": str(h.SOPInstanceUID), "path": str(p), "received_at": 0.0}
            for h, p in zip(headers, files, strict=True)])
    runner.store.enqueue(job.job_id)
    runner.store.transition(job.job_id, JobState.RUNNING)

    done = runner.analyse(job.job_id)

    assert done.state is JobState.RESULTS_READY
    assert "not a chest CT" in (done.error or "")
    out = runner.results_dir(done)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    kinds = sorted(e["kind"] for e in manifest)
    assert "sr" in kinds and "seg" not in kinds  # nothing segmented on a failure
    sr = pydicom.dcmread(out / next(e["file"] for e in manifest if e["kind"] == "sr"))
    assert sr.StudyInstanceUID == headers[0].StudyInstanceUID
    assert FAILED_ANALYSES_CODE in _codes(sr)
