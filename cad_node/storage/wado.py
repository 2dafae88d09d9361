"""Read-only, token-protected, study-scoped WADO-RS for workers on other hosts.

The receiver stays the only writer of the spool.  A worker that does not
share ``storage_dir`` (``storage.fetch_url``) fetches its job's instances
from the receiver with the DICOMweb *Retrieve Instance* transaction
(PS3.18 10.4, ``GET {base}/studies/{study}/series/{series}/instances/{sop}``,
``multipart/related; type="application/dicom"``), presenting the job's
study-scoped token as ``Authorization: Bearer <token>``.

Contract
--------
* Read-only: the router has GET routes only; nothing a client sends is
  written anywhere, and files are found through the spool index by UID,
  never by building a path from a UID.
* Study-scoped: a token is ``HMAC-SHA256(key, study UID)``; it opens the
  instances of that study only (401 without a token, 403 for another study's
  token, 404 for an instance that is not in the named study and series).
  The key (32 random bytes, file mode 0600) never leaves the receiver; the
  receiver mints the token at the hand-off and the job row carries it.
  Rotating the key file revokes every token.
* :func:`create_app` builds a standalone FastAPI application (its own module
  and router: it can be mounted or served alone); :class:`WadoServer` runs it
  with uvicorn in a thread of ``cad-node serve`` when ``storage.wado_host``
  is set.
* :func:`fetch_study` (worker side) retries while the receiver is
  unreachable or restarting (connection refused, 5xx) for up to
  :data:`FETCH_HORIZON_S`, and fails at once on 401/403/404.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cad_node.storage.index import SpoolIndex
from cad_node.uids import validate_uid

__all__ = [
    "FETCH_HORIZON_S",
    "FetchError",
    "StudyTokens",
    "WadoServer",
    "create_app",
    "fetch_study",
    "load_or_create_key",
]

LOG = logging.getLogger(__name__)

#: Media type of one DICOM Part 10 instance (PS3.18 8.7.3).
DICOM_MEDIA_TYPE = "application/dicom"
#: How long a worker keeps retrying an unreachable receiver (seconds).
FETCH_HORIZON_S = 180.0
_KEY_BYTES = 32


class FetchError(RuntimeError):
    """The receiver refused a fetch (bad token, unknown instance) or stayed unreachable."""


def load_or_create_key(path: str | Path) -> bytes:
    """The token key in ``path``; created (random, mode 0600) when missing."""
    path = Path(path)
    if path.exists():
        key = path.read_bytes()
        if len(key) < _KEY_BYTES:
            raise ValueError(f"token key file {path} is shorter than {_KEY_BYTES} bytes")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, secrets.token_bytes(_KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    return path.read_bytes()


class StudyTokens:
    """Mints and checks study-scoped tokens (``HMAC-SHA256(key, study UID)``, hex)."""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def mint(self, study_instance_uid: str) -> str:
        """The token that opens ``study_instance_uid``."""
        return hmac.new(self._key, f"study:{study_instance_uid}".encode(),
                        hashlib.sha256).hexdigest()

    def verify(self, token: str, study_instance_uid: str) -> bool:
        """True when ``token`` opens ``study_instance_uid`` (constant-time compare)."""
        return hmac.compare_digest(token.encode(), self.mint(study_instance_uid).encode())


def _multipart(payload: bytes) -> tuple[bytes, str]:
    boundary = secrets.token_hex(16)
    body = (f"--{boundary}\r\nContent-Type: {DICOM_MEDIA_TYPE}\r\n\r\n".encode() + payload
            + f"\r\n--{boundary}--\r\n".encode())
    return body, f'multipart/related; type="{DICOM_MEDIA_TYPE}"; boundary={boundary}'


def create_app(index: SpoolIndex, tokens: StudyTokens) -> Any:
    """The FastAPI application serving *Retrieve Instance* from ``index``.

    Parameters
    ----------
    index : SpoolIndex
        The spool index (read only; a read-only index of another process works).
    tokens : StudyTokens
        Checks the bearer token of each request against the requested study.
    """
    from fastapi import APIRouter, FastAPI, Header, HTTPException, Response

    router = APIRouter()

    @router.get("/studies/{study}/series/{series}/instances/{sop}")
    def retrieve_instance(study: str, series: str, sop: str,
                          authorization: str | None = Header(default=None)) -> Response:
        if not authorization or not authorization.startswith("Bearer "):
            raise HTTPException(401, "bearer token required",
                                headers={"WWW-Authenticate": "Bearer"})
        for uid in (study, series, sop):
            try:
                validate_uid(uid)
            except ValueError:
                raise HTTPException(400, "invalid UID") from None
        if not tokens.verify(authorization[7:].strip(), study):
            raise HTTPException(403, "token does not open this study")
        instance_id = index.find_instance(sop)
        found = index.instance(instance_id) if instance_id is not None else None
        if (found is None or found.study_instance_uid != study
                or found.series_instance_uid != series):
            raise HTTPException(404, "no such instance in this study and series")
        body, content_type = _multipart(found.path.read_bytes())
        return Response(content=body, media_type=content_type)

    app = FastAPI(title="cad-node study fetch (WADO-RS, read-only)", openapi_url=None,
                  docs_url=None, redoc_url=None)
    app.include_router(router)
    return app


class WadoServer:
    """:func:`create_app` served by uvicorn in a daemon thread."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        import uvicorn

        self.host = host
        self.port = port
        self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port,
                                                     log_level="warning", access_log=False))
        self._thread = threading.Thread(target=self._server.run, name="wado", daemon=True)

    def start(self, timeout: float = 10.0) -> None:
        """Start serving; wait until the socket listens."""
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise OSError(f"WADO-RS endpoint {self.host}:{self.port} did not start")
            time.sleep(0.05)
        LOG.info("WADO-RS study fetch endpoint on %s:%d", self.host, self.port)

    def stop(self) -> None:
        """Stop serving."""
        self._server.should_exit = True
        self._thread.join(timeout=10)


