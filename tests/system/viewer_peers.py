"""Real viewer peers for the browser test: OHIF's built app, a one-origin server, Chromium.

* **OHIF** is the npm package ``@ohif/app`` (its ``dist/`` is the built web
  app).  ``make ohif`` runs ``npm pack`` into the test cache
  (``CAD_NODE_TEST_CACHE``, default ``~/.cache/cad-node-test``); the tarball
  is unpacked once next to it and reused across runs.  Nothing of it is in git.
* :class:`ViewerServer` serves ``dist/`` with SPA fallback (unknown paths give
  ``index.html``), its own ``app-config.js`` pointing OHIF at ``/dicom-web``,
  and proxies ``/dicom-web/...`` to Orthanc's DICOMweb plugin: one origin, no
  CORS, nothing external, loopback only.
* :func:`chromium_driver` starts headless Debian Chromium through Debian's
  chromedriver (selenium), with a fresh profile and no background traffic.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import tarfile
import threading
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import free_port, in_ci, require_program

#: The OHIF release the test pins (``npm view @ohif/app versions``).
OHIF_VERSION = "3.13.2"
OHIF_TARBALL = f"ohif-app-{OHIF_VERSION}.tgz"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
#: Chromium flags: headless, no sandbox (root in CI), and no traffic of its own.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1600,1000",
)


def _missing(msg: str) -> None:
    if in_ci():
        pytest.fail(msg + " — required under CI=true")
    pytest.skip(msg)


def test_cache() -> Path:
    """Directory the browser test reuses across runs (``CAD_NODE_TEST_CACHE``)."""
    env = os.environ.get("CAD_NODE_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "cad-node-test"


test_cache.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def ohif_dist() -> Path:
    """The built OHIF app (``dist/``), unpacked from the cached npm tarball."""
    cache = test_cache() / "ohif"
    tarball = cache / OHIF_TARBALL
    dist = cache / OHIF_VERSION / "package" / "dist"
    if (dist / "index.html").is_file():
        return dist
    if not tarball.is_file():
        _missing(f"OHIF tarball {tarball} is missing (make ohif)")
    target = cache / OHIF_VERSION
    tmp = cache / f".{OHIF_VERSION}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tarball) as tf:
        tf.extractall(tmp, filter="data")
    if not (tmp / "package" / "dist" / "index.html").is_file():
        _missing(f"{tarball} has no built dist/index.html")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return dist


def app_config(dicomweb: str = "/dicom-web") -> str:
    """OHIF ``app-config.js``: one DICOMweb data source on our own origin."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": "dicomweb",
        "configuration": {
            "friendlyName": "cad-node test PACS (Orthanc)",
            "name": "orthanc",
            "wadoUriRoot": dicomweb,
            "qidoRoot": dicomweb,
            "wadoRoot": dicomweb,
            "qidoSupportsIncludeField": False,
            "supportsReject": False,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "staticWado": False,
            "singlepart": "bulkdata,video",
            "bulkDataURI": {"enabled": True, "relativeResolution": "studies"},
            "omitQuotationForMultipartRequest": True,
        },
    }
    config = {
        "routerBasename": "/",
        "showStudyList": True,
        "extensions": [],
        "modes": [],
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": False,
        "showLoadingIndicator": True,
        "maxNumberOfWebWorkers": 1,
        "investigationalUseDialog": {"option": "never"},
        "defaultDataSourceName": "dicomweb",
        "dataSources": [source],
    }
    return "window.config = " + json.dumps(config, indent=2) + ";\n"


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        self.server.log.append(format % args)

    def _proxy(self) -> None:
        url = self.server.upstream + self.path
        body = None
        if self.command == "POST":
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        headers = {k: v for k, v in self.headers.items()
                   if k.lower() in ("accept", "content-type", "range")}
        req = urllib.request.Request(url, data=body, method=self.command, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=60) as rsp:
                status, rsp_headers, data = rsp.status, rsp.headers, rsp.read()
        except urllib.error.HTTPError as exc:
            status, rsp_headers, data = exc.code, exc.headers, exc.read()
        self.send_response(status)
        for k, v in rsp_headers.items():
            if k.lower() in ("content-type", "content-encoding"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith("/dicom-web/"):
            self._proxy()
            return
        if path == "/app-config.js":
            data = self.server.config_js.encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/javascript")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        local = Path(self.translate_path(path))
        if not local.is_file():
            self.path = "/index.html"  # SPA fallback: the app routes it
        super().do_GET()

    def do_POST(self) -> None:
        if self.path.startswith("/dicom-web/"):
            self._proxy()
        else:
            self.send_error(405)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    upstream: str
    config_js: str
    log: list[str]


class ViewerServer:
    """``dist/`` + ``app-config.js`` + ``/dicom-web`` proxy on ``127.0.0.1:<free port>``."""

    def __init__(self, dist: Path, orthanc_base: str) -> None:
        self.dist = dist
        self.port = free_port()
        handler = lambda *a, **kw: _Handler(*a, directory=str(dist), **kw)  # noqa: E731
        self.httpd = _Server(("127.0.0.1", self.port), handler)
        self.httpd.upstream = orthanc_base
        self.httpd.config_js = app_config()
        self.httpd.log = []
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        """The origin, e.g. ``http://127.0.0.1:5xxxx``."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Serve in a background thread."""
        self.thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.httpd.shutdown()
        self.httpd.server_close()


def chromium_driver(profile_dir: Path) -> Any:
    """Headless Chromium under selenium, console logs captured, fresh ``profile_dir``."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        _missing("selenium is not installed (pip install -e '.[dev]')")
    chromium = require_program(CHROMIUM)
    driver_exe = require_program(CHROMEDRIVER)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile_dir}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=driver_exe)
    return webdriver.Chrome(service=service, options=options)


def require_dicomweb_plugin() -> str:
    """Path of Debian's Orthanc DICOMweb plugin; skip (fail under CI) when absent."""
    if not os.path.isfile(DICOMWEB_PLUGIN):
        _missing(f"Orthanc DICOMweb plugin {DICOMWEB_PLUGIN} is missing (make peers)")
    return DICOMWEB_PLUGIN
