"""Operating the node: status page in a real browser, the README configuration, live reload,
the audit trail and retention, against real peers on loopback.

One ``cad-node serve`` (configured with exactly the README's three keys, the
test-only values given as ``CAD_NODE_*`` environment overrides) and one
Orthanc serve every test of the module:

* headless Chromium (Debian ``chromium`` + ``chromium-driver``, selenium)
  watches the status page while dcmtk ``storescu`` sends the real
  LIDC-IDRI-0001 CT, until the study shows "sent";
* the results reach Orthanc (REST API);
* peers are added and removed with ``cad-node peers ... --reload`` (SIGHUP)
  while a pynetdicom association is half-way through a transfer;
* a small phantom study no rule matches shows as "not routed";
* every audit event type is in the node's audit file.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import yaml
from typer.testing import Result

from cad_node.audit import AuditEvent, read_events
from cad_node.jobs.states import JobState
from cad_node.jobs.store import Job, JobStore
from cad_node.live import read_generation
from tests.conftest import REPO_ROOT, STORESCU, free_port, require_program
from tests.system.conftest import OrthancServer, ServeProcess
from tests.unit.test_jobs_celery import phantom_study

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
TOKEN = "test-token-0123456789abcdef"
_DONE = {JobState.SENT, JobState.FAILED, JobState.DEAD}


def readme_config() -> dict[str, Any]:
    """The YAML block the README shows under "The keys operators script against"."""
    text = (REPO_ROOT / "README.md").read_text()
    block = text.split("The keys operators script against", 1)[1]
    match = re.search(r"```yaml\n(.*?)```", block, re.S)
    assert match, "README has no yaml block after 'The keys operators script against'"
    data = yaml.safe_load(match.group(1))
    assert set(data) == {"node", "peers", "destinations"}, data
    return dict(data)


class OpsNode(ServeProcess):
    """``cad-node serve`` on the README's three-key configuration (site values filled in)."""

    log_tail = 8000

    def __init__(self, workdir: Path, orthanc: OrthancServer) -> None:
        super().__init__()
        self.workdir = workdir
        self.port = free_port()
        self.web_port = free_port()
        self.metrics_port = free_port()
        cfg = readme_config()
        cfg["node"]["host"] = "127.0.0.1"
        cfg["node"]["port"] = self.port
        assert cfg["node"]["storage_dir"] == "./var"  # relative: resolved against the file
        cfg["destinations"][0].update(ae_title=orthanc.ae_title, port=orthanc.dicom_port)
        (workdir / "etc").mkdir(parents=True, exist_ok=True)
        self.config = workdir / "etc" / "cad-node.yaml"
        self.config.write_text("# site configuration (comment kept by admin edits)\n"
                               + yaml.safe_dump(cfg, sort_keys=False))
        self.storage = workdir / "etc" / "var"
        self.env = dict(
            os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
            CAD_NODE_STUDY__SERIES_QUIET_S="1", CAD_NODE_STUDY__STUDY_QUIET_S="2",
            CAD_NODE_STUDY__POLL_INTERVAL_S="0.2",
            CAD_NODE_WEB__ENABLED="true", CAD_NODE_WEB__PORT=str(self.web_port),
            CAD_NODE_WEB__REFRESH_S="1",
            CAD_NODE_WEB__TOKENS=f"[{{name: alice, token: {TOKEN}}}]",
            CAD_NODE_METRICS__PORT=str(self.metrics_port),
            CAD_NODE_JOBS__DEVICE="cpu",
            # dciodvfy on these very objects is tests/system/test_e2e.py's job; here the
            # in-process conformance gate suffices and the module stays short.
            CAD_NODE_RESULTS__USE_DCIODVFY="false",
        )
        self.store = JobStore.for_storage(self.storage)

    def cli(self, *args: str, check: bool = True) -> Result:
        """``cad-node ARGS`` in-process, with the node's environment (a wide terminal)."""
        from typer.testing import CliRunner

        from cad_node.cli import app

        overrides = {k: v for k, v in self.env.items() if k.startswith("CAD_NODE_")}
        result = CliRunner().invoke(app, list(args), env={**overrides, "COLUMNS": "300"})
        if check:
            assert result.exit_code == 0, result.stdout + result.stderr
        return result

    def start(self) -> None:
        elsewhere = self.workdir / "elsewhere"
        elsewhere.mkdir(exist_ok=True)
        # Started from another directory: ./var must still land next to the file.
        self.spawn(env=self.env, cwd=elsewhere)
        self.wait_serving(90, ready=self._web_answers)

    def _web_answers(self) -> bool:
        try:
            self.get("/api/overview")
        except OSError:
            return False
        return True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=30) as rsp:
            return json.loads(rsp.read().decode())

    def post(self, path: str, token: str | None = TOKEN) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, method="POST", data=b"")
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=60) as rsp:
                return rsp.status, json.loads(rsp.read().decode())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read().decode())

    def wait_job(self, study_uid: str, timeout: float = 600.0) -> Job:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            jobs = self.store.list_jobs(study_instance_uid=study_uid, limit=None)
            if jobs and jobs[0].state in _DONE:
                return jobs[0]
            time.sleep(0.3)
        raise AssertionError(f"study {study_uid} not done\n{self.log()}")


