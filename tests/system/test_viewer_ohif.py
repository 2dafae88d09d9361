"""OHIF 3 in headless Chromium shows our results for the real LIDC-IDRI-0001 CT.

Peers, all real and on loopback: Orthanc with Debian's DICOMweb plugin (the
PACS), the built ``@ohif/app`` from npm behind a one-origin server that also
proxies ``/dicom-web`` (:mod:`tests.system.viewer_peers`), Debian Chromium
driven by selenium through Debian's chromedriver.

The CT and the node's result objects for the ``ohif`` output profile go into
Orthanc; the test then does what a radiologist does: opens the study, loads
the SR (and accepts measurement tracking), reads the measurements panel,
loads the SEG and reads the segmentation panel.  Expected values come from
the SR file itself, read with highdicom (not from the code that wrote it).
Screenshots and the browser console go to the test's temporary directory.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pydicom
import pytest

from cad_node.config import OUTPUT_PROFILES, ResultsConfig
from cad_node.results import build_results
from tests.system.conftest import OrthancServer
from tests.system.viewer_peers import (
    ViewerServer,
    chromium_driver,
    ohif_dist,
    require_dicomweb_plugin,
)

pytestmark = pytest.mark.slow

#: The ``ohif`` output profile (SR + SEG + SC; GSPS/KOS are for other viewers).
OBJECTS = OUTPUT_PROFILES["ohif"]
#: Long axis in the panel vs the SR's planar Long Axis NUM (issue #13), mm.
LONG_AXIS_TOLERANCE_MM = 0.5
_TIMEOUT_S = 90.0
_LONG_AXIS_CODE = "103339001"


@pytest.fixture(scope="module")
def study(
    ct_chest_lidc_run: Any, lidc_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The real CT and our result objects on disk, with what the SR says."""
    out = tmp_path_factory.mktemp("ohif-results")
    source = [pydicom.dcmread(p) for p in sorted(lidc_dir.glob("*.dcm"))]
    objs = build_results(ct_chest_lidc_run.result, source,
                         settings=ResultsConfig(use_dciodvfy=False), objects=OBJECTS)
    files = []
    for obj in objs:
        path = out / obj.filename
        obj.dataset.save_as(path, enforce_file_format=True)
        files.append(path)
    (sr_path,) = [p for p in files if p.name.startswith("sr_")]
    sr = hd.sr.srread(sr_path)
    groups = sr.content.get_planar_roi_measurement_groups()
    expected = {}
    for g in groups:
        (la,) = [m for m in g.get_measurements() if m.name.value == _LONG_AXIS_CODE]
        expected[str(g.tracking_uid)] = float(la.value)
    seg = next(o.dataset for o in objs if o.kind == "seg")
    return {
        "ct": sorted(lidc_dir.glob("*.dcm")),
        "ct_series_number": int(source[0].SeriesNumber),
        "results": files,
        "study_uid": str(source[0].StudyInstanceUID),
        "long_axes": expected,
        "segments": [str(s.SegmentLabel) for s in seg.SegmentSequence],
        "uids": {str(o.dataset.SOPInstanceUID) for o in objs}
        | {str(o.dataset.SeriesInstanceUID) for o in objs},
    }


@pytest.fixture(scope="module")
def pacs(
    tmp_path_factory: pytest.TempPathFactory, study: dict[str, Any]
) -> Iterator[OrthancServer]:
    """Orthanc with DICOMweb, holding the CT and our results."""
    plugin = require_dicomweb_plugin()
    server = OrthancServer(tmp_path_factory.mktemp("orthanc-dicomweb"), extra={
        "Plugins": [plugin],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True},
    })
    server.start()
    try:
        for path in [*study["ct"], *study["results"]]:
            req = urllib.request.Request(server.base + "/instances", data=path.read_bytes(),
                                         headers={"Content-Type": "application/dicom"})
            with urllib.request.urlopen(req, timeout=30) as rsp:
                assert json.loads(rsp.read())["Status"] in ("Success", "AlreadyStored")
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser(pacs: OrthancServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """OHIF on one origin and a fresh headless Chromium pointed at it."""
    viewer = ViewerServer(ohif_dist(), pacs.base)
    viewer.start()
    driver = chromium_driver(tmp_path_factory.mktemp("chromium-profile"))
    driver.viewer_base = viewer.base
    try:
        yield driver
    finally:
        driver.quit()
        viewer.stop()


def _wait(driver: Any, what: str, predicate: Any) -> Any:
    deadline = time.monotonic() + _TIMEOUT_S
    while time.monotonic() < deadline:
        found = predicate(driver)
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"OHIF did not show {what} within {_TIMEOUT_S:.0f} s")


