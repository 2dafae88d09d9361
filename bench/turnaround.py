"""Turnaround benchmark: real CT in, results acknowledged by Orthanc, on CPU.

Runs the real system on loopback: ``cad-node serve`` (SCP + embedded SQLite
broker + worker), dcmtk ``storescu`` as the modality and Orthanc as the PACS.
The clock starts at the "study complete" hand-off (the study-quiet timer is
excluded) and stops when the last result object is acknowledged; the job
table's timeline gives the stages:

* ``hand-off``   complete -> queued (job row + message published)
* ``pickup``     queued -> running (broker to worker)
* ``analyse``    running -> results-ready, split into route / load /
  inference / build / validate (the conformance gate, dciodvfy included)
* ``send``       results-ready -> sent (C-STORE of every object)

Peer measured in the same run: dcmtk ``storescu`` sending the very same
result files to the same Orthanc (the ``send`` ratio).

Usage::

    .venv/bin/python bench/turnaround.py [--repeat N] [--threads 2] [--shipped-routing]
                                         [--ct-lesion]

``--shipped-routing`` routes with ``config/cad-node.yaml`` (ct-chest; the
ct-lesion rule is commented out there, it is opt-in); ``--ct-lesion`` adds that
opt-in rule, so ct-chest and ct-lesion run on the same series (goal for both:
30 s).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from cad_node.jobs.states import JobState  # noqa: E402
from cad_node.jobs.store import JobStore  # noqa: E402
from tests.conftest import STORESCU, data_root  # noqa: E402
from tests.system.conftest import OrthancServer  # noqa: E402
from tests.system.test_e2e import Node  # noqa: E402

GOAL_S = 20.0
_STAGE = re.compile(r"(route|load|inference|build|validate) ([0-9.]+)s")


def _lidc_files() -> list[Path]:
    root = data_root() / "lidc-idri-0001" / "LIDC-IDRI-0001"
    series = [p.parent for p in root.rglob("069.xml")]
    if len(series) != 1:
        raise SystemExit(f"LIDC-IDRI-0001 not found under {root}")
    return sorted(series[0].glob("*.dcm"))


def _one_run(workdir: Path, pacs: OrthancServer, files: list[Path],
             shipped_routing: bool = False, ct_lesion: bool = False) -> dict[str, float]:
    node = Node(workdir / "node", pacs.dicom_port)
    if shipped_routing or ct_lesion:  # the rules of config/cad-node.yaml (+ the opt-in one)
        import yaml

        from cad_node.config import load_config
        from tests.system.test_ct_lesion_e2e import CT_LESION_RULE

        cfg = yaml.safe_load(node.config.read_text())
        cfg["routing"] = yaml.safe_load((REPO / "config" / "cad-node.yaml").read_text())[
            "routing"]
        if ct_lesion:
            cfg["routing"]["rules"].append(CT_LESION_RULE)
        node.config.write_text(yaml.safe_dump(cfg))
        node.settings = load_config(node.config)
    node.start()
    try:
        if not node.store.workers():
            deadline = time.monotonic() + 60
            while not node.store.workers() and time.monotonic() < deadline:
                time.sleep(0.2)
        t0 = time.monotonic()
        node.send(files)
        ingest_s = time.monotonic() - t0
        study_uid = str(__import__("pydicom").dcmread(files[0], stop_before_pixels=True)
                        .StudyInstanceUID)
        job = node.wait_job(study_uid, {JobState.SENT, JobState.FAILED, JobState.DEAD},
                            timeout=900)
        if job.state is not JobState.SENT:
            raise SystemExit(f"job ended {job.state.value}: {job.error}")
        store: JobStore = node.store
        at: dict[str, float] = {}
        stages: dict[str, float] = {}
        for ev in store.events(job.job_id):
            at.setdefault(ev.state.value, ev.at)  # first occurrence of each state
            if ev.state is JobState.RESULTS_READY and ev.detail:
                stages = {k: float(v) for k, v in _STAGE.findall(ev.detail)}
        out = {
            "turnaround": job.turnaround_s or 0.0,
            "hand-off": at["queued"] - at["complete"],
            "pickup": at["running"] - at["queued"],
            "analyse": at["results-ready"] - at["running"],
            "send": at["sent"] - at["results-ready"],
            "storescu-in (peer: study into the node)": ingest_s,
            "objects": float(len(store.sent_objects(job.job_id))),
        }
        out.update({f"  {k}": v for k, v in stages.items()})
        # Peer: dcmtk storescu sending the same result files to the same Orthanc.
        results = sorted((node.workdir / "var" / "results").rglob("step*.dcm"))
        t0 = time.monotonic()
        subprocess.run([STORESCU, "-R", "-aet", "PEER", "-aec", pacs.ae_title, "127.0.0.1",
                        str(pacs.dicom_port), *map(str, results)], check=True,
                       capture_output=True, timeout=300)
        out["storescu-out (peer: same results to Orthanc)"] = time.monotonic() - t0
        return out
    finally:
        node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs (fresh node each)")
    parser.add_argument("--threads", type=int, default=2, help="torch/OMP threads")
    parser.add_argument("--shipped-routing", action="store_true",
                        help="route with config/cad-node.yaml (ct-chest; ct-lesion is opt-in)")
    parser.add_argument("--ct-lesion", action="store_true",
                        help="shipped routing plus the opt-in ct-lesion rule (both CT pipelines)")
    args = parser.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["CAD_NODE_JOBS__DEVICE"] = "cpu"
    files = _lidc_files()
    runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="cad-node-bench-") as tmp:
        work = Path(tmp)
        (work / "orthanc").mkdir()
        pacs = OrthancServer(work / "orthanc")
        pacs.start()
        try:
            for i in range(args.repeat):
                pacs.delete_all()
                runs.append(_one_run(work / f"run{i}", pacs, files, args.shipped_routing,
                                     args.ct_lesion))
                shutil.rmtree(work / f"run{i}", ignore_errors=True)
        finally:
            pacs.stop()
    keys = list(runs[0])
    print(f"LIDC-IDRI-0001: {len(files)} CT slices, {args.repeat} run(s), CPU, "
          f"{os.cpu_count()} cores; median (min-max) seconds")
    for k in keys:
        vals = [r.get(k, 0.0) for r in runs]
        print(f"{k:<48} {statistics.median(vals):8.2f}  ({min(vals):.2f}-{max(vals):.2f})")
    med = statistics.median(r["turnaround"] for r in runs)
    send = statistics.median(r["send"] for r in runs)
    peer = statistics.median(r["storescu-out (peer: same results to Orthanc)"] for r in runs)
    print(f"turnaround / goal {GOAL_S:.0f} s = {med / GOAL_S:.2f}; "
          f"send / storescu of the same objects = {send / peer:.2f}")


if __name__ == "__main__":
    main()