@pytest.fixture(scope="module")
def node(orthanc: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpsNode]:
    n = OpsNode(tmp_path_factory.mktemp("ops"), orthanc)
    with n.running():
        yield n


@pytest.fixture(scope="module")
def ct_study_uid(ct_files: list[Path]) -> str:
    return str(pydicom.dcmread(ct_files[0], stop_before_pixels=True).StudyInstanceUID)


@pytest.fixture(scope="module")
def browser_run(node: OpsNode, ct_files: list[Path], ct_study_uid: str,
                tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Chromium on the status page while storescu sends the real CT, until it shows "sent"."""
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    require_program(CHROMIUM)
    require_program(CHROMEDRIVER)
    out = tmp_path_factory.mktemp("browser")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                f"--user-data-dir={out / 'profile'}", "--window-size=1600,1200"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.get(node.url + "/")
        assert driver.title == "cad-node status"
        storescu = subprocess.Popen(
            [require_program(STORESCU), "-aet", "MODALITY", "-aec", "CADNODE", "127.0.0.1",
             str(node.port), *map(str, ct_files)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        seen: list[str] = []
        state = ""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            # Read in one script: the page re-renders its rows on every refresh.
            state = driver.execute_script(
                "const c = document.querySelector(arguments[0]); return c ? c.textContent : '';",
                f'tr[data-study-uid="{ct_study_uid}"] td.state')
            if state and (not seen or seen[-1] != state):
                seen.append(state)
            if state in ("sent", "failed", "dead"):
                break
            time.sleep(0.3)
        out_s, _ = storescu.communicate(timeout=120)
        assert storescu.returncode == 0, out_s
        time.sleep(1.5)  # one more refresh: the timeline of the sent job
        shot = out / "status-page.png"
        driver.save_screenshot(str(shot))
        stages = dict(driver.execute_script(
            "return Array.from(document.querySelectorAll(arguments[0]))"
            ".map(s => [s.dataset.stage, s.textContent]);",
            f'tr[data-study-uid="{ct_study_uid}"] span.stage'))
        logs = driver.get_log("browser")
        if os.environ.get("CAD_NODE_SCREENSHOT_DIR"):  # keep a copy outside pytest's tmp
            shutil.copy(shot, Path(os.environ["CAD_NODE_SCREENSHOT_DIR"]) / shot.name)
        print(f"screenshot: {shot}")
        return {"state": state, "seen": seen, "screenshot": shot, "stages": stages,
                "console": logs}
    finally:
        driver.quit()


def test_browser_shows_the_real_ct_sent(browser_run: dict[str, Any]) -> None:
    assert browser_run["state"] == "sent", (browser_run["seen"], browser_run["stages"])
    shot: Path = browser_run["screenshot"]
    assert shot.stat().st_size > 10_000
    # The page's own JS produced no console errors (SEVERE), nor warnings.
    bad = [e for e in browser_run["console"] if e["level"] in ("SEVERE", "WARNING")]
    assert not bad, bad
    stages = browser_run["stages"]
    assert list(stages) == ["received", "complete", "routed", "analysed", "built", "validated",
                            "sent"]
    for name, text in stages.items():
        if name != "received":
            assert re.fullmatch(rf"{name}: \d+\.\d+ s", text), (name, text)


def test_readme_three_keys_analyse_the_real_ct_into_orthanc(
    node: OpsNode, browser_run: dict[str, Any], ct_study_uid: str, orthanc: OrthancServer,
) -> None:
    assert set(yaml.safe_load(node.config.read_text())) == {"node", "peers", "destinations"}
    check = node.cli("config", "check", str(node.config))
    assert "built-in" in check.stdout and "chest-ct" in check.stdout, check.stdout
    assert str(node.storage) in check.stdout.replace("\n", "")
    assert (node.storage / "spool" / "index.sqlite3").is_file()
    assert not (node.workdir / "elsewhere" / "var").exists()
    job = node.wait_job(ct_study_uid)
    assert job.state is JobState.SENT, job.error
    sent = node.store.sent_objects(job.job_id, "pacs")
    assert {o.kind for o in sent} == {"sr", "seg", "sc"}
    in_pacs = {i["MainDicomTags"]["SOPInstanceUID"]
               for i in orthanc.study_instances(ct_study_uid)}
    assert {o.sop_instance_uid for o in sent} <= in_pacs
    detail = node.get(f"/api/jobs/{job.job_id}")
    assert detail["destinations"]["pacs"]["state"] == "acknowledged", detail["destinations"]
    assert {s["sop_instance_uid"] for s in detail["sent"]} == {o.sop_instance_uid for o in sent}
    overview = node.get("/api/overview")
    row = next(s for s in overview["studies"] if s["study_instance_uid"] == ct_study_uid)
    assert row["state"] == "sent" and row["instances"] == 133


def _scu_assoc(node: OpsNode, calling: str) -> Any:
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage, Verification

    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    return ae.associate("127.0.0.1", node.port, ae_title="CADNODE")


def _wait_generation(node: OpsNode, generation: int) -> None:
    deadline = time.monotonic() + 30
    while read_generation(node.storage) < generation:
        assert time.monotonic() < deadline, node.log()
        time.sleep(0.1)


def test_peers_change_live_while_an_association_is_mid_transfer(
    node: OpsNode, browser_run: dict[str, Any], tmp_path: Path,
) -> None:
    files = sorted(phantom_study(tmp_path / "p", seed=31, slices=12))
    datasets = [pydicom.dcmread(f) for f in files]
    generation = read_generation(node.storage)
    node.cli("peers", "add", "LIVEPEER", "127.0.0.1", "--config", str(node.config), "--reload")
    _wait_generation(node, generation + 1)
    assoc = _scu_assoc(node, "LIVEPEER")
    assert assoc.is_established
    try:
        statuses = [int(assoc.send_c_store(ds).Status) for ds in datasets[:6]]
        # Mid-transfer: LIVEPEER is removed and NEWPEER added, applied by SIGHUP.
        node.cli("peers", "remove", "LIVEPEER", "--config", str(node.config), "--reload")
        node.cli("peers", "add", "NEWPEER", "127.0.0.1", "--config", str(node.config),
                 "--reload")
        _wait_generation(node, generation + 3)
        assert assoc.is_established
        statuses += [int(assoc.send_c_store(ds).Status) for ds in datasets[6:]]
    finally:
        assoc.release()
    assert statuses == [0x0000] * len(datasets)
    assert "# site configuration (comment kept by admin edits)" in node.config.read_text()
    listed = node.cli("peers", "list", "--config", str(node.config)).stdout
    assert "NEWPEER" in listed and "LIVEPEER" not in listed
    again = _scu_assoc(node, "LIVEPEER")
    assert again.is_rejected, "a removed peer's next association must be rejected"
    fresh = _scu_assoc(node, "NEWPEER")
    assert fresh.is_established
    assert int(fresh.send_c_echo().Status) == 0x0000
    fresh.release()
    # A bad file is rejected and the running configuration kept.
    good = node.config.read_text()
    node.config.write_text(good + "peers: [oops\n")
    try:
        os.kill(int((node.storage / "serve.pid").read_text()), signal.SIGHUP)
        time.sleep(1.5)
        assert read_generation(node.storage) == generation + 3
        still = _scu_assoc(node, "NEWPEER")
        assert still.is_established
        still.release()
    finally:
        node.config.write_text(good)
    assert "reload rejected, configuration unchanged" in node.log()


def test_a_study_no_rule_matches_is_shown_not_routed(
    node: OpsNode, browser_run: dict[str, Any],
) -> None:
    # The 12-slice phantom of the previous test: fewer than the 40 instances chest-ct needs.
    deadline = time.monotonic() + 120
    row = None
    while time.monotonic() < deadline:
        rows = [s for s in node.get("/api/overview")["studies"]
                if s["patient_id"] == "PHANTOM31"]
        if rows and rows[0]["state"] == "not routed":
            row = rows[0]
            break
        time.sleep(0.5)
    assert row is not None, node.log()
    assert "40" in row["job"]["not_routed_reason"], row["job"]
    routed = next(t for t in row["timeline"] if t["stage"] == "routed")
    assert routed["error"].startswith("not routed: no routing rule matched")
    status = node.cli("status", "--config", str(node.config)).stdout
    assert "not routed" in status
    with urllib.request.urlopen(f"http://127.0.0.1:{node.metrics_port}/metrics",
                                timeout=10) as rsp:
        lines = [ln for ln in rsp.read().decode().splitlines() if "not_routed" in ln]
    assert "cad_node_jobs_not_routed 1.0" in lines, lines


def test_write_actions_need_a_token_and_every_audit_event_is_recorded(
    node: OpsNode, browser_run: dict[str, Any], ct_study_uid: str,
) -> None:
    assert node.post("/api/destinations/pacs/echo", token=None)[0] == 401
    assert node.post("/api/destinations/pacs/echo", token="wrong-token-0123456789")[0] == 401
    code, body = node.post("/api/destinations/pacs/echo")
    assert code == 200 and body["ok"], body
    code, body = node.post("/api/reload")
    assert code == 200 and body["ok"], body
    # Retention dry run while the node runs: the acknowledged CT would go, the phantom not.
    dry = node.cli("spool", "purge", "--dry-run", "--days", "0", "--config",
                   str(node.config)).stdout
    assert "would delete" in dry and "keep" in dry, dry
    assert node.cli("spool", "purge", "--days", "0", "--config", str(node.config),
                    check=False).exit_code == 2  # the node holds the spool
    events = read_events(node.storage / "audit")
    kinds = {e["event"] for e in events}
    assert kinds >= {k.value for k in AuditEvent}, kinds
    by = {k: [e for e in events if e["event"] == k.value] for k in AuditEvent}
    assert any(e["source"] == {"ae_title": "MODALITY", "address": "127.0.0.1"}
               for e in by[AuditEvent.ASSOCIATION_ACCEPTED])
    rejected = [e for e in by[AuditEvent.ASSOCIATION_REJECTED] if e["actor"] == "LIVEPEER"]
    assert rejected and rejected[0]["reason"] == "calling-ae"
    assert rejected[0]["source"] == {"ae_title": "LIVEPEER", "address": "127.0.0.1"}
    stored = [e for e in by[AuditEvent.INSTANCES_STORED]
              if any(s["study_instance_uid"] == ct_study_uid for s in e["studies"])]
    assert sum(e["count"] for e in stored) == 133
    sent = [e for e in by[AuditEvent.RESULTS_SENT] if e["study_instance_uid"] == ct_study_uid]
    assert sent and sent[0]["destination"]["name"] == "pacs"
    assert {i["status"] for i in sent[0]["instances"]} == {0}
    assert len(sent[0]["instances"]) >= 3
    changes = by[AuditEvent.CONFIG_CHANGED]
    assert any(e["actor"].startswith("cli:") and "LIVEPEER" in e["change"] for e in changes)
    assert any(e["actor"] == "alice" and e["change"] == "reload" for e in changes)
    assert any(e["outcome"] != 0 and e["change"] == "reload rejected" for e in changes)
    assert any(e["actor"] == "alice" and e["action"] == "c-echo"
               for e in by[AuditEvent.ADMIN_ACTION])