def _thumbnail(driver: Any, modality: str) -> Any:
    from selenium.webdriver.common.by import By

    for el in driver.find_elements(By.CSS_SELECTOR, '[data-cy="series-modality-label"]'):
        if el.text.strip() == modality:
            return el
    return None


def _click_text(driver: Any, text: str) -> bool:
    from selenium.webdriver.common.by import By

    for el in driver.find_elements(By.XPATH, f"//button[normalize-space(.)='{text}']"):
        if el.is_displayed():
            el.click()
            return True
    return False


def test_ohif_shows_sr_measurements_and_seg_segments(
    browser: Any, study: dict[str, Any], tmp_path: Path
) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    driver = browser
    shots: list[Path] = []

    def shot(name: str) -> None:
        path = tmp_path / f"{len(shots) + 1:02d}-{name}.png"
        driver.save_screenshot(str(path))
        shots.append(path)

    driver.get(f"{driver.viewer_base}/viewer?StudyInstanceUIDs={study['study_uid']}")
    _wait(driver, "the study's series", lambda d: _thumbnail(d, "SR") and _thumbnail(d, "SEG"))
    time.sleep(2)
    _click_text(driver, "Skip all")  # the first-visit tour
    shot("study-opened")
    # Result series sort after the CT: the CT is the first series OHIF lists.
    numbers = [int(el.get_attribute("data-series"))
               for el in driver.find_elements(By.CSS_SELECTOR, "[data-series]")]
    assert numbers and numbers[0] == study["ct_series_number"], numbers
    assert all(n > study["ct_series_number"] for n in numbers[1:]), numbers

    # SR: open it, accept tracking, read the measurements panel.
    ActionChains(driver).double_click(_thumbnail(driver, "SR")).perform()
    _wait(driver, "the measurement tracking prompt", lambda d: _click_text(d, "Yes"))
    driver.find_element(By.CSS_SELECTOR, '[data-cy="trackedMeasurements-btn"]').click()
    expected = study["long_axes"]
    assert expected, "the SR has no planar measurement group"

    def panel_lengths(d: Any) -> list[float] | None:
        text = d.find_element(By.TAG_NAME, "body").text
        m = re.search(r"Measurements \((\d+)\)", text)
        values = [float(v) for v in re.findall(r"^L: ([0-9.]+) mm$", text, flags=re.M)]
        return values if m and int(m.group(1)) == len(expected) == len(values) else None

    shown = _wait(driver, f"{len(expected)} tracked measurements", panel_lengths)
    shot("sr-measurements")
    for uid, value in expected.items():
        close = [v for v in shown if abs(v - value) <= LONG_AXIS_TOLERANCE_MM]
        assert close, f"finding {uid}: SR long axis {value} mm not in the panel {shown}"
    assert len(shown) == len(expected)

    # SEG: open it and read the segmentation panel.
    ActionChains(driver).double_click(_thumbnail(driver, "SEG")).perform()
    time.sleep(3)
    driver.find_element(By.CSS_SELECTOR, '[data-cy="panelSegmentation-btn"]').click()

    def segments_listed(d: Any) -> bool:
        lines = {ln.strip() for ln in d.find_element(By.TAG_NAME, "body").text.splitlines()}
        return all(label in lines for label in study["segments"])

    _wait(driver, f"the segments {study['segments']}", segments_listed)
    shot("seg-segments")

    logs = driver.get_log("browser")
    (tmp_path / "console.json").write_text(json.dumps(logs, indent=1))
    ours = study["uids"] | {"CAD SR", "CAD SEG"}
    errors = [e["message"] for e in logs if e["level"] == "SEVERE"
              and any(name in e["message"] for name in ours)]
    assert errors == [], errors
    for path in shots:
        assert path.stat().st_size > 10_000, f"{path} looks blank"