def _part(body: bytes, content_type: str) -> bytes:
    """The first part of a ``multipart/related`` body."""
    marker = "boundary="
    if marker not in content_type:
        raise FetchError(f"not a multipart answer: {content_type!r}")
    boundary = content_type.split(marker, 1)[1].split(";", 1)[0].strip().strip('"')
    delimiter = b"--" + boundary.encode()
    start = body.find(delimiter)
    head_end = body.find(b"\r\n\r\n", start)
    end = body.find(b"\r\n" + delimiter, head_end)
    if start < 0 or head_end < 0 or end < 0:
        raise FetchError("malformed multipart/related answer")
    return body[head_end + 4:end]


def _get(url: str, token: str, timeout: float) -> bytes:
    deadline = time.monotonic() + FETCH_HORIZON_S
    delay = 0.2
    while True:
        req = urllib.request.Request(url, headers={
            "Authorization": f"Bearer {token}",
            "Accept": f'multipart/related; type="{DICOM_MEDIA_TYPE}"'})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as rsp:
                return _part(rsp.read(), rsp.headers.get("Content-Type", ""))
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                raise FetchError(f"receiver answered {exc.code} for {url}") from None
            error: str = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            error = str(exc)
        if time.monotonic() > deadline:
            raise FetchError(f"receiver unreachable for {FETCH_HORIZON_S:.0f} s: {error}")
        LOG.warning("fetch from the receiver failed (%s): retrying in %.1f s", error, delay)
        time.sleep(delay)
        delay = min(delay * 2, 5.0)


def fetch_study(base_url: str, token: str, instances: Sequence[Mapping[str, Any]],
                dest: Path, *, timeout: float = 60.0) -> list[Path]:
    """Fetch a job's instances from the receiver into ``dest`` (worker side).

    Parameters
    ----------
    base_url : str
        ``storage.fetch_url`` (e.g. ``http://receiver:8043``).
    token : str
        The job's study-scoped token.
    instances : sequence of mapping
        The job's instance records (study, series and SOP Instance UIDs).
    dest : Path
        Empty directory for the files, named ``NNNNNN.dcm`` by position.

    Returns
    -------
    list of Path
        The fetched files, in the order of ``instances``.

    Raises
    ------
    FetchError
        Refused (401/403/404) or unreachable past :data:`FETCH_HORIZON_S`.
    """
    dest.mkdir(parents=True, exist_ok=True)
    base = base_url.rstrip("/")
    out: list[Path] = []
    for n, rec in enumerate(instances):
        url = (f"{base}/studies/{rec['study_instance_uid']}/series/"
               f"{rec['series_instance_uid']}/instances/{rec['sop_instance_uid']}")
        path = dest / f"{n:06d}.dcm"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(_get(url, token, timeout))
        os.replace(tmp, path)
        out.append(path)
    return out
