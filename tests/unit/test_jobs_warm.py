"""A worker imports what a job can reach before it takes one (cad_node.jobs.tasks.warm_imports).

A fresh-clone CI run showed why: a 1 s soft time limit fired inside a job's first,
cold import of MONAI; MONAI's ``optional_import`` caught the ``SoftTimeLimitExceeded``
and the job failed with ``ImportError: cannot import name 'Convolution' from partially
initialized module 'monai.networks.blocks'`` instead of its time limit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.unit.test_jobs_celery import write_config

#: Modules jobs import lazily today, named here by hand (not from WARM_PACKAGES).
REACHED_BY_JOBS = [
    "monai.networks.blocks",
    "torch",
    "highdicom.sr",
    "highdicom.seg",
    "cad_node.pipelines.ct_chest.pipeline",
    "cad_node.pipelines.cxr.pipeline",
    "cad_node.pipelines.ct_lesion.pipeline",
    "cad_node.results.sr",
    "cad_node.results.seg",
    "cad_node.results.validate",
    "cad_node.export.sender",
]


def test_configure_worker_imports_every_module_a_job_reaches(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", tmp_path / "var", 4243)
    probe = (
        "import json, sys\n"
        f"wanted = {REACHED_BY_JOBS!r}\n"
        "from cad_node.config import load_config\n"
        "from cad_node.jobs.tasks import configure_worker\n"
        "before = [m for m in wanted if m in sys.modules]\n"
        f"configure_worker(load_config({str(config)!r}))\n"
        "print(json.dumps({'before': before,"
        " 'missing': [m for m in wanted if m not in sys.modules]}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).resolve().parents[2], check=True)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    # what importing the task module alone pulls in does not count: configure_worker must
    assert set(seen["before"]) < set(REACHED_BY_JOBS)
    assert seen["missing"] == []
